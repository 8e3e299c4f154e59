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
// Variants (the glue's `variant`, named in piip_kernels/variants.py; 0 is the above):
// forward 1 point_major (a row's points set up once, one per lane, and broadcast by shuffles),
// 2 flat (one thread per output chunk, no idle group lanes), 3 block128 (variant 0 in
// 128-thread blocks); backward 1 warp_aggregated (lanes of a warp that hit the same grad_value
// address add first, one atomic per address), 2 shared_privatized (a block's grad_value band
// accumulated in shared memory, then flushed). The backward variants add in fp32 only; every
// variant gives variant 0's results up to the order of fp32 additions.
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
constexpr int kForwardVariants = 4;
constexpr int kBackwardVariants = 3;
constexpr int kDeterministicBackwardVariants = 2;

// What a kernel writes where its inputs make the result meaningless (see level_fits).
__device__ __forceinline__ float quiet_nan() { return __int_as_float(0x7fc00000); }

// V consecutive elements, loaded and stored as one aligned vector.
template <typename T, int V>
struct alignas(sizeof(T) * V) Vec {
  T v[V];
};

// out[0 .. V) = the V elements at src (one aligned vector load), in fp32.
template <typename T, int V>
__device__ __forceinline__ void load_floats(const T* src, float (&out)[V]) {
  const Vec<T, V> g = *reinterpret_cast<const Vec<T, V>*>(src);
#pragma unroll
  for (int i = 0; i < V; ++i) out[i] = to_f(g.v[i]);
}

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
// sink(off, pixel, c, contrib) adds contrib to grad_value[off .. off + V), the chunk c of
// pixel `pixel` of the map (scatter_to_global, or the privatized kernel's shared buffer).
template <typename T, int V, typename Sink>
__device__ __forceinline__ void scatter_point(const T* value, const T* g_row, int64_t map, int64_t stride,
                                              const Bilinear<float>& b, float a, int lane, int GP, int64_t chunks,
                                              float s[4], Sink&& sink) {
  for (int64_t c = lane; c < chunks; c += GP) {
    float gf[V];
    load_floats<T, V>(g_row + c * V, gf);
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
      sink(off, b.idx[k], c, contrib);
    }
  }
}

