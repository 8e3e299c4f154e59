// Tensor checks shared by the CPU and CUDA glue of multi-scale deformable attention.
// Turns the stable-ABI tensors into the torch-free Sizes struct of msda_cpu.h.
#pragma once

#include "../common/tensor_glue.h"
#include "msda_cpu.h"

namespace piip {
namespace msda {

inline Sizes check_and_sizes(const Tensor& value, const Tensor& shapes, const Tensor& starts, const Tensor& loc,
                             const Tensor& attn, bool cuda) {
  const Meta v(value), sh(shapes), st(starts), l(loc), a(attn);
  STD_TORCH_CHECK(v.dim == 4, "ms_deform_attn: value must be [N, S, M, D], got ", v.shape());
  STD_TORCH_CHECK(l.dim == 6 && l.size(5) == 2, "ms_deform_attn: sampling_locations must be [N, Lq, M, L, P, 2], got ",
                  l.shape());
  STD_TORCH_CHECK(a.dim == 5, "ms_deform_attn: attention_weights must be [N, Lq, M, L, P], got ", a.shape());
  Sizes z{v.size(0), v.size(1), v.size(2), v.size(3), l.size(1), l.size(3), l.size(4)};
  STD_TORCH_CHECK(l.size(0) == z.N && l.size(2) == z.M, "ms_deform_attn: sampling_locations batch/heads do not match value");
  STD_TORCH_CHECK(a.same_sizes(l, 5), "ms_deform_attn: attention_weights must be sampling_locations.shape[:5]");
  STD_TORCH_CHECK(sh.dim == 2 && sh.size(0) == z.L && sh.size(1) == 2 && sh.dtype == ScalarType::Long,
                  "ms_deform_attn: spatial_shapes must be int64 [L, 2] with L = ", z.L);
  STD_TORCH_CHECK(st.dim == 1 && st.size(0) == z.L && st.dtype == ScalarType::Long,
                  "ms_deform_attn: level_start_index must be int64 [L] with L = ", z.L);
  STD_TORCH_CHECK(l.dtype == a.dtype, "ms_deform_attn: sampling_locations and attention_weights must share a dtype");
  for (const Meta* t : {&v, &l, &a, &sh, &st}) {
    STD_TORCH_CHECK(t->same_device(v), "ms_deform_attn: all tensors must be on one device");
    STD_TORCH_CHECK(cuda ? t->is_cuda() : t->is_cpu(), "ms_deform_attn: expected ", cuda ? "CUDA" : "CPU", " tensors");
  }
  if (!cuda) {
    // Levels must tile value exactly, or the kernel would read out of bounds.
    const Tensor sp = contig(shapes);
    const Tensor sa = contig(starts);
    // Overflow-safe: the running total never passes S (msda_cpu.h), whatever the level sizes.
    const std::string problem = level_problem(ptr<int64_t>(sp), ptr<int64_t>(sa), z.L, z.S);
    STD_TORCH_CHECK(problem.empty(), "ms_deform_attn: ", problem);
  }
  return z;
}

inline void check_grad_output(const Tensor& grad_output, const Tensor& value, const Sizes& z) {
  const Meta g(grad_output), v(value);
  STD_TORCH_CHECK(g.dim == 3 && g.size(0) == z.N && g.size(1) == z.Lq && g.size(2) == z.M * z.D,
                  "ms_deform_attn backward: grad_output must be [N, Lq, M*D]");
  STD_TORCH_CHECK(g.dtype == v.dtype && g.same_device(v),
                  "ms_deform_attn backward: grad_output must match value's dtype and device");
}

}  // namespace msda
}  // namespace piip
