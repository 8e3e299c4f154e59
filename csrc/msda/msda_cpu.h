// CPU kernels of multi-scale deformable attention (torch-free).
//
// The glue (msda_cpu.cpp) makes every tensor contiguous, allocates outputs and
// calls these range functions from a parallel loop; nothing here knows about
// torch. Types:
//   T      element type of value, output and grad_output (float, double, half, bfloat16)
//   U      element type of sampling_locations and attention_weights (T or float)
//   acc_t  accumulation type: double for double inputs, float otherwise
// Any type with a conversion to and from acc_t works, which is how the glue
// instantiates the half-precision variants without this header including torch.
#pragma once

#include <cstdint>
#include <string>

#include "msda_math.h"

namespace piip {
namespace msda {

// Why the levels do not tile value's S rows in order, or "" when they do: every level
// non-empty, starting where the levels before it end, and inside value. The CPU kernels
// read levels without bounds checks, so their glue refuses inputs this rejects (the
// Python-side check is skipped under torch.compile and by torch.ops.piip.*). No sum or
// product can overflow: a level counts only once level_fits has shown that its rows end
// inside value, so the running total never exceeds S (sizes whose H * W wraps int64 used
// to pass a plain sum and send the kernel 2**32 rows past the end of value).
inline std::string level_problem(const int64_t* shapes, const int64_t* starts, int64_t L, int64_t S) {
  int64_t total = 0;
  for (int64_t l = 0; l < L; ++l) {
    const int64_t H = shapes[2 * l], W = shapes[2 * l + 1], start = starts[l];
    const std::string level = "level " + std::to_string(l) + " (" + std::to_string(H) + " x " + std::to_string(W) + ")";
    if (H <= 0 || W <= 0) return level + " is empty or negative";
    if (start != total) {
      return "level_start_index[" + std::to_string(l) + "] = " + std::to_string(start) + ", but the levels before it cover " +
             std::to_string(total) + " rows";
    }
    if (!level_fits(H, W, start, S)) {
      return level + " does not fit in value's S = " + std::to_string(S) + " rows from row " + std::to_string(start);
    }
    total += H * W;
  }
  if (total != S) return "spatial_shapes cover " + std::to_string(total) + " rows, but value has S = " + std::to_string(S);
  return "";
}

// Sizes and pointers of one call. Layouts (all contiguous, row-major):
//   value      [N, S, M, D]         S = sum over levels of H_l * W_l
//   shapes     [L, 2]               (H_l, W_l)
//   starts     [L]                  first row of level l in value
//   loc        [N, Lq, M, L, P, 2]  normalised (x, y)
//   attn       [N, Lq, M, L, P]
//   out        [N, Lq, M, D]        (viewed as [N, Lq, M * D] by the caller)
struct Sizes {
  int64_t N, S, M, D, Lq, L, P;
};

// The read-only inputs of one call (layouts above).
template <typename T, typename U>
struct Inputs {
  const T* value;
  const int64_t* shapes;
  const int64_t* starts;
  const U* loc;
  const U* attn;
};

// Forward for the query rows [row_begin, row_end) of the flattened (N, Lq)
// range. `acc` is caller-provided scratch of D elements (one per thread).
template <typename T, typename U, typename acc_t, int kD = 0>
void forward_rows(const Sizes& z, const Inputs<T, U>& in, T* out, int64_t row_begin,
                  int64_t row_end, acc_t* acc) {
  // kD > 0 fixes the head dim at compile time, so the channel loops unroll.
  const int64_t D = kD > 0 ? kD : z.D;
  const int64_t M = z.M, L = z.L, P = z.P;
  for (int64_t row = row_begin; row < row_end; ++row) {
    const int64_t n = row / z.Lq;
    for (int64_t m = 0; m < M; ++m) {
      for (int64_t d = 0; d < D; ++d) acc[d] = acc_t(0);
      acc_t outside = 0;  // what points outside their level add to every channel: 0 or NaN
      // Points of (row, m) are contiguous in loc and attn.
      const int64_t pt0 = (row * M + m) * L * P;
      for (int64_t l = 0; l < L; ++l) {
        const int64_t H = in.shapes[2 * l], W = in.shapes[2 * l + 1];
        // Row r of level l, head m, lives at value[n, starts[l] + r, m, :].
        const T* level = in.value + ((n * z.S + in.starts[l]) * M + m) * D;
        for (int64_t p = 0; p < P; ++p) {
          const int64_t pt = pt0 + l * P + p;
          Bilinear<acc_t> b;
          const acc_t a = static_cast<acc_t>(in.attn[pt]);
          if (!make_bilinear<acc_t>(static_cast<acc_t>(in.loc[2 * pt]),
                                    static_cast<acc_t>(in.loc[2 * pt + 1]), H, W, b)) {
            outside += outside_sample(b, a);
            continue;
          }
          for (int c = 0; c < 4; ++c) {
            if (b.idx[c] < 0) continue;
            const acc_t coef = a * b.w[c];
            const T* v = level + b.idx[c] * M * D;
            // Contiguous inner loop over channels; `omp simd` (we build with
            // -fopenmp) tells the compiler the pointers do not alias.
#pragma omp simd
            for (int64_t d = 0; d < D; ++d) acc[d] += coef * static_cast<acc_t>(v[d]);
          }
        }
      }
      T* o = out + (row * M + m) * D;
      for (int64_t d = 0; d < D; ++d) o[d] = static_cast<T>(acc[d] + outside);
    }
  }
}

// Backward for image n and heads [m_begin, m_end). A task owns
// value[n, :, m_begin:m_end, :], so the scatter into grad_value needs no
// atomics and the result does not depend on the thread count. Queries are the
// outer loop so that neighbouring queries, which sample neighbouring pixels,
// reuse cached rows of value and grad_value across heads.
//   grad_out    [N, Lq, M, D]  (T)
//   grad_value  [N, S, M, D]   (acc_t, zero-initialised by the caller)
//   grad_loc    [N, Lq, M, L, P, 2], grad_attn [N, Lq, M, L, P]  (U, fully written here)
// `g` is caller-provided scratch of D elements.
template <typename T, typename U, typename acc_t, int kD = 0>
void backward_heads(const Sizes& z, const Inputs<T, U>& in, const T* grad_out,
                    acc_t* grad_value, U* grad_loc, U* grad_attn, int64_t n, int64_t m_begin,
                    int64_t m_end, acc_t* g) {
  // kD > 0 fixes the head dim at compile time, so the channel loops unroll.
  const int64_t D = kD > 0 ? kD : z.D;
  const int64_t M = z.M, L = z.L, P = z.P;
  for (int64_t q = 0; q < z.Lq; ++q) {
    const int64_t row = n * z.Lq + q;
    for (int64_t m = m_begin; m < m_end; ++m) {
      const T* go = grad_out + (row * M + m) * D;
      acc_t gz = 0;  // the dot product of this row with a zero corner: 0 or NaN
      for (int64_t d = 0; d < D; ++d) {
        g[d] = static_cast<acc_t>(go[d]);
        gz += zero_dot(g[d]);
      }
      const int64_t pt0 = (row * M + m) * L * P;
      for (int64_t l = 0; l < L; ++l) {
        const int64_t H = in.shapes[2 * l], W = in.shapes[2 * l + 1];
        const int64_t level_off = ((n * z.S + in.starts[l]) * M + m) * D;
        for (int64_t p = 0; p < P; ++p) {
          const int64_t pt = pt0 + l * P + p;
          Bilinear<acc_t> b;
          make_bilinear<acc_t>(static_cast<acc_t>(in.loc[2 * pt]), static_cast<acc_t>(in.loc[2 * pt + 1]), H, W, b);
          const acc_t a = static_cast<acc_t>(in.attn[pt]);
          // Corners outside the level (all four for a point outside it) are not loaded:
          // their dot products are the zero one.
          acc_t s[4] = {gz, gz, gz, gz};
          for (int c = 0; c < 4; ++c) {
            if (b.idx[c] < 0) continue;
            const int64_t off = level_off + b.idx[c] * M * D;
            const T* v = in.value + off;
            acc_t* gv = grad_value + off;
            const acc_t coef = a * b.w[c];
            acc_t dot = 0;
            // The reduction clause allows the vectorised (reassociated) sum; the
            // order is fixed at compile time, so results stay deterministic.
#pragma omp simd reduction(+ : dot)
            for (int64_t d = 0; d < D; ++d) {
              dot += g[d] * static_cast<acc_t>(v[d]);
              gv[d] += coef * g[d];
            }
            s[c] = dot;
          }
          acc_t ga, gx, gy;
          point_grads<acc_t>(b, s, a, H, W, ga, gx, gy);
          grad_attn[pt] = static_cast<U>(ga);
          grad_loc[2 * pt] = static_cast<U>(gx);
          grad_loc[2 * pt + 1] = static_cast<U>(gy);
        }
      }
    }
  }
}

}  // namespace msda
}  // namespace piip
