// The deterministic MSDA backward without atomics ("two_pass", variant 1 of
// msda_backward_deterministic; torch-free).
//
// Variant 0 ("fixed_point", msda_cuda.cuh) makes the grad_value scatter order-independent by
// adding 64-bit fixed-point integers. This one never adds two floats in an order that depends
// on scheduling: it turns the scatter into a gather over a list of contributions sorted by
// target. Every sum is formed in one fixed order (entry order, whatever the grid or the
// scheduling), so the bits are the same run to run, and NaN and infinity reach grad_value exactly where the
// reference puts them (a fixed-point sum cannot hold them and variant 0 poisons all of
// grad_value instead).
//
// An "entry" is one bilinear corner of one sampling point: e = pt * 4 + k with
// pt = (row * L + l) * P + p, row = (n * Lq + q) * M + m, so entries are numbered E = rows * L
// * P * 4 in the order of the reference's loops. A "cell" is one D-vector of value:
// c = (n * S + s) * M + m, C = N * S * M of them.
//
// 1. Pass 1 (pass1_kernel, GP lanes per row as in msda_cuda.cuh's backward): the location and
//    weight gradients as variant 0 computes them (the same corner dot products, lane split
//    and shuffles, so the same arithmetic), and for every entry its target cell (C when the corner
//    is outside the map, the point outside it, or its level does not fit value) and its
//    coefficient attn * w_k.
// 2. Sort the entries by cell, stably: an LSD radix sort of (cell, entry) pairs on 4-bit
//    digits, ceil(bits(C) / 4) passes. Each pass: per-tile digit counts (radix_count), one
//    exclusive scan of the [digit, tile] counts (scan_kernel), and a scatter that ranks a
//    tile's keys by (digit, thread, item) (radix_scatter). No atomics: every position is a
//    sum of counts, and stability keeps the entries of a cell in entry order. The sort costs
//    about 20 bytes of traffic per entry and pass, independent of D.
// 3. CSR offsets from the sorted keys (csr_offsets): cell c's entries are sorted[off[c],
//    off[c + 1]); the unused corners (key C) sort last and are dropped.
// 4. Pass 2 (pass2_kernel, GP lanes per cell): grad_value[c] = sum over its entries, in entry
//    order, of coef * grad_out[row of the entry], in fp32, written once in value's dtype
//    (no zero fill, no conversion kernel, no int64 accumulator).
//
// Why it may beat variant 0: variant 0 issues rows * L * P * 4 * D 64-bit atomics, which
// contend where many queries sample a small (coarse) level, plus the scale pre-pass, the
// int64 accumulator (8 bytes per value element, zeroed) and the conversion. This one reads
// grad_out once per contribution without contention and sorts 8-byte pairs whatever D is:
// it should gain with large D and coarse levels and lose with small D, where the sort dominates.
// Limits: entries and cells are int32 (fits_int32 says whether a call fits; the glue refuses
// the others with a message pointing to variant 0).
//
// Layouts as in msda_cuda.cuh: value [N, S, M, D], loc [N, Lq, M, L, P, 2], attn
// [N, Lq, M, L, P], grad_out [N, Lq, M, D].
#pragma once

#include <cstddef>
#include <cstdint>

#include "msda_cuda.cuh"

