// Glue between ATen tensors and the torch-free CUDA kernels of dca_cuda.cuh:
// registers piip_C::dca_forward / piip_C::dca_backward for CUDA tensors.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cmath>

#include "../common/cuda_glue.h"
#include "dca_cuda.cuh"
#include "dca_glue.h"

namespace piip {
namespace dca {
namespace {

using cuda_glue::Device;
using cuda_glue::dev_mut_ptr;
using cuda_glue::dev_ptr;

template <typename T, typename U>
cuda::Params<typename Device<T>::type, typename Device<U>::type> params(const Sizes& z, const at::Tensor& value,
                                                                       const at::Tensor& offsets, const at::Tensor& logits) {
  return {dev_ptr<T>(value), dev_ptr<U>(offsets), dev_ptr<U>(logits), z.N, z.Hv, z.Wv, z.Hq, z.Wq, z.M, z.D, z.P};
}

void check_points(const Sizes& z) {
  TORCH_CHECK(z.P <= cuda::kMaxP, "deform_cross_attn (cuda): at most ", cuda::kMaxP,
              " points per head (got ", z.P, "); use the triton, cpu or reference backend");
}

at::Tensor dca_forward_cuda(const at::Tensor& value_, const at::Tensor& offsets_, const at::Tensor& logits_, int64_t Hv,
                            int64_t Wv, int64_t Hq, int64_t Wq) {
  const Sizes z = check_and_sizes(value_, offsets_, logits_, Hv, Wv, Hq, Wq, /*cuda=*/true);
  check_points(z);
  const c10::cuda::CUDAGuard guard(value_.device());
  auto value = value_.contiguous(), offsets = offsets_.contiguous(), logits = logits_.contiguous();
  auto out = at::empty({z.N, z.Lq(), z.M * z.D}, value.options());
  if (out.numel() == 0) return out;
  auto stream = c10::cuda::getCurrentCUDAStream().stream();
  cuda_glue::dispatch("deform_cross_attn", value.scalar_type(), offsets.scalar_type(), [&]<typename T, typename U>() {
    using DT = typename Device<T>::type;
    const auto p = params<T, U>(z, value, offsets, logits);
    DT* o = dev_mut_ptr<T>(out);
    const int v = msda::cuda::vector_width<DT>(z.D, reinterpret_cast<uintptr_t>(p.value), reinterpret_cast<uintptr_t>(o));
    cuda_glue::check_launch("deform_cross_attn forward", msda::cuda::with_vector_width<DT>(v, [&]<int V>() {
      return cuda::launch_forward<DT, typename Device<U>::type, V>(p, o, stream);
    }));
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> dca_backward_cuda(const at::Tensor& grad_output, const at::Tensor& value_,
                                                                 const at::Tensor& offsets_, const at::Tensor& logits_,
                                                                 int64_t Hv, int64_t Wv, int64_t Hq, int64_t Wq,
                                                                 bool deterministic) {
  const Sizes z = check_and_sizes(value_, offsets_, logits_, Hv, Wv, Hq, Wq, /*cuda=*/true);
  check_points(z);
  TORCH_CHECK(grad_output.dim() == 3 && grad_output.size(0) == z.N && grad_output.size(1) == z.Lq() &&
                  grad_output.size(2) == z.M * z.D && grad_output.scalar_type() == value_.scalar_type(),
              "deform_cross_attn: grad_output must be [N, Lq, M*D] in value's dtype, got ", grad_output.sizes());
  const c10::cuda::CUDAGuard guard(value_.device());
  auto value = value_.contiguous(), offsets = offsets_.contiguous(), logits = logits_.contiguous();
  auto go = grad_output.contiguous();
  if (z.N * z.Lq() * z.M * z.D == 0) return {at::zeros_like(value), at::zeros_like(offsets), at::zeros_like(logits)};
  auto grad_value = at::empty(value.sizes(), value.options());
  auto grad_off = at::empty(offsets.sizes(), offsets.options());
  auto grad_logits = at::empty(logits.sizes(), logits.options());
  // Softmax weights are at most 1, and each of the Lq * P points reaches an entry at most once. The
  // weights' bound is 1, or NaN where a head's softmax is not finite (a NaN or +inf logit, or all -inf).
  const at::Tensor bound = deterministic ? logits.amax(-1).mul(0).add(1) : at::Tensor();
  const cuda_glue::GradValueAccumulator accum(value, go, bound, static_cast<double>(z.Lq()) * z.P, deterministic);
  const auto& gv = accum.gv;
  auto stream = c10::cuda::getCurrentCUDAStream().stream();
  cuda_glue::dispatch("deform_cross_attn", value.scalar_type(), offsets.scalar_type(), [&]<typename T, typename U>() {
    using DT = typename Device<T>::type;
    using DU = typename Device<U>::type;
    const auto p = params<T, U>(z, value, offsets, logits);
    const DT* g = dev_ptr<T>(go);
    const int v = msda::cuda::vector_width<DT>(z.D, reinterpret_cast<uintptr_t>(p.value), reinterpret_cast<uintptr_t>(g));
    cuda_glue::check_launch("deform_cross_attn backward", msda::cuda::with_vector_width<DT>(v, [&]<int V>() {
      return cuda::launch_backward<DT, DU, V>(p, g, gv, dev_mut_ptr<U>(grad_off), dev_mut_ptr<U>(grad_logits),
                                              dev_mut_ptr<T>(grad_value), stream);
    }));
  });
  return {grad_value, grad_off, grad_logits};
}

}  // namespace
}  // namespace dca
}  // namespace piip

TORCH_LIBRARY_IMPL(piip_C, CUDA, m) {
  m.impl("dca_forward", &piip::dca::dca_forward_cuda);
  m.impl("dca_backward", &piip::dca::dca_backward_cuda);
}
