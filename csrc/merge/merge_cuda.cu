// Glue between stable-ABI tensors and the torch-free CUDA kernels of merge_cuda.cuh:
// registers piip_C::merge_forward / piip_C::merge_backward for CUDA tensors.
#include <vector>

#include "../common/cuda_glue.h"
#include "merge_cuda.cuh"

namespace piip {
namespace merge {
namespace {

using cuda_glue::Device;
using cuda_glue::dev_mut_ptr;
using cuda_glue::dev_ptr;

std::vector<Tensor> check_features(const std::vector<Tensor>& features, const Tensor& weights) {
  STD_TORCH_CHECK(!features.empty() && static_cast<int>(features.size()) <= cuda::kMaxBranches,
                  "branch_merge (cuda): 1 to ", cuda::kMaxBranches, " maps, got ", features.size());
  STD_TORCH_CHECK(weights.dim() == 1 && weights.size(0) == static_cast<int64_t>(features.size()) && weights.is_cuda(),
                  "branch_merge: weights must be a CUDA [", features.size(), "] tensor");
  std::vector<Tensor> out;
  for (const auto& f : features) {
    STD_TORCH_CHECK(f.is_cuda() && same_device(f, features[0]), "branch_merge (cuda): maps must be on one CUDA device");
    STD_TORCH_CHECK(f.dim() == 4 && f.size(0) == features[0].size(0) && f.size(1) == features[0].size(1) &&
                        f.scalar_type() == features[0].scalar_type() && f.size(2) > 0 && f.size(3) > 0,
                    "branch_merge: maps must be non-empty [N, C, H_i, W_i] of one N, C and dtype");
    out.push_back(contig(f));
  }
  return out;
}

// Calls f.template operator()<T, O>(): maps' dtype T and output dtype O (T, or float).
template <typename F>
void dispatch(ScalarType t, ScalarType o, F&& f) {
  if (t == ScalarType::Float && o == ScalarType::Float) return f.template operator()<float, float>();
  if (t == ScalarType::Half && o == ScalarType::Half) return f.template operator()<c10::Half, c10::Half>();
  if (t == ScalarType::BFloat16 && o == ScalarType::BFloat16) return f.template operator()<c10::BFloat16, c10::BFloat16>();
  if (t == ScalarType::Half && o == ScalarType::Float) return f.template operator()<c10::Half, float>();
  if (t == ScalarType::BFloat16 && o == ScalarType::Float) return f.template operator()<c10::BFloat16, float>();
  STD_TORCH_CHECK(false, "branch_merge (cuda): unsupported dtypes: maps ", t, ", output ", o,
                  " (float64 runs on the cpu and reference backends)");
}

Tensor merge_forward_cuda(const std::vector<Tensor>& features, const Tensor& weights, int64_t Ho, int64_t Wo,
                          bool align_corners, ScalarType out_dtype, int64_t variant) {
  check_variant("branch_merge forward", "cuda", variant, cuda::kForwardVariants);
  auto feats = check_features(features, weights);
  STD_TORCH_CHECK(Ho > 0 && Wo > 0, "branch_merge: out_size must be positive");
  const cuda_glue::DeviceGuard guard(feats[0].get_device_index());
  const int64_t N = feats[0].size(0), C = feats[0].size(1);
  Tensor out = alloc({N, C, Ho, Wo}, out_dtype, feats[0]);
  const Tensor w = contig(cast(weights, ScalarType::Float));
  const cudaStream_t stream = cuda_glue::current_stream(feats[0].get_device_index());
  dispatch(feats[0].scalar_type(), out_dtype, [&]<typename T, typename O>() {
    using DT = typename Device<T>::type;
    const DT* maps[cuda::kMaxBranches];
    int64_t H[cuda::kMaxBranches], W[cuda::kMaxBranches];
    for (size_t b = 0; b < feats.size(); ++b) {
      maps[b] = dev_ptr<T>(feats[b]);
      H[b] = feats[b].size(2);
      W[b] = feats[b].size(3);
    }
    const auto p = cuda::forward_params<DT>(static_cast<int>(feats.size()), maps, H, W, ptr<float>(w), N * C, Ho,
                                            Wo, align_corners);
    cuda_glue::check_launch("branch_merge forward",
                            cuda::launch_forward<DT, typename Device<O>::type>(static_cast<int>(variant), p,
                                                                               dev_mut_ptr<O>(out), stream));
  });
  return out;
}

std::tuple<std::vector<Tensor>, Tensor> merge_backward_cuda(const Tensor& grad_output,
                                                            const std::vector<Tensor>& features, const Tensor& weights,
                                                            bool align_corners, int64_t variant) {
  check_variant("branch_merge backward", "cuda", variant, cuda::kBackwardVariants);
  auto feats = check_features(features, weights);
  const cuda_glue::DeviceGuard guard(feats[0].get_device_index());
  STD_TORCH_CHECK(grad_output.dim() == 4 && grad_output.size(0) == feats[0].size(0) &&
                      grad_output.size(1) == feats[0].size(1),
                  "branch_merge: grad_output must be [N, C, Ho, Wo], got ", shape_str(grad_output));
  const Tensor go = contig(grad_output);
  const int64_t planes = go.size(0) * go.size(1), Ho = go.size(2), Wo = go.size(3);
  const Tensor w = contig(cast(weights, ScalarType::Float));
  const cudaStream_t stream = cuda_glue::current_stream(feats[0].get_device_index());
  const int nb = static_cast<int>(feats.size());
  std::vector<Tensor> grads;
  for (const auto& f : feats) grads.push_back(alloc_like(f));
  Tensor grad_w;
  dispatch(feats[0].scalar_type(), go.scalar_type(), [&]<typename T, typename O>() {
    using DT = typename Device<T>::type;
    using DO = typename Device<O>::type;
    const DT* maps[cuda::kMaxBranches];
    DT* gs[cuda::kMaxBranches];
    int64_t H[cuda::kMaxBranches], W[cuda::kMaxBranches];
    for (int b = 0; b < nb; ++b) {
      maps[b] = dev_ptr<T>(feats[b]);
      gs[b] = dev_mut_ptr<T>(grads[b]);
      H[b] = feats[b].size(2);
      W[b] = feats[b].size(3);
    }
    auto p = cuda::branches_backward<DT, DO>(static_cast<int>(variant), nb, dev_ptr<O>(go), maps, gs, H, W,
                                             ptr<float>(w), planes, Ho, Wo, align_corners);
    // Every block's share of each weight gradient (zeros where a branch has fewer blocks),
    // summed per branch in float64 in a fixed order.
    Tensor partial = alloc_zeros({nb, p.shares}, ScalarType::Float, feats[0]);
    p.partial = mut_ptr<float>(partial);
    cuda_glue::check_launch("branch_merge backward", cuda::launch_backward<DT, DO>(static_cast<int>(variant), p, stream));
    grad_w = torch::stable::sum(partial, std::vector<int64_t>{1}, false, ScalarType::Double);
  });
  return {grads, cast(grad_w, weights.scalar_type())};
}

}  // namespace
}  // namespace merge
}  // namespace piip

static const piip::Kernels kernels("CUDA", {{"merge_forward", TORCH_BOX(&piip::merge::merge_forward_cuda)},
                                            {"merge_backward", TORCH_BOX(&piip::merge::merge_backward_cuda)}});