namespace piip {
namespace msda {
namespace two_pass {

using cuda::Group;
using cuda::Params;
using cuda::Vec;
using cuda::from_f;
using cuda::kThreads;
using cuda::to_f;

constexpr int kRadixBits = 4;
constexpr int kBins = 1 << kRadixBits;
constexpr int kItems = 8;                   // keys per thread in the sort kernels
constexpr int kTile = kThreads * kItems;    // keys per block of the sort kernels

// The size of one call: entries (corners) and cells (value D-vectors).
struct Problem {
  int64_t entries, cells;
};

inline Problem problem(int64_t N, int64_t S, int64_t M, int64_t Lq, int64_t L, int64_t P) {
  return {N * Lq * M * L * P * 4, N * S * M};
}

// Whether the int32 indices hold every entry, every cell and the key C of unused corners.
inline bool fits_int32(const Problem& z) {
  constexpr int64_t kMax = 2147483647;
  return z.entries < kMax && z.cells < kMax;
}

inline int64_t sort_tiles(const Problem& z) { return (z.entries + kTile - 1) / kTile; }

// Radix passes: enough 4-bit digits for keys 0..C (C marks an unused corner).
inline int radix_passes(const Problem& z) {
  int bits = 0;
  while (bits < 31 && (int64_t{1} << bits) <= z.cells) ++bits;
  return (bits + kRadixBits - 1) / kRadixBits;
}

// The caller's workspace, carved into aligned int32/fp32 arrays.
struct Workspace {
  int32_t* keys[2];  // [E] target cells, ping-pong buffers of the sort
  int32_t* ids[2];   // [E] entry numbers, sorted along with the keys
  float* coef;       // [E] attn * w_k of each entry, by entry number
  int32_t* counts;   // [kBins * tiles] digit counts of the sort, then their exclusive scan
  int32_t* offsets;  // [C + 1] CSR: cell c's entries are sorted positions offsets[c] .. offsets[c + 1]
};

inline size_t round_up(size_t bytes) { return (bytes + 255) / 256 * 256; }

// Lays the arrays out from `base` (nullptr to measure); returns the bytes they take.
inline size_t carve(const Problem& z, char* base, Workspace* ws) {
  const size_t e4 = round_up(static_cast<size_t>(z.entries) * 4);
  const size_t sizes[7] = {e4, e4, e4, e4, e4, round_up(static_cast<size_t>(kBins * sort_tiles(z)) * 4),
                           round_up(static_cast<size_t>(z.cells + 1) * 4)};
  char* at[7];
  size_t total = 0;
  for (int i = 0; i < 7; ++i) {
    at[i] = base != nullptr ? base + total : nullptr;
    total += sizes[i];
  }
  if (ws != nullptr) {
    *ws = {{reinterpret_cast<int32_t*>(at[0]), reinterpret_cast<int32_t*>(at[1])},
           {reinterpret_cast<int32_t*>(at[2]), reinterpret_cast<int32_t*>(at[3])},
           reinterpret_cast<float*>(at[4]), reinterpret_cast<int32_t*>(at[5]), reinterpret_cast<int32_t*>(at[6])};
  }
  return total;
}

// Bytes of workspace a call needs. The pieces start on 256-byte boundaries of the buffer, so a
// buffer aligned as CUDA allocations are (256 bytes or more) gives aligned, coalesced arrays;
// 4 bytes is all correctness needs.
inline size_t workspace_bytes(const Problem& z) { return carve(z, nullptr, nullptr); }

// One sampling point, this lane's chunks (lane, lane + GP, ... < chunks): adds the partial dot
// products <grad_out, value[corner k]> to s[k], as msda_cuda.cuh's scatter_point without
// the scatter (same order of operations, so the same bits as variant 0).
template <typename T, int V>
__device__ __forceinline__ void dot_point(const T* value, const T* g_row, int64_t map, int64_t stride,
                                          const Bilinear<float>& b, int lane, int GP, int64_t chunks, float s[4]) {
  for (int64_t c = lane; c < chunks; c += GP) {
    float gf[V];
    cuda::load_floats<T, V>(g_row + c * V, gf);
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      if (b.idx[k] < 0) continue;
      const Vec<T, V> v = cuda::load_ro<T, V>(value + map + b.idx[k] * stride + c * V);
      float dot = 0.f;
#pragma unroll
      for (int i = 0; i < V; ++i) dot += gf[i] * to_f(v.v[i]);
      s[k] += dot;
    }
  }
}

// Pass 1: one row (n, q, m) per group of GP lanes. Writes grad_loc and grad_attn, and each
// entry's cell (C when unused) and coefficient, and its own number as the sort's payload.
// The occupancy caps of variant 0's backward (64 registers, 80 for 16-byte vectors of 16-bit
// values): pass 1 holds less (no scatter), and ptxas reports no spills at these caps.
template <typename T, typename U, int V>
__global__ void __launch_bounds__(kThreads, cuda::kBackwardMinBlocks<V>)
    pass1_kernel(Params<T, U> p, const T* __restrict__ grad_out, U* __restrict__ grad_loc, U* __restrict__ grad_attn,
                 int32_t* __restrict__ keys, int32_t* __restrict__ ids, float* __restrict__ coef, int GP) {
  const Group grp = cuda::my_group(GP);
  // Lanes past the last row stay to take part in the shuffles of their group.
  const int64_t row = grp.row;
  const bool live = row < p.N * p.Lq * p.M;
  const int64_t chunks = p.D / V;
  const int32_t unused = static_cast<int32_t>(p.N * p.S * p.M);
  const float gz = live ? cuda::zero_dot_share<T, V>(grad_out + row * p.D, grp.lane, GP, chunks) : 0.f;
  // A level that does not fit gives NaN gradients and leaves its corners unused (ok is false).
  cuda::backward_points(
      p, row, live, grp, GP, gz, grad_loc, grad_attn,
      [&](int64_t level_off, const Bilinear<float>& b, float, bool ok, float s[4]) {
        if (ok) dot_point<T, V>(p.value, grad_out + row * p.D, level_off, p.M * p.D, b, grp.lane, GP, chunks, s);
      },
      [&](int64_t pt, int64_t cell, const Bilinear<float>& b, float a, bool ok) {
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          const int64_t e = pt * 4 + k;
          const bool used = ok && b.idx[k] >= 0;
          // The cell of the level's pixel idx for this image and head ([N, S, M] flat).
          keys[e] = used ? static_cast<int32_t>(cell + b.idx[k] * p.M) : unused;
          ids[e] = static_cast<int32_t>(e);
          coef[e] = used ? a * b.w[k] : 0.f;
        }
      });
}

// The sort kernels are templates on the index type K (always int32_t) only so that, as every
// kernel in these headers, they have one definition however many files include this one.

// This thread's keys of tile blockIdx.x: items [first, first + kItems) below n.
__device__ __forceinline__ int64_t first_item() {
  return static_cast<int64_t>(blockIdx.x) * kTile + static_cast<int64_t>(threadIdx.x) * kItems;
}

__device__ __forceinline__ int digit_of(int32_t key, int shift) { return (key >> shift) & (kBins - 1); }

// per_thread[d][t] = how many of thread t's keys (first_item()'s kItems, below n) have digit d;
// the caller's barrier then makes every thread's counts visible.
template <typename K>
__device__ __forceinline__ void count_digits(const K* __restrict__ keys, int64_t n, int shift,
                                             int32_t (&per_thread)[kBins][kThreads]) {
  int32_t c[kBins];
#pragma unroll
  for (int d = 0; d < kBins; ++d) c[d] = 0;
  const int64_t first = first_item();
  for (int i = 0; i < kItems; ++i) {
    if (first + i < n) ++c[digit_of(keys[first + i], shift)];
  }
#pragma unroll
  for (int d = 0; d < kBins; ++d) per_thread[d][threadIdx.x] = c[d];
}

// counts[d * tiles + tile] = how many keys of the tile have digit d.
template <typename K>
__global__ void __launch_bounds__(kThreads)
    radix_count(const K* __restrict__ keys, int64_t n, int shift, int32_t* __restrict__ counts, int64_t tiles) {
  __shared__ int32_t per_thread[kBins][kThreads];
  count_digits(keys, n, shift, per_thread);
  __syncthreads();
  if (threadIdx.x < kBins) {
    int32_t sum = 0;
    for (int t = 0; t < kThreads; ++t) sum += per_thread[threadIdx.x][t];
    counts[threadIdx.x * tiles + blockIdx.x] = sum;
  }
}

// In-place exclusive scan of x[0 .. n), one block: thread t scans a contiguous run, thread 0
// scans the run totals. Integers, so any order gives the same result; digit-major order of the
// counts makes the sort stable.
template <typename K>
__global__ void __launch_bounds__(kThreads) scan_kernel(K* __restrict__ x, int64_t n) {
  __shared__ int32_t totals[kThreads];
  const int64_t run = (n + kThreads - 1) / kThreads;
  const int64_t lo = threadIdx.x * run, hi = lo + run < n ? lo + run : n;
  int32_t sum = 0;
  for (int64_t i = lo; i < hi; ++i) sum += x[i];
  totals[threadIdx.x] = sum;
  __syncthreads();
  if (threadIdx.x == 0) {
    int32_t acc = 0;
    for (int t = 0; t < kThreads; ++t) {
      const int32_t v = totals[t];
      totals[t] = acc;
      acc += v;
    }
  }
  __syncthreads();
  int32_t acc = totals[threadIdx.x];
  for (int64_t i = lo; i < hi; ++i) {
    const int32_t v = x[i];
    x[i] = acc;
    acc += v;
  }
}

// Moves the tile's (key, id) pairs to their sorted places for this digit: the tile's start in
// digit d (scanned counts) + the keys of digit d held by earlier threads + earlier items of
// this thread. Stable: the order inside a digit is the input order.
template <typename K>
__global__ void __launch_bounds__(kThreads)
    radix_scatter(const K* __restrict__ keys_in, const K* __restrict__ ids_in, K* __restrict__ keys_out,
                  K* __restrict__ ids_out, int64_t n, int shift, const int32_t* __restrict__ scanned, int64_t tiles) {
  __shared__ int32_t per_thread[kBins][kThreads];
  count_digits(keys_in, n, shift, per_thread);
  __syncthreads();
  if (threadIdx.x < kBins) {  // exclusive scan over the threads, one digit per scanning thread
    int32_t acc = scanned[threadIdx.x * tiles + blockIdx.x];
    for (int t = 0; t < kThreads; ++t) {
      const int32_t v = per_thread[threadIdx.x][t];
      per_thread[threadIdx.x][t] = acc;
      acc += v;
    }
  }
  __syncthreads();
  int32_t c[kBins];  // where this thread's next key of each digit goes
#pragma unroll
  for (int d = 0; d < kBins; ++d) c[d] = per_thread[d][threadIdx.x];
  const int64_t first = first_item();
  for (int i = 0; i < kItems; ++i) {
    if (first + i >= n) break;
    const int32_t key = keys_in[first + i];
    const int32_t at = c[digit_of(key, shift)]++;
    keys_out[at] = key;
    ids_out[at] = ids_in[first + i];
  }
}

// offsets[c] = the first sorted position whose key is >= c, for c in 0..C. Thread i (0..n)
// writes the cells in (key[i - 1], key[i]] (key[-1] = -1, key[n] = C): each cell exactly once.
template <typename K>
__global__ void __launch_bounds__(kThreads)
    csr_offsets(const K* __restrict__ sorted, int64_t n, int32_t cells, int32_t* __restrict__ offsets) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i > n) return;
  const int32_t prev = i == 0 ? -1 : sorted[i - 1];
  const int32_t cur = i == n ? cells : sorted[i];
  for (int32_t c = prev + 1; c <= cur; ++c) offsets[c] = static_cast<int32_t>(i);
}

