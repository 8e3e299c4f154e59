// Per-point arithmetic of multi-scale deformable attention.
//
// Everything here is one sampling point: where its four bilinear corners are,
// their weights, and the gradient formulas. The CPU kernel (msda_cpu.h) and
// the CUDA kernels call exactly these functions, so the CPU tests in CI check
// the arithmetic the GPU runs; the backends only add loops, thread mapping,
// vector loads and reductions around them.
//
// Convention (identical to grid_sample(mode="bilinear", padding_mode="zeros",
// align_corners=False)): a normalised location (x, y) in [0, 1] maps to the
// pixel coordinate (w_im, h_im) = (x * W - 0.5, y * H - 0.5); corners outside
// the H x W grid contribute zero.
//
// Non-finite numbers reach the results as in the reference (grid_sample followed by the
// weighted sum), which computes every corner weight and multiplies corners outside the
// grid by zero: a NaN or infinite coordinate makes the weights NaN and the sample NaN, a
// non-finite attention weight times a zero sample is NaN, and a non-finite grad_output
// row makes the point's corner dot products NaN even where every corner is outside. The
// kernels skip the corner loads of a point outside the grid (the fast path), so
// make_bilinear describes such a point by fractions that carry the NaN instead (see
// there), and the kernels add what the skipped zero corners would have given.
#pragma once

#include "../common/hd.h"