// The same into grad_value (fp32 atomics, or fixed point when deterministic): variant 0, and
// the deformable cross-attention kernels.
template <typename T, int V>
__device__ __forceinline__ void scatter_point(const T* value, const T* g_row, int64_t map, int64_t stride,
                                              const Bilinear<float>& b, float a, const GradValue& gv, double scale,
                                              int lane, int GP, int64_t chunks, float s[4]) {
  scatter_point<T, V>(value, g_row, map, stride, b, a, lane, GP, chunks, s,
                      [&](int64_t off, int64_t, int64_t, const float* contrib) { scatter<V>(gv, scale, off, contrib); });
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

// Output chunk c (channels c * V .. c * V + V) of row (n, q, m): every level and point, one
// write. Variant 0 runs it for each chunk a lane owns, `flat` for the one chunk of a thread.
template <typename T, typename U, int V>
__device__ __forceinline__ void forward_chunk(const Params<T, U>& p, T* __restrict__ out, int64_t row, int64_t c) {
  const int64_t m = row % p.M;
  const int64_t n = row / (p.Lq * p.M);
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

// Variant 0 ("lanes"): one row (n, q, m) per group of GP lanes; `rows` = N * Lq * M.
// kMinBlocks is the blocks per SM asked of the compiler (__launch_bounds__): 1 leaves the
// registers to it (variant 0); `block128` launches 128-thread blocks and asks for 8.
template <typename T, typename U, int V, int kBlock, int kMinBlocks>
__global__ void __launch_bounds__(kBlock, kMinBlocks) forward_kernel(Params<T, U> p, T* __restrict__ out, int GP) {
  const Group grp = my_group(GP);
  if (grp.row >= p.N * p.Lq * p.M) return;
  for (int64_t c = grp.lane; c < p.D / V; c += GP) forward_chunk<T, U, V>(p, out, grp.row, c);
}

// Variant "flat": one thread per output chunk, thread t -> row t / chunks, chunk t % chunks.
// The forward has no reduction, so a row needs no power-of-two lane group: variant 0 leaves
// group lanes idle whenever the chunk count is not a power of two (PIIP's head dims 6, 12, 24
// and 40 in fp32 give 3, 3, 6 and 10 chunks: 25 to 37.5% of the lanes idle, and 100 gives 25
// of 32), here every thread writes a chunk, and the threads of a row still read neighbouring
// chunks of each corner (coalesced).
template <typename T, typename U, int V>
__global__ void __launch_bounds__(kThreads) flat_forward_kernel(Params<T, U> p, T* __restrict__ out) {
  const int64_t chunks = p.D / V;
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t >= p.N * p.Lq * p.M * chunks) return;
  forward_chunk<T, U, V>(p, out, t / chunks, t % chunks);
}

// Chunks a lane of `point_major` accumulates per pass over the points (registers: K * V floats).
constexpr int kPointMajorChunks = 2;

// Variant "point_major": one row per group of GP lanes as variant 0, but the group reads the
// row's L * P locations and weights cooperatively, one point per lane (coalesced), each lane
// sets up the bilinear sample of its point once, and the group broadcasts each point's corner
// offsets and weights (a * w_k) with shuffles while every lane gathers its chunks. Variant 0
// has each lane read every point and redo its setup for every chunk it owns (three times for
// D = 300 in fp32); here the setup runs once per point and pass (a pass covers K * GP chunks).
// All lanes of a warp run the same shuffles: rows past the end take part as dead lanes.
template <typename T, typename U, int V>
__global__ void __launch_bounds__(kThreads) point_major_forward_kernel(Params<T, U> p, T* __restrict__ out, int GP) {
  constexpr int K = kPointMajorChunks;
  const Group grp = my_group(GP);
  const int64_t row = grp.row;
  const bool live = row < p.N * p.Lq * p.M;
  const int lane = grp.lane;
  const int64_t m = live ? row % p.M : 0;
  const int64_t n = live ? row / (p.Lq * p.M) : 0;
  const int64_t chunks = p.D / V, points = p.L * p.P, stride = p.M * p.D;
  for (int64_t c0 = 0; c0 < chunks; c0 += K * GP) {
    float acc[K][V];
#pragma unroll
    for (int k = 0; k < K; ++k) {
#pragma unroll
      for (int i = 0; i < V; ++i) acc[k][i] = 0.f;
    }
    float outside = 0.f;  // this lane's points outside their level (summed over the group below)
    bool fits = true;
    for (int64_t j0 = 0; j0 < points; j0 += GP) {
      // This lane's point j: its corners' offsets from its level's pixel 0 (-1 outside) and
      // weights a * w_k.
      const int64_t j = j0 + lane;
      long long idx[4] = {-1, -1, -1, -1};
      float coef[4] = {0.f, 0.f, 0.f, 0.f};
      if (live && j < points) {
        const int64_t l = j / p.P;
        const int64_t H = p.shapes[2 * l], W = p.shapes[2 * l + 1];
        if (level_fits(H, W, p.starts[l], p.S)) {
          const int64_t pt = row * points + j;
          Bilinear<float> b;
          const float a = to_f(p.attn[pt]);
          if (make_bilinear<float>(to_f(p.loc[2 * pt]), to_f(p.loc[2 * pt + 1]), H, W, b)) {
#pragma unroll
            for (int k = 0; k < 4; ++k) {
              idx[k] = b.idx[k];
              coef[k] = a * b.w[k];  // as gather_point: the same products, in the same order
            }
          } else {
            outside += outside_sample(b, a);
          }
        }
      }
      const int64_t batch = points - j0 < GP ? points - j0 : GP;
      for (int src = 0; src < batch; ++src) {
        const int64_t l = (j0 + src) / p.P;  // the same for every lane
        const int64_t start = p.starts[l];
        const bool level_ok = level_fits(p.shapes[2 * l], p.shapes[2 * l + 1], start, p.S);
        fits = fits && level_ok;
        long long pix[4];
        float w[4];
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          pix[k] = __shfl_sync(grp.mask, idx[k], src, GP);
          w[k] = __shfl_sync(grp.mask, coef[k], src, GP);
        }
        if (!live || !level_ok) continue;
        const T* level = p.value + ((n * p.S + start) * p.M + m) * p.D;
#pragma unroll
        for (int kc = 0; kc < K; ++kc) {
          const int64_t c = c0 + kc * GP + lane;
          if (c >= chunks) break;
#pragma unroll
          for (int k = 0; k < 4; ++k) {
            if (pix[k] < 0) continue;
            const Vec<T, V> v = *reinterpret_cast<const Vec<T, V>*>(level + pix[k] * stride + c * V);
#pragma unroll
            for (int i = 0; i < V; ++i) acc[kc][i] += w[k] * to_f(v.v[i]);
          }
        }
      }
    }
    for (int o = GP / 2; o > 0; o /= 2) outside += __shfl_xor_sync(grp.mask, outside, o, GP);
    if (!live) continue;
#pragma unroll
    for (int kc = 0; kc < K; ++kc) {
      const int64_t c = c0 + kc * GP + lane;
      if (c >= chunks) break;
      Vec<T, V> o;
#pragma unroll
      for (int i = 0; i < V; ++i) o.v[i] = from_f<T>(fits ? acc[kc][i] + outside : quiet_nan());
      *reinterpret_cast<Vec<T, V>*>(out + row * p.D + c * V) = o;
    }
  }
}

