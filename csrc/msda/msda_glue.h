// Tensor checks shared by the CPU and CUDA glue of multi-scale deformable attention.
// Turns the stable-ABI tensors into the torch-free Sizes struct of msda_cpu.h.
#pragma once

#include "../common/tensor_glue.h"
#include "msda_cpu.h"

namespace piip {
namespace msda {

inline Sizes check_and_sizes(const Tensor& value, const Tensor& shapes, const Tensor& starts, const Tensor& loc,
                             const Tensor& attn, bool cuda) {
  STD_TORCH_CHECK(value.dim() == 4, "ms_deform_attn: value must be [N, S, M, D], got ", shape_str(value));
  STD_TORCH_CHECK(loc.dim() == 6 && loc.size(5) == 2,
                  "ms_deform_attn: sampling_locations must be [N, Lq, M, L, P, 2], got ", shape_str(loc));
  STD_TORCH_CHECK(attn.dim() == 5, "ms_deform_attn: attention_weights must be [N, Lq, M, L, P], got ",
                  shape_str(attn));
  Sizes z{value.size(0), value.size(1), value.size(2), value.size(3), loc.size(1), loc.size(3), loc.size(4)};
  STD_TORCH_CHECK(loc.size(0) == z.N && loc.size(2) == z.M,
                  "ms_deform_attn: sampling_locations batch/heads do not match value");
  bool same = true;
  for (int64_t d = 0; d < 5; ++d) same = same && attn.size(d) == loc.size(d);
  STD_TORCH_CHECK(same, "ms_deform_attn: attention_weights must be sampling_locations.shape[:5]");
  STD_TORCH_CHECK(shapes.dim() == 2 && shapes.size(0) == z.L && shapes.size(1) == 2 &&
                      shapes.scalar_type() == ScalarType::Long,
                  "ms_deform_attn: spatial_shapes must be int64 [L, 2] with L = ", z.L);
  STD_TORCH_CHECK(starts.dim() == 1 && starts.size(0) == z.L && starts.scalar_type() == ScalarType::Long,
                  "ms_deform_attn: level_start_index must be int64 [L] with L = ", z.L);
  STD_TORCH_CHECK(loc.scalar_type() == attn.scalar_type(),
                  "ms_deform_attn: sampling_locations and attention_weights must share a dtype");
  for (const Tensor* t : {&value, &loc, &attn, &shapes, &starts}) {
    STD_TORCH_CHECK(same_device(*t, value), "ms_deform_attn: all tensors must be on one device");
    STD_TORCH_CHECK(cuda ? t->is_cuda() : t->is_cpu(), "ms_deform_attn: expected ", cuda ? "CUDA" : "CPU",
                    " tensors");
  }
  if (!cuda) {
    // Levels must tile value exactly, or the kernel would read out of bounds.
    const Tensor sp = contig(shapes);
    const Tensor st = contig(starts);
    const int64_t* s = sp.const_data_ptr<int64_t>();
    const int64_t* b = st.const_data_ptr<int64_t>();
    int64_t total = 0;
    for (int64_t l = 0; l < z.L; ++l) {
      STD_TORCH_CHECK(s[2 * l] > 0 && s[2 * l + 1] > 0, "ms_deform_attn: level ", l, " is empty");
      STD_TORCH_CHECK(b[l] == total, "ms_deform_attn: level_start_index[", l, "] = ", b[l], ", expected ", total);
      total += s[2 * l] * s[2 * l + 1];
    }
    STD_TORCH_CHECK(total == z.S, "ms_deform_attn: spatial_shapes cover ", total, " rows, value has S = ", z.S);
  }
  return z;
}

inline void check_grad_output(const Tensor& grad_output, const Tensor& value, const Sizes& z) {
  STD_TORCH_CHECK(grad_output.dim() == 3 && grad_output.size(0) == z.N && grad_output.size(1) == z.Lq &&
                      grad_output.size(2) == z.M * z.D,
                  "ms_deform_attn backward: grad_output must be [N, Lq, M*D]");
  STD_TORCH_CHECK(grad_output.scalar_type() == value.scalar_type() && same_device(grad_output, value),
                  "ms_deform_attn backward: grad_output must match value's dtype and device");
}

}  // namespace msda
}  // namespace piip
