// CUDA kernels of branch_merge (torch-free).
//
// Forward variants (piip_kernels/variants.py, VARIANTS["merge_forward"]):
//  0 "pixel": one thread per output element; every branch's two taps per axis come from
//    merge_math.h (torch's bilinear rule), each corner read through the cache (about four
//    reads per input element, one per output pixel near it). A branch of the output's size
//    is read directly, without taps.
//  1 "rows_vectorized": a block owns a band of output rows of one plane. A band needs a
//    narrow band of rows of every branch (about rows * scale + 2); those rows are contiguous
//    in memory, so the block stages them in shared memory with 16-byte loads (each input
//    byte read from global memory about once), then computes the band and writes it with
//    16-byte stores (a scalar head and tail where the band is not aligned).
// Backward variants (VARIANTS["merge_backward"]):
//  0 "gather", per branch: one thread per input element gathers from the output elements
//    whose taps touch it (a few rows and columns, bounded by the scale), so grad_features
//    need no atomics; a branch of the output's size takes grad_output itself. grad_output
//    is read once per branch.
//  1 "fused_branches": one kernel for every branch. A block owns a tile of output rows of a
//    plane and, per branch, the input rows whose first tap lies in the tile (so each input
//    element belongs to exactly one block); it stages the tile's grad_output rows (plus the
//    few rows before it that also read its first input row) in shared memory once, and
//    every branch gathers from there. grad_output is read about once in total.
// Every block writes its share of each weight gradient, summed in a fixed order by the
// glue. All variants are deterministic, and none uses atomics.
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
constexpr int kForwardVariants = 2;
constexpr int kBackwardVariants = 2;

// Shared memory the staging variants use for their staged rows (static, so the emulation of
// the tests can hold it too): 24 KiB lets eight 256-thread blocks share an SM of 228 KiB.
constexpr int kStageBytes = 24 * 1024;

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

// --- staging in shared memory (rows_vectorized, fused_branches) ---------------------------

template <typename T>
__device__ __forceinline__ uintptr_t addr_of(const T* p) { return reinterpret_cast<uintptr_t>(p); }

// Copies n elements from global memory (src) to shared memory (dst), the whole block taking
// part: 16-byte vectors in the middle, single elements before the first 16-byte boundary of
// src and after the last. dst must lie at the same offset from a 16-byte boundary as src
// (stage_slot places it so), which makes the vectors aligned at both ends.
template <typename T>
__device__ void stage_rows(T* dst, const T* src, int64_t n) {
  constexpr int V = 16 / static_cast<int>(sizeof(T));
  const int64_t head = std::min<int64_t>(n, static_cast<int64_t>(((16 - addr_of(src) % 16) % 16) / sizeof(T)));
  const int64_t body = (n - head) / V;
  for (int64_t i = threadIdx.x; i < head; i += blockDim.x) dst[i] = src[i];
  const uint4* s = reinterpret_cast<const uint4*>(src + head);
  uint4* d = reinterpret_cast<uint4*>(dst + head);
  for (int64_t j = threadIdx.x; j < body; j += blockDim.x) d[j] = __ldg(s + j);
  for (int64_t i = head + body * V + threadIdx.x; i < n; i += blockDim.x) dst[i] = src[i];
}

// Where in a shared buffer (16-byte aligned, at byte `offset`) rows copied from `src` start:
// at src's offset from a 16-byte boundary, so that stage_rows' vectors line up. The host
// gives every slot 16 bytes of room for this.
template <typename T>
__device__ __forceinline__ T* stage_slot(unsigned char* buffer, int64_t offset, const T* src) {
  return reinterpret_cast<T*>(buffer + offset + addr_of(src) % 16);
}

// Rows [lo, hi] of a plane of a map (or of grad_output), `at` pointing at row lo: in the stage,
// or in global memory where they were not staged (then `global` == `at`). A row outside
// [lo, hi] is read through `global`, which points at the same row lo in global memory: the
// kernels find the rows a block reads with the same tap arithmetic as they then read them,
// but the compiler may round the two call sites differently (contracting one to an fma), so
// a read just outside the staged rows stays right, only slower.
template <typename T>
struct Staged {
  const T* at;
  const T* global;
  int64_t lo, hi, width;  // width: elements per row

