// Helpers shared by the CUDA glue files (ATen side; the kernels stay torch-free).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/zeros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>

#include "../msda/msda_cuda.cuh"

namespace piip {
namespace cuda_glue {

// ATen's 16-bit types and CUDA's share their bit layout.
template <typename T> struct Device { using type = T; };
template <> struct Device<c10::Half> { using type = __half; };
template <> struct Device<c10::BFloat16> { using type = __nv_bfloat16; };

template <typename T>
const typename Device<T>::type* dev_ptr(const at::Tensor& t) {
  return reinterpret_cast<const typename Device<T>::type*>(t.const_data_ptr<T>());
}
template <typename T>
typename Device<T>::type* dev_mut_ptr(at::Tensor& t) {
  return reinterpret_cast<typename Device<T>::type*>(t.mutable_data_ptr<T>());
}

// Calls f.template operator()<T, U>() for the dtype pairs the GPU kernels take:
// T in {float, half, bfloat16}; U == T, or float beside a 16-bit T.
template <typename F>
void dispatch(const char* op, at::ScalarType vt, at::ScalarType lt, F&& f) {
  using at::ScalarType;
  if (vt == ScalarType::Float && lt == ScalarType::Float) return f.template operator()<float, float>();
  if (vt == ScalarType::Half && lt == ScalarType::Half) return f.template operator()<c10::Half, c10::Half>();
  if (vt == ScalarType::BFloat16 && lt == ScalarType::BFloat16) return f.template operator()<c10::BFloat16, c10::BFloat16>();
  if (vt == ScalarType::Half && lt == ScalarType::Float) return f.template operator()<c10::Half, float>();
  if (vt == ScalarType::BFloat16 && lt == ScalarType::Float) return f.template operator()<c10::BFloat16, float>();
  TORCH_CHECK(false, op, " (cuda): unsupported dtypes ", vt, " and ", lt,
              "; the CUDA kernels take float32/float16/bfloat16 (float64 runs on the cpu and reference backends)");
}

inline void check_launch(const char* op, cudaError_t err) {
  TORCH_CHECK(err == cudaSuccess, op, " (cuda): kernel launch failed: ", cudaGetErrorString(err));
}

// The grad_value accumulator of the deformable backwards: fp32 for atomics, or (deterministic)
// int64 fixed point. Every point adds weight * w_c * grad_output (w_c <= 1) to an entry at most
// once, so no entry's sum exceeds points_per_entry x max|weight| x max|grad_output|; the scale
// maps that bound to 2^62. `weights` may be undefined for weights bounded by 1 (a softmax).
// A non-finite grad_output or weight leaves the scale zero or NaN, and the finishing kernel
// then writes NaN everywhere instead of a wrapped integer sum.
// Holds the tensors the kernels write into.
struct GradValueAccumulator {
  at::Tensor acc, scale;
  msda::cuda::GradValue gv{nullptr, nullptr, nullptr};

  GradValueAccumulator(const at::Tensor& value, const at::Tensor& grad_output, const at::Tensor& weights,
                       double points_per_entry, bool deterministic) {
    if (deterministic) {
      acc = at::zeros(value.sizes(), value.options().dtype(at::kLong));
      auto bound = grad_output.abs().amax().to(at::kDouble);
      if (weights.defined()) bound = bound.mul(weights.abs().amax().to(at::kDouble));
      scale = bound.clamp_min(1e-30).mul(std::max(1.0, points_per_entry)).reciprocal().mul(std::ldexp(1.0, 62));
      gv.fixed = reinterpret_cast<unsigned long long*>(acc.mutable_data_ptr<int64_t>());
      gv.scale = scale.const_data_ptr<double>();
    } else {
      acc = at::zeros(value.sizes(), value.options().dtype(at::kFloat));
      gv.f32 = acc.mutable_data_ptr<float>();
    }
  }
};

}  // namespace cuda_glue
}  // namespace piip