// The backward's register use decides its occupancy: left alone, nvcc gives it 80 to 126
// registers (2 blocks of 256 threads per SM). These bounds cap it at 64 (80 for 16-byte
// vectors of 16-bit values), 3 to 4 blocks per SM, and ptxas reports no spills at these caps
// (tests/test_native_sources.py checks that).
template <int V>
constexpr int kBackwardMinBlocks = V >= 8 ? 3 : 4;

// Point pt's bilinear setup and weight where its level fits (the return value: the point lies
// inside the level); a is 0 and b unset where the level does not fit.
template <typename T, typename U>
__device__ __forceinline__ bool load_point(const Params<T, U>& p, int64_t pt, int64_t H, int64_t W, bool fits,
                                           Bilinear<float>& b, float& a) {
  a = 0.f;
  if (!fits) return false;
  a = to_f(p.attn[pt]);
  return make_bilinear<float>(to_f(p.loc[2 * pt]), to_f(p.loc[2 * pt + 1]), H, W, b);
}

// The per-point frame every backward variant shares, for one row (n, q, m) served by a group
// of GP lanes (`live`: a real row; lanes past the last row stay for the shuffles of their
// group): for each level and point, the bilinear setup (ok: the point lies inside its level;
// a: its weight), the corner dot products s started at this lane's zero-dot share gz,
// `scatter(level_off, b, a, ok, s)` (the variant's grad_value work, which adds this lane's
// corner dot products to s), the group's sums, and on its first lane the location and weight
// gradients (NaN for a level that does not fit), then `record(pt, cell, b, a, ok)` with `cell` the
// flat [N, S, M] index of the level's first pixel for this image and head.
template <typename T, typename U, typename Scatter, typename Record>
__device__ __forceinline__ void backward_points(const Params<T, U>& p, int64_t row, bool live, const Group& grp, int GP,
                                                float gz, U* __restrict__ grad_loc, U* __restrict__ grad_attn,
                                                Scatter&& scatter, Record&& record) {
  const int64_t m = live ? row % p.M : 0;
  const int64_t n = live ? row / (p.Lq * p.M) : 0;
  for (int64_t l = 0; l < p.L; ++l) {
    const int64_t H = live ? p.shapes[2 * l] : 1, W = live ? p.shapes[2 * l + 1] : 1;
    const int64_t start = live ? p.starts[l] : 0;
    const bool fits = live && level_fits(H, W, start, p.S);  // else its gradients are NaN
    const int64_t cell = (n * p.S + start) * p.M + m;
    const int64_t level_off = fits ? cell * p.D : 0;
    for (int64_t pp = 0; pp < p.P; ++pp) {
      const int64_t pt = (row * p.L + l) * p.P + pp;
      Bilinear<float> b;
      float a;
      const bool ok = load_point(p, pt, H, W, fits, b, a);
      // Corners outside the level (all four for a point outside it) keep the zero dot product.
      float s[4] = {gz, gz, gz, gz};
      scatter(level_off, b, a, ok, s);
      group_sum4(s, grp.mask, GP);
      if (live && grp.lane == 0) {
        float ga = quiet_nan(), gx = quiet_nan(), gy = quiet_nan();  // a level that does not fit
        if (fits) point_grads<float>(b, s, a, H, W, ga, gx, gy);
        grad_attn[pt] = from_f<U>(ga);
        grad_loc[2 * pt] = from_f<U>(gx);
        grad_loc[2 * pt + 1] = from_f<U>(gy);
        record(pt, cell, b, a, ok);
      }
    }
  }
}

