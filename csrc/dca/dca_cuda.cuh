// CUDA kernels of the fused deformable cross-attention (torch-free).
//
// Same thread mapping, vector loads and grad_value accumulation as msda_cuda.cuh
// (a group of GP lanes per (image, query, head) row, V channels per load), with the
// reference point from the query index, offsets scaled by the value grid, and the
// softmax over the P points computed per thread. The backward keeps dL/dw_p per point
// (every lane of the group has the reduced sums) and applies the softmax backward in the
// group's first lane.
#pragma once

#include "../msda/msda_cuda.cuh"
#include "dca_math.h"

namespace piip {
namespace dca {
namespace cuda {

using msda::cuda::from_f;
using msda::cuda::GradValue;
using msda::cuda::to_f;
using msda::cuda::Vec;

constexpr int kMaxP = 32;  // points per head held per thread

template <typename T, typename U>
struct Params {
  const T* value;    // [N, Hv*Wv, M, D]
  const U* offsets;  // [N, Hq*Wq, M, P, 2]
  const U* logits;   // [N, Hq*Wq, M, P]
  int64_t N, Hv, Wv, Hq, Wq, M, D, P;
};

// The per-point arrays (softmax weights, their gradients) stay in registers only when every
// index is a compile-time constant, so the kernels take the point count as a template
// argument PC: PC > 0 is that many points, unrolled (PIIP uses 4); PC = 0 reads p.P at run
// time (at most kMaxP) and the arrays live in local memory.
template <int PC>
__device__ __forceinline__ int64_t points(int64_t runtime_p) {
  return PC > 0 ? PC : runtime_p;
}
template <int PC>
constexpr int kSlots = PC > 0 ? PC : kMaxP;

// Softmax weights of one row (max-subtracted), in fp32.
template <int PC, typename U>
__device__ __forceinline__ void row_softmax(const U* logits, int64_t P, float* w) {
  float mx = to_f(logits[0]);
#pragma unroll
  for (int64_t p = 1; p < points<PC>(P); ++p) mx = fmaxf(mx, to_f(logits[p]));
  float sum = 0.f;
#pragma unroll
  for (int64_t p = 0; p < points<PC>(P); ++p) {
    w[p] = __expf(to_f(logits[p]) - mx);
    sum += w[p];
  }
  const float inv = 1.f / sum;
#pragma unroll
  for (int64_t p = 0; p < points<PC>(P); ++p) w[p] *= inv;
}

template <typename T, typename U>
__device__ __forceinline__ bool point(const Params<T, U>& p, int64_t row, int64_t pp, float rx, float ry,
                                      msda::Bilinear<float>& b) {
  const U* off = p.offsets + 2 * (row * p.P + pp);
  const float x = rx + to_f(off[0]) / static_cast<float>(p.Wv);
  const float y = ry + to_f(off[1]) / static_cast<float>(p.Hv);
  return msda::make_bilinear<float>(x, y, p.Hv, p.Wv, b);
}

template <typename T, typename U, int V, int PC>
__global__ void forward_kernel(Params<T, U> p, T* __restrict__ out, int GP) {
  const msda::cuda::Group grp = msda::cuda::my_group(GP);
  const int64_t row = grp.row;  // (n, q, m)
  const int lane = grp.lane;
  const int64_t Lq = p.Hq * p.Wq;
  if (row >= p.N * Lq * p.M) return;
  const int64_t m = row % p.M, q = (row / p.M) % Lq, n = row / (p.M * Lq);
  const int64_t P = points<PC>(p.P);
  float rx, ry, w[kSlots<PC>];
  grid_reference<float>(q, p.Hq, p.Wq, rx, ry);
  row_softmax<PC>(p.logits + row * P, P, w);
  const T* img = p.value + n * p.Hv * p.Wv * p.M * p.D + m * p.D;
  for (int64_t c = lane; c < p.D / V; c += GP) {
    float acc[V];
#pragma unroll
    for (int i = 0; i < V; ++i) acc[i] = 0.f;
    float outside = 0.f;  // what points outside the map add to every channel: 0 or NaN (msda_math.h)
#pragma unroll
    for (int64_t pp = 0; pp < P; ++pp) {
      msda::Bilinear<float> b;
      if (point(p, row, pp, rx, ry, b)) {
        msda::cuda::gather_point<T, V>(img + c * V, p.M * p.D, b, w[pp], acc);
      } else {
        outside += msda::outside_sample(b, w[pp]);
      }
    }
    Vec<T, V> o;
#pragma unroll
    for (int i = 0; i < V; ++i) o.v[i] = from_f<T>(acc[i] + outside);
    *reinterpret_cast<Vec<T, V>*>(out + row * p.D + c * V) = o;
  }
}

template <typename T, typename U, int V, int PC>
__global__ void backward_kernel(Params<T, U> p, const T* __restrict__ grad_out, GradValue gv, U* __restrict__ grad_off,
                                U* __restrict__ grad_logits, int GP) {
  const msda::cuda::Group grp = msda::cuda::my_group(GP);
  const int64_t Lq = p.Hq * p.Wq;
  const int64_t row = grp.row;
  const bool live = row < p.N * Lq * p.M;
  const int lane = grp.lane;
  const int64_t m = live ? row % p.M : 0, q = live ? (row / p.M) % Lq : 0, n = live ? row / (p.M * Lq) : 0;
  const int64_t P = points<PC>(p.P);
  float rx = 0.f, ry = 0.f, w[kSlots<PC>], gw[kSlots<PC>];
  if (live) {
    grid_reference<float>(q, p.Hq, p.Wq, rx, ry);
    row_softmax<PC>(p.logits + row * P, P, w);
  }
  const int64_t img = n * p.Hv * p.Wv * p.M * p.D + m * p.D;
  const double scale = msda::cuda::fixed_scale(gv);
  // This lane's share of the dot product of the row with a corner that is not loaded.
  const float gz = live ? msda::cuda::zero_dot_share<T, V>(grad_out + row * p.D, lane, GP, p.D / V) : 0.f;
#pragma unroll
  for (int64_t pp = 0; pp < P; ++pp) {
    msda::Bilinear<float> b;
    const bool ok = live && point(p, row, pp, rx, ry, b);
    // Corners outside the map (all four for a point outside it) keep the zero dot product.
    float s[4] = {gz, gz, gz, gz};
    if (ok) {
      msda::cuda::scatter_point<T, V>(p.value, grad_out + row * p.D, img, p.M * p.D, b, w[pp], gv, scale, lane, GP,
                                      p.D / V, s);
    }
    msda::cuda::group_sum4(s, grp.mask, GP);
    float ga = 0.f, gx = 0.f, gy = 0.f;
    if (live) msda::point_grads<float>(b, s, w[pp], p.Hv, p.Wv, ga, gx, gy);
    gw[pp] = ga;  // every lane holds the group's sums after group_sum4
    if (live && lane == 0) {
      // x = rx + off_x / Wv: the offset gradient is the location gradient over Wv.
      grad_off[2 * (row * P + pp)] = from_f<U>(gx / static_cast<float>(p.Wv));
      grad_off[2 * (row * P + pp) + 1] = from_f<U>(gy / static_cast<float>(p.Hv));
    }
  }
  if (live && lane == 0) {
    softmax_backward<float>(w, P, gw);  // gw: dL/dw -> dL/dlogits
#pragma unroll
    for (int64_t pp = 0; pp < P; ++pp) grad_logits[row * P + pp] = from_f<U>(gw[pp]);
  }
}

// Runs f.template operator()<PC>() with PC = 4 (unrolled, PIIP's point count) or 0 (any P).
template <typename F>
cudaError_t with_points(int64_t P, F&& f) {
  if (P == 4) return f.template operator()<4>();
  return f.template operator()<0>();
}

template <typename T, typename U, int V>
cudaError_t launch_forward(const Params<T, U>& p, T* out, cudaStream_t stream) {
  const int GP = msda::cuda::group_size(p.D / V);
  const int64_t threads = p.N * p.Hq * p.Wq * p.M * GP;
  if (threads == 0) return cudaSuccess;
  return with_points(p.P, [&]<int PC>() {
    return launch(forward_kernel<T, U, V, PC>, msda::cuda::blocks_for(threads), msda::cuda::kThreads, stream, p, out, GP);
  });
}

template <typename T, typename U, int V>
cudaError_t launch_backward(const Params<T, U>& p, const T* grad_out, const GradValue& gv, U* grad_off, U* grad_logits,
                            T* grad_value, cudaStream_t stream) {
  const int GP = msda::cuda::group_size(p.D / V);
  const int64_t threads = p.N * p.Hq * p.Wq * p.M * GP;
  if (threads > 0) {
    const cudaError_t err = with_points(p.P, [&]<int PC>() {
      return launch(backward_kernel<T, U, V, PC>, msda::cuda::blocks_for(threads), msda::cuda::kThreads, stream, p, grad_out,
                    gv, grad_off, grad_logits, GP);
    });
    if (err != cudaSuccess) return err;
  }
  return msda::cuda::launch_finish_grad_value<T>(gv, grad_value, p.N * p.Hv * p.Wv * p.M * p.D, stream);
}

}  // namespace cuda
}  // namespace dca
}  // namespace piip
