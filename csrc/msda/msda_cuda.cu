// Glue between stable-ABI tensors and the torch-free CUDA kernels of msda_cuda.cuh:
// registers piip_C::msda_forward / piip_C::msda_backward / piip_C::msda_backward_deterministic for CUDA
// tensors.
// Inputs are made contiguous here; kernels run on the current stream of the
// inputs' device, and every launch is checked.
#include "../common/cuda_glue.h"
#include "msda_cuda.cuh"
#include "msda_glue.h"
#include "msda_two_pass.cuh"

namespace piip {
namespace msda {
namespace {

using cuda_glue::Device;
using cuda_glue::dev_mut_ptr;
using cuda_glue::dev_ptr;

template <typename T, typename U>
cuda::Params<typename Device<T>::type, typename Device<U>::type> params(const Sizes& z, const Tensor& value,
                                                                       const Tensor& shapes, const Tensor& starts,
                                                                       const Tensor& loc, const Tensor& attn) {
  return {dev_ptr<T>(value), ptr<int64_t>(shapes), ptr<int64_t>(starts), dev_ptr<U>(loc),
          dev_ptr<U>(attn), z.N, z.S, z.M, z.D, z.Lq, z.L, z.P};
}

Tensor msda_forward_cuda(const Tensor& value_, const Tensor& shapes_, const Tensor& starts_, const Tensor& loc_,
                         const Tensor& attn_, int64_t variant) {
  check_variant("ms_deform_attn forward", "cuda", variant, cuda::kForwardVariants);
  const Sizes z = check_and_sizes(value_, shapes_, starts_, loc_, attn_, /*cuda=*/true);
  const cuda_glue::DeviceGuard guard(value_.get_device_index());
  const Tensor value = contig(value_), shapes = contig(shapes_), starts = contig(starts_);
  const Tensor loc = contig(loc_), attn = contig(attn_);
  Tensor out = alloc({z.N, z.Lq, z.M * z.D}, value.scalar_type(), value);
  if (out.numel() == 0) return out;
  if (z.L * z.P == 0) return torch::stable::zero_(out);
  const cudaStream_t stream = cuda_glue::current_stream(value.get_device_index());
  cuda_glue::dispatch("ms_deform_attn", value.scalar_type(), loc.scalar_type(), [&]<typename T, typename U>() {
    using DT = typename Device<T>::type;
    const auto p = params<T, U>(z, value, shapes, starts, loc, attn);
    DT* o = dev_mut_ptr<T>(out);
    const int v = cuda::vector_width<DT>(z.D, reinterpret_cast<uintptr_t>(p.value), reinterpret_cast<uintptr_t>(o));
    const cudaError_t err = cuda::with_vector_width<DT>(v, [&]<int V>() {
      return cuda::launch_forward<DT, typename Device<U>::type, V>(p, o, stream, static_cast<int>(variant));
    });
    cuda_glue::check_launch("ms_deform_attn forward", err);
  });
  return out;
}

// The contiguous inputs and the outputs of a backward call, made inside its DeviceGuard. With no
// sampled product at all (`empty`) the outputs are zeros and no kernel runs; otherwise they are
// allocated for the kernels to write.
struct BackwardCall {
  Sizes z;
  Tensor value, shapes, starts, loc, attn, go;
  bool empty;
  Tensor grad_value, grad_loc, grad_attn;

  BackwardCall(const Sizes& z_, const Tensor& grad_output, const Tensor& value_, const Tensor& shapes_,
               const Tensor& starts_, const Tensor& loc_, const Tensor& attn_)
      : z(z_), value(contig(value_)), shapes(contig(shapes_)), starts(contig(starts_)), loc(contig(loc_)),
        attn(contig(attn_)), go(contig(grad_output)), empty(z.N * z.Lq * z.M * z.L * z.P * z.D == 0),
        grad_value(empty ? zeros_as(value) : alloc_like(value)), grad_loc(empty ? zeros_as(loc) : alloc_like(loc)),
        grad_attn(empty ? zeros_as(attn) : alloc_like(attn)) {}

