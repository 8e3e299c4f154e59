// Glue between stable-ABI tensors and the torch-free CPU kernels of dca_cpu.h
// (piip_C::dca_forward / piip_C::dca_backward). Friendly input checks live in
// piip_kernels/dca/api.py; the checks here guard memory safety.
#include <algorithm>
#include <vector>

#include "../common/cpu_glue.h"
#include "dca_cpu.h"
#include "dca_glue.h"

namespace piip {
namespace dca {
namespace {

Tensor dca_forward_cpu(const Tensor& value_, const Tensor& offsets_, const Tensor& logits_, int64_t Hv, int64_t Wv,
                       int64_t Hq, int64_t Wq) {
  const Sizes z = check_and_sizes(value_, offsets_, logits_, Hv, Wv, Hq, Wq);
  const Tensor value = contig(value_), offsets = contig(offsets_), logits = contig(logits_);
  Tensor out = alloc({z.N, z.Lq(), z.M * z.D}, value.scalar_type(), value);
  cpu::dispatch_types("deform_cross_attn", value.scalar_type(), offsets.scalar_type(), [&]<typename T, typename U>() {
    using acc_t = typename cpu::Acc<T>::type;
    const T* v = ptr<T>(value);
    const U* off = ptr<U>(offsets);
    const U* lg = ptr<U>(logits);
    T* o = mut_ptr<T>(out);
    cpu::parallel_for(0, z.N * z.Lq(), cpu::grain(z.M * z.P * 5 * z.D), [&](int64_t b, int64_t e) {
      std::vector<acc_t> acc(z.D), w(z.P);
      cpu::with_head_dim(z.D, [&]<int kD>() {
        forward_rows<T, U, acc_t, kD>(z, v, off, lg, o, b, e, acc.data(), w.data());
      });
    });
  });
  return out;
}

std::tuple<Tensor, Tensor, Tensor> dca_backward_cpu(const Tensor& grad_output, const Tensor& value_,
                                                    const Tensor& offsets_, const Tensor& logits_, int64_t Hv,
                                                    int64_t Wv, int64_t Hq, int64_t Wq,
                                                    bool /*deterministic: always*/) {
  const Sizes z = check_and_sizes(value_, offsets_, logits_, Hv, Wv, Hq, Wq);
  check_grad_output(grad_output, value_, z);
  const Tensor value = contig(value_), offsets = contig(offsets_), logits = contig(logits_);
  const Tensor go = contig(grad_output);
  if (z.N * z.Lq() * z.M * z.D == 0) {
    return {zeros_as(value), zeros_as(offsets), zeros_as(logits)};
  }
  const ScalarType acc_type = value.scalar_type() == ScalarType::Double ? ScalarType::Double : ScalarType::Float;
  Tensor gv = alloc(sizes_of(value), acc_type, value);
  cpu::zero_parallel(gv);
  Tensor goff = alloc_like(offsets);
  Tensor glog = alloc_like(logits);
  cpu::dispatch_types("deform_cross_attn", value.scalar_type(), offsets.scalar_type(), [&]<typename T, typename U>() {
    using acc_t = typename cpu::Acc<T>::type;
    const T* v = ptr<T>(value);
    const U* off = ptr<U>(offsets);
    const U* lg = ptr<U>(logits);
    const T* g_out = ptr<T>(go);
    acc_t* g_value = mut_ptr<acc_t>(gv);
    U* g_off = mut_ptr<U>(goff);
    U* g_log = mut_ptr<U>(glog);
    // A task is one image and a block of heads, owning that slice of grad_value
    // (see the ms_deform_attn backward for why heads are split only as needed).
    const int64_t threads = cpu::num_threads();
    const int64_t chunks = std::min<int64_t>(z.M, std::max<int64_t>(1, (threads + z.N - 1) / z.N));
    const int64_t per = (z.M + chunks - 1) / chunks;
    cpu::parallel_for(0, z.N * chunks, 1, [&](int64_t b, int64_t e) {
      std::vector<acc_t> g(z.D), w(z.P), gw(z.P);
      for (int64_t u = b; u < e; ++u) {
        const int64_t n = u / chunks, m0 = (u % chunks) * per, m1 = std::min(z.M, m0 + per);
        cpu::with_head_dim(z.D, [&]<int kD>() {
          backward_heads<T, U, acc_t, kD>(z, v, off, lg, g_out, g_value, g_off, g_log, n, m0, m1, g.data(), w.data(),
                                          gw.data());
        });
      }
    });
  });
  return {cast(gv, value.scalar_type()), goff, glog};
}

}  // namespace
}  // namespace dca
}  // namespace piip

static const piip::Kernels kernels("CPU", {{"dca_forward", TORCH_BOX(&piip::dca::dca_forward_cpu)},
                                           {"dca_backward", TORCH_BOX(&piip::dca::dca_backward_cpu)}});
