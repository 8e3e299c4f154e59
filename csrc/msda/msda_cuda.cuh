// CUDA kernels of multi-scale deformable attention (torch-free).
//
// Thread mapping: a group of GP lanes (a power of two, at most a warp) serves one
// (image, query, head) row; lane k handles the channel chunks k, k + GP, ... of V
// consecutive channels each, loaded as one aligned vector (16 bytes when V * sizeof(T)
// allows). The per-point arithmetic is msda_math.h, shared with the CPU kernels.
//
// Forward: each lane accumulates its chunks in fp32 over every level and point and
// stores them once: one read of each sampled value vector, one write of the output.
// Backward: each lane scatters attn * w_c * grad_out into grad_value for its chunks and
// computes partial corner dot products; the group reduces them with warp shuffles and
// its first lane writes the location and weight gradients (no atomics there). The
// grad_value scatter uses fp32 atomics, or, when deterministic, 64-bit fixed-point
// integer atomics (integer addition is associative, so every run gives the same bits)
// followed by a conversion kernel.
//
// Layouts as in msda_cpu.h: value [N, S, M, D], shapes [L, 2], starts [L],
// loc [N, Lq, M, L, P, 2], attn [N, Lq, M, L, P], out / grad_out [N, Lq, M, D].
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "../common/launch.cuh"
#include "msda_math.h"

