// The scale of the deterministic (fixed-point) grad_value accumulation, computed on the
// device from max|grad_output| and max|weights| without a host sync (torch-free).
//
// Every point adds weight * w_c * grad_output (bilinear w_c <= 1) to a grad_value entry at
// most once, so no entry's sum exceeds points_per_entry x max|weight| x max|grad_output|;
// the scale maps that bound to 2^62, half the int64 range. A NaN anywhere makes the scale
// NaN and an infinity makes it zero: the finishing kernel then writes NaN everywhere
// instead of a wrapped integer sum (msda_cuda.cuh, finish_grad_value).
#pragma once

#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "../msda/msda_cuda.cuh"
#include "launch.cuh"

namespace piip {
namespace fixed_point {

constexpr int kThreads = 256;
constexpr int kMaxBlocks = 256;

// out = max(out, bits of |x_i|) over all i. For non-negative floats the order of the bit
// patterns is the numeric order, and a NaN (sign cleared by fabsf) lies above +inf, so
// a NaN input gives NaN and an infinite one +inf, as amax(abs(x)) does.
template <typename T>
__global__ void absmax_kernel(const T* __restrict__ x, int64_t n, unsigned int* out) {
  unsigned int m = 0;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += step) {
    m = max(m, __float_as_uint(fabsf(msda::cuda::to_f(x[i]))));
  }
  if (m != 0) atomicMax(out, m);
}

// out = max(out, bits of b_r) over rows r of P softmax logits, where b_r = 1 when row r's largest
// logit is finite and NaN when it is not (a NaN or +inf logit, or every logit -inf): the bound of a
// softmax's weights, NaN exactly where the softmax itself is not finite. A -inf logit beside finite
// ones is a weight of 0 and leaves the bound 1 (max|logits| would be +inf there).
template <typename T>
__global__ void softmax_bound_kernel(const T* __restrict__ logits, int64_t rows, int64_t P, unsigned int* out) {
  unsigned int m = 0;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; r < rows; r += step) {
    float top = -INFINITY;
    bool nan = false;
    for (int64_t p = 0; p < P; ++p) {
      const float v = msda::cuda::to_f(logits[r * P + p]);
      nan |= isnan(v);
      top = fmaxf(top, v);
    }
    m = max(m, (!nan && isfinite(top)) ? 0x3f800000u : 0x7fc00000u);  // 1.0f or a quiet NaN
  }
  if (m != 0) atomicMax(out, m);
}

// scale = 2^62 / (max(bound, 1e-30) * max(1, points_per_entry)), bound = absmax[0]
// (x absmax[1] when kWeighted); a NaN bound stays NaN, an infinite one gives 0. (A template,
// as every kernel in these headers: one definition however many glue files include it.)
template <bool kWeighted>
__global__ void scale_kernel(const unsigned int* absmax, double points_per_entry, double* scale) {
  double bound = __uint_as_float(absmax[0]);
  if (kWeighted) bound *= static_cast<double>(__uint_as_float(absmax[1]));
  if (bound < 1e-30) bound = 1e-30;
  *scale = ldexp(1.0, 62) / (bound * fmax(1.0, points_per_entry));
}

template <typename T>
cudaError_t launch_absmax(const T* x, int64_t n, unsigned int* out, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  const int64_t blocks = (n + kThreads - 1) / kThreads;
  return launch(absmax_kernel<T>, static_cast<unsigned>(blocks < kMaxBlocks ? blocks : kMaxBlocks), kThreads, stream, x,
                n, out);
}

template <typename T>
cudaError_t launch_softmax_bound(const T* logits, int64_t rows, int64_t P, unsigned int* out, cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  const int64_t blocks = (rows + kThreads - 1) / kThreads;
  return launch(softmax_bound_kernel<T>, static_cast<unsigned>(blocks < kMaxBlocks ? blocks : kMaxBlocks), kThreads,
                stream, logits, rows, P, out);
}

inline cudaError_t launch_scale(const unsigned int* absmax, bool weighted, double points_per_entry, double* scale,
                                cudaStream_t stream) {
  return weighted ? launch(scale_kernel<true>, 1, 1, stream, absmax, points_per_entry, scale)
                  : launch(scale_kernel<false>, 1, 1, stream, absmax, points_per_entry, scale);
}

}  // namespace fixed_point
}  // namespace piip
