// Glue between ATen tensors and the torch-free CUDA kernels of msda_cuda.cuh:
// registers piip_C::msda_forward / piip_C::msda_backward for CUDA tensors.
// Inputs are made contiguous here; kernels run on the current stream of the
// inputs' device, and every launch is checked.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cmath>

#include "../common/cuda_glue.h"
#include "msda_cuda.cuh"
#include "msda_glue.h"

namespace piip {
namespace msda {
namespace {

using cuda_glue::Device;

template <typename T, typename U>
cuda::Params<typename Device<T>::type, typename Device<U>::type> params(const Sizes& z, const at::Tensor& value,
                                                                       const at::Tensor& shapes, const at::Tensor& starts,
                                                                       const at::Tensor& loc, const at::Tensor& attn) {
  using DT = typename Device<T>::type;
  using DU = typename Device<U>::type;
  return {reinterpret_cast<const DT*>(value.const_data_ptr<T>()), shapes.const_data_ptr<int64_t>(),
          starts.const_data_ptr<int64_t>(), reinterpret_cast<const DU*>(loc.const_data_ptr<U>()),
          reinterpret_cast<const DU*>(attn.const_data_ptr<U>()), z.N, z.S, z.M, z.D, z.Lq, z.L, z.P};
}

at::Tensor msda_forward_cuda(const at::Tensor& value_, const at::Tensor& shapes_, const at::Tensor& starts_,
                             const at::Tensor& loc_, const at::Tensor& attn_) {
  const Sizes z = check_and_sizes(value_, shapes_, starts_, loc_, attn_, /*cuda=*/true);
  const c10::cuda::CUDAGuard guard(value_.device());
  auto value = value_.contiguous(), shapes = shapes_.contiguous(), starts = starts_.contiguous();
  auto loc = loc_.contiguous(), attn = attn_.contiguous();
  auto out = at::empty({z.N, z.Lq, z.M * z.D}, value.options());
  if (out.numel() == 0) return out;
  if (z.L * z.P == 0) return out.zero_();
  auto stream = c10::cuda::getCurrentCUDAStream().stream();
  cuda_glue::dispatch("ms_deform_attn", value.scalar_type(), loc.scalar_type(), [&]<typename T, typename U>() {
    using DT = typename Device<T>::type;
    const auto p = params<T, U>(z, value, shapes, starts, loc, attn);
    DT* o = reinterpret_cast<DT*>(out.mutable_data_ptr<T>());
    const int v = cuda::vector_width<DT>(z.D, reinterpret_cast<uintptr_t>(p.value), reinterpret_cast<uintptr_t>(o));
    const cudaError_t err = cuda::with_vector_width<DT>(v, [&]<int V>() {
      return cuda::launch_forward<DT, typename Device<U>::type, V>(p, o, stream);
    });
    cuda_glue::check_launch("ms_deform_attn forward", err);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> msda_backward_cuda_impl(
    const at::Tensor& grad_output, const at::Tensor& value_, const at::Tensor& shapes_, const at::Tensor& starts_,
    const at::Tensor& loc_, const at::Tensor& attn_, bool deterministic) {
  const Sizes z = check_and_sizes(value_, shapes_, starts_, loc_, attn_, /*cuda=*/true);
  check_grad_output(grad_output, value_, z);
  const c10::cuda::CUDAGuard guard(value_.device());
  auto value = value_.contiguous(), shapes = shapes_.contiguous(), starts = starts_.contiguous();
  auto loc = loc_.contiguous(), attn = attn_.contiguous(), go = grad_output.contiguous();
  if (z.N * z.Lq * z.M * z.L * z.P * z.D == 0) {
    return {at::zeros_like(value), at::zeros_like(loc), at::zeros_like(attn)};
  }
  auto grad_value = at::empty(value.sizes(), value.options());
  auto grad_loc = at::empty(loc.sizes(), loc.options());
  auto grad_attn = at::empty(attn.sizes(), attn.options());
  // An entry of level l can receive one contribution from each of the Lq * P points on that level.
  const cuda_glue::GradValueAccumulator accum(value, go, attn, static_cast<double>(z.Lq) * z.P, deterministic);
  const auto& gv = accum.gv;
  auto stream = c10::cuda::getCurrentCUDAStream().stream();
  cuda_glue::dispatch("ms_deform_attn", value.scalar_type(), loc.scalar_type(), [&]<typename T, typename U>() {
    using DT = typename Device<T>::type;
    using DU = typename Device<U>::type;
    const auto p = params<T, U>(z, value, shapes, starts, loc, attn);
    const DT* g = reinterpret_cast<const DT*>(go.const_data_ptr<T>());
    const int v = cuda::vector_width<DT>(z.D, reinterpret_cast<uintptr_t>(p.value), reinterpret_cast<uintptr_t>(g));
    const cudaError_t err = cuda::with_vector_width<DT>(v, [&]<int V>() {
      return cuda::launch_backward<DT, DU, V>(p, g, gv, reinterpret_cast<DU*>(grad_loc.mutable_data_ptr<U>()),
                                              reinterpret_cast<DU*>(grad_attn.mutable_data_ptr<U>()),
                                              reinterpret_cast<DT*>(grad_value.mutable_data_ptr<T>()), stream);
    });
    cuda_glue::check_launch("ms_deform_attn backward", err);
  });
  return {grad_value, grad_loc, grad_attn};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> msda_backward_cuda(
    const at::Tensor& grad_output, const at::Tensor& value, const at::Tensor& shapes, const at::Tensor& starts,
    const at::Tensor& loc, const at::Tensor& attn) {
  return msda_backward_cuda_impl(grad_output, value, shapes, starts, loc, attn, false);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> msda_backward_deterministic_cuda(
    const at::Tensor& grad_output, const at::Tensor& value, const at::Tensor& shapes, const at::Tensor& starts,
    const at::Tensor& loc, const at::Tensor& attn) {
  return msda_backward_cuda_impl(grad_output, value, shapes, starts, loc, attn, true);
}

}  // namespace
}  // namespace msda
}  // namespace piip

TORCH_LIBRARY_IMPL(piip_C, CUDA, m) {
  m.impl("msda_forward", &piip::msda::msda_forward_cuda);
  m.impl("msda_backward", &piip::msda::msda_backward_cuda);
  m.impl("msda_backward_deterministic", &piip::msda::msda_backward_deterministic_cuda);
}