  __device__ __forceinline__ const T* row(int64_t r) const { return (r >= lo && r <= hi ? at : global) + (r - lo) * width; }
};

// --- forward variant 1: rows_vectorized -----------------------------------------------------

// How the rows_vectorized forward splits the output (host side: rows_plan).
struct RowsPlan {
  int64_t rows;                // output rows per block (a band); the last band may be shorter
  int64_t bands;               // ceil(Ho / rows)
  int64_t cap[kMaxBranches];   // rows of map b its stage slot holds (0: read from global memory)
  int64_t slot[kMaxBranches];  // byte offset of that slot in the stage (16-byte aligned)
};

// The merged value of output element (oy, ox), as forward_kernel computes it, map b's rows
// read through rows[b].
template <typename T>
__device__ __forceinline__ float merged_at(const ForwardParams<T>& p, const float* w, const Staged<T>* rows, int64_t oy,
                                           int64_t ox) {
  float acc = 0.f;
  for (int b = 0; b < p.nb; ++b) {
    const Staged<T>& m = rows[b];
    if (p.H[b] == p.Ho && p.W[b] == p.Wo) {  // as forward_kernel: no resampling
      acc += w[b] * to_f(m.row(oy)[ox]);
      continue;
    }
    const Tap<float> ty = axis_tap<float>(oy, p.H[b], p.sy[b], p.align_corners);
    const Tap<float> tx = axis_tap<float>(ox, p.W[b], p.sx[b], p.align_corners);
    const T* r0 = m.row(ty.i0);
    const T* r1 = m.row(ty.i1);
    const float v00 = to_f(r0[tx.i0]), v01 = to_f(r0[tx.i1]);
    const float v10 = to_f(r1[tx.i0]), v11 = to_f(r1[tx.i1]);
    const float top = v00 + tx.l * (v01 - v00), bot = v10 + tx.l * (v11 - v10);
    acc += w[b] * (top + ty.l * (bot - top));
  }
  return acc;
}

