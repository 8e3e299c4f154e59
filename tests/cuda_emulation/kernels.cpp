// The CUDA kernels of csrc/ compiled for the CPU emulation (emulation.h), behind a C ABI
// that tests/test_cuda_emulation.py calls through ctypes with CPU tensors' pointers.
// Each entry mirrors its glue file in csrc/*/*_cuda.cu: the same launch_* functions,
// vector-width choice and parameter builders; only the ATen side is left out.
// dtype codes: 0 float32, 1 float16, 2 bfloat16. Entries return 0, or the cudaError_t; -2 for a
// variant number the op does not have. `variant` is the glue's `int variant` (piip_kernels/variants.py).
#include "emulation.h"  // first: it defines PIIP_CUDA_EMULATION and piip::launch

#include "dca/dca_cuda.cuh"
#include "merge/merge_cuda.cuh"
#include "msda/msda_cuda.cuh"
#include "msda/msda_two_pass.cuh"

namespace {

template <int Code> struct Type;
template <> struct Type<0> { using type = float; };
template <> struct Type<1> { using type = __half; };
template <> struct Type<2> { using type = __nv_bfloat16; };

// f.template operator()<T, U>() for the pairs the glue dispatches: U == T, or float beside 16-bit T.
template <typename F>
int dispatch(int t, int u, F&& f) {
  if (t == 0 && u == 0) return f.template operator()<float, float>();
  if (t == 1 && u == 1) return f.template operator()<__half, __half>();
  if (t == 2 && u == 2) return f.template operator()<__nv_bfloat16, __nv_bfloat16>();
  if (t == 1 && u == 0) return f.template operator()<__half, float>();
  if (t == 2 && u == 0) return f.template operator()<__nv_bfloat16, float>();
  return -1;
}

piip::msda::cuda::GradValue grad_value(float* f32, unsigned long long* fixed, const double* scale) {
  return fixed != nullptr ? piip::msda::cuda::GradValue{nullptr, fixed, scale} : piip::msda::cuda::GradValue{f32, nullptr, nullptr};
}

template <typename T>
uintptr_t addr(const T* p) { return reinterpret_cast<uintptr_t>(p); }

__global__ void count_blocks(unsigned long long* blocks) {
  if (threadIdx.x == 0) atomicAdd(blocks, 1ull);
}

}  // namespace

