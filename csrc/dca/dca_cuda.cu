// Glue between stable-ABI tensors and the torch-free CUDA kernels of dca_cuda.cuh:
// registers piip_C::dca_forward / piip_C::dca_backward for CUDA tensors.
#include "../common/cuda_glue.h"
#include "dca_cuda.cuh"
#include "dca_glue.h"

namespace piip {
namespace dca {
namespace {

using cuda_glue::Device;
using cuda_glue::dev_mut_ptr;
using cuda_glue::dev_ptr;

template <typename T, typename U>
cuda::Params<typename Device<T>::type, typename Device<U>::type> params(const Sizes& z, const Tensor& value,
                                                                       const Tensor& offsets, const Tensor& logits) {
  return {dev_ptr<T>(value), dev_ptr<U>(offsets), dev_ptr<U>(logits), z.N, z.Hv, z.Wv, z.Hq, z.Wq, z.M, z.D, z.P};
}

void check_points(const Sizes& z) {
  STD_TORCH_CHECK(z.P <= cuda::kMaxP, "deform_cross_attn (cuda): at most ", cuda::kMaxP, " points per head (got ", z.P,
                  "); use the triton, cpu or reference backend");
}

Tensor dca_forward_cuda(const Tensor& value_, const Tensor& offsets_, const Tensor& logits_, int64_t Hv, int64_t Wv,
                        int64_t Hq, int64_t Wq) {
  const Sizes z = check_and_sizes(value_, offsets_, logits_, Hv, Wv, Hq, Wq, /*cuda=*/true);
  check_points(z);
  const cuda_glue::DeviceGuard guard(value_.get_device_index());
  const Tensor value = contig(value_), offsets = contig(offsets_), logits = contig(logits_);
  Tensor out = alloc({z.N, z.Lq(), z.M * z.D}, value.scalar_type(), value);
  if (out.numel() == 0) return out;
  const cudaStream_t stream = cuda_glue::current_stream(value.get_device_index());
  cuda_glue::dispatch("deform_cross_attn", value.scalar_type(), offsets.scalar_type(), [&]<typename T, typename U>() {
    using DT = typename Device<T>::type;
    const auto p = params<T, U>(z, value, offsets, logits);
    DT* o = dev_mut_ptr<T>(out);
    const int v = msda::cuda::vector_width<DT>(z.D, reinterpret_cast<uintptr_t>(p.value), reinterpret_cast<uintptr_t>(o));
    cuda_glue::check_launch("deform_cross_attn forward", msda::cuda::with_vector_width<DT>(v, [&]<int V>() {
      return cuda::launch_forward<DT, typename Device<U>::type, V>(p, o, stream);
    }));
  });
  return out;
}

std::tuple<Tensor, Tensor, Tensor> dca_backward_cuda(const Tensor& grad_output, const Tensor& value_,
                                                     const Tensor& offsets_, const Tensor& logits_, int64_t Hv,
                                                     int64_t Wv, int64_t Hq, int64_t Wq, bool deterministic) {
  const Sizes z = check_and_sizes(value_, offsets_, logits_, Hv, Wv, Hq, Wq, /*cuda=*/true);
  check_points(z);
  check_grad_output(grad_output, value_, z);
  const cuda_glue::DeviceGuard guard(value_.get_device_index());
  const Tensor value = contig(value_), offsets = contig(offsets_), logits = contig(logits_);
  const Tensor go = contig(grad_output);
  if (z.N * z.Lq() * z.M * z.D == 0) return {zeros_as(value), zeros_as(offsets), zeros_as(logits)};
  Tensor grad_value = alloc_like(value);
  Tensor grad_off = alloc_like(offsets);
  Tensor grad_logits = alloc_like(logits);
  const cudaStream_t stream = cuda_glue::current_stream(value.get_device_index());
  // Softmax weights are at most 1, and each of the Lq * P points reaches an entry at most once. The
  // weights' bound is 1, or NaN where a head's softmax is not finite (a NaN or +inf logit, or all -inf).
  const cuda_glue::GradValueAccumulator accum(value, go, &logits, static_cast<double>(z.Lq()) * z.P, deterministic,
                                              stream, /*softmax_points=*/z.P);
  const auto& gv = accum.gv;
  cuda_glue::dispatch("deform_cross_attn", value.scalar_type(), offsets.scalar_type(), [&]<typename T, typename U>() {
    using DT = typename Device<T>::type;
    using DU = typename Device<U>::type;
    const auto p = params<T, U>(z, value, offsets, logits);
    const DT* g = dev_ptr<T>(go);
    const int v = msda::cuda::vector_width<DT>(z.D, reinterpret_cast<uintptr_t>(p.value), reinterpret_cast<uintptr_t>(g));
    cuda_glue::check_launch("deform_cross_attn backward", msda::cuda::with_vector_width<DT>(v, [&]<int V>() {
      return cuda::launch_backward<DT, DU, V>(p, g, gv, dev_mut_ptr<U>(grad_off), dev_mut_ptr<U>(grad_logits),
                                              dev_mut_ptr<T>(grad_value), stream);
    }));
  });
  return {grad_value, grad_off, grad_logits};
}

}  // namespace
}  // namespace dca
}  // namespace piip

static const piip::Kernels kernels("CUDA", {{"dca_forward", TORCH_BOX(&piip::dca::dca_forward_cuda)},
                                            {"dca_backward", TORCH_BOX(&piip::dca::dca_backward_cuda)}});
