// Glue between ATen tensors and the torch-free CPU kernels of merge_cpu.h
// (piip_C::merge_forward / piip_C::merge_backward). Friendly input checks live
// in piip_kernels/merge/api.py; the checks here guard memory safety.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "../common/cpu_glue.h"
#include "merge_cpu.h"

namespace piip {
namespace merge {
namespace {

// Checks the maps, returns N*C (the number of planes) and makes them contiguous NCHW.
int64_t check_features(const std::vector<at::Tensor>& features, const at::Tensor& weights,
                       std::vector<at::Tensor>& contig) {
  TORCH_CHECK(!features.empty() && features.size() <= 8, "branch_merge: 1 to 8 feature maps, got ", features.size());
  TORCH_CHECK(weights.dim() == 1 && weights.size(0) == static_cast<int64_t>(features.size()),
              "branch_merge: weights must be [", features.size(), "], got ", weights.sizes());
  const auto& f0 = features[0];
  for (const auto& f : features) {
    TORCH_CHECK(f.dim() == 4 && f.size(0) == f0.size(0) && f.size(1) == f0.size(1),
                "branch_merge: every map must be [N, C, H_i, W_i] with one N and C");
    TORCH_CHECK(f.scalar_type() == f0.scalar_type(), "branch_merge: maps must share a dtype");
    TORCH_CHECK(f.is_cpu() && weights.is_cpu(), "branch_merge (cpu): expected CPU tensors");
    TORCH_CHECK(f.size(2) > 0 && f.size(3) > 0, "branch_merge: empty map");
    contig.push_back(f.contiguous());
  }
  return f0.size(0) * f0.size(1);
}

template <typename T, typename acc_t>
std::vector<Branch<T, acc_t>> branches(const std::vector<at::Tensor>& feats, const at::Tensor& weights,
                                       int64_t Ho, int64_t Wo, bool align_corners, bool backward) {
  auto w = weights.to(at::kDouble).contiguous();
  std::vector<Branch<T, acc_t>> br(feats.size());
  for (size_t i = 0; i < feats.size(); ++i) {
    br[i].f = feats[i].const_data_ptr<T>();
    br[i].H = feats[i].size(2);
    br[i].W = feats[i].size(3);
    br[i].weight = static_cast<acc_t>(w.const_data_ptr<double>()[i]);
    build_branch(br[i], Ho, Wo, align_corners, backward);
  }
  return br;
}

// Calls f.template operator()<T, O>(): T the maps' dtype, O the output's
// (T, or float for 16-bit maps merged with fp32 weights).
template <typename F>
void dispatch(at::ScalarType t, at::ScalarType o, F&& f) {
  using at::ScalarType;
  if (t == o) {
    switch (t) {
      case ScalarType::Float: return f.template operator()<float, float>();
      case ScalarType::Double: return f.template operator()<double, double>();
      case ScalarType::Half: return f.template operator()<c10::Half, c10::Half>();
      case ScalarType::BFloat16: return f.template operator()<c10::BFloat16, c10::BFloat16>();
      default: break;
    }
  } else if (o == ScalarType::Float) {
    if (t == ScalarType::Half) return f.template operator()<c10::Half, float>();
    if (t == ScalarType::BFloat16) return f.template operator()<c10::BFloat16, float>();
  }
  TORCH_CHECK(false, "branch_merge (cpu): unsupported dtypes: maps ", t, ", output ", o);
}

at::Tensor merge_forward_cpu(at::TensorList features, const at::Tensor& weights, int64_t Ho, int64_t Wo,
                             bool align_corners, at::ScalarType out_dtype) {
  std::vector<at::Tensor> feats;
  const int64_t planes = check_features(features.vec(), weights, feats);
  TORCH_CHECK(Ho > 0 && Wo > 0, "branch_merge: out_size must be positive");
  auto out = at::empty({features[0].size(0), features[0].size(1), Ho, Wo},
                       features[0].options().dtype(out_dtype).memory_format(at::MemoryFormat::Contiguous));
  dispatch(feats[0].scalar_type(), out_dtype, [&]<typename T, typename O>() {
    using acc_t = typename cpu::Acc<T>::type;
    auto br = branches<T, acc_t>(feats, weights, Ho, Wo, align_corners, false);
    O* o = out.mutable_data_ptr<O>();
    at::parallel_for(0, planes, cpu::grain(Ho * Wo * 4 * static_cast<int64_t>(br.size())), [&](int64_t b, int64_t e) {
      std::vector<acc_t> row(Wo);
      forward_planes<T, O, acc_t>(br, Ho, Wo, o, b, e, row.data());
    });
  });
  return out;
}

std::tuple<std::vector<at::Tensor>, at::Tensor> merge_backward_cpu(const at::Tensor& grad_output,
                                                                   at::TensorList features,
                                                                   const at::Tensor& weights, bool align_corners) {
  std::vector<at::Tensor> feats;
  const int64_t planes = check_features(features.vec(), weights, feats);
  TORCH_CHECK(grad_output.dim() == 4 && grad_output.size(0) == features[0].size(0) &&
                  grad_output.size(1) == features[0].size(1),
              "branch_merge: grad_output must be [N, C, Ho, Wo], got ", grad_output.sizes());
  const int64_t Ho = grad_output.size(2), Wo = grad_output.size(3);
  auto go = grad_output.contiguous();
  std::vector<at::Tensor> grads;
  for (const auto& f : feats) grads.push_back(at::empty(f.sizes(), f.options()));
  const auto acc_type = feats[0].scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  // Per-plane shares of each weight gradient, summed in a fixed order below: deterministic.
  auto dots = at::zeros({static_cast<int64_t>(feats.size()), planes}, feats[0].options().dtype(acc_type));
  dispatch(feats[0].scalar_type(), go.scalar_type(), [&]<typename T, typename O>() {
    using acc_t = typename cpu::Acc<T>::type;
    auto br = branches<T, acc_t>(feats, weights, Ho, Wo, align_corners, true);
    int64_t max_w = 0;
    for (const auto& b : br) max_w = std::max(max_w, b.W);
    // One task walks every branch of a plane, so that plane of grad_output is read
    // from memory once and from cache for the other branches.
    at::parallel_for(0, planes, cpu::grain(Ho * Wo * 4 * static_cast<int64_t>(br.size())), [&](int64_t b, int64_t e) {
      std::vector<acc_t> tmp((Ho + 1) * max_w);
      for (int64_t p = b; p < e; ++p) {
        for (size_t i = 0; i < br.size(); ++i) {
          backward_planes<T, O, acc_t>(br[i], go.const_data_ptr<O>(), Ho, Wo, grads[i].mutable_data_ptr<T>(),
                                       dots.mutable_data_ptr<acc_t>() + i * planes, p, p + 1, tmp.data());
        }
      }
    });
  });
  auto grad_weights = dots.to(at::kDouble).sum(1).to(weights.scalar_type());
  return {grads, grad_weights};
}

}  // namespace
}  // namespace merge
}  // namespace piip

TORCH_LIBRARY_IMPL(piip_C, CPU, m) {
  m.impl("merge_forward", &piip::merge::merge_forward_cpu);
  m.impl("merge_backward", &piip::merge::merge_backward_cpu);
}