namespace piip {
namespace msda {

// Whether level rows [start, start + H * W) lie inside value's S rows. The GPU kernels check
// this themselves when the index tensors live on the GPU (a host check would synchronise)
// and poison the outputs of a level that does not fit with NaN instead of reading outside
// value. Written so that H * W cannot overflow.
PIIP_HD bool level_fits(int64_t H, int64_t W, int64_t start, int64_t S) {
  return H > 0 && W > 0 && H <= S && W <= S / H && start >= 0 && start <= S - H * W;
}

// The four corners of one bilinear sample, in the order
// 0: (h0, w0), 1: (h0, w0 + 1), 2: (h0 + 1, w0), 3: (h0 + 1, w0 + 1).
template <typename acc_t>
struct Bilinear {
  int64_t idx[4];  // flat spatial index h * W + w inside the level, -1 when outside the grid
  acc_t w[4];      // interpolation weight of each corner (also set for outside corners)
  acc_t lh, lw;    // fractional parts of h_im and w_im (needed by the gradients)
};

// Floor that is exact for the range of pixel coordinates we see and cheap on
// both host and device (std::floor is not constexpr-usable in device code
// before C++23 and would pull in <cmath> overloads for half types).
template <typename acc_t>
PIIP_HD int64_t floor_to_int(acc_t v) {
  int64_t i = static_cast<int64_t>(v);
  return (static_cast<acc_t>(i) > v) ? i - 1 : i;
}

template <typename acc_t>
PIIP_HD void set_weights(Bilinear<acc_t>& b) {
  const acc_t hh = acc_t(1) - b.lh;
  const acc_t hw = acc_t(1) - b.lw;
  b.w[0] = hh * hw;
  b.w[1] = hh * b.lw;
  b.w[2] = b.lh * hw;
  b.w[3] = b.lh * b.lw;
}

// Sets up the bilinear sample of location (x, y) on an H x W level.
// Returns false when no corner lies inside the grid: the point reads zeros and its
// corners need no loads. `b` then has every idx -1 and fractions that are 0 for a finite
// coordinate and NaN for a NaN or infinite one (the NaN the reference's weights carry),
// so a kernel that runs the same arithmetic on it with zero corners (point_grads with s
// the zero dot products, or the forward's `attn * (lh + lw)`) gets the reference's NaN or
// exact zero without loading anything.
template <typename acc_t>
PIIP_HD bool make_bilinear(acc_t x, acc_t y, int64_t H, int64_t W, Bilinear<acc_t>& b) {
  const acc_t h_im = y * static_cast<acc_t>(H) - acc_t(0.5);
  const acc_t w_im = x * static_cast<acc_t>(W) - acc_t(0.5);
  // The negated form also rejects NaN locations: every comparison with NaN is false, so
  // a NaN point never indexes garbage.
  if (!(h_im > acc_t(-1) && w_im > acc_t(-1) && h_im < static_cast<acc_t>(H) &&
        w_im < static_cast<acc_t>(W))) {
    b.lh = h_im - h_im;  // 0, or NaN for NaN and +-inf
    b.lw = w_im - w_im;
    set_weights(b);
    b.idx[0] = b.idx[1] = b.idx[2] = b.idx[3] = -1;
    return false;
  }
  const int64_t h0 = floor_to_int(h_im);
  const int64_t w0 = floor_to_int(w_im);
  b.lh = h_im - static_cast<acc_t>(h0);
  b.lw = w_im - static_cast<acc_t>(w0);
  set_weights(b);
  const bool top = h0 >= 0, bottom = h0 + 1 <= H - 1;
  const bool left = w0 >= 0, right = w0 + 1 <= W - 1;
  b.idx[0] = (top && left) ? h0 * W + w0 : -1;
  b.idx[1] = (top && right) ? h0 * W + w0 + 1 : -1;
  b.idx[2] = (bottom && left) ? (h0 + 1) * W + w0 : -1;
  b.idx[3] = (bottom && right) ? (h0 + 1) * W + w0 + 1 : -1;
  return true;
}

// What a point outside the grid adds to each output channel: attn times its zero sample,
// i.e. 0, or NaN when the weight or the location is not finite (`b` from make_bilinear
// returning false). The forward kernels add it to the row instead of a zero.
template <typename acc_t>
PIIP_HD acc_t outside_sample(const Bilinear<acc_t>& b, acc_t attn) {
  return attn * (b.lh + b.lw);
}

// The zero dot product <grad_out_row, 0> of a corner that is not loaded: 0, or NaN when
// the row holds a non-finite number. Accumulated over a row's channels by the backward
// kernels and used as the corner dot products of a point outside the grid.
template <typename acc_t>
PIIP_HD acc_t zero_dot(acc_t g) {
  return g * acc_t(0);
}

// Derivatives of the corner weights with respect to w_im and h_im.
template <typename acc_t>
PIIP_HD acc_t weight_dw(const Bilinear<acc_t>& b, int c) {
  const acc_t hh = acc_t(1) - b.lh;
  switch (c) {
    case 0: return -hh;
    case 1: return hh;
    case 2: return -b.lh;
    default: return b.lh;
  }
}

template <typename acc_t>
PIIP_HD acc_t weight_dh(const Bilinear<acc_t>& b, int c) {
  const acc_t hw = acc_t(1) - b.lw;
  switch (c) {
    case 0: return -hw;
    case 1: return -b.lw;
    case 2: return hw;
    default: return b.lw;
  }
}

// Gradients of one point from the four corner dot products
// s[c] = <grad_out_head, value[corner c]> (zero for outside corners):
//   output        += attn * sum_c w_c * v_c
//   d/d attn       = sum_c w_c * s_c
//   d/d x          = attn * W * sum_c (d w_c / d w_im) * s_c   (w_im = x * W - 0.5)
//   d/d y          = attn * H * sum_c (d w_c / d h_im) * s_c   (h_im = y * H - 0.5)
// The gradient with respect to value corner c is attn * w_c * grad_out_head,
// which the kernels scatter themselves (it is a D-vector per corner).
template <typename acc_t>
PIIP_HD void point_grads(const Bilinear<acc_t>& b, const acc_t s[4], acc_t attn, int64_t H,
                         int64_t W, acc_t& g_attn, acc_t& g_x, acc_t& g_y) {
  acc_t ga = 0, gw = 0, gh = 0;
#pragma unroll
  for (int c = 0; c < 4; ++c) {
    ga += b.w[c] * s[c];
    gw += weight_dw(b, c) * s[c];
    gh += weight_dh(b, c) * s[c];
  }
  g_attn = ga;
  g_x = attn * static_cast<acc_t>(W) * gw;
  g_y = attn * static_cast<acc_t>(H) * gh;
}

}  // namespace msda
}  // namespace piip
