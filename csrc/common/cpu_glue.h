// Helpers shared by the CPU glue files (ATen side; the kernels stay torch-free).
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstring>

namespace piip {
namespace cpu {

// Accumulation type: double for double inputs, float for everything else.
template <typename T> struct Acc { using type = float; };
template <> struct Acc<double> { using type = double; };

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
inline void zero_parallel(at::Tensor& t) {
  auto* p = static_cast<char*>(t.data_ptr());
  const int64_t bytes = t.numel() * t.element_size();
  at::parallel_for(0, bytes, 1 << 18, [&](int64_t b, int64_t e) { std::memset(p + b, 0, e - b); });
}

// Calls f.template operator()<T, U>() for the supported dtype pairs:
// U == T, or U == float with a 16-bit T (fp32 locations beside bf16 values
// is what autocast produces and keeps sub-pixel precision).
template <typename F>
void dispatch_types(const char* op, at::ScalarType vt, at::ScalarType lt, F&& f) {
  using at::ScalarType;
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
  TORCH_CHECK(false, op, " (cpu): unsupported dtypes ", vt, " and ", lt,
              "; values must be float32/float64/float16/bfloat16 and the second group the same "
              "dtype, or float32 beside 16-bit values");
}

}  // namespace cpu
}  // namespace piip