namespace piip {
namespace msda {
namespace cuda {

// fp32 <-> storage type conversions usable in device code.
__device__ __forceinline__ float to_f(float v) { return v; }
__device__ __forceinline__ float to_f(double v) { return static_cast<float>(v); }
__device__ __forceinline__ float to_f(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename T> __device__ __forceinline__ T from_f(float v);
template <> __device__ __forceinline__ float from_f<float>(float v) { return v; }
template <> __device__ __forceinline__ double from_f<double>(float v) { return v; }
template <> __device__ __forceinline__ __half from_f<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

constexpr int kThreads = 256;  // threads per block of every kernel here

// How many variants of each kernel this file has (the glue's `variant` argument picks one;
// piip_kernels/variants.py names them in this order, and 0 is the default).
constexpr int kForwardVariants = 1;
constexpr int kBackwardVariants = 1;
constexpr int kDeterministicBackwardVariants = 2;

// What a kernel writes where its inputs make the result meaningless (see level_fits).
__device__ __forceinline__ float quiet_nan() { return __int_as_float(0x7fc00000); }

// V consecutive elements, loaded and stored as one aligned vector.
template <typename T, int V>
struct alignas(sizeof(T) * V) Vec {
  T v[V];
};

// One vector through the read-only data cache (ld.global.nc). For value in the backwards:
// the kernel never writes it, but the compiler cannot prove that grad_value's atomics do
// not alias it and would otherwise use ordinary loads.
template <typename T, int V>
__device__ __forceinline__ Vec<T, V> load_ro(const T* ptr) {
  constexpr int kBytes = sizeof(T) * V;
  using Word = std::conditional_t<kBytes == 16, uint4,
               std::conditional_t<kBytes == 8, uint2, std::conditional_t<kBytes == 4, unsigned int, unsigned short>>>;
  static_assert(sizeof(Word) == kBytes, "vectors of 2, 4, 8 or 16 bytes");
  const Word w = __ldg(reinterpret_cast<const Word*>(ptr));
  Vec<T, V> out;
  __builtin_memcpy(&out, &w, kBytes);
  return out;
}

template <typename T, typename U>
struct Params {
  const T* value;
  const int64_t* shapes;
  const int64_t* starts;
  const U* loc;
  const U* attn;
  int64_t N, S, M, D, Lq, L, P;
};

// Accumulation target of the grad_value scatter.
struct GradValue {
  float* f32;                   // fp32 atomics (default), or
  unsigned long long* fixed;    // 64-bit fixed point (deterministic)
  const double* scale;          // fixed-point units per 1.0 (device scalar)
};

// The fixed-point scale, read once per thread (0 when accumulating in fp32).
__device__ __forceinline__ double fixed_scale(const GradValue& gv) { return gv.fixed != nullptr ? *gv.scale : 0.0; }

// grad_value[off .. off + V) += contrib; `scale` from fixed_scale(gv).
template <int V>
__device__ __forceinline__ void scatter(const GradValue& gv, double scale, int64_t off, const float* contrib) {
  if (gv.fixed != nullptr) {
#pragma unroll
    for (int i = 0; i < V; ++i) {
      const long long q = __double2ll_rn(static_cast<double>(contrib[i]) * scale);
      atomicAdd(gv.fixed + off + i, static_cast<unsigned long long>(q));
    }
    return;
  }
#if PIIP_VECTOR_ATOMICS
  // Hopper and later: one atomic per four channels. A preprocessor branch, not only `if
  // constexpr`: the float4 call does not depend on V, so it is looked up even where discarded,
  // and before sm_90 there is no float4 atomicAdd to find.
  if constexpr (V % 4 == 0) {
#pragma unroll
    for (int i = 0; i < V; i += 4) {
      atomicAdd(reinterpret_cast<float4*>(gv.f32 + off + i),
                make_float4(contrib[i], contrib[i + 1], contrib[i + 2], contrib[i + 3]));
    }
  } else
#endif
  {
#pragma unroll
    for (int i = 0; i < V; ++i) atomicAdd(gv.f32 + off + i, contrib[i]);
  }
}

// This thread's row (one per group of GP lanes), its lane in the group, and the
// shuffle mask of the group inside its warp.
struct Group {
  int64_t row;
  int lane;
  unsigned mask;
};

__device__ __forceinline__ Group my_group(int GP) {
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const unsigned mask = (GP == 32) ? 0xffffffffu : (((1u << GP) - 1u) << ((threadIdx.x % 32) / GP * GP));
  return {tid / GP, static_cast<int>(tid % GP), mask};
}

// Sums the four partial corner dot products over the lanes of a group.
__device__ __forceinline__ void group_sum4(float s[4], unsigned mask, int GP) {
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    for (int o = GP / 2; o > 0; o /= 2) s[k] += __shfl_xor_sync(mask, s[k], o, GP);
  }
}

// One sampling point, one lane's chunk of V channels at `chunk` (value's pointer advanced to
// the point's map and this chunk), forward: acc += a * sum over inside corners k of
// w_k * chunk[idx_k * stride], where `stride` is the distance between two pixels (M * D).
template <typename T, int V>
__device__ __forceinline__ void gather_point(const T* chunk, int64_t stride, const Bilinear<float>& b, float a, float* acc) {
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    if (b.idx[k] < 0) continue;
    const Vec<T, V> v = *reinterpret_cast<const Vec<T, V>*>(chunk + b.idx[k] * stride);
    const float coef = a * b.w[k];
#pragma unroll
    for (int i = 0; i < V; ++i) acc[i] += coef * to_f(v.v[i]);
  }
}

// One sampling point, backward, over this lane's chunks (lane, lane + GP, ... < chunks):
// scatters a * w_k * grad_out into grad_value at each inside corner k and adds the partial
// dot product <grad_out, value[corner k]> to s[k]. `map` is the offset of the point's map
// (pixel 0, channel 0 of its head) in value and grad_value; `g_row` the row of grad_out.
template <typename T, int V>
__device__ __forceinline__ void scatter_point(const T* value, const T* g_row, int64_t map, int64_t stride,
                                              const Bilinear<float>& b, float a, const GradValue& gv, double scale,
                                              int lane, int GP, int64_t chunks, float s[4]) {
  for (int64_t c = lane; c < chunks; c += GP) {
    const Vec<T, V> g = *reinterpret_cast<const Vec<T, V>*>(g_row + c * V);
    float gf[V];
#pragma unroll
    for (int i = 0; i < V; ++i) gf[i] = to_f(g.v[i]);
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      if (b.idx[k] < 0) continue;
      const int64_t off = map + b.idx[k] * stride + c * V;
      const Vec<T, V> v = load_ro<T, V>(value + off);
      float contrib[V];
      float dot = 0.f;
#pragma unroll
      for (int i = 0; i < V; ++i) {
        dot += gf[i] * to_f(v.v[i]);
        contrib[i] = a * b.w[k] * gf[i];
      }
      s[k] += dot;
      scatter<V>(gv, scale, off, contrib);
    }
  }
}

// This lane's share (chunks lane, lane + GP, ...) of zero_dot over a grad_out row: 0, or NaN
// when those channels hold a non-finite number. Summed over the group with the corner dot
// products, it is what a corner that is not loaded contributes (msda_math.h).
template <typename T, int V>
__device__ __forceinline__ float zero_dot_share(const T* g_row, int lane, int GP, int64_t chunks) {
  float gz = 0.f;
  for (int64_t c = lane; c < chunks; c += GP) {
    const Vec<T, V> g = *reinterpret_cast<const Vec<T, V>*>(g_row + c * V);
#pragma unroll
    for (int i = 0; i < V; ++i) gz += zero_dot(to_f(g.v[i]));
  }
  return gz;
}

// One row (n, q, m) per group of GP lanes; `rows` = N * Lq * M.
template <typename T, typename U, int V>
__global__ void forward_kernel(Params<T, U> p, T* __restrict__ out, int GP) {
  const Group grp = my_group(GP);
  const int64_t row = grp.row;
  const int lane = grp.lane;
  if (row >= p.N * p.Lq * p.M) return;
  const int64_t m = row % p.M;
  const int64_t n = row / (p.Lq * p.M);
  const int64_t chunks = p.D / V;
  for (int64_t c = lane; c < chunks; c += GP) {
    float acc[V];
#pragma unroll
    for (int i = 0; i < V; ++i) acc[i] = 0.f;
    float outside = 0.f;  // what points outside their level add to every channel: 0 or NaN (msda_math.h)
    bool fits = true;
    for (int64_t l = 0; l < p.L; ++l) {
      const int64_t H = p.shapes[2 * l], W = p.shapes[2 * l + 1], start = p.starts[l];
      if (!level_fits(H, W, start, p.S)) {
        fits = false;
        continue;
      }
      const T* level = p.value + ((n * p.S + start) * p.M + m) * p.D + c * V;
      for (int64_t pp = 0; pp < p.P; ++pp) {
        const int64_t pt = (row * p.L + l) * p.P + pp;
        Bilinear<float> b;
        const float a = to_f(p.attn[pt]);
        if (make_bilinear<float>(to_f(p.loc[2 * pt]), to_f(p.loc[2 * pt + 1]), H, W, b)) {
          gather_point<T, V>(level, p.M * p.D, b, a, acc);
        } else {
          outside += outside_sample(b, a);
        }
      }
    }
    Vec<T, V> o;
#pragma unroll
    for (int i = 0; i < V; ++i) o.v[i] = from_f<T>(fits ? acc[i] + outside : quiet_nan());
    *reinterpret_cast<Vec<T, V>*>(out + row * p.D + c * V) = o;
  }
}

// The backward's register use decides its occupancy: left alone, nvcc gives it 80 to 126
// registers (2 blocks of 256 threads per SM). These bounds cap it at 64 (80 for 16-byte
// vectors of 16-bit values), 3 to 4 blocks per SM, and ptxas reports no spills at these caps
// (tests/test_native_sources.py checks that).
template <int V>
constexpr int kBackwardMinBlocks = V >= 8 ? 3 : 4;

template <typename T, typename U, int V>
__global__ void __launch_bounds__(kThreads, kBackwardMinBlocks<V>)
    backward_kernel(Params<T, U> p, const T* __restrict__ grad_out, GradValue gv,
                                U* __restrict__ grad_loc, U* __restrict__ grad_attn, int GP) {
  const Group grp = my_group(GP);
  // Lanes past the last row stay to take part in the shuffles of their group.
  const int64_t row = grp.row;
  const bool live = row < p.N * p.Lq * p.M;
  const int lane = grp.lane;
  const int64_t m = live ? row % p.M : 0;
  const int64_t n = live ? row / (p.Lq * p.M) : 0;
  const int64_t chunks = p.D / V;
  const double scale = fixed_scale(gv);
  // This lane's share of the dot product of the row with a corner that is not loaded.
  const float gz = live ? zero_dot_share<T, V>(grad_out + row * p.D, lane, GP, chunks) : 0.f;
  for (int64_t l = 0; l < p.L; ++l) {
    const int64_t H = live ? p.shapes[2 * l] : 1, W = live ? p.shapes[2 * l + 1] : 1;
    const int64_t start = live ? p.starts[l] : 0;
    const bool fits = live && level_fits(H, W, start, p.S);  // else its gradients are NaN
    const int64_t level_off = fits ? ((n * p.S + start) * p.M + m) * p.D : 0;
    for (int64_t pp = 0; pp < p.P; ++pp) {
      const int64_t pt = (row * p.L + l) * p.P + pp;
      Bilinear<float> b;
      bool ok = false;
      float a = 0.f;
      if (fits) {
        ok = make_bilinear<float>(to_f(p.loc[2 * pt]), to_f(p.loc[2 * pt + 1]), H, W, b);
        a = to_f(p.attn[pt]);
      }
      // Corners outside the level (all four for a point outside it) keep the zero dot product.
      float s[4] = {gz, gz, gz, gz};
      if (ok) scatter_point<T, V>(p.value, grad_out + row * p.D, level_off, p.M * p.D, b, a, gv, scale, lane, GP, chunks, s);
      group_sum4(s, grp.mask, GP);
      if (live && lane == 0) {
        float ga = quiet_nan(), gx = quiet_nan(), gy = quiet_nan();  // a level that does not fit
        if (fits) point_grads<float>(b, s, a, H, W, ga, gx, gy);
        grad_attn[pt] = from_f<U>(ga);
        grad_loc[2 * pt] = from_f<U>(gx);
        grad_loc[2 * pt + 1] = from_f<U>(gy);
      }
    }
  }
}

// grad_value = fixed / scale, in the value dtype (deterministic mode), or fp32 -> T.
template <typename T>
__global__ void finish_grad_value(GradValue gv, T* __restrict__ out, int64_t numel) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= numel) return;
  if (gv.fixed != nullptr) {
    // A zero or non-finite scale comes from a non-finite grad_output or weight: the integer
    // sums are meaningless then, and NaN says so.
    const double s = *gv.scale;
    const long long q = static_cast<long long>(gv.fixed[i]);
    out[i] = from_f<T>((s > 0.0 && isfinite(s)) ? static_cast<float>(static_cast<double>(q) / s) : quiet_nan());
  } else {
    out[i] = from_f<T>(gv.f32[i]);
  }
}

