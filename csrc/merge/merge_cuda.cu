// Glue between ATen tensors and the torch-free CUDA kernels of merge_cuda.cuh:
// registers piip_C::merge_forward / piip_C::merge_backward for CUDA tensors.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/stack.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <vector>

#include "../common/cuda_glue.h"
#include "merge_cuda.cuh"

namespace piip {
namespace merge {
namespace {

using cuda_glue::Device;
using cuda_glue::dev_mut_ptr;
using cuda_glue::dev_ptr;

std::vector<at::Tensor> check_features(at::TensorList features, const at::Tensor& weights) {
  TORCH_CHECK(!features.empty() && static_cast<int>(features.size()) <= cuda::kMaxBranches,
              "branch_merge (cuda): 1 to ", cuda::kMaxBranches, " maps, got ", features.size());
  TORCH_CHECK(weights.dim() == 1 && weights.size(0) == static_cast<int64_t>(features.size()) && weights.is_cuda(),
              "branch_merge: weights must be a CUDA [", features.size(), "] tensor");
  std::vector<at::Tensor> out;
  for (const auto& f : features) {
    TORCH_CHECK(f.is_cuda() && f.device() == features[0].device(), "branch_merge (cuda): maps must be on one CUDA device");
    TORCH_CHECK(f.dim() == 4 && f.size(0) == features[0].size(0) && f.size(1) == features[0].size(1) &&
                    f.scalar_type() == features[0].scalar_type() && f.size(2) > 0 && f.size(3) > 0,
                "branch_merge: maps must be non-empty [N, C, H_i, W_i] of one N, C and dtype");
    out.push_back(f.contiguous());
  }
  return out;
}

// Calls f.template operator()<T, O>(): maps' dtype T and output dtype O (T, or float).
template <typename F>
void dispatch(at::ScalarType t, at::ScalarType o, F&& f) {
  using at::ScalarType;
  if (t == ScalarType::Float && o == ScalarType::Float) return f.template operator()<float, float>();
  if (t == ScalarType::Half && o == ScalarType::Half) return f.template operator()<c10::Half, c10::Half>();
  if (t == ScalarType::BFloat16 && o == ScalarType::BFloat16) return f.template operator()<c10::BFloat16, c10::BFloat16>();
  if (t == ScalarType::Half && o == ScalarType::Float) return f.template operator()<c10::Half, float>();
  if (t == ScalarType::BFloat16 && o == ScalarType::Float) return f.template operator()<c10::BFloat16, float>();
  TORCH_CHECK(false, "branch_merge (cuda): unsupported dtypes: maps ", t, ", output ", o,
              " (float64 runs on the cpu and reference backends)");
}

at::Tensor merge_forward_cuda(at::TensorList features, const at::Tensor& weights, int64_t Ho, int64_t Wo, bool align_corners,
                              at::ScalarType out_dtype) {
  auto feats = check_features(features, weights);
  TORCH_CHECK(Ho > 0 && Wo > 0, "branch_merge: out_size must be positive");
  const c10::cuda::CUDAGuard guard(feats[0].device());
  const int64_t N = feats[0].size(0), C = feats[0].size(1);
  auto out = at::empty({N, C, Ho, Wo}, feats[0].options().dtype(out_dtype).memory_format(at::MemoryFormat::Contiguous));
  auto w = weights.to(at::kFloat).contiguous();
  auto stream = c10::cuda::getCurrentCUDAStream().stream();
  dispatch(feats[0].scalar_type(), out_dtype, [&]<typename T, typename O>() {
    using DT = typename Device<T>::type;
    const DT* maps[cuda::kMaxBranches];
    int64_t H[cuda::kMaxBranches], W[cuda::kMaxBranches];
    for (size_t b = 0; b < feats.size(); ++b) {
      maps[b] = dev_ptr<T>(feats[b]);
      H[b] = feats[b].size(2);
      W[b] = feats[b].size(3);
    }
    const auto p = cuda::forward_params<DT>(static_cast<int>(feats.size()), maps, H, W, w.const_data_ptr<float>(), N * C, Ho,
                                            Wo, align_corners);
    cuda_glue::check_launch("branch_merge forward", cuda::launch_forward<DT, typename Device<O>::type>(p, dev_mut_ptr<O>(out), stream));
  });
  return out;
}

std::tuple<std::vector<at::Tensor>, at::Tensor> merge_backward_cuda(const at::Tensor& grad_output, at::TensorList features,
                                                                    const at::Tensor& weights, bool align_corners) {
  auto feats = check_features(features, weights);
  const c10::cuda::CUDAGuard guard(feats[0].device());
  TORCH_CHECK(grad_output.dim() == 4 && grad_output.size(0) == feats[0].size(0) && grad_output.size(1) == feats[0].size(1),
              "branch_merge: grad_output must be [N, C, Ho, Wo], got ", grad_output.sizes());
  auto go = grad_output.contiguous();
  const int64_t planes = go.size(0) * go.size(1), Ho = go.size(2), Wo = go.size(3);
  auto w = weights.to(at::kFloat).contiguous();
  auto stream = c10::cuda::getCurrentCUDAStream().stream();
  std::vector<at::Tensor> grads, shares;
  dispatch(feats[0].scalar_type(), go.scalar_type(), [&]<typename T, typename O>() {
    using DT = typename Device<T>::type;
    using DO = typename Device<O>::type;
    for (size_t b = 0; b < feats.size(); ++b) {
      const int64_t H = feats[b].size(2), W = feats[b].size(3);
      auto gf = at::empty(feats[b].sizes(), feats[b].options());
      auto partial = at::empty({cuda::backward_blocks(planes, H, W)}, feats[b].options().dtype(at::kFloat));
      const auto p = cuda::backward_params<DT, DO>(dev_ptr<O>(go), dev_ptr<T>(feats[b]), dev_mut_ptr<T>(gf),
                                                   partial.mutable_data_ptr<float>(), w.const_data_ptr<float>() + b, planes,
                                                   H, W, Ho, Wo, align_corners);
      cuda_glue::check_launch("branch_merge backward", cuda::launch_backward<DT, DO>(p, stream));
      grads.push_back(gf);
      shares.push_back(partial.to(at::kDouble).sum());
    }
  });
  return {grads, at::stack(shares).to(weights.scalar_type())};
}

}  // namespace
}  // namespace merge
}  // namespace piip

TORCH_LIBRARY_IMPL(piip_C, CUDA, m) {
  m.impl("merge_forward", &piip::merge::merge_forward_cuda);
  m.impl("merge_backward", &piip::merge::merge_backward_cuda);
}
