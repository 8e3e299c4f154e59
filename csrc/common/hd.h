// Portability macros shared by the CPU and CUDA kernels.
//
// Headers under csrc/ are torch-free: they see plain pointers, sizes and
// strides only, so the same per-point arithmetic compiles with g++ for the
// CPU kernels and with nvcc for the CUDA kernels.
#pragma once

#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define PIIP_HD __host__ __device__ __forceinline__
#else
#define PIIP_HD inline
#endif
