// Glue between ATen tensors and the torch-free CPU kernels of dca_cpu.h
// (piip_C::dca_forward / piip_C::dca_backward). Friendly input checks live in
// piip_kernels/dca/api.py; the checks here guard memory safety.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros_like.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "../common/cpu_glue.h"
#include "dca_cpu.h"
#include "dca_glue.h"

namespace piip {
namespace dca {
namespace {

at::Tensor dca_forward_cpu(const at::Tensor& value_, const at::Tensor& offsets_, const at::Tensor& logits_,
                           int64_t Hv, int64_t Wv, int64_t Hq, int64_t Wq) {
  const Sizes z = check_and_sizes(value_, offsets_, logits_, Hv, Wv, Hq, Wq);
  auto value = value_.contiguous();
  auto offsets = offsets_.contiguous();
  auto logits = logits_.contiguous();
  auto out = at::empty({z.N, z.Lq(), z.M * z.D}, value.options());
  cpu::dispatch_types("deform_cross_attn", value.scalar_type(), offsets.scalar_type(), [&]<typename T, typename U>() {
    using acc_t = typename cpu::Acc<T>::type;
    const T* v = value.const_data_ptr<T>();
    const U* off = offsets.const_data_ptr<U>();
    const U* lg = logits.const_data_ptr<U>();
    T* o = out.mutable_data_ptr<T>();
    at::parallel_for(0, z.N * z.Lq(), cpu::grain(z.M * z.P * 5 * z.D), [&](int64_t b, int64_t e) {
      std::vector<acc_t> acc(z.D), w(z.P);
      cpu::with_head_dim(z.D, [&]<int kD>() {
        forward_rows<T, U, acc_t, kD>(z, v, off, lg, o, b, e, acc.data(), w.data());
      });
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> dca_backward_cpu(
    const at::Tensor& grad_output, const at::Tensor& value_, const at::Tensor& offsets_,
    const at::Tensor& logits_, int64_t Hv, int64_t Wv, int64_t Hq, int64_t Wq, bool /*deterministic: always*/) {
  const Sizes z = check_and_sizes(value_, offsets_, logits_, Hv, Wv, Hq, Wq);
  TORCH_CHECK(grad_output.dim() == 3 && grad_output.size(0) == z.N && grad_output.size(1) == z.Lq() &&
                  grad_output.size(2) == z.M * z.D && grad_output.scalar_type() == value_.scalar_type(),
              "deform_cross_attn: grad_output must be [N, Lq, M*D] in value's dtype, got ", grad_output.sizes());
  auto value = value_.contiguous();
  auto offsets = offsets_.contiguous();
  auto logits = logits_.contiguous();
  auto go = grad_output.contiguous();
  if (z.N * z.Lq() * z.M * z.D == 0) {
    return {at::zeros_like(value), at::zeros_like(offsets), at::zeros_like(logits)};
  }
  const auto acc_type = value.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto gv = at::empty(value.sizes(), value.options().dtype(acc_type));
  cpu::zero_parallel(gv);
  auto goff = at::empty(offsets.sizes(), offsets.options());
  auto glog = at::empty(logits.sizes(), logits.options());
  cpu::dispatch_types("deform_cross_attn", value.scalar_type(), offsets.scalar_type(), [&]<typename T, typename U>() {
    using acc_t = typename cpu::Acc<T>::type;
    // A task is one image and a block of heads, owning that slice of grad_value
    // (see the ms_deform_attn backward for why heads are split only as needed).
    const int64_t threads = at::get_num_threads();
    const int64_t chunks = std::min<int64_t>(z.M, std::max<int64_t>(1, (threads + z.N - 1) / z.N));
    const int64_t per = (z.M + chunks - 1) / chunks;
    at::parallel_for(0, z.N * chunks, 1, [&](int64_t b, int64_t e) {
      std::vector<acc_t> g(z.D), w(z.P), gw(z.P);
      for (int64_t u = b; u < e; ++u) {
        const int64_t n = u / chunks, m0 = (u % chunks) * per, m1 = std::min(z.M, m0 + per);
        cpu::with_head_dim(z.D, [&]<int kD>() {
          backward_heads<T, U, acc_t, kD>(z, value.const_data_ptr<T>(), offsets.const_data_ptr<U>(),
                                          logits.const_data_ptr<U>(), go.const_data_ptr<T>(),
                                          gv.mutable_data_ptr<acc_t>(), goff.mutable_data_ptr<U>(),
                                          glog.mutable_data_ptr<U>(), n, m0, m1, g.data(), w.data(), gw.data());
        });
      }
    });
  });
  return {gv.to(value.scalar_type()), goff, glog};
}

}  // namespace
}  // namespace dca
}  // namespace piip

TORCH_LIBRARY_IMPL(piip_C, CPU, m) {
  m.impl("dca_forward", &piip::dca::dca_forward_cpu);
  m.impl("dca_backward", &piip::dca::dca_backward_cpu);
}