extern "C" {

long piip_emu_errors() { return piip_emu::errors.exchange(0); }

// Counts the fp32 atomics into [begin, begin + bytes) from now on (a float4 atomic once); returns
// the count since the previous call.
long piip_emu_watch_atomics(const void* begin, int64_t bytes) {
  piip_emu::watch_begin = begin;
  piip_emu::watch_end = static_cast<const char*>(begin) + bytes;
  return piip_emu::watched_atomics.exchange(0);
}

// Launches a kernel that counts its blocks into *counted through piip::launch: the return code
// and the count show whether a grid of `blocks` was run or refused.
int piip_emu_launch_blocks(int64_t blocks, unsigned long long* counted) {
  return static_cast<int>(piip::launch(count_blocks, blocks, 2, nullptr, counted));
}

int piip_emu_msda_forward(int variant, int t, int u, const void* value, const int64_t* shapes, const int64_t* starts, const void* loc,
                          const void* attn, void* out, int64_t N, int64_t S, int64_t M, int64_t D, int64_t Lq, int64_t L,
                          int64_t P) {
  namespace k = piip::msda::cuda;
  if (variant < 0 || variant >= k::kForwardVariants) return -2;
  return dispatch(t, u, [&]<typename T, typename U>() {
    const k::Params<T, U> p{static_cast<const T*>(value), shapes, starts, static_cast<const U*>(loc),
                            static_cast<const U*>(attn), N, S, M, D, Lq, L, P};
    T* o = static_cast<T*>(out);
    return static_cast<int>(k::with_vector_width<T>(k::vector_width<T>(D, addr(p.value), addr(o)), [&]<int V>() {
      return k::launch_forward<T, U, V>(p, o, nullptr, variant);
    }));
  });
}

int piip_emu_msda_backward(int variant, int t, int u, const void* grad_out, const void* value, const int64_t* shapes, const int64_t* starts,
                           const void* loc, const void* attn, float* acc_f32, unsigned long long* acc_fixed, const double* scale,
                           void* grad_value_out, void* grad_loc, void* grad_attn, int64_t N, int64_t S, int64_t M, int64_t D,
                           int64_t Lq, int64_t L, int64_t P) {
  namespace k = piip::msda::cuda;
  // The deterministic variants past 0 (two_pass) have an entry of their own below.
  if (variant < 0 || variant >= (acc_fixed != nullptr ? 1 : k::kBackwardVariants)) return -2;
  const auto gv = grad_value(acc_f32, acc_fixed, scale);
  return dispatch(t, u, [&]<typename T, typename U>() {
    const k::Params<T, U> p{static_cast<const T*>(value), shapes, starts, static_cast<const U*>(loc),
                            static_cast<const U*>(attn), N, S, M, D, Lq, L, P};
    const T* g = static_cast<const T*>(grad_out);
    return static_cast<int>(k::with_vector_width<T>(k::vector_width<T>(D, addr(p.value), addr(g)), [&]<int V>() {
      return k::launch_backward<T, U, V>(p, g, gv, static_cast<U*>(grad_loc), static_cast<U*>(grad_attn),
                                         static_cast<T*>(grad_value_out), nullptr, variant);
    }));
  });
}

int piip_emu_dca_forward(int t, int u, const void* value, const void* offsets, const void* logits, void* out, int64_t N,
                         int64_t Hv, int64_t Wv, int64_t Hq, int64_t Wq, int64_t M, int64_t D, int64_t P) {
  namespace k = piip::dca::cuda;
  return dispatch(t, u, [&]<typename T, typename U>() {
    const k::Params<T, U> p{static_cast<const T*>(value), static_cast<const U*>(offsets), static_cast<const U*>(logits),
                            N, Hv, Wv, Hq, Wq, M, D, P};
    T* o = static_cast<T*>(out);
    return static_cast<int>(piip::msda::cuda::with_vector_width<T>(
        piip::msda::cuda::vector_width<T>(D, addr(p.value), addr(o)), [&]<int V>() { return k::launch_forward<T, U, V>(p, o, nullptr); }));
  });
}

int piip_emu_dca_backward(int t, int u, const void* grad_out, const void* value, const void* offsets, const void* logits,
                          float* acc_f32, unsigned long long* acc_fixed, const double* scale, void* grad_value_out,
                          void* grad_off, void* grad_logits, int64_t N, int64_t Hv, int64_t Wv, int64_t Hq, int64_t Wq,
                          int64_t M, int64_t D, int64_t P) {
  namespace k = piip::dca::cuda;
  const auto gv = grad_value(acc_f32, acc_fixed, scale);
  return dispatch(t, u, [&]<typename T, typename U>() {
    const k::Params<T, U> p{static_cast<const T*>(value), static_cast<const U*>(offsets), static_cast<const U*>(logits),
                            N, Hv, Wv, Hq, Wq, M, D, P};
    const T* g = static_cast<const T*>(grad_out);
    return static_cast<int>(piip::msda::cuda::with_vector_width<T>(
        piip::msda::cuda::vector_width<T>(D, addr(p.value), addr(g)), [&]<int V>() {
          return k::launch_backward<T, U, V>(p, g, gv, static_cast<U*>(grad_off), static_cast<U*>(grad_logits),
                                             static_cast<T*>(grad_value_out), nullptr);
        }));
  });
}

// maps: nb pointers to [planes, H[b], W[b]]; the output dtype o is t or float (0).
int piip_emu_merge_forward(int variant, int t, int o, int nb, const void* const* maps, const int64_t* H, const int64_t* W,
                           const float* weights, void* out, int64_t planes, int64_t Ho, int64_t Wo, int align_corners) {
  namespace k = piip::merge::cuda;
  if (variant < 0 || variant >= k::kForwardVariants) return -2;
  return dispatch(t, o, [&]<typename T, typename O>() {
    const auto p = k::forward_params<T>(nb, reinterpret_cast<const T* const*>(maps), H, W, weights, planes, Ho, Wo,
                                        align_corners != 0);
    return static_cast<int>(k::launch_forward<T, O>(variant, p, static_cast<O*>(out), nullptr));
  });
}

// The length of each branch's row of weight-gradient shares (`partial` is [nb, this], zeroed),
// or -2 for an unknown variant.
long piip_emu_merge_backward_blocks(int variant, int t, int o, int nb, const int64_t* H, const int64_t* W, int64_t planes,
                                    int64_t Ho, int64_t Wo, int align_corners) {
  namespace k = piip::merge::cuda;
  if (variant < 0 || variant >= k::kBackwardVariants) return -2;
  return dispatch(t, o, [&]<typename T, typename O>() {
    const T* none[k::kMaxBranches] = {};
    T* out[k::kMaxBranches] = {};
    return static_cast<int>(k::branches_backward<T, O>(variant, nb, nullptr, none, out, H, W, nullptr, planes, Ho, Wo,
                                                       align_corners != 0).shares);
  });
}

// Every branch at once, as the glue: maps[b] and grad_maps[b] [planes, H[b], W[b]], weights [nb],
// partial [nb, piip_emu_merge_backward_blocks(...)] zeroed.
int piip_emu_merge_backward(int variant, int t, int o, int nb, const void* grad_out, const void* const* maps,
                            void* const* grad_maps, float* partial, const float* weights, const int64_t* H,
                            const int64_t* W, int64_t planes, int64_t Ho, int64_t Wo, int align_corners) {
  namespace k = piip::merge::cuda;
  if (variant < 0 || variant >= k::kBackwardVariants) return -2;
  return dispatch(t, o, [&]<typename T, typename O>() {
    auto p = k::branches_backward<T, O>(variant, nb, static_cast<const O*>(grad_out), reinterpret_cast<const T* const*>(maps),
                                        reinterpret_cast<T* const*>(grad_maps), H, W, weights, planes, Ho, Wo,
                                        align_corners != 0);
    p.partial = partial;
    return static_cast<int>(k::launch_backward<T, O>(variant, p, nullptr));
  });
}

}  // extern "C"