// The no-op `record` of the variants that keep nothing per point.
struct NoRecord {
  __device__ __forceinline__ void operator()(int64_t, int64_t, const Bilinear<float>&, float, bool) const {}
};

template <typename T, typename U, int V>
__global__ void __launch_bounds__(kThreads, kBackwardMinBlocks<V>)
    backward_kernel(Params<T, U> p, const T* __restrict__ grad_out, GradValue gv,
                                U* __restrict__ grad_loc, U* __restrict__ grad_attn, int GP) {
  const Group grp = my_group(GP);
  const int64_t row = grp.row;
  const bool live = row < p.N * p.Lq * p.M;
  const int64_t chunks = p.D / V;
  const double scale = fixed_scale(gv);
  // This lane's share of the dot product of the row with a corner that is not loaded.
  const float gz = live ? zero_dot_share<T, V>(grad_out + row * p.D, grp.lane, GP, chunks) : 0.f;
  backward_points(p, row, live, grp, GP, gz, grad_loc, grad_attn,
                  [&](int64_t level_off, const Bilinear<float>& b, float a, bool ok, float s[4]) {
                    if (ok) {
                      scatter_point<T, V>(p.value, grad_out + row * p.D, level_off, p.M * p.D, b, a, gv, scale, grp.lane,
                                          GP, chunks, s);
                    }
                  },
                  NoRecord{});
}

// Row (n, q, m) of index r in (n, m, q) order: the row orders of the scatter variants below,
// in which neighbouring threads serve neighbouring queries of one head. PIIP's queries lie
// on a grid, so neighbouring queries sample neighbouring cells of the same map, whereas in
// variant 0's (n, q, m) order a warp's rows are different heads, whose maps never share an
// address.
template <typename T, typename U>
__device__ __forceinline__ int64_t query_major_row(const Params<T, U>& p, int64_t r) {
  const int64_t q = r % p.Lq, nm = r / p.Lq;  // nm = n * M + m
  return ((nm / p.M) * p.Lq + q) * p.M + nm % p.M;
}

// Sums x over the lanes of `peers` (the lanes of this warp that hold the same key, this lane
// among them) into the lowest of them. A tree over the ranks among the lanes still holding a
// partial sum: each round, a holder of even rank takes the sum of the next holder above it and
// the odd ranks drop out, so ceil(log2 |peers|) rounds. Every lane of the warp runs every round
// (shuffles need all of them), so the loop runs as long as any key has two holders left.
template <int V>
__device__ __forceinline__ void sum_over_peers(unsigned peers, float x[V]) {
  const int lane = static_cast<int>(threadIdx.x % 32);
  unsigned holders = peers;
  while (__any_sync(0xffffffffu, __popc(holders) > 1)) {
    const bool holding = (holders >> lane) & 1u;
    const int rank = __popc(holders & ((1u << lane) - 1u));
    const unsigned above = holders & ~((2u << lane) - 1u);  // 2u << 31 is 0: nothing above lane 31
    const int src = above != 0u ? __ffs(above) - 1 : lane;
    const bool take = holding && rank % 2 == 0 && above != 0u;
#pragma unroll
    for (int i = 0; i < V; ++i) {
      const float t = __shfl_sync(0xffffffffu, x[i], src);
      if (take) x[i] += t;
    }
    holders &= ~__ballot_sync(0xffffffffu, holding && rank % 2 == 1);
  }
}

