// A CPU emulation of the parts of the CUDA execution model our kernels use, so that the
// kernels of csrc/*/*_cuda.cuh run unchanged on a machine without a GPU (tests only).
//
// - A launch runs its blocks one after another; every thread of a block is an OS thread,
//   with blockIdx / blockDim / threadIdx / gridDim as thread-local values.
// - Warp shuffles exchange values through the warp's slots between two barriers of the
//   warp's 32 threads. They check what the hardware leaves undefined and our kernels must
//   never do: a lane outside the mask, or a source lane outside the mask, is an error.
// - __syncthreads is a barrier of the block; a thread that returns drops out of both.
// - __shared__ variables are function statics: blocks run one at a time, so each block
//   sees its own (the kernels write them before they read them).
// - Atomics are std::atomic_ref; float4 atomics are four scalar ones; __ldg is a load. The
//   fp32 atomics into a watched address range (piip_emu::watch) are counted, a float4 one
//   once, as the hardware issues it: tests use the count to see that a kernel combined its
//   additions before they reached global memory.
// - Warp votes and matches (__ballot_sync, __any_sync, __match_any_sync) and __shfl_sync
//   exchange through the same slots and barriers as the shuffles, with the same checks.
// Errors (bad shuffles, reads of exited lanes) are counted in piip_emu::errors; the tests
// read them through piip_emu_errors().
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#ifdef __CUDACC__
#error "the emulation is host C++: compile it with a host compiler"
#endif

#define PIIP_CUDA_EMULATION 1
#include "common/launch.cuh"  // kMaxGridX; with PIIP_CUDA_EMULATION it leaves launch() to this file

#define __launch_bounds__(...)
#undef __shared__
#define __shared__ static

namespace piip_emu {

inline std::atomic<long> errors{0};

struct Warp {
  explicit Warp(int n) : bar(n) {}
  std::barrier<> bar;
  float slots[32] = {};
  unsigned long long wide[32] = {};  // 64-bit slots: __shfl_sync of any word, votes, matches
  bool exited[32] = {};
};

// The counted address range of the fp32 atomics, and the count.
inline std::atomic<const void*> watch_begin{nullptr}, watch_end{nullptr};
inline std::atomic<long> watched_atomics{0};

struct Block {
  explicit Block(int threads) : bar(threads) {
    for (int w = 0; w < (threads + 31) / 32; ++w) warps.push_back(std::make_unique<Warp>(std::min(32, threads - 32 * w)));
  }
  std::barrier<> bar;
  std::vector<std::unique_ptr<Warp>> warps;
};

struct Thread {
  uint3 block_idx, thread_idx;
  dim3 block_dim, grid_dim;
  Block* block;
};

inline thread_local Thread self;

}  // namespace piip_emu

#define blockIdx (piip_emu::self.block_idx)
#define threadIdx (piip_emu::self.thread_idx)
#define blockDim (piip_emu::self.block_dim)
#define gridDim (piip_emu::self.grid_dim)

inline void __syncthreads() { piip_emu::self.block->bar.arrive_and_wait(); }

inline float __shfl_xor_sync(unsigned mask, float v, int lane_mask, int width = 32) {
  piip_emu::Warp& w = *piip_emu::self.block->warps[piip_emu::self.thread_idx.x / 32];
  const int lane = static_cast<int>(piip_emu::self.thread_idx.x % 32);
  const int src = lane ^ lane_mask;
  const bool same_segment = src / width == lane / width;
  if (!((mask >> lane) & 1u) || (same_segment && !((mask >> src) & 1u))) ++piip_emu::errors;
  w.slots[lane] = v;
  w.bar.arrive_and_wait();
  if (same_segment && w.exited[src]) ++piip_emu::errors;  // reading a lane that has returned
  const float r = same_segment ? w.slots[src] : v;
  w.bar.arrive_and_wait();
  return r;
}

// Whether the calling lane and the lanes it reads are inside `mask` (the hardware leaves the
// result undefined otherwise; our kernels must never do it).
inline void check_lane(unsigned mask, int lane) {
  if (!((mask >> lane) & 1u)) ++piip_emu::errors;
}

// Each lane of the warp publishes `bits`; f(slots, lane) runs between the two barriers.
template <typename F>
inline auto exchange(unsigned long long bits, F&& f) {
  piip_emu::Warp& w = *piip_emu::self.block->warps[piip_emu::self.thread_idx.x / 32];
  const int lane = static_cast<int>(piip_emu::self.thread_idx.x % 32);
  w.wide[lane] = bits;
  w.bar.arrive_and_wait();
  const auto r = f(w, lane);
  w.bar.arrive_and_wait();
  return r;
}

