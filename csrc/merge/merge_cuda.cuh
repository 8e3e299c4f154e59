// CUDA kernels of branch_merge (torch-free).
//
// Forward: one thread per output element; every branch's two taps per axis come from
// merge_math.h (torch's bilinear rule), so each map is read once (through the cache) and
// the output written once. A branch of the output's size is read directly, without taps.
// Backward, per branch: one thread per input element gathers from the output elements whose
// taps touch it (a few rows and columns, bounded by the scale), so grad_features need no
// atomics; a branch of the output's size takes grad_output itself. Each block writes its
// share of the weight gradient, summed in a fixed order by the glue. Both are deterministic.
#pragma once

#include "../msda/msda_cuda.cuh"
#include "merge_math.h"

#include <algorithm>
#include <cmath>

namespace piip {
namespace merge {
namespace cuda {

using msda::cuda::blocks_for;
using msda::cuda::from_f;
using msda::cuda::kThreads;
using msda::cuda::to_f;

constexpr int kMaxBranches = 8;

// How many variants of each kernel this file has (the glue's `variant` argument picks one;
// piip_kernels/variants.py names them in this order, and 0 is the default).
constexpr int kForwardVariants = 1;
constexpr int kBackwardVariants = 1;

template <typename T>
struct ForwardParams {
  const T* f[kMaxBranches];  // [planes, H_i, W_i]
  int64_t H[kMaxBranches], W[kMaxBranches];
  float sy[kMaxBranches], sx[kMaxBranches];
  const float* weights;      // [nb], device
  int nb;
  int64_t planes, Ho, Wo;
  bool align_corners;
};

template <typename T, typename O>
__global__ void forward_kernel(ForwardParams<T> p, O* __restrict__ out) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= p.planes * p.Ho * p.Wo) return;
  const int64_t ox = i % p.Wo, oy = (i / p.Wo) % p.Ho, plane = i / (p.Ho * p.Wo);
  float acc = 0.f;
  for (int b = 0; b < p.nb; ++b) {
    const T* f = p.f[b] + plane * p.H[b] * p.W[b];
    if (p.H[b] == p.Ho && p.W[b] == p.Wo) {  // the finest branch: no resampling (as torch copies it)
      acc += p.weights[b] * to_f(f[oy * p.Wo + ox]);
      continue;
    }
    const Tap<float> ty = axis_tap<float>(oy, p.H[b], p.sy[b], p.align_corners);
    const Tap<float> tx = axis_tap<float>(ox, p.W[b], p.sx[b], p.align_corners);
    const float v00 = to_f(f[ty.i0 * p.W[b] + tx.i0]), v01 = to_f(f[ty.i0 * p.W[b] + tx.i1]);
    const float v10 = to_f(f[ty.i1 * p.W[b] + tx.i0]), v11 = to_f(f[ty.i1 * p.W[b] + tx.i1]);
    const float top = v00 + tx.l * (v01 - v00), bot = v10 + tx.l * (v11 - v10);
    acc += p.weights[b] * (top + ty.l * (bot - top));
  }
  out[i] = from_f<O>(acc);
}

// Whether output index o reads input index in_idx along one axis, and with which weight `w`.
// A tap of weight 0 is a read all the same: the reference multiplies its gradient by 0, so
// a NaN in grad_output reaches that input (0 * NaN) there too.
__device__ __forceinline__ bool axis_read(int64_t o, int64_t in_idx, int64_t size_in, float scale, bool align, float& w) {
  const Tap<float> t = axis_tap<float>(o, size_in, scale, align);
  w = (t.i0 == in_idx ? 1.f - t.l : 0.f) + (t.i1 == in_idx ? t.l : 0.f);
  return t.i0 == in_idx || t.i1 == in_idx;
}

// First output index whose source coordinate can reach input index i (one early, clamped at 0).
__device__ __forceinline__ int64_t first_reader(int64_t i, float inv_scale, bool align) {
  const float lo = align ? (static_cast<float>(i) - 1.f) * inv_scale : (static_cast<float>(i) - 0.5f) * inv_scale - 0.5f;
  const int64_t k = static_cast<int64_t>(floorf(lo)) - 1;
  return k > 0 ? k : 0;
}

template <typename T, typename O>
struct BackwardParams {
  const O* grad_out;  // [planes, Ho, Wo]
  const T* f;         // [planes, H, W]
  T* grad_f;          // [planes, H, W]
  float* partial;     // [blocks] shares of the weight gradient
  const float* weight;
  int64_t planes, H, W, Ho, Wo;
  float sy, sx, inv_sy, inv_sx;
  int64_t ky, kx;     // candidate output rows / columns per input index
  bool align_corners;
};

template <typename T, typename O>
__global__ void backward_kernel(BackwardParams<T, O> p) {
  __shared__ float share[kThreads];
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  float dot = 0.f;
  if (i < p.planes * p.H * p.W) {
    const int64_t ix = i % p.W, iy = (i / p.W) % p.H, plane = i / (p.H * p.W);
    const O* g = p.grad_out + plane * p.Ho * p.Wo;
    const int64_t y0 = first_reader(iy, p.inv_sy, p.align_corners), x0 = first_reader(ix, p.inv_sx, p.align_corners);
    const bool identity = p.H == p.Ho && p.W == p.Wo;  // the finest branch: its gradient is grad_out itself
    float G = identity ? to_f(g[iy * p.Wo + ix]) : 0.f;
    for (int64_t a = 0; a < (identity ? 0 : p.ky); ++a) {
      const int64_t oy = y0 + a;
      if (oy >= p.Ho) break;
      float wy, wx;
      if (!axis_read(oy, iy, p.H, p.sy, p.align_corners, wy)) continue;
      for (int64_t b = 0; b < p.kx; ++b) {
        const int64_t ox = x0 + b;
        if (ox >= p.Wo) break;
        if (axis_read(ox, ix, p.W, p.sx, p.align_corners, wx)) G += wy * wx * to_f(g[oy * p.Wo + ox]);
      }
    }
    p.grad_f[i] = from_f<T>(*p.weight * G);
    dot = to_f(p.f[i]) * G;
  }
  // Block sum of this block's share of the weight gradient (fixed order: deterministic).
  share[threadIdx.x] = dot;
  __syncthreads();
  for (unsigned s = blockDim.x / 2; s > 0; s /= 2) {
    if (threadIdx.x < s) share[threadIdx.x] += share[threadIdx.x + s];
    __syncthreads();
  }
  if (threadIdx.x == 0) p.partial[blockIdx.x] = share[0];
}

// The kernels' parameters from sizes and pointers (host side; the glue and the CPU emulation
// of the tests both build them here).
inline float scale_of(int64_t in, int64_t out, bool align) { return axis_scale<float>(in, out, align); }

// Output rows (columns) whose taps can touch one input row (column), for an axis of `out`
// outputs: the reach of a tap, 2 / scale, plus margin for first_reader's one-early start
// and rounding, never more than the axis. A zero scale (align_corners with an input side
// of 1, or an output side of 1) has every output read input 0: all `out` are candidates.
inline int64_t candidates(float scale, int64_t out) {
  if (scale <= 0.f) return out;
  return std::min<int64_t>(out, static_cast<int64_t>(std::ceil(2.0 / scale)) + 4);
}

// maps[b] of sizes H[b] x W[b] (b < nb), weights [nb] fp32 on the device.
template <typename T>
ForwardParams<T> forward_params(int nb, const T* const* maps, const int64_t* H, const int64_t* W, const float* weights,
                                int64_t planes, int64_t Ho, int64_t Wo, bool align_corners) {
  ForwardParams<T> p{};
  p.nb = nb;
  for (int b = 0; b < nb; ++b) {
    p.f[b] = maps[b];
    p.H[b] = H[b];
    p.W[b] = W[b];
    p.sy[b] = scale_of(H[b], Ho, align_corners);
    p.sx[b] = scale_of(W[b], Wo, align_corners);
  }
  p.weights = weights;
  p.planes = planes;
  p.Ho = Ho;
  p.Wo = Wo;
  p.align_corners = align_corners;
  return p;
}

inline int64_t backward_blocks(int64_t planes, int64_t H, int64_t W) { return blocks_for(planes * H * W); }

// One branch: its map f [planes, H, W], gradient grad_f, weight (a device scalar) and
// `partial`, backward_blocks(planes, H, W) fp32 shares of its weight gradient.
template <typename T, typename O>
BackwardParams<T, O> backward_params(const O* grad_out, const T* f, T* grad_f, float* partial, const float* weight,
                                     int64_t planes, int64_t H, int64_t W, int64_t Ho, int64_t Wo, bool align_corners) {
  BackwardParams<T, O> p{};
  p.grad_out = grad_out;
  p.f = f;
  p.grad_f = grad_f;
  p.partial = partial;
  p.weight = weight;
  p.planes = planes;
  p.H = H;
  p.W = W;
  p.Ho = Ho;
  p.Wo = Wo;
  p.sy = scale_of(H, Ho, align_corners);
  p.sx = scale_of(W, Wo, align_corners);
  p.inv_sy = p.sy > 0.f ? 1.f / p.sy : 0.f;
  p.inv_sx = p.sx > 0.f ? 1.f / p.sx : 0.f;
  p.ky = candidates(p.sy, Ho);
  p.kx = candidates(p.sx, Wo);
  p.align_corners = align_corners;
  return p;
}

template <typename T, typename O>
cudaError_t launch_forward(const ForwardParams<T>& p, O* out, cudaStream_t stream) {
  const int64_t n = p.planes * p.Ho * p.Wo;
  if (n == 0) return cudaSuccess;
  return launch(forward_kernel<T, O>, blocks_for(n), kThreads, stream, p, out);
}

template <typename T, typename O>
cudaError_t launch_backward(const BackwardParams<T, O>& p, cudaStream_t stream) {
  const int64_t blocks = backward_blocks(p.planes, p.H, p.W);
  if (blocks == 0) return cudaSuccess;
  return launch(backward_kernel<T, O>, blocks, kThreads, stream, p);
}

}  // namespace cuda
}  // namespace merge
}  // namespace piip
