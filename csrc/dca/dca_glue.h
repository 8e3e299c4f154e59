// Tensor checks shared by the CPU and CUDA glue of deform_cross_attn.
#pragma once

#include "../common/tensor_glue.h"
#include "dca_cpu.h"

namespace piip {
namespace dca {

inline Sizes check_and_sizes(const Tensor& value, const Tensor& offsets, const Tensor& logits, int64_t Hv, int64_t Wv,
                             int64_t Hq, int64_t Wq, bool cuda = false) {
  const Meta v(value), o(offsets), l(logits);
  STD_TORCH_CHECK(v.dim == 4, "deform_cross_attn: value must be [N, Hv*Wv, M, D], got ", v.shape());
  STD_TORCH_CHECK(o.dim == 5 && o.size(4) == 2, "deform_cross_attn: offsets must be [N, Hq*Wq, M, P, 2], got ",
                  o.shape());
  STD_TORCH_CHECK(Hv > 0 && Wv > 0 && Hq > 0 && Wq > 0, "deform_cross_attn: grid sizes must be positive");
  Sizes z{v.size(0), Hv, Wv, v.size(2), v.size(3), Hq, Wq, o.size(3)};
  // grid_has compares without forming H * W, which may overflow int64 (dca_cpu.h).
  STD_TORCH_CHECK(grid_has(Hv, Wv, v.size(1)), "deform_cross_attn: value has ", v.size(1), " rows, value_hw is ", Hv,
                  " x ", Wv);
  STD_TORCH_CHECK(o.size(0) == z.N && grid_has(Hq, Wq, o.size(1)) && o.size(2) == z.M, "deform_cross_attn: offsets ",
                  o.shape(), " do not match value and query_hw");
  STD_TORCH_CHECK(l.dim == 4 && l.same_sizes(o, 4), "deform_cross_attn: logits must be offsets.shape[:4]");
  STD_TORCH_CHECK(o.dtype == l.dtype, "deform_cross_attn: offsets and logits must share a dtype");
  STD_TORCH_CHECK(z.P > 0, "deform_cross_attn: at least one point is needed");
  for (const Meta* t : {&v, &o, &l}) {
    STD_TORCH_CHECK(cuda ? t->is_cuda() : t->is_cpu(), "deform_cross_attn: expected ", cuda ? "CUDA" : "CPU",
                    " tensors");
    STD_TORCH_CHECK(t->same_device(v), "deform_cross_attn: all tensors must be on one device");
  }
  return z;
}

inline void check_grad_output(const Tensor& grad_output, const Tensor& value, const Sizes& z) {
  const Meta g(grad_output);
  STD_TORCH_CHECK(g.dim == 3 && g.size(0) == z.N && g.size(1) == z.Lq() && g.size(2) == z.M * z.D &&
                      g.dtype == Meta(value).dtype,
                  "deform_cross_attn: grad_output must be [N, Lq, M*D] in value's dtype, got ", g.shape());
}

}  // namespace dca
}  // namespace piip
