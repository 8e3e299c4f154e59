// Helpers shared by the CUDA glue files (stable-ABI side; the kernels stay torch-free).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>

#include "../msda/msda_cuda.cuh"
#include "fixed_point.cuh"
#include "tensor_glue.h"

namespace piip {
namespace cuda_glue {

// torch's 16-bit types and CUDA's share their bit layout.
template <typename T> struct Device { using type = T; };
template <> struct Device<c10::Half> { using type = __half; };
template <> struct Device<c10::BFloat16> { using type = __nv_bfloat16; };

template <typename T>
const typename Device<T>::type* dev_ptr(const Tensor& t) {
  return reinterpret_cast<const typename Device<T>::type*>(ptr<T>(t));
}
template <typename T>
typename Device<T>::type* dev_mut_ptr(Tensor& t) {
  return reinterpret_cast<typename Device<T>::type*>(mut_ptr<T>(t));
}

// Calls f.template operator()<T, U>() for the dtype pairs the GPU kernels take:
// T in {float, half, bfloat16}; U == T, or float beside a 16-bit T.
template <typename F>
void dispatch(const char* op, ScalarType vt, ScalarType lt, F&& f) {
  if (vt == ScalarType::Float && lt == ScalarType::Float) return f.template operator()<float, float>();
  if (vt == ScalarType::Half && lt == ScalarType::Half) return f.template operator()<c10::Half, c10::Half>();
  if (vt == ScalarType::BFloat16 && lt == ScalarType::BFloat16) return f.template operator()<c10::BFloat16, c10::BFloat16>();
  if (vt == ScalarType::Half && lt == ScalarType::Float) return f.template operator()<c10::Half, float>();
  if (vt == ScalarType::BFloat16 && lt == ScalarType::Float) return f.template operator()<c10::BFloat16, float>();
  STD_TORCH_CHECK(false, op, " (cuda): unsupported dtypes ", vt, " and ", lt,
                  "; the CUDA kernels take float32/float16/bfloat16 (float64 runs on the cpu and reference backends)");
}

inline void check_launch(const char* op, cudaError_t err) {
  STD_TORCH_CHECK(err == cudaSuccess, op, " (cuda): kernel launch failed: ", cudaGetErrorString(err));
}

// Why the CUDA kernels cannot find torch's current stream, or nullptr. Defined in
// cuda_glue.cu; the module init refuses to load with this message.
const char* stream_lookup_error();

// torch's current CUDA stream on `device` (what every launch runs on).
cudaStream_t current_stream(int32_t device);

// Sets `device` as the current CUDA device for the life of the guard (and the one torch
// sees: the stable ABI's device guard).
using DeviceGuard = torch::stable::accelerator::DeviceGuard;

// The grad_value accumulator of the deformable backwards: fp32 for atomics, or (deterministic)
// int64 fixed point at the scale of fixed_point.cuh. `weights` may be null for weights bounded
// by 1 (a softmax). Holds the tensors the kernels write into.
struct GradValueAccumulator {
  Tensor acc;
  msda::cuda::GradValue gv{nullptr, nullptr, nullptr};

  // `weights` (may be null for weights bounded by 1) bounds the weights by max|weights|; with
  // softmax_points = P > 0 it holds softmax logits in rows of P instead, whose weights are bounded
  // by 1, or by NaN where a row's softmax is not finite.
  GradValueAccumulator(const Tensor& value, const Tensor& grad_output, const Tensor* weights, double points_per_entry,
                       bool deterministic, cudaStream_t stream, int64_t softmax_points = 0)
      : acc(alloc_zeros(sizes_of(value), deterministic ? ScalarType::Long : ScalarType::Float, value)) {
    if (!deterministic) {
      gv.f32 = mut_ptr<float>(acc);
      return;
    }
    gv.fixed = reinterpret_cast<unsigned long long*>(mut_ptr<int64_t>(acc));
    // One buffer: [absmax bits of grad_output, of weights] as int32, then the scale as a double.
    scratch_ = alloc_zeros({2}, ScalarType::Double, value);
    auto* absmax = static_cast<unsigned int*>(scratch_.mutable_data_ptr());
    double* scale = static_cast<double*>(scratch_.mutable_data_ptr()) + 1;
    absmax_of(grad_output, absmax, stream);
    if (weights != nullptr && softmax_points > 0) {
      softmax_bound_of(*weights, softmax_points, absmax + 1, stream);
    } else if (weights != nullptr) {
      absmax_of(*weights, absmax + 1, stream);
    }
    check_launch("fixed-point scale", fixed_point::launch_scale(absmax, weights != nullptr, points_per_entry, scale, stream));
    gv.scale = scale;
  }

 private:
  Tensor scratch_;

  static void absmax_of(const Tensor& t, unsigned int* out, cudaStream_t stream) {
    dispatch("fixed-point scale", t.scalar_type(), t.scalar_type(), [&]<typename T, typename>() {
      check_launch("fixed-point scale", fixed_point::launch_absmax(dev_ptr<T>(t), t.numel(), out, stream));
    });
  }

  static void softmax_bound_of(const Tensor& logits, int64_t points, unsigned int* out, cudaStream_t stream) {
    dispatch("fixed-point scale", logits.scalar_type(), logits.scalar_type(), [&]<typename T, typename>() {
      check_launch("fixed-point scale",
                   fixed_point::launch_softmax_bound(dev_ptr<T>(logits), logits.numel() / points, points, out, stream));
    });
  }
};

}  // namespace cuda_glue
}  // namespace piip