// scatter_point with warp aggregation: the lanes of a warp whose targets coincide (same address:
// the same chunk of the same pixel, from different rows of the warp) add their contributions
// among themselves first and the lowest of them issues one atomic. Every lane of the warp calls
// it with the same `chunks` and GP (the matches and shuffles need the whole warp); `ok` false
// (the point outside its level, or a dead row) takes part without a target.
template <typename T, int V>
__device__ __forceinline__ void aggregated_scatter_point(const T* value, const T* g_row, int64_t map, int64_t stride,
                                                         const Bilinear<float>& b, float a, bool ok, float* gv,
                                                         int lane, int GP, int64_t chunks, float s[4]) {
  const unsigned warp_lane = threadIdx.x % 32;
  for (int64_t c0 = 0; c0 < chunks; c0 += GP) {
    const int64_t c = c0 + lane;
    const bool on = ok && c < chunks;
    float gf[V];
#pragma unroll
    for (int i = 0; i < V; ++i) gf[i] = 0.f;
    if (on) {
      load_floats<T, V>(g_row + c * V, gf);
    }
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const bool hit = on && b.idx[k] >= 0;
      const int64_t off = hit ? map + b.idx[k] * stride + c * V : 0;
      float contrib[V];
#pragma unroll
      for (int i = 0; i < V; ++i) contrib[i] = 0.f;
      if (hit) {
        const Vec<T, V> v = load_ro<T, V>(value + off);
        float dot = 0.f;
#pragma unroll
        for (int i = 0; i < V; ++i) {
          dot += gf[i] * to_f(v.v[i]);
          contrib[i] = a * b.w[k] * gf[i];
        }
        s[k] += dot;
      }
      // A lane without a target gets a key no offset has (offsets are below 2^63).
      const unsigned long long key = hit ? static_cast<unsigned long long>(off) : (1ull << 63) | warp_lane;
      const unsigned peers = __match_any_sync(0xffffffffu, key);
      sum_over_peers<V>(peers, contrib);
      if (hit && warp_lane == static_cast<unsigned>(__ffs(peers) - 1)) scatter<V>(GradValue{gv, nullptr, nullptr}, 0.0, off, contrib);
    }
  }
}

// Variant "warp_aggregated" of the backward: variant 0's per-point work in (n, m, q) row order,
// with the grad_value scatter aggregated over the lanes of a warp that hit the same address
// (aggregated_scatter_point). Fewer atomics on the same address means less serialisation in
// the L2 where many queries sample the same cells (PIIP's interactions: the query grid is
// often denser than the value grid). A row of 32 lanes (GP = 32) is alone in its warp and its
// lanes hold different chunks, so nothing can coincide: those rows scatter as variant 0.
// The match key, the peer mask and the sums beside variant 0's state need more than variant 0's
// 64 registers (ptxas spilled 32 bytes at that cap for V = 1 and 4): 3 blocks per SM (80).
template <typename T, typename U, int V>
__global__ void __launch_bounds__(kThreads, 3)
    warp_aggregated_backward_kernel(Params<T, U> p, const T* __restrict__ grad_out, float* __restrict__ gv,
                                    U* __restrict__ grad_loc, U* __restrict__ grad_attn, int GP) {
  const Group grp = my_group(GP);
  const bool live = grp.row < p.N * p.Lq * p.M;
  const int64_t row = live ? query_major_row(p, grp.row) : 0;
  const int64_t chunks = p.D / V;
  const float gz = live ? zero_dot_share<T, V>(grad_out + row * p.D, grp.lane, GP, chunks) : 0.f;
  backward_points(p, row, live, grp, GP, gz, grad_loc, grad_attn,
                  [&](int64_t level_off, const Bilinear<float>& b, float a, bool ok, float s[4]) {
                    if (GP < 32) {
                      aggregated_scatter_point<T, V>(p.value, grad_out + row * p.D, level_off, p.M * p.D, b, a, ok, gv,
                                                     grp.lane, GP, chunks, s);
                    } else if (ok) {
                      scatter_point<T, V>(p.value, grad_out + row * p.D, level_off, p.M * p.D, b, a,
                                          GradValue{gv, nullptr, nullptr}, 0.0, grp.lane, GP, chunks, s);
                    }
                  },
                  NoRecord{});
}

// Shared-memory budget of the privatized backward: 8192 fp32 (32 KB) per block.
constexpr int kPrivateFloats = 8192;

