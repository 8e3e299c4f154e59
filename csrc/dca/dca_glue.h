// Tensor checks shared by the CPU and CUDA glue of deform_cross_attn.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include "dca_cpu.h"

namespace piip {
namespace dca {

inline Sizes check_and_sizes(const at::Tensor& value, const at::Tensor& offsets, const at::Tensor& logits,
                             int64_t Hv, int64_t Wv, int64_t Hq, int64_t Wq, bool cuda = false) {
  TORCH_CHECK(value.dim() == 4, "deform_cross_attn: value must be [N, Hv*Wv, M, D], got ", value.sizes());
  TORCH_CHECK(offsets.dim() == 5 && offsets.size(4) == 2,
              "deform_cross_attn: offsets must be [N, Hq*Wq, M, P, 2], got ", offsets.sizes());
  TORCH_CHECK(Hv > 0 && Wv > 0 && Hq > 0 && Wq > 0, "deform_cross_attn: grid sizes must be positive");
  Sizes z{value.size(0), Hv, Wv, value.size(2), value.size(3), Hq, Wq, offsets.size(3)};
  TORCH_CHECK(grid_has(Hv, Wv, value.size(1)), "deform_cross_attn: value has ", value.size(1), " rows, value_hw is ", Hv,
              " x ", Wv);
  TORCH_CHECK(offsets.size(0) == z.N && grid_has(Hq, Wq, offsets.size(1)) && offsets.size(2) == z.M,
              "deform_cross_attn: offsets ", offsets.sizes(), " do not match value and query_hw");
  TORCH_CHECK(logits.sizes() == offsets.sizes().slice(0, 4),
              "deform_cross_attn: logits must be offsets.shape[:4]");
  TORCH_CHECK(offsets.scalar_type() == logits.scalar_type(), "deform_cross_attn: offsets and logits must share a dtype");
  TORCH_CHECK(z.P > 0, "deform_cross_attn: at least one point is needed");
  for (const at::Tensor* t : {&value, &offsets, &logits}) {
    TORCH_CHECK(cuda ? t->is_cuda() : t->is_cpu(), "deform_cross_attn: expected ", cuda ? "CUDA" : "CPU", " tensors");
    TORCH_CHECK(t->device() == value.device(), "deform_cross_attn: all tensors must be on one device");
  }
  return z;
}

}  // namespace dca
}  // namespace piip