  std::tuple<Tensor, Tensor, Tensor> grads() const { return {grad_value, grad_loc, grad_attn}; }
};

std::tuple<Tensor, Tensor, Tensor> msda_backward_cuda_impl(const Tensor& grad_output, const Tensor& value_,
                                                           const Tensor& shapes_, const Tensor& starts_,
                                                           const Tensor& loc_, const Tensor& attn_, bool deterministic,
                                                           int64_t variant) {
  check_variant(deterministic ? "ms_deform_attn backward (deterministic)" : "ms_deform_attn backward", "cuda", variant,
                deterministic ? cuda::kDeterministicBackwardVariants : cuda::kBackwardVariants);
  const Sizes z = check_and_sizes(value_, shapes_, starts_, loc_, attn_, /*cuda=*/true);
  check_grad_output(grad_output, value_, z);
  const cuda_glue::DeviceGuard guard(value_.get_device_index());
  BackwardCall c(z, grad_output, value_, shapes_, starts_, loc_, attn_);
  if (c.empty) return c.grads();
  const Tensor &value = c.value, &shapes = c.shapes, &starts = c.starts, &loc = c.loc, &attn = c.attn, &go = c.go;
  Tensor &grad_value = c.grad_value, &grad_loc = c.grad_loc, &grad_attn = c.grad_attn;
  const cudaStream_t stream = cuda_glue::current_stream(value.get_device_index());
  // An entry of level l can receive one contribution from each of the Lq * P points on that level.
  const cuda_glue::GradValueAccumulator accum(value, go, &attn, static_cast<double>(z.Lq) * z.P, deterministic, stream);
  const auto& gv = accum.gv;
  cuda_glue::dispatch("ms_deform_attn", value.scalar_type(), loc.scalar_type(), [&]<typename T, typename U>() {
    using DT = typename Device<T>::type;
    using DU = typename Device<U>::type;
    const auto p = params<T, U>(z, value, shapes, starts, loc, attn);
    const DT* g = dev_ptr<T>(go);
    const int v = cuda::vector_width<DT>(z.D, reinterpret_cast<uintptr_t>(p.value), reinterpret_cast<uintptr_t>(g));
    const cudaError_t err = cuda::with_vector_width<DT>(v, [&]<int V>() {
      return cuda::launch_backward<DT, DU, V>(p, g, gv, dev_mut_ptr<U>(grad_loc), dev_mut_ptr<U>(grad_attn),
                                              dev_mut_ptr<T>(grad_value), stream, static_cast<int>(variant));
    });
    cuda_glue::check_launch("ms_deform_attn backward", err);
  });
  return c.grads();
}

std::tuple<Tensor, Tensor, Tensor> msda_backward_cuda(const Tensor& grad_output, const Tensor& value,
                                                      const Tensor& shapes, const Tensor& starts, const Tensor& loc,
                                                      const Tensor& attn, int64_t variant) {
  return msda_backward_cuda_impl(grad_output, value, shapes, starts, loc, attn, false, variant);
}

// Variant 1 of the deterministic backward ("two_pass", msda_two_pass.cuh): no accumulator, one
// workspace of the size the kernels ask for, every output written by the kernels.
std::tuple<Tensor, Tensor, Tensor> msda_backward_two_pass_cuda(const Tensor& grad_output, const Tensor& value_,
                                                               const Tensor& shapes_, const Tensor& starts_,
                                                               const Tensor& loc_, const Tensor& attn_) {
  const Sizes z = check_and_sizes(value_, shapes_, starts_, loc_, attn_, /*cuda=*/true);
  check_grad_output(grad_output, value_, z);
  const two_pass::Problem problem = two_pass::problem(z.N, z.S, z.M, z.Lq, z.L, z.P);
  STD_TORCH_CHECK(two_pass::fits_int32(problem), "ms_deform_attn backward (deterministic, two_pass): ",
                  problem.entries, " sampling corners and ", problem.cells,
                  " value cells; this variant indexes them with int32 (at most 2^31 - 2 each): use variant 0 (fixed_point)");
  const cuda_glue::DeviceGuard guard(value_.get_device_index());
  BackwardCall c(z, grad_output, value_, shapes_, starts_, loc_, attn_);
  if (c.empty) return c.grads();
  const Tensor &value = c.value, &shapes = c.shapes, &starts = c.starts, &loc = c.loc, &attn = c.attn, &go = c.go;
  Tensor &grad_value = c.grad_value, &grad_loc = c.grad_loc, &grad_attn = c.grad_attn;
  // Byte tensors come from torch's CUDA caching allocator, whose blocks are 512-byte aligned.
  const size_t bytes = two_pass::workspace_bytes(problem);
  Tensor workspace = alloc({static_cast<int64_t>(bytes)}, ScalarType::Byte, value);
  const cudaStream_t stream = cuda_glue::current_stream(value.get_device_index());
  cuda_glue::dispatch("ms_deform_attn", value.scalar_type(), loc.scalar_type(), [&]<typename T, typename U>() {
    using DT = typename Device<T>::type;
    using DU = typename Device<U>::type;
    const auto p = params<T, U>(z, value, shapes, starts, loc, attn);
    const DT* g = dev_ptr<T>(go);
    DT* gv = dev_mut_ptr<T>(grad_value);
    // Pass 1 reads value and grad_out, pass 2 grad_out and grad_value: V must suit all three.
    const int v = std::min(cuda::vector_width<DT>(z.D, reinterpret_cast<uintptr_t>(p.value), reinterpret_cast<uintptr_t>(g)),
                           cuda::vector_width<DT>(z.D, reinterpret_cast<uintptr_t>(gv), reinterpret_cast<uintptr_t>(g)));
    const cudaError_t err = cuda::with_vector_width<DT>(v, [&]<int V>() {
      return two_pass::launch_backward<DT, DU, V>(p, g, dev_mut_ptr<U>(grad_loc), dev_mut_ptr<U>(grad_attn), gv,
                                                  workspace.mutable_data_ptr(), bytes, stream);
    });
    cuda_glue::check_launch("ms_deform_attn backward (deterministic, two_pass)", err);
  });
  return c.grads();
}

std::tuple<Tensor, Tensor, Tensor> msda_backward_deterministic_cuda(const Tensor& grad_output, const Tensor& value,
                                                                    const Tensor& shapes, const Tensor& starts,
                                                                    const Tensor& loc, const Tensor& attn,
                                                                    int64_t variant) {
  // 0: fixed_point (the accumulator of msda_cuda.cuh), 1: two_pass; piip_kernels/variants.py names them.
  check_variant("ms_deform_attn backward (deterministic)", "cuda", variant, cuda::kDeterministicBackwardVariants);
  if (variant == 1) return msda_backward_two_pass_cuda(grad_output, value, shapes, starts, loc, attn);
  return msda_backward_cuda_impl(grad_output, value, shapes, starts, loc, attn, true, variant);
}

}  // namespace
}  // namespace msda
}  // namespace piip

static const piip::Kernels kernels(
    "CUDA", {{"msda_forward", TORCH_BOX(&piip::msda::msda_forward_cuda)},
             {"msda_backward", TORCH_BOX(&piip::msda::msda_backward_cuda)},
             {"msda_backward_deterministic", TORCH_BOX(&piip::msda::msda_backward_deterministic_cuda)}});