// Pass 2: one cell (n, s, m) per group of GP lanes, lane k its chunks k, k + GP, ...:
// grad_value[cell] = sum over the cell's entries, in entry order, of coef * grad_out[row].
template <typename T, int V>
__global__ void __launch_bounds__(kThreads)
    pass2_kernel(const T* __restrict__ grad_out, const int32_t* __restrict__ ids, const float* __restrict__ coef,
                 const int32_t* __restrict__ offsets, T* __restrict__ grad_value, int64_t cells, int64_t D,
                 int64_t entries_per_row, int GP) {
  const Group grp = cuda::my_group(GP);
  if (grp.row >= cells) return;  // no shuffles here: lanes may leave on their own
  const int64_t cell = grp.row;
  const int64_t chunks = D / V;
  const int32_t lo = offsets[cell], hi = offsets[cell + 1];
  for (int64_t c = grp.lane; c < chunks; c += GP) {
    float acc[V];
#pragma unroll
    for (int i = 0; i < V; ++i) acc[i] = 0.f;
    for (int32_t j = lo; j < hi; ++j) {
      const int32_t e = ids[j];
      const float a = coef[e];
      const Vec<T, V> g = *reinterpret_cast<const Vec<T, V>*>(grad_out + (e / entries_per_row) * D + c * V);
#pragma unroll
      for (int i = 0; i < V; ++i) acc[i] += a * to_f(g.v[i]);
    }
    Vec<T, V> o;
#pragma unroll
    for (int i = 0; i < V; ++i) o.v[i] = from_f<T>(acc[i]);
    *reinterpret_cast<Vec<T, V>*>(grad_value + cell * D + c * V) = o;
  }
}

