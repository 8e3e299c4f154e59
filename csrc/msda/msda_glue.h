// Tensor checks shared by the CPU and CUDA glue of multi-scale deformable attention.
// Turns the ATen arguments into the torch-free Sizes struct of msda_cpu.h.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include "msda_cpu.h"

namespace piip {
namespace msda {

inline Sizes check_and_sizes(const at::Tensor& value, const at::Tensor& shapes,
                             const at::Tensor& starts, const at::Tensor& loc,
                             const at::Tensor& attn, bool cuda) {
  TORCH_CHECK(value.dim() == 4, "ms_deform_attn: value must be [N, S, M, D], got ", value.sizes());
  TORCH_CHECK(loc.dim() == 6 && loc.size(5) == 2,
              "ms_deform_attn: sampling_locations must be [N, Lq, M, L, P, 2], got ", loc.sizes());
  TORCH_CHECK(attn.dim() == 5, "ms_deform_attn: attention_weights must be [N, Lq, M, L, P], got ",
              attn.sizes());
  Sizes z{value.size(0), value.size(1), value.size(2), value.size(3),
          loc.size(1),   loc.size(3),   loc.size(4)};
  TORCH_CHECK(loc.size(0) == z.N && loc.size(2) == z.M,
              "ms_deform_attn: sampling_locations batch/heads do not match value");
  TORCH_CHECK(attn.sizes() == loc.sizes().slice(0, 5),
              "ms_deform_attn: attention_weights must be sampling_locations.shape[:5]");
  TORCH_CHECK(shapes.dim() == 2 && shapes.size(0) == z.L && shapes.size(1) == 2 &&
                  shapes.scalar_type() == at::kLong,
              "ms_deform_attn: spatial_shapes must be int64 [L, 2] with L = ", z.L);
  TORCH_CHECK(starts.dim() == 1 && starts.size(0) == z.L && starts.scalar_type() == at::kLong,
              "ms_deform_attn: level_start_index must be int64 [L] with L = ", z.L);
  TORCH_CHECK(loc.scalar_type() == attn.scalar_type(),
              "ms_deform_attn: sampling_locations and attention_weights must share a dtype");
  for (const at::Tensor* t : {&value, &loc, &attn, &shapes, &starts}) {
    TORCH_CHECK(t->device() == value.device(), "ms_deform_attn: all tensors must be on one device");
    TORCH_CHECK(cuda ? t->is_cuda() : t->is_cpu(), "ms_deform_attn: expected ",
                cuda ? "CUDA" : "CPU", " tensors");
  }
  if (!cuda) {
    // Levels must tile value exactly, or the kernel would read out of bounds.
    auto sp = shapes.contiguous();
    auto st = starts.contiguous();
    const std::string problem = level_problem(sp.const_data_ptr<int64_t>(), st.const_data_ptr<int64_t>(), z.L, z.S);
    TORCH_CHECK(problem.empty(), "ms_deform_attn: ", problem);
  }
  return z;
}

inline void check_grad_output(const at::Tensor& grad_output, const at::Tensor& value,
                              const Sizes& z) {
  TORCH_CHECK(grad_output.dim() == 3 && grad_output.size(0) == z.N &&
                  grad_output.size(1) == z.Lq && grad_output.size(2) == z.M * z.D,
              "ms_deform_attn backward: grad_output must be [N, Lq, M*D]");
  TORCH_CHECK(grad_output.scalar_type() == value.scalar_type() &&
                  grad_output.device() == value.device(),
              "ms_deform_attn backward: grad_output must match value's dtype and device");
}

}  // namespace msda
}  // namespace piip
