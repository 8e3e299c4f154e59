// Tensor checks shared by the CPU and CUDA glue of deform_cross_attn.
#pragma once

#include "../common/tensor_glue.h"
#include "dca_cpu.h"

namespace piip {
namespace dca {

inline Sizes check_and_sizes(const Tensor& value, const Tensor& offsets, const Tensor& logits, int64_t Hv, int64_t Wv,
                             int64_t Hq, int64_t Wq, bool cuda = false) {
  STD_TORCH_CHECK(value.dim() == 4, "deform_cross_attn: value must be [N, Hv*Wv, M, D], got ", shape_str(value));
  STD_TORCH_CHECK(offsets.dim() == 5 && offsets.size(4) == 2,
                  "deform_cross_attn: offsets must be [N, Hq*Wq, M, P, 2], got ", shape_str(offsets));
  STD_TORCH_CHECK(Hv > 0 && Wv > 0 && Hq > 0 && Wq > 0, "deform_cross_attn: grid sizes must be positive");
  Sizes z{value.size(0), Hv, Wv, value.size(2), value.size(3), Hq, Wq, offsets.size(3)};
  STD_TORCH_CHECK(value.size(1) == z.S(), "deform_cross_attn: value has ", value.size(1), " rows, value_hw gives ",
                  z.S());
  STD_TORCH_CHECK(offsets.size(0) == z.N && offsets.size(1) == z.Lq() && offsets.size(2) == z.M,
                  "deform_cross_attn: offsets ", shape_str(offsets), " do not match value and query_hw");
  bool same = logits.dim() == 4;
  for (int64_t d = 0; same && d < 4; ++d) same = logits.size(d) == offsets.size(d);
  STD_TORCH_CHECK(same, "deform_cross_attn: logits must be offsets.shape[:4]");
  STD_TORCH_CHECK(offsets.scalar_type() == logits.scalar_type(),
                  "deform_cross_attn: offsets and logits must share a dtype");
  STD_TORCH_CHECK(z.P > 0, "deform_cross_attn: at least one point is needed");
  for (const Tensor* t : {&value, &offsets, &logits}) {
    STD_TORCH_CHECK(cuda ? t->is_cuda() : t->is_cpu(), "deform_cross_attn: expected ", cuda ? "CUDA" : "CPU",
                    " tensors");
    STD_TORCH_CHECK(same_device(*t, value), "deform_cross_attn: all tensors must be on one device");
  }
  return z;
}

inline void check_grad_output(const Tensor& grad_output, const Tensor& value, const Sizes& z) {
  STD_TORCH_CHECK(grad_output.dim() == 3 && grad_output.size(0) == z.N && grad_output.size(1) == z.Lq() &&
                      grad_output.size(2) == z.M * z.D && grad_output.scalar_type() == value.scalar_type(),
                  "deform_cross_attn: grad_output must be [N, Lq, M*D] in value's dtype, got ",
                  shape_str(grad_output));
}

}  // namespace dca
}  // namespace piip