// The whole backward: grad_loc, grad_attn, and grad_value (every element written), using
// `workspace` (workspace_bytes(problem(...)) bytes; see there for its alignment), whose contents
// are ignored. V divides D and aligns value, grad_out and grad_value (vector_width over them).
// Returns cudaErrorInvalidValue when the call does not fit int32 indices (fits_int32) or the
// workspace is too small or misaligned.
template <typename T, typename U, int V>
cudaError_t launch_backward(const Params<T, U>& p, const T* grad_out, U* grad_loc, U* grad_attn, T* grad_value,
                            void* workspace, size_t workspace_size, cudaStream_t stream) {
  const Problem z = problem(p.N, p.S, p.M, p.Lq, p.L, p.P);
  if (!fits_int32(z) || workspace_size < workspace_bytes(z) || reinterpret_cast<uintptr_t>(workspace) % 4 != 0) {
    return cudaErrorInvalidValue;
  }
  Workspace ws;
  carve(z, static_cast<char*>(workspace), &ws);
  const int64_t rows = p.N * p.Lq * p.M;
  int cur = 0;  // which ping-pong buffer holds the keys
  if (z.entries > 0) {
    const int GP = cuda::group_size(p.D / V);
    cudaError_t err = launch(pass1_kernel<T, U, V>, cuda::blocks_for(rows * GP), kThreads, stream, p, grad_out, grad_loc,
                             grad_attn, ws.keys[0], ws.ids[0], ws.coef, GP);
    if (err != cudaSuccess) return err;
    const int64_t tiles = sort_tiles(z);
    for (int pass = 0; pass < radix_passes(z); ++pass) {
      const int shift = pass * kRadixBits;
      err = launch(radix_count<int32_t>, tiles, kThreads, stream, ws.keys[cur], z.entries, shift, ws.counts, tiles);
      if (err == cudaSuccess) err = launch(scan_kernel<int32_t>, 1, kThreads, stream, ws.counts, kBins * tiles);
      if (err == cudaSuccess) {
        err = launch(radix_scatter<int32_t>, tiles, kThreads, stream, ws.keys[cur], ws.ids[cur], ws.keys[1 - cur],
                     ws.ids[1 - cur], z.entries, shift, ws.counts, tiles);
      }
      if (err != cudaSuccess) return err;
      cur = 1 - cur;
    }
  }
  // With no entries every cell gets an empty list, so grad_value is written as zeros.
  cudaError_t err = launch(csr_offsets<int32_t>, cuda::blocks_for(z.entries + 1), kThreads, stream, ws.keys[cur], z.entries,
                           static_cast<int32_t>(z.cells), ws.offsets);
  if (err != cudaSuccess || z.cells == 0) return err;
  const int GP = cuda::group_size(p.D / V);
  return launch(pass2_kernel<T, V>, cuda::blocks_for(z.cells * GP), kThreads, stream, grad_out, ws.ids[cur], ws.coef,
                ws.offsets, grad_value, z.cells, p.D, p.L * p.P * 4, GP);
}

}  // namespace two_pass
}  // namespace msda
}  // namespace piip
