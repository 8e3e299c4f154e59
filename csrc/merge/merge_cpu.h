// CPU kernels of branch_merge (torch-free): out = sum_i w_i * bilinear_resize(f_i)
// for 1 to 4 branch maps, in one pass, and its gather-only backward.
//
// Layouts: every map is a stack of planes (N * C of them, row-major H x W):
//   feats[i]   [N*C, H_i, W_i]   (T)
//   out        [N*C, Ho, Wo]     (O: T, or float when the weights promote 16-bit maps)
// Resampling tables come from merge_math.h and are built once per call by the glue.
#pragma once

#include <cstdint>
#include <vector>

#include "merge_math.h"

namespace piip {
namespace merge {

// One branch: its map, sizes, weight, and the taps of each output row and column.
template <typename T, typename acc_t>
struct Branch {
  const T* f;
  int64_t H, W;
  acc_t weight;
  bool identity;                 // same size as the output: no resampling
  std::vector<Tap<acc_t>> ty;    // Ho taps
  std::vector<Tap<acc_t>> tx;    // Wo taps
  // Transposed taps for the backward: input row iy receives output row ry_out[k]
  // with weight ry_w[k] for k in [ry_ptr[iy], ry_ptr[iy + 1]) (same for columns).
  std::vector<int64_t> ry_ptr, ry_out, rx_ptr, rx_out;
  std::vector<acc_t> ry_w, rx_w;
};

template <typename acc_t>
void transpose_taps(const std::vector<Tap<acc_t>>& taps, int64_t in, std::vector<int64_t>& ptr,
                    std::vector<int64_t>& out, std::vector<acc_t>& w) {
  ptr.assign(in + 1, 0);
  for (const auto& t : taps) {
    ptr[t.i0 + 1]++;
    ptr[t.i1 + 1]++;
  }
  for (int64_t i = 0; i < in; ++i) ptr[i + 1] += ptr[i];
  out.assign(ptr[in], 0);
  w.assign(ptr[in], acc_t(0));
  std::vector<int64_t> fill(ptr.begin(), ptr.end() - 1);
  for (int64_t o = 0; o < static_cast<int64_t>(taps.size()); ++o) {
    const auto& t = taps[o];
    out[fill[t.i0]] = o;
    w[fill[t.i0]++] = acc_t(1) - t.l;
    out[fill[t.i1]] = o;
    w[fill[t.i1]++] = t.l;
  }
}

template <typename T, typename acc_t>
void build_branch(Branch<T, acc_t>& b, int64_t Ho, int64_t Wo, bool align_corners, bool backward) {
  b.identity = b.H == Ho && b.W == Wo;
  if (b.identity) return;
  const acc_t sy = axis_scale<acc_t>(b.H, Ho, align_corners), sx = axis_scale<acc_t>(b.W, Wo, align_corners);
  b.ty.resize(Ho);
  b.tx.resize(Wo);
  for (int64_t o = 0; o < Ho; ++o) b.ty[o] = axis_tap<acc_t>(o, b.H, sy, align_corners);
  for (int64_t o = 0; o < Wo; ++o) b.tx[o] = axis_tap<acc_t>(o, b.W, sx, align_corners);
  if (backward) {
    transpose_taps(b.ty, b.H, b.ry_ptr, b.ry_out, b.ry_w);
    transpose_taps(b.tx, b.W, b.rx_ptr, b.rx_out, b.rx_w);
  }
}

// Forward of planes [p_begin, p_end). `row` is scratch of Wo acc_t.
template <typename T, typename O, typename acc_t>
void forward_planes(const std::vector<Branch<T, acc_t>>& br, int64_t Ho, int64_t Wo, O* out,
                    int64_t p_begin, int64_t p_end, acc_t* row) {
  for (int64_t p = p_begin; p < p_end; ++p) {
    for (int64_t oy = 0; oy < Ho; ++oy) {
      for (int64_t ox = 0; ox < Wo; ++ox) row[ox] = acc_t(0);
      for (const auto& b : br) {
        const T* f = b.f + p * b.H * b.W;
        if (b.identity) {
          const T* r = f + oy * b.W;
#pragma omp simd
          for (int64_t ox = 0; ox < Wo; ++ox) row[ox] += b.weight * static_cast<acc_t>(r[ox]);
          continue;
        }
        const Tap<acc_t> ty = b.ty[oy];
        const T* r0 = f + ty.i0 * b.W;
        const T* r1 = f + ty.i1 * b.W;
        const acc_t wy1 = b.weight * ty.l, wy0 = b.weight - wy1;
        for (int64_t ox = 0; ox < Wo; ++ox) {
          const Tap<acc_t> tx = b.tx[ox];
          const acc_t top = static_cast<acc_t>(r0[tx.i0]) + tx.l * (static_cast<acc_t>(r0[tx.i1]) - static_cast<acc_t>(r0[tx.i0]));
          const acc_t bot = static_cast<acc_t>(r1[tx.i0]) + tx.l * (static_cast<acc_t>(r1[tx.i1]) - static_cast<acc_t>(r1[tx.i0]));
          row[ox] += wy0 * top + wy1 * bot;
        }
      }
      O* o = out + (p * Ho + oy) * Wo;
      for (int64_t ox = 0; ox < Wo; ++ox) o[ox] = static_cast<O>(row[ox]);
    }
  }
}

// Backward of planes [p_begin, p_end) for one branch, by gathering (deterministic):
//   G = R_y^T g R_x (the unweighted gradient of the resized map), grad_f = weight * G,
//   dot[p] = sum(f * G) (the plane's share of the weight gradient).
// `tmp` is scratch of (Ho + 1) * W acc_t.
template <typename T, typename O, typename acc_t>
void backward_planes(const Branch<T, acc_t>& b, const O* grad_out, int64_t Ho, int64_t Wo,
                     T* grad_f, acc_t* dot, int64_t p_begin, int64_t p_end, acc_t* tmp) {
  const int64_t H = b.H, W = b.W;
  for (int64_t p = p_begin; p < p_end; ++p) {
    const O* g = grad_out + p * Ho * Wo;
    const T* f = b.f + p * H * W;
    T* gf = grad_f + p * H * W;
    // The plane's weight-gradient share sums H * W products: in double, so a long plane
    // does not lose fp32 digits to a sequential sum.
    double d = 0;
    if (b.identity) {
      for (int64_t k = 0; k < H * W; ++k) {
        const acc_t G = static_cast<acc_t>(g[k]);
        gf[k] = static_cast<T>(b.weight * G);
        d += static_cast<double>(static_cast<acc_t>(f[k]) * G);
      }
      dot[p] = static_cast<acc_t>(d);
      continue;
    }
    // Columns first: tmp[oy, ix] = sum over the output columns that read ix.
    for (int64_t oy = 0; oy < Ho; ++oy) {
      const O* gr = g + oy * Wo;
      acc_t* tr = tmp + oy * W;
      for (int64_t ix = 0; ix < W; ++ix) {
        acc_t s = 0;
        for (int64_t k = b.rx_ptr[ix]; k < b.rx_ptr[ix + 1]; ++k) s += b.rx_w[k] * static_cast<acc_t>(gr[b.rx_out[k]]);
        tr[ix] = s;
      }
    }
    // Then rows, a whole row at a time so the inner loop is contiguous.
    acc_t* acc = tmp + Ho * W;
    for (int64_t iy = 0; iy < H; ++iy) {
      for (int64_t ix = 0; ix < W; ++ix) acc[ix] = acc_t(0);
      for (int64_t k = b.ry_ptr[iy]; k < b.ry_ptr[iy + 1]; ++k) {
        const acc_t wk = b.ry_w[k];
        const acc_t* tr = tmp + b.ry_out[k] * W;
#pragma omp simd
        for (int64_t ix = 0; ix < W; ++ix) acc[ix] += wk * tr[ix];
      }
      for (int64_t ix = 0; ix < W; ++ix) {
        gf[iy * W + ix] = static_cast<T>(b.weight * acc[ix]);
        d += static_cast<double>(static_cast<acc_t>(f[iy * W + ix]) * acc[ix]);
      }
    }
    dot[p] = static_cast<acc_t>(d);
  }
}

}  // namespace merge
}  // namespace piip
