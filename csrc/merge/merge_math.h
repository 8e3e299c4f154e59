// Source indices of bilinear resizing, exactly as torch's upsample_bilinear2d
// computes them when given an output size (torch-free, shared by the CPU and
// CUDA kernels of branch_merge).
//
// Output index o of an axis resized from `in` to `out` reads input indices
// i0 and i1 = min(i0 + 1, in - 1) with weights (1 - l, l):
//   align_corners=False: src = max((o + 0.5) * in / out - 0.5, 0)
//   align_corners=True:  src = o * (in - 1) / (out - 1)   (0 when out == 1)
//   i0 = min(floor(src), in - 1), l = clamp(src - i0, 0, 1)
#pragma once

#include "../common/hd.h"

namespace piip {
namespace merge {

template <typename acc_t>
struct Tap {
  int64_t i0, i1;
  acc_t l;  // weight of i1; i0 gets 1 - l
};

template <typename acc_t>
PIIP_HD acc_t axis_scale(int64_t in, int64_t out, bool align_corners) {
  if (align_corners) return out > 1 ? static_cast<acc_t>(in - 1) / static_cast<acc_t>(out - 1) : acc_t(0);
  return static_cast<acc_t>(in) / static_cast<acc_t>(out);
}

template <typename acc_t>
PIIP_HD Tap<acc_t> axis_tap(int64_t o, int64_t in, acc_t scale, bool align_corners) {
  acc_t src;
  if (align_corners) {
    src = scale * static_cast<acc_t>(o);
  } else {
    src = scale * (static_cast<acc_t>(o) + acc_t(0.5)) - acc_t(0.5);
    src = src < acc_t(0) ? acc_t(0) : src;
  }
  int64_t i0 = static_cast<int64_t>(src);  // src >= 0: truncation is floor
  i0 = i0 < in - 1 ? i0 : in - 1;
  acc_t l = src - static_cast<acc_t>(i0);
  l = l < acc_t(0) ? acc_t(0) : (l > acc_t(1) ? acc_t(1) : l);
  return {i0, i0 < in - 1 ? i0 + 1 : i0, l};
}

}  // namespace merge
}  // namespace piip