// Block: output rows [oy0, oy0 + rows) of one plane (blockIdx.x = plane * bands + band).
// out [planes, Ho, Wo]; the band is contiguous there, rows * Wo elements, and so are the rows
// of each map it reads. VO outputs per 16-byte store.
template <typename T, typename O>
__global__ void __launch_bounds__(kThreads)
    rows_vectorized_forward_kernel(ForwardParams<T> p, RowsPlan plan, O* __restrict__ out) {
  constexpr int VO = 16 / static_cast<int>(sizeof(O));
  __shared__ __align__(16) unsigned char stage[kStageBytes];
  __shared__ Staged<T> rows_of[kMaxBranches];  // the rows of map b the band reads
  __shared__ int64_t count[kMaxBranches];      // elements to stage (0: read from global memory)
  __shared__ float w[kMaxBranches];
  const int64_t plane = blockIdx.x / plan.bands, oy0 = (blockIdx.x % plan.bands) * plan.rows;
  const int64_t rows = std::min<int64_t>(plan.rows, p.Ho - oy0);
  if (threadIdx.x < static_cast<unsigned>(p.nb)) {
    const int b = static_cast<int>(threadIdx.x);
    int64_t first = oy0, last = oy0 + rows - 1;  // a map of the output's size: the band's own rows
    if (p.H[b] != p.Ho || p.W[b] != p.Wo) {
      first = axis_tap<float>(oy0, p.H[b], p.sy[b], p.align_corners).i0;
      last = axis_tap<float>(oy0 + rows - 1, p.H[b], p.sy[b], p.align_corners).i1;
    }
    const T* rows_at = p.f[b] + (plane * p.H[b] + first) * p.W[b];
    // The host sized the slot from the scale; should rounding ever ask for more rows, this
    // map is read from global memory instead (right, only slower).
    const bool staged = last - first + 1 <= plan.cap[b];
    rows_of[b] = {staged ? stage_slot<T>(stage, plan.slot[b], rows_at) : rows_at, rows_at, first, last, p.W[b]};
    count[b] = staged ? (last - first + 1) * p.W[b] : 0;
    w[b] = p.weights[b];
  }
  __syncthreads();
  for (int b = 0; b < p.nb; ++b) {
    if (count[b] > 0) stage_rows<T>(const_cast<T*>(rows_of[b].at), rows_of[b].global, count[b]);
  }
  __syncthreads();

  O* o = out + (plane * p.Ho + oy0) * p.Wo;
  const int64_t n = rows * p.Wo;
  const int64_t head = std::min<int64_t>(n, static_cast<int64_t>(((16 - addr_of(o) % 16) % 16) / sizeof(O)));
  const int64_t body = (n - head) / VO;
  for (int64_t k = threadIdx.x; k < head; k += blockDim.x) {
    o[k] = from_f<O>(merged_at<T>(p, w, rows_of, oy0 + k / p.Wo, k % p.Wo));
  }
  for (int64_t j = threadIdx.x; j < body; j += blockDim.x) {
    const int64_t k = head + j * VO;
    int64_t oy = oy0 + k / p.Wo, ox = k % p.Wo;  // one division per vector; the rest steps along
    msda::cuda::Vec<O, VO> v;
#pragma unroll
    for (int i = 0; i < VO; ++i) {
      v.v[i] = from_f<O>(merged_at<T>(p, w, rows_of, oy, ox));
      if (++ox == p.Wo) ox = 0, ++oy;
    }
    *reinterpret_cast<msda::cuda::Vec<O, VO>*>(o + k) = v;
  }
  for (int64_t k = head + body * VO + threadIdx.x; k < n; k += blockDim.x) {
    o[k] = from_f<O>(merged_at<T>(p, w, rows_of, oy0 + k / p.Wo, k % p.Wo));
  }
}

// --- backward variant 1: fused_branches ------------------------------------------------------

// Every branch at once (the glue's view of the backward), and what the fused kernel needs.
template <typename T, typename O>
struct BranchesBackward {
  const O* grad_out;              // [planes, Ho, Wo]
  const T* f[kMaxBranches];       // [planes, H[b], W[b]]
  T* grad_f[kMaxBranches];        // [planes, H[b], W[b]]
  int64_t H[kMaxBranches], W[kMaxBranches];
  float sy[kMaxBranches], sx[kMaxBranches], inv_sy[kMaxBranches], inv_sx[kMaxBranches];
  int64_t ky[kMaxBranches], kx[kMaxBranches];  // candidate output rows / columns, as BackwardParams
  const float* weights;           // [nb], device
  float* partial;                 // [nb, shares]: shares of each weight gradient, zeroed by the caller
  int64_t shares;                 // length of each row of partial (branches_backward sets it per variant)
  int nb;
  int64_t planes, Ho, Wo;
  bool align_corners;
  int64_t rows, tiles;            // fused: output rows per tile, ceil(Ho / rows)
  int64_t cap;                    // fused: grad_output elements the stage holds
};

// The unweighted gradient of input element (iy, ix) of a map (H x W, scales s*, candidates k*):
// the sum over the output elements whose taps read it of their tap weights times grad_out,
// g: grad_output's rows of the plane. As backward_kernel, in the same order, but leaving each axis'
// search once past its readers (they are consecutive: i0 and i1 never decrease with o).
template <typename O>
__device__ __forceinline__ float gather_rows(const Staged<O>& g, int64_t iy, int64_t ix, int64_t H, int64_t W,
                                             int64_t Ho, int64_t Wo, float sy, float sx, float inv_sy, float inv_sx,
                                             int64_t ky, int64_t kx, bool align) {
  const int64_t y0 = first_reader(iy, inv_sy, align), x0 = first_reader(ix, inv_sx, align);
  float G = 0.f;
  bool seen_y = false;
  for (int64_t a = 0; a < ky; ++a) {
    const int64_t oy = y0 + a;
    if (oy >= Ho) break;
    float wy, wx;
    if (!axis_read(oy, iy, H, sy, align, wy)) {
      if (seen_y) break;
      continue;
    }
    seen_y = true;
    const O* row = g.row(oy);
    bool seen_x = false;
    for (int64_t b = 0; b < kx; ++b) {
      const int64_t ox = x0 + b;
      if (ox >= Wo) break;
      if (axis_read(ox, ix, W, sx, align, wx)) {
        G += wy * wx * to_f(row[ox]);
        seen_x = true;
      } else if (seen_x) {
        break;
      }
    }
  }
  return G;
}

