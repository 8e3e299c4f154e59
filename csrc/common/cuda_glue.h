// Helpers shared by the CUDA glue files (ATen side; the kernels stay torch-free).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

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

}  // namespace cuda_glue
}  // namespace piip
