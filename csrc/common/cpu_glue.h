// Helpers shared by the CPU glue files (stable-ABI side; the kernels stay torch-free).
#pragma once

#include <algorithm>
#include <cstring>

#include "tensor_glue.h"

namespace piip {
namespace cpu {

// Accumulation type: double for double inputs, float for everything else.
template <typename T> struct Acc { using type = float; };
template <> struct Acc<double> { using type = double; };

// torch's thread pool through the stable ABI: f(begin, end) on chunks of at least
// `grain` items (inline when the range is below that, or inside a parallel region).
template <typename F>
void parallel_for(int64_t begin, int64_t end, int64_t grain, const F& f) {
  if (begin >= end) return;
  torch::stable::parallel_for(begin, end, grain, f);
}

inline int64_t num_threads() { return static_cast<int64_t>(torch::stable::get_num_threads()); }

// Work per task is at least ~32k multiply-adds so that small calls do not
// pay for thread wake-ups.
inline int64_t grain(int64_t per_item) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(1, per_item)); }

// Calls f.template operator()<kD>() with kD = D for the head dims of PIIP
// (6, 12, 24, 32) and 64, whose channel loops then unroll (about 1.3x on the
// backward); kD = 0 (runtime D) for every other head dim.
template <typename F>
void with_head_dim(int64_t D, F&& f) {
  switch (D) {
    case 6: return f.template operator()<6>();
    case 12: return f.template operator()<12>();
    case 24: return f.template operator()<24>();
    case 32: return f.template operator()<32>();
    case 64: return f.template operator()<64>();
    default: return f.template operator()<0>();
  }
}

// Zero-fills a fresh buffer from all threads. For a new allocation the cost is
// page faults, not bandwidth (about 10x a memset of warm memory), and spreading
// the first touch over the threads divides it.
inline void zero_parallel(Tensor& t) {
  auto* p = static_cast<char*>(t.mutable_data_ptr());
  const int64_t bytes = t.numel() * static_cast<int64_t>(t.element_size());
  parallel_for(0, bytes, 1 << 18, [&](int64_t b, int64_t e) { std::memset(p + b, 0, e - b); });
}

// Calls f.template operator()<T, U>() for the supported dtype pairs:
// U == T, or U == float with a 16-bit T (fp32 locations beside bf16 values
// is what autocast produces and keeps sub-pixel precision).
template <typename F>
void dispatch_types(const char* op, ScalarType vt, ScalarType lt, F&& f) {
  if (vt == lt) {
    switch (vt) {
      case ScalarType::Float: return f.template operator()<float, float>();
      case ScalarType::Double: return f.template operator()<double, double>();
      case ScalarType::Half: return f.template operator()<c10::Half, c10::Half>();
      case ScalarType::BFloat16: return f.template operator()<c10::BFloat16, c10::BFloat16>();
      default: break;
    }
  } else if (lt == ScalarType::Float) {
    if (vt == ScalarType::Half) return f.template operator()<c10::Half, float>();
    if (vt == ScalarType::BFloat16) return f.template operator()<c10::BFloat16, float>();
  }
  STD_TORCH_CHECK(false, op, " (cpu): unsupported dtypes ", vt, " and ", lt,
              "; values must be float32/float64/float16/bfloat16 and the second group the same "
              "dtype, or float32 beside 16-bit values");
}

}  // namespace cpu
}  // namespace piip
