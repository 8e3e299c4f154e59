// CPU kernels of the fused deformable cross-attention (torch-free).
//
// Layouts (contiguous, row-major):
//   value    [N, Hv*Wv, M, D]
//   offsets  [N, Hq*Wq, M, P, 2]  raw (x, y) offsets in value-grid pixels
//   logits   [N, Hq*Wq, M, P]     raw attention logits (softmax over P inside)
//   out      [N, Hq*Wq, M, D]
// Types as in msda_cpu.h: T for value/out/grad_out, U for offsets/logits and
// their gradients (T, or float beside a 16-bit T), acc_t for accumulation.
#pragma once

#include <cstdint>

#include "dca_math.h"

namespace piip {
namespace dca {

struct Sizes {
  int64_t N, Hv, Wv, M, D, Hq, Wq, P;
  int64_t S() const { return Hv * Wv; }
  int64_t Lq() const { return Hq * Wq; }
};

// Whether an H x W grid has exactly `cells` cells, decided without forming H * W: the
// glue checks value_hw against value's rows and query_hw against the queries this way,
// since sizes whose product wraps int64 to the right count would otherwise pass and send
// the kernels far outside value.
inline bool grid_has(int64_t H, int64_t W, int64_t cells) {
  return H > 0 && W > 0 && cells % H == 0 && cells / H == W;
}

// Sampling location of point p from the reference and its raw offset.
template <typename acc_t, typename U>
inline void location(const Sizes& z, acc_t rx, acc_t ry, const U* off, acc_t& x, acc_t& y) {
  x = rx + static_cast<acc_t>(off[0]) / static_cast<acc_t>(z.Wv);
  y = ry + static_cast<acc_t>(off[1]) / static_cast<acc_t>(z.Hv);
}

// Forward for the query rows [row_begin, row_end) of the flattened (N, Lq) range.
// Scratch: acc (D), w (P).
template <typename T, typename U, typename acc_t, int kD = 0>
void forward_rows(const Sizes& z, const T* value, const U* offsets, const U* logits, T* out,
                  int64_t row_begin, int64_t row_end, acc_t* acc, acc_t* w) {
  const int64_t D = kD > 0 ? kD : z.D;
  const int64_t M = z.M, P = z.P, Lq = z.Lq();
  for (int64_t row = row_begin; row < row_end; ++row) {
    const int64_t n = row / Lq;
    acc_t rx, ry;
    grid_reference<acc_t>(row - n * Lq, z.Hq, z.Wq, rx, ry);
    for (int64_t m = 0; m < M; ++m) {
      const int64_t pt0 = (row * M + m) * P;
      softmax<acc_t, U>(logits + pt0, P, w);
      for (int64_t d = 0; d < D; ++d) acc[d] = acc_t(0);
      acc_t outside = 0;  // what points outside the map add to every channel: 0 or NaN
      const T* img = value + (n * z.S() * M + m) * D;
      for (int64_t p = 0; p < P; ++p) {
        acc_t x, y;
        location<acc_t, U>(z, rx, ry, offsets + 2 * (pt0 + p), x, y);
        msda::Bilinear<acc_t> b;
        if (!msda::make_bilinear<acc_t>(x, y, z.Hv, z.Wv, b)) {
          outside += msda::outside_sample(b, w[p]);
          continue;
        }
        for (int c = 0; c < 4; ++c) {
          if (b.idx[c] < 0) continue;
          const acc_t coef = w[p] * b.w[c];
          const T* v = img + b.idx[c] * M * D;
#pragma omp simd
          for (int64_t d = 0; d < D; ++d) acc[d] += coef * static_cast<acc_t>(v[d]);
        }
      }
      T* o = out + (row * M + m) * D;
      for (int64_t d = 0; d < D; ++d) o[d] = static_cast<T>(acc[d] + outside);
    }
  }
}

// Backward for image n and heads [m_begin, m_end): the task owns
// grad_value[n, :, m_begin:m_end, :] (no atomics, deterministic).
//   grad_value [N, S, M, D] acc_t (zeroed by the caller)
//   grad_off   [N, Lq, M, P, 2], grad_logits [N, Lq, M, P] (U, fully written here)
// Scratch: g (D), w (P), gw (P).
template <typename T, typename U, typename acc_t, int kD = 0>
void backward_heads(const Sizes& z, const T* value, const U* offsets, const U* logits,
                    const T* grad_out, acc_t* grad_value, U* grad_off, U* grad_logits, int64_t n,
                    int64_t m_begin, int64_t m_end, acc_t* g, acc_t* w, acc_t* gw) {
  const int64_t D = kD > 0 ? kD : z.D;
  const int64_t M = z.M, P = z.P, Lq = z.Lq();
  for (int64_t q = 0; q < Lq; ++q) {
    const int64_t row = n * Lq + q;
    acc_t rx, ry;
    grid_reference<acc_t>(q, z.Hq, z.Wq, rx, ry);
    for (int64_t m = m_begin; m < m_end; ++m) {
      const T* go = grad_out + (row * M + m) * D;
      acc_t gz = 0;  // the dot product of this row with a zero corner: 0 or NaN
      for (int64_t d = 0; d < D; ++d) {
        g[d] = static_cast<acc_t>(go[d]);
        gz += msda::zero_dot(g[d]);
      }
      const int64_t pt0 = (row * M + m) * P;
      softmax<acc_t, U>(logits + pt0, P, w);
      const int64_t img_off = (n * z.S() * M + m) * D;
      for (int64_t p = 0; p < P; ++p) {
        acc_t x, y;
        location<acc_t, U>(z, rx, ry, offsets + 2 * (pt0 + p), x, y);
        U* go_xy = grad_off + 2 * (pt0 + p);
        msda::Bilinear<acc_t> b;
        msda::make_bilinear<acc_t>(x, y, z.Hv, z.Wv, b);
        // Corners outside the map (all four for a point outside it) are not loaded: their
        // dot products are the zero one.
        acc_t s[4] = {gz, gz, gz, gz};
        for (int c = 0; c < 4; ++c) {
          if (b.idx[c] < 0) continue;
          const int64_t off = img_off + b.idx[c] * M * D;
          const T* v = value + off;
          acc_t* gv = grad_value + off;
          const acc_t coef = w[p] * b.w[c];
          acc_t dot = 0;
#pragma omp simd reduction(+ : dot)
          for (int64_t d = 0; d < D; ++d) {
            dot += g[d] * static_cast<acc_t>(v[d]);
            gv[d] += coef * g[d];
          }
          s[c] = dot;
        }
        acc_t gx, gy;
        msda::point_grads<acc_t>(b, s, w[p], z.Hv, z.Wv, gw[p], gx, gy);
        // x = rx + off_x / Wv: the offset gradient is the location gradient over Wv.
        go_xy[0] = static_cast<U>(gx / static_cast<acc_t>(z.Wv));
        go_xy[1] = static_cast<U>(gy / static_cast<acc_t>(z.Hv));
      }
      softmax_backward<acc_t>(w, P, gw);
      for (int64_t p = 0; p < P; ++p) grad_logits[pt0 + p] = static_cast<U>(gw[p]);
    }
  }
}

}  // namespace dca
}  // namespace piip