template <typename W>
inline W __shfl_sync(unsigned mask, W v, int src_lane, int width = 32) {
  static_assert(sizeof(W) <= 8, "a word of at most 8 bytes");
  unsigned long long bits = 0;
  std::memcpy(&bits, &v, sizeof v);
  const int lane = static_cast<int>(piip_emu::self.thread_idx.x % 32);
  check_lane(mask, lane);
  const int src = lane / width * width + src_lane % width;
  check_lane(mask, src);
  const unsigned long long got = exchange(bits, [&](piip_emu::Warp& w, int) {
    if (w.exited[src]) ++piip_emu::errors;
    return w.wide[src];
  });
  W r;
  std::memcpy(&r, &got, sizeof r);
  return r;
}

inline unsigned __ballot_sync(unsigned mask, bool pred) {
  check_lane(mask, static_cast<int>(piip_emu::self.thread_idx.x % 32));
  return exchange(pred ? 1ull : 0ull, [&](piip_emu::Warp& w, int) {
    unsigned r = 0;
    for (int i = 0; i < 32; ++i) {
      if (!((mask >> i) & 1u)) continue;
      if (w.exited[i]) ++piip_emu::errors;
      else if (w.wide[i]) r |= 1u << i;
    }
    return r;
  });
}

inline bool __any_sync(unsigned mask, bool pred) { return __ballot_sync(mask, pred) != 0u; }

inline unsigned __match_any_sync(unsigned mask, unsigned long long key) {
  check_lane(mask, static_cast<int>(piip_emu::self.thread_idx.x % 32));
  return exchange(key, [&](piip_emu::Warp& w, int) {
    unsigned r = 0;
    for (int i = 0; i < 32; ++i) {
      if (!((mask >> i) & 1u)) continue;
      if (w.exited[i]) ++piip_emu::errors;
      else if (w.wide[i] == key) r |= 1u << i;
    }
    return r;
  });
}

inline int __popc(unsigned v) { return __builtin_popcount(v); }
inline int __ffs(unsigned v) { return __builtin_ffs(static_cast<int>(v)); }

inline float atomic_add_f32(float* p, float v) { return std::atomic_ref<float>(*p).fetch_add(v); }
inline void count_atomic(const void* p) {
  if (p >= piip_emu::watch_begin.load() && p < piip_emu::watch_end.load()) ++piip_emu::watched_atomics;
}
inline float atomicAdd(float* p, float v) {
  count_atomic(p);
  return atomic_add_f32(p, v);
}
inline int atomicMin(int* p, int v) {
  std::atomic_ref<int> a(*p);
  int old = a.load();
  while (v < old && !a.compare_exchange_weak(old, v)) {
  }
  return old;
}
inline int atomicMax(int* p, int v) {
  std::atomic_ref<int> a(*p);
  int old = a.load();
  while (v > old && !a.compare_exchange_weak(old, v)) {
  }
  return old;
}
inline unsigned long long atomicAdd(unsigned long long* p, unsigned long long v) {
  return std::atomic_ref<unsigned long long>(*p).fetch_add(v);
}
inline float4 atomicAdd(float4* p, float4 v) {
  count_atomic(p);
  float* f = reinterpret_cast<float*>(p);
  return make_float4(atomic_add_f32(f, v.x), atomic_add_f32(f + 1, v.y), atomic_add_f32(f + 2, v.z),
                     atomic_add_f32(f + 3, v.w));
}

template <typename W>
inline W __ldg(const W* p) { return *p; }
inline long long __double2ll_rn(double v) { return std::llrint(v); }  // the default rounding: to nearest even
inline float __int_as_float(int bits) {
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}
inline float __expf(float v) { return std::exp(v); }
using std::isfinite;

namespace piip {

// Runs kernel(args...) on `blocks` blocks of `threads` threads (see the file comment), after the
// grid check of csrc/common/launch.cuh's launch.
template <typename... KernelArgs, typename... Args>
cudaError_t launch(void (*kernel)(KernelArgs...), int64_t blocks, unsigned threads, cudaStream_t, Args&&... args) {
  if (blocks > kMaxGridX) return cudaErrorInvalidConfiguration;
  for (unsigned b = 0; b < blocks; ++b) {
    piip_emu::Block block(static_cast<int>(threads));
    std::vector<std::thread> pool;
    pool.reserve(threads);
    for (unsigned t = 0; t < threads; ++t) {
      pool.emplace_back([&, b, t] {
        piip_emu::self = {{b, 0, 0}, {t, 0, 0}, {threads, 1, 1}, {static_cast<unsigned>(blocks), 1, 1}, &block};
        kernel(args...);
        // An exited thread no longer takes part in its warp's shuffles or the block's barriers.
        block.warps[t / 32]->exited[t % 32] = true;
        block.warps[t / 32]->bar.arrive_and_drop();
        block.bar.arrive_and_drop();
      });
    }
    for (auto& th : pool) th.join();
  }
  return cudaSuccess;
}

}  // namespace piip