// Group size: enough lanes for the channel chunks, a power of two, at most a warp.
inline int group_size(int64_t chunks) {
  int gp = 1;
  while (gp < chunks && gp < 32) gp *= 2;
  return gp;
}

inline int64_t blocks_for(int64_t threads) { return (threads + kThreads - 1) / kThreads; }

// Converts the grad_value accumulator into the value dtype (after a backward kernel).
template <typename T>
cudaError_t launch_finish_grad_value(const GradValue& gv, T* grad_value, int64_t numel, cudaStream_t stream) {
  if (numel == 0) return cudaSuccess;
  return launch(finish_grad_value<T>, blocks_for(numel), kThreads, stream, gv, grad_value, numel);
}

template <typename T, typename U, int V>
cudaError_t launch_forward(const Params<T, U>& p, T* out, cudaStream_t stream) {
  const int GP = group_size(p.D / V);
  const int64_t threads = p.N * p.Lq * p.M * GP;
  if (threads == 0) return cudaSuccess;
  return launch(forward_kernel<T, U, V>, blocks_for(threads), kThreads, stream, p, out, GP);
}

template <typename T, typename U, int V>
cudaError_t launch_backward(const Params<T, U>& p, const T* grad_out, const GradValue& gv, U* grad_loc,
                            U* grad_attn, T* grad_value, cudaStream_t stream) {
  const int GP = group_size(p.D / V);
  const int64_t threads = p.N * p.Lq * p.M * GP;
  if (threads > 0) {
    // Whole groups per block (kThreads is a multiple of every GP), so shuffles stay inside a warp.
    const cudaError_t err = launch(backward_kernel<T, U, V>, blocks_for(threads), kThreads, stream, p, grad_out, gv, grad_loc,
                                   grad_attn, GP);
    if (err != cudaSuccess) return err;
  }
  return launch_finish_grad_value<T>(gv, grad_value, p.N * p.S * p.M * p.D, stream);
}

// Largest vector width (elements) that divides D and fits 16 bytes.
template <typename T>
inline int vector_width(int64_t D, uintptr_t value_addr, uintptr_t out_addr) {
  for (int v = 16 / static_cast<int>(sizeof(T)); v > 1; v /= 2) {
    const uintptr_t bytes = static_cast<uintptr_t>(v) * sizeof(T);
    if (D % v == 0 && value_addr % bytes == 0 && out_addr % bytes == 0) return v;
  }
  return 1;
}

// Calls f.template operator()<V>() with V = vector_width(...) as a compile-time constant.
template <typename T, typename F>
cudaError_t with_vector_width(int v, F&& f) {
  switch (v) {
    case 8: if constexpr (16 / sizeof(T) >= 8) return f.template operator()<8>(); break;
    case 4: if constexpr (16 / sizeof(T) >= 4) return f.template operator()<4>(); break;
    case 2: if constexpr (16 / sizeof(T) >= 2) return f.template operator()<2>(); break;
    default: break;
  }
  return f.template operator()<1>();
}

}  // namespace cuda
}  // namespace msda
}  // namespace piip