// --- the deterministic MSDA backward without atomics (csrc/msda/msda_two_pass.cuh) ----------
extern "C" {

// Bytes of workspace piip_emu_msda_backward_two_pass needs for these sizes; -1 when they do not
// fit its int32 indices.
int64_t piip_emu_msda_two_pass_workspace(int64_t N, int64_t S, int64_t M, int64_t Lq, int64_t L, int64_t P) {
  namespace tp = piip::msda::two_pass;
  const tp::Problem z = tp::problem(N, S, M, Lq, L, P);
  return tp::fits_int32(z) ? static_cast<int64_t>(tp::workspace_bytes(z)) : -1;
}

// Variant 1 ("two_pass") of msda_backward_deterministic, as csrc/msda/msda_cuda.cu runs it:
// `workspace` holds `workspace_size` bytes (aligned as a CUDA allocation), its contents ignored.
int piip_emu_msda_backward_two_pass(int t, int u, const void* grad_out, const void* value, const int64_t* shapes,
                                    const int64_t* starts, const void* loc, const void* attn, void* workspace,
                                    int64_t workspace_size, void* grad_value_out, void* grad_loc, void* grad_attn, int64_t N,
                                    int64_t S, int64_t M, int64_t D, int64_t Lq, int64_t L, int64_t P) {
  namespace k = piip::msda::cuda;
  return dispatch(t, u, [&]<typename T, typename U>() {
    const k::Params<T, U> p{static_cast<const T*>(value), shapes, starts, static_cast<const U*>(loc),
                            static_cast<const U*>(attn), N, S, M, D, Lq, L, P};
    const T* g = static_cast<const T*>(grad_out);
    T* gv = static_cast<T*>(grad_value_out);
    const int v = std::min(k::vector_width<T>(D, addr(p.value), addr(g)), k::vector_width<T>(D, addr(gv), addr(g)));
    return static_cast<int>(k::with_vector_width<T>(v, [&]<int V>() {
      return piip::msda::two_pass::launch_backward<T, U, V>(p, g, static_cast<U*>(grad_loc), static_cast<U*>(grad_attn), gv,
                                                            workspace, static_cast<size_t>(workspace_size), nullptr);
    }));
  });
}

}  // extern "C"