// Block: tile t of output rows [t * rows, t * rows + rows) of one plane (blockIdx.x = plane *
// tiles + t). It owns, of map b, the input rows [i0(t * rows), i0((t + 1) * rows)) (the first
// tile from row 0, the last to row H[b]): every input row belongs to exactly one tile. Their
// readers are output rows [A_b, end of the tile), A_b the first whose second tap reaches the
// first owned row (at most a few rows before the tile); the block stages grad_output rows
// [min_b A_b, end of the tile) once and every branch gathers from them.
template <typename T, typename O>
__global__ void __launch_bounds__(kThreads) fused_branches_backward_kernel(BranchesBackward<T, O> p) {
  __shared__ __align__(16) unsigned char stage[kStageBytes];
  __shared__ float share[kThreads];
  __shared__ int64_t own0[kMaxBranches], own1[kMaxBranches], first[kMaxBranches];
  __shared__ Staged<O> g;  // the tile's grad_output rows, with its lead-in
  __shared__ int64_t staged;
  const int64_t plane = blockIdx.x / p.tiles, t = blockIdx.x % p.tiles;
  const int64_t oy0 = t * p.rows, oy1 = t + 1 == p.tiles ? p.Ho : oy0 + p.rows;
  if (threadIdx.x < static_cast<unsigned>(p.nb)) {
    const int b = static_cast<int>(threadIdx.x);
    // The owned rows' ends, i0 of the tile's first row and of the next tile's (a map of the
    // output's size: the rows themselves). One copy of the tap arithmetic computes both, so
    // that neighbouring tiles agree on their common end to the last bit.
    const bool identity = p.H[b] == p.Ho && p.W[b] == p.Wo;
    int64_t r0 = 0, r1 = p.H[b];
#pragma unroll 1
    for (int e = 0; e < 2; ++e) {
      const int64_t o = e == 0 ? oy0 : oy1;
      const int64_t r = identity ? o : axis_tap<float>(o, p.H[b], p.sy[b], p.align_corners).i0;
      if (e == 0 && t > 0) r0 = r;
      if (e == 1 && t + 1 < p.tiles) r1 = r;
    }
    int64_t a = oy0;
    if (r0 < r1 && !identity) {
      while (a > 0 && axis_tap<float>(a - 1, p.H[b], p.sy[b], p.align_corners).i1 >= r0) --a;
    }
    own0[b] = r0;
    own1[b] = r1;
    first[b] = a;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    int64_t a = oy0;
    for (int b = 0; b < p.nb; ++b) a = std::min(a, first[b]);
    const O* rows_at = p.grad_out + (plane * p.Ho + a) * p.Wo;
    // The host sized the tile to fit with the usual lead-in; a longer one (a scale of 0: every
    // output row reads input row 0) is read from global memory instead.
    const bool fits = (oy1 - a) * p.Wo <= p.cap;
    g = {fits ? stage_slot<O>(stage, 0, rows_at) : rows_at, rows_at, a, oy1 - 1, p.Wo};
    staged = fits ? (oy1 - a) * p.Wo : 0;
  }
  __syncthreads();
  if (staged > 0) stage_rows<O>(const_cast<O*>(g.at), g.global, staged);
  __syncthreads();

  for (int b = 0; b < p.nb; ++b) {
    const int64_t H = p.H[b], W = p.W[b];
    const bool identity = H == p.Ho && W == p.Wo;  // its gradient is grad_out itself
    const float weight = p.weights[b];
    const int64_t base = plane * H * W;
    float dot = 0.f;
    for (int64_t i = own0[b] * W + threadIdx.x; i < own1[b] * W; i += blockDim.x) {
      const int64_t iy = i / W, ix = i - iy * W;
      const float G = identity ? to_f(g.row(iy)[ix])
                               : gather_rows<O>(g, iy, ix, H, W, p.Ho, p.Wo, p.sy[b], p.sx[b], p.inv_sy[b],
                                                p.inv_sx[b], p.ky[b], p.kx[b], p.align_corners);
      p.grad_f[b][base + i] = from_f<T>(weight * G);
      dot += to_f(p.f[b][base + i]) * G;
    }
    // This block's share of branch b's weight gradient (fixed order: deterministic).
    share[threadIdx.x] = dot;
    __syncthreads();
    for (unsigned s = blockDim.x / 2; s > 0; s /= 2) {
      if (threadIdx.x < s) share[threadIdx.x] += share[threadIdx.x + s];
      __syncthreads();
    }
    if (threadIdx.x == 0) p.partial[b * p.shares + blockIdx.x] = share[0];
  }
}

