// Per-query arithmetic of the fused deformable cross-attention of PIIP's
// interaction units (torch-free, shared by the CPU and CUDA kernels).
//
// The queries form an Hq x Wq grid whose reference points are the cell centres,
// so query q = i * Wq + j has reference (x, y) = ((j + 0.5) / Wq, (i + 0.5) / Hq)
// and never needs a tensor. Raw offsets are in value-grid pixels, so point p of
// head m samples at (x + off_x / Wv, y + off_y / Hv); its weight is the softmax
// of the raw logits over the P points of that head. The sampling itself is the
// one-level case of multi-scale deformable attention (msda_math.h).
#pragma once

#include <cmath>

#include "../common/hd.h"
#include "../msda/msda_math.h"

namespace piip {
namespace dca {

template <typename acc_t>
PIIP_HD void grid_reference(int64_t q, int64_t Hq, int64_t Wq, acc_t& x, acc_t& y) {
  const int64_t i = q / Wq, j = q - (q / Wq) * Wq;
  x = (static_cast<acc_t>(j) + acc_t(0.5)) / static_cast<acc_t>(Wq);
  y = (static_cast<acc_t>(i) + acc_t(0.5)) / static_cast<acc_t>(Hq);
}

// exp that resolves to the right overload on host and device for float and double.
PIIP_HD float exp_acc(float v) { return expf(v); }
PIIP_HD double exp_acc(double v) { return exp(v); }

// w[0..P) = softmax(logits[0..P)), max-subtracted so large logits do not overflow.
template <typename acc_t, typename U>
PIIP_HD void softmax(const U* logits, int64_t P, acc_t* w) {
  acc_t mx = static_cast<acc_t>(logits[0]);
  for (int64_t p = 1; p < P; ++p) {
    const acc_t v = static_cast<acc_t>(logits[p]);
    mx = v > mx ? v : mx;
  }
  acc_t sum = 0;
  for (int64_t p = 0; p < P; ++p) {
    w[p] = exp_acc(static_cast<acc_t>(logits[p]) - mx);
    sum += w[p];
  }
  const acc_t inv = acc_t(1) / sum;
  for (int64_t p = 0; p < P; ++p) w[p] *= inv;
}

// Softmax backward in place: g[p] = dL/dw_p on entry, dL/dlogit_p on exit,
// dL/dlogit_p = w_p * (g_p - sum_k w_k g_k).
template <typename acc_t>
PIIP_HD void softmax_backward(const acc_t* w, int64_t P, acc_t* g) {
  acc_t dot = 0;
  for (int64_t p = 0; p < P; ++p) dot += w[p] * g[p];
  for (int64_t p = 0; p < P; ++p) g[p] = w[p] * (g[p] - dot);
}

}  // namespace dca
}  // namespace piip
