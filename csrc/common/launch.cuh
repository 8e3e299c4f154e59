// The one place CUDA kernels are launched (torch-free).
//
// Every launch in csrc/ goes through piip::launch, so the CPU emulation of the CUDA
// execution model in tests/cuda_emulation/ (threads, warps, shuffles, atomics), which
// defines PIIP_CUDA_EMULATION and its own piip::launch, runs exactly these kernels.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <utility>

namespace piip {

// CUDA's largest grid along x. Every launch in csrc/ is one-dimensional (axes y and z, capped
// at 65535, stay 1), so this is the only grid bound; launch() refuses more blocks instead of
// letting the count wrap around (the emulation's launch does the same).
constexpr int64_t kMaxGridX = 2147483647;

}  // namespace piip

// sm_90 has vector (float4) atomics; the emulation exercises that path too.
#if (defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900) || defined(PIIP_CUDA_EMULATION)
#define PIIP_VECTOR_ATOMICS 1
#else
#define PIIP_VECTOR_ATOMICS 0
#endif

#ifndef PIIP_CUDA_EMULATION
namespace piip {

// kernel<<<blocks, threads, 0, stream>>>(args...), then the launch error.
template <typename... KernelArgs, typename... Args>
cudaError_t launch(void (*kernel)(KernelArgs...), int64_t blocks, unsigned threads, cudaStream_t stream, Args&&... args) {
  if (blocks > kMaxGridX) return cudaErrorInvalidConfiguration;
  kernel<<<static_cast<unsigned>(blocks), threads, 0, stream>>>(std::forward<Args>(args)...);
  return cudaGetLastError();
}

}  // namespace piip
#endif