// Variant "shared_privatized" of the backward. Every block serves kThreads / GP consecutive
// queries of one (image, head); per level it finds the band of pixel rows its points touch,
// and when the band's grad_value (rows x W x D fp32) fits kPrivateFloats it accumulates there
// with shared-memory atomics, then flushes the band to global memory with one atomic per
// touched vector of V channels (an all-zero vector is skipped: adding zero changes nothing).
// Shared atomics stay on the SM, so the contention of neighbouring queries on the same cells
// no longer reaches the L2, and the global atomics drop to at most one per touched cell and
// block. A level whose band does not fit (large maps with wide spreads of offsets), or a level
// of 2^31 rows or more, is scattered with global atomics as in variant 0.
// blocks_per_map = ceil(Lq / (kThreads / GP)); the grid is N * M * blocks_per_map blocks.
template <typename T, typename U, int V>
__global__ void __launch_bounds__(kThreads, kBackwardMinBlocks<V>)
    shared_privatized_backward_kernel(Params<T, U> p, const T* __restrict__ grad_out, float* __restrict__ gv,
                               U* __restrict__ grad_loc, U* __restrict__ grad_attn, int GP, int64_t blocks_per_map) {
  __shared__ float priv[kPrivateFloats];
  __shared__ int band[2];  // first and last pixel row of the level that the block's points touch
  const int64_t nm = blockIdx.x / blocks_per_map;  // n * M + m
  const int64_t q = (blockIdx.x % blocks_per_map) * (kThreads / GP) + threadIdx.x / GP;
  const int lane = static_cast<int>(threadIdx.x % GP);
  const unsigned mask = (GP == 32) ? 0xffffffffu : (((1u << GP) - 1u) << ((threadIdx.x % 32) / GP * GP));
  const bool live = q < p.Lq;  // threads past the last query stay for the barriers and shuffles
  const int64_t n = nm / p.M, m = nm % p.M;
  const int64_t row = live ? (n * p.Lq + q) * p.M + m : 0;
  const int64_t chunks = p.D / V, stride = p.M * p.D;
  const GradValue global{gv, nullptr, nullptr};
  const float gz = live ? zero_dot_share<T, V>(grad_out + row * p.D, lane, GP, chunks) : 0.f;
  for (int64_t l = 0; l < p.L; ++l) {
    const int64_t H = p.shapes[2 * l], W = p.shapes[2 * l + 1], start = p.starts[l];
    const bool level_ok = level_fits(H, W, start, p.S);  // the same for the whole block
    const bool fits = live && level_ok;
    const int64_t level_off = level_ok ? ((n * p.S + start) * p.M + m) * p.D : 0;
    if (threadIdx.x == 0) {
      band[0] = 0x7fffffff;
      band[1] = -1;
    }
    __syncthreads();
    const bool try_private = level_ok && H < 0x7fffffff;
    if (try_private && live && lane == 0) {
      for (int64_t pp = 0; pp < p.P; ++pp) {
        const int64_t pt = (row * p.L + l) * p.P + pp;
        Bilinear<float> b;
        if (!make_bilinear<float>(to_f(p.loc[2 * pt]), to_f(p.loc[2 * pt + 1]), H, W, b)) continue;
        // Corners 0, 1 lie on the point's first row, 2, 3 on the next; either may be outside.
        const int64_t top = b.idx[0] >= 0 ? b.idx[0] : b.idx[1];
        const int64_t bottom = b.idx[2] >= 0 ? b.idx[2] : b.idx[3];
        const int64_t first = top >= 0 ? top / W : bottom / W;
        const int64_t last = bottom >= 0 ? bottom / W : top / W;
        atomicMin(&band[0], static_cast<int>(first));
        atomicMax(&band[1], static_cast<int>(last));
      }
    }
    __syncthreads();
    const int64_t lo = band[0], hi = band[1];
    const bool use_private = try_private && hi >= lo && (hi - lo + 1) <= kPrivateFloats / p.D / W;
    const int64_t band_floats = use_private ? (hi - lo + 1) * W * p.D : 0;
    for (int64_t e = threadIdx.x; e < band_floats; e += kThreads) priv[e] = 0.f;
    __syncthreads();
    for (int64_t pp = 0; pp < p.P; ++pp) {
      const int64_t pt = (row * p.L + l) * p.P + pp;
      Bilinear<float> b;
      float a;
      const bool ok = load_point(p, pt, H, W, fits, b, a);
      float s[4] = {gz, gz, gz, gz};
      if (ok) {
        scatter_point<T, V>(p.value, grad_out + row * p.D, level_off, stride, b, a, lane, GP, chunks, s,
                            [&](int64_t off, int64_t pixel, int64_t c, const float* contrib) {
                              if (use_private) {
                                float* dst = priv + (pixel - lo * W) * p.D + c * V;
#pragma unroll
                                for (int i = 0; i < V; ++i) atomicAdd(dst + i, contrib[i]);
                              } else {
                                scatter<V>(global, 0.0, off, contrib);
                              }
                            });
      }
      group_sum4(s, mask, GP);
      if (live && lane == 0) {
        float ga = quiet_nan(), gx = quiet_nan(), gy = quiet_nan();
        if (fits) point_grads<float>(b, s, a, H, W, ga, gx, gy);
        grad_attn[pt] = from_f<U>(ga);
        grad_loc[2 * pt] = from_f<U>(gx);
        grad_loc[2 * pt + 1] = from_f<U>(gy);
      }
    }
    __syncthreads();
    // Flush: vector u of the band is chunk u % chunks of the band's pixel u / chunks.
    for (int64_t u = threadIdx.x; u < band_floats / V; u += kThreads) {
      float x[V];
      bool touched = false;
#pragma unroll
      for (int i = 0; i < V; ++i) {
        x[i] = priv[u * V + i];
        touched = touched || x[i] != 0.f;  // NaN != 0: a NaN is flushed too
      }
      if (touched) scatter<V>(global, 0.0, level_off + (lo * W + u / chunks) * stride + (u % chunks) * V, x);
    }
    __syncthreads();  // the next level reuses band and priv
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

// Forward variants (piip_kernels/variants.py, "msda_forward"): 0 lanes, 1 point_major,
// 2 flat, 3 block128. Another number is refused (the glue checks it first).
template <typename T, typename U, int V>
cudaError_t launch_forward(const Params<T, U>& p, T* out, cudaStream_t stream, int variant = 0) {
  const int GP = group_size(p.D / V);
  const int64_t rows = p.N * p.Lq * p.M;
  if (rows == 0) return cudaSuccess;
  switch (variant) {
    case 0: return launch(forward_kernel<T, U, V, kThreads, 1>, blocks_for(rows * GP), kThreads, stream, p, out, GP);
    case 1: return launch(point_major_forward_kernel<T, U, V>, blocks_for(rows * GP), kThreads, stream, p, out, GP);
    case 2: return launch(flat_forward_kernel<T, U, V>, blocks_for(rows * (p.D / V)), kThreads, stream, p, out);
    case 3: {
      // 128-thread blocks (whole groups: 128 is a multiple of every GP), up to 8 resident per SM
      // asked of the compiler (<= 64 registers): smaller blocks finish less unevenly at the
      // tail of a grid and fill the SMs of small calls (batch-1 classification shapes) better.
      constexpr int kBlock = 128;
      return launch(forward_kernel<T, U, V, kBlock, 8>, (rows * GP + kBlock - 1) / kBlock, kBlock, stream, p, out, GP);
    }
    default: return cudaErrorInvalidValue;
  }
}

// Backward variants (piip_kernels/variants.py, "msda_backward"): 0 atomic, 1 warp_aggregated,
// 2 shared_privatized; another number is refused. The deterministic (fixed-point) backward has
// variant 0 only here: the other variants add in fp32, and refuse a fixed-point accumulator.
template <typename T, typename U, int V>
cudaError_t launch_backward(const Params<T, U>& p, const T* grad_out, const GradValue& gv, U* grad_loc,
                            U* grad_attn, T* grad_value, cudaStream_t stream, int variant = 0) {
  if (variant < 0 || variant >= kBackwardVariants || (variant != 0 && gv.fixed != nullptr)) return cudaErrorInvalidValue;
  const int GP = group_size(p.D / V);
  const int64_t threads = p.N * p.Lq * p.M * GP;
  if (threads > 0) {
    // Whole groups per block (kThreads is a multiple of every GP), so shuffles stay inside a warp.
    cudaError_t err = cudaSuccess;
    switch (variant) {
      case 0:
        err = launch(backward_kernel<T, U, V>, blocks_for(threads), kThreads, stream, p, grad_out, gv, grad_loc,
                     grad_attn, GP);
        break;
      case 1:
        err = launch(warp_aggregated_backward_kernel<T, U, V>, blocks_for(threads), kThreads, stream, p, grad_out,
                     gv.f32, grad_loc, grad_attn, GP);
        break;
      default: {
        const int64_t rows_per_block = kThreads / GP;
        const int64_t per_map = (p.Lq + rows_per_block - 1) / rows_per_block;
        err = launch(shared_privatized_backward_kernel<T, U, V>, p.N * p.M * per_map, kThreads, stream, p, grad_out, gv.f32,
                     grad_loc, grad_attn, GP, per_map);
        break;
      }
    }
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