// --- host side ---------------------------------------------------------------------------
//
// The kernels' parameters from sizes and pointers (the glue and the CPU emulation of the
// tests both build them here).
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

// Input rows a band of `rows` output rows can read along an axis of scale s: its taps span
// (rows - 1) * s source rows, plus the two taps' rows, plus one for float rounding (the
// kernel checks, and reads from global memory should a band ever need more).
inline int64_t band_rows(int64_t rows, float s) {
  return static_cast<int64_t>(std::floor(static_cast<double>(rows - 1) * s)) + 4;
}

inline int64_t align16(int64_t bytes) { return (bytes + 15) / 16 * 16; }

// The rows_vectorized forward's bands: about two 16-byte stores per thread per band (fewer
// rows when the stage cannot hold them), and a stage slot for every map that fits (each slot
// 16 bytes longer than its rows, for stage_slot's alignment).
template <typename T>
RowsPlan rows_plan(const ForwardParams<T>& p, int64_t element_bytes_out) {
  RowsPlan plan{};
  const int64_t per_band = 2 * kThreads * (16 / element_bytes_out);
  int64_t rows = std::max<int64_t>(1, std::min<int64_t>(p.Ho, (per_band + p.Wo - 1) / p.Wo));
  const auto need = [&](int b, int64_t r) {
    const bool identity = p.H[b] == p.Ho && p.W[b] == p.Wo;
    return std::min<int64_t>(identity ? r : band_rows(r, p.sy[b]), p.H[b]);
  };
  const auto bytes = [&](int b, int64_t r) { return align16(need(b, r) * p.W[b] * static_cast<int64_t>(sizeof(T)) + 16); };
  for (;;) {
    int64_t total = 0;
    for (int b = 0; b < p.nb; ++b) total += bytes(b, rows);
    if (total <= kStageBytes || rows == 1) break;
    rows = std::max<int64_t>(1, rows * 3 / 4);
  }
  plan.rows = rows;
  plan.bands = (p.Ho + rows - 1) / rows;
  int64_t used = 0;
  for (int b = 0; b < p.nb; ++b) {  // in order; a map whose rows do not fit is read from global memory
    if (used + bytes(b, rows) <= kStageBytes) {
      plan.cap[b] = need(b, rows);
      plan.slot[b] = used;
      used += bytes(b, rows);
    }
  }
  return plan;
}

template <typename T, typename O>
cudaError_t launch_forward(int variant, const ForwardParams<T>& p, O* out, cudaStream_t stream) {
  const int64_t n = p.planes * p.Ho * p.Wo;
  if (n == 0) return cudaSuccess;
  if (variant == 1) {
    const RowsPlan plan = rows_plan<T>(p, sizeof(O));
    return launch(rows_vectorized_forward_kernel<T, O>, p.planes * plan.bands, kThreads, stream, p, plan, out);
  }
  if (variant != 0) return cudaErrorInvalidValue;
  return launch(forward_kernel<T, O>, blocks_for(n), kThreads, stream, p, out);
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

// Every branch's backward for `variant`: maps[b] and grads[b] [planes, H[b], W[b]], weights
// [nb] fp32 (device). The caller then allocates `partial` as [nb, backward_shares(...)] fp32,
// zeroed, sets it, and sums each row (in a fixed order) for the weight gradients.
template <typename T, typename O>
BranchesBackward<T, O> branches_backward(int variant, int nb, const O* grad_out, const T* const* maps, T* const* grads,
                                         const int64_t* H, const int64_t* W, const float* weights, int64_t planes,
                                         int64_t Ho, int64_t Wo, bool align_corners) {
  BranchesBackward<T, O> p{};
  p.grad_out = grad_out;
  p.nb = nb;
  p.weights = weights;
  p.planes = planes;
  p.Ho = Ho;
  p.Wo = Wo;
  p.align_corners = align_corners;
  int64_t lead = 0;  // most grad_output rows a tile stages before its own
  for (int b = 0; b < nb; ++b) {
    p.f[b] = maps[b];
    p.grad_f[b] = grads[b];
    p.H[b] = H[b];
    p.W[b] = W[b];
    p.sy[b] = scale_of(H[b], Ho, align_corners);
    p.sx[b] = scale_of(W[b], Wo, align_corners);
    p.inv_sy[b] = p.sy[b] > 0.f ? 1.f / p.sy[b] : 0.f;
    p.inv_sx[b] = p.sx[b] > 0.f ? 1.f / p.sx[b] : 0.f;
    p.ky[b] = candidates(p.sy[b], Ho);
    p.kx[b] = candidates(p.sx[b], Wo);
    // The rows before a tile that read its first input row: where the source coordinate
    // lies within one input row of it, 1 / scale of them (and a little for rounding).
    if (H[b] != Ho || W[b] != Wo) lead = std::max<int64_t>(lead, p.sy[b] > 0.f ? static_cast<int64_t>(std::ceil(1.0 / p.sy[b])) + 2 : Ho);
  }
  // fused_branches: tiles of about eight output elements per thread, fewer rows when the
  // stage cannot hold them with their lead-in.
  // An empty grad_output (Ho or Wo of 0) is one tile per plane, whose maps' gradients are 0.
  p.cap = (kStageBytes - 16) / static_cast<int64_t>(sizeof(O));
  p.rows = Ho > 0 && Wo > 0 ? std::max<int64_t>(1, std::min({Ho, (8 * kThreads + Wo - 1) / Wo, p.cap / Wo - lead})) : 1;
  p.tiles = std::max<int64_t>(1, (Ho + p.rows - 1) / p.rows);
  int64_t shares = 0;
  for (int b = 0; b < nb; ++b) shares = std::max(shares, variant == 1 ? planes * p.tiles : backward_blocks(planes, H[b], W[b]));
  p.shares = shares;
  return p;
}

template <typename T, typename O>
cudaError_t launch_backward(int variant, const BranchesBackward<T, O>& p, cudaStream_t stream) {
  if (variant == 1) {
    if (p.planes == 0) return cudaSuccess;
    return launch(fused_branches_backward_kernel<T, O>, p.planes * p.tiles, kThreads, stream, p);
  }
  if (variant != 0) return cudaErrorInvalidValue;
  for (int b = 0; b < p.nb; ++b) {  // gather: one launch per branch
    const int64_t blocks = backward_blocks(p.planes, p.H[b], p.W[b]);
    if (blocks == 0) continue;
    const BackwardParams<T, O> q = backward_params<T, O>(p.grad_out, p.f[b], p.grad_f[b], p.partial + b * p.shares,
                                                         p.weights + b, p.planes, p.H[b], p.W[b], p.Ho, p.Wo,
                                                         p.align_corners);
    const cudaError_t err = launch(backward_kernel<T, O>, blocks, kThreads, stream, q);
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

}  // namespace cuda
}  // namespace merge
}  // namespace piip
