// Glue between stable-ABI tensors and the torch-free CPU kernels of merge_cpu.h
// (piip_C::merge_forward / piip_C::merge_backward). Friendly input checks live
// in piip_kernels/merge/api.py; the checks here guard memory safety.
#include <algorithm>
#include <vector>

#include "../common/cpu_glue.h"
#include "merge_cpu.h"

namespace piip {
namespace merge {
namespace {

// Checks the maps, returns N*C (the number of planes) and makes them contiguous NCHW.
int64_t check_features(const std::vector<Tensor>& features, const Tensor& weights, std::vector<Tensor>& contiguous_features) {
  STD_TORCH_CHECK(!features.empty() && features.size() <= 8, "branch_merge: 1 to 8 feature maps, got ",
                  features.size());
  STD_TORCH_CHECK(weights.dim() == 1 && weights.size(0) == static_cast<int64_t>(features.size()),
                  "branch_merge: weights must be [", features.size(), "], got ", shape_str(weights));
  const auto& f0 = features[0];
  for (const auto& f : features) {
    STD_TORCH_CHECK(f.dim() == 4 && f.size(0) == f0.size(0) && f.size(1) == f0.size(1),
                    "branch_merge: every map must be [N, C, H_i, W_i] with one N and C");
    STD_TORCH_CHECK(f.scalar_type() == f0.scalar_type(), "branch_merge: maps must share a dtype");
    STD_TORCH_CHECK(f.is_cpu() && weights.is_cpu(), "branch_merge (cpu): expected CPU tensors");
    STD_TORCH_CHECK(f.size(2) > 0 && f.size(3) > 0, "branch_merge: empty map");
    contiguous_features.push_back(contig(f));
  }
  return f0.size(0) * f0.size(1);
}

template <typename T, typename acc_t>
std::vector<Branch<T, acc_t>> branches(const std::vector<Tensor>& feats, const Tensor& weights, int64_t Ho,
                                       int64_t Wo, bool align_corners, bool backward) {
  const Tensor w = contig(cast(weights, ScalarType::Double));
  const double* wd = ptr<double>(w);
  std::vector<Branch<T, acc_t>> br(feats.size());
  for (size_t i = 0; i < feats.size(); ++i) {
    br[i].f = ptr<T>(feats[i]);
    br[i].H = feats[i].size(2);
    br[i].W = feats[i].size(3);
    br[i].weight = static_cast<acc_t>(wd[i]);
    build_branch(br[i], Ho, Wo, align_corners, backward);
  }
  return br;
}

// Calls f.template operator()<T, O>(): T the maps' dtype, O the output's
// (T, or float for 16-bit maps merged with fp32 weights).
template <typename F>
void dispatch(ScalarType t, ScalarType o, F&& f) {
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
  STD_TORCH_CHECK(false, "branch_merge (cpu): unsupported dtypes: maps ", t, ", output ", o);
}

Tensor merge_forward_cpu(const std::vector<Tensor>& features, const Tensor& weights, int64_t Ho, int64_t Wo,
                         bool align_corners, ScalarType out_dtype, int64_t variant) {
  check_variant("branch_merge forward", "cpu", variant, 1);
  std::vector<Tensor> feats;
  const int64_t planes = check_features(features, weights, feats);
  STD_TORCH_CHECK(Ho > 0 && Wo > 0, "branch_merge: out_size must be positive");
  Tensor out = alloc({features[0].size(0), features[0].size(1), Ho, Wo}, out_dtype, features[0]);
  dispatch(feats[0].scalar_type(), out_dtype, [&]<typename T, typename O>() {
    using acc_t = typename cpu::Acc<T>::type;
    auto br = branches<T, acc_t>(feats, weights, Ho, Wo, align_corners, false);
    O* o = mut_ptr<O>(out);
    cpu::parallel_for(0, planes, cpu::grain(Ho * Wo * 4 * static_cast<int64_t>(br.size())), [&](int64_t b, int64_t e) {
      std::vector<acc_t> row(Wo);
      forward_planes<T, O, acc_t>(br, Ho, Wo, o, b, e, row.data());
    });
  });
  return out;
}

std::tuple<std::vector<Tensor>, Tensor> merge_backward_cpu(const Tensor& grad_output,
                                                           const std::vector<Tensor>& features,
                                                           const Tensor& weights, bool align_corners,
                                                           int64_t variant) {
  check_variant("branch_merge backward", "cpu", variant, 1);
  std::vector<Tensor> feats;
  const int64_t planes = check_features(features, weights, feats);
  STD_TORCH_CHECK(grad_output.dim() == 4 && grad_output.size(0) == features[0].size(0) &&
                      grad_output.size(1) == features[0].size(1),
                  "branch_merge: grad_output must be [N, C, Ho, Wo], got ", shape_str(grad_output));
  const int64_t Ho = grad_output.size(2), Wo = grad_output.size(3);
  const Tensor go = contig(grad_output);
  std::vector<Tensor> grads;
  for (const auto& f : feats) grads.push_back(alloc_like(f));
  const ScalarType acc_type = feats[0].scalar_type() == ScalarType::Double ? ScalarType::Double : ScalarType::Float;
  // Per-plane shares of each weight gradient, summed in a fixed order below: deterministic.
  Tensor dots = alloc_zeros({static_cast<int64_t>(feats.size()), planes}, acc_type, feats[0]);
  dispatch(feats[0].scalar_type(), go.scalar_type(), [&]<typename T, typename O>() {
    using acc_t = typename cpu::Acc<T>::type;
    auto br = branches<T, acc_t>(feats, weights, Ho, Wo, align_corners, true);
    int64_t max_w = 0;
    for (const auto& b : br) max_w = std::max(max_w, b.W);
    const O* g_out = ptr<O>(go);
    acc_t* d = mut_ptr<acc_t>(dots);
    std::vector<T*> g_feat;
    for (auto& g : grads) g_feat.push_back(mut_ptr<T>(g));
    // One task walks every branch of a plane, so that plane of grad_output is read
    // from memory once and from cache for the other branches.
    cpu::parallel_for(0, planes, cpu::grain(Ho * Wo * 4 * static_cast<int64_t>(br.size())), [&](int64_t b, int64_t e) {
      std::vector<acc_t> tmp((Ho + 1) * max_w);
      for (int64_t p = b; p < e; ++p) {
        for (size_t i = 0; i < br.size(); ++i) {
          backward_planes<T, O, acc_t>(br[i], g_out, Ho, Wo, g_feat[i], d + i * planes, p, p + 1, tmp.data());
        }
      }
    });
  });
  const int64_t dim = 1;
  const Tensor grad_weights = cast(torch::stable::sum(cast(dots, ScalarType::Double), torch::headeronly::IntHeaderOnlyArrayRef(&dim, 1)),
                                   weights.scalar_type());
  return {grads, grad_weights};
}

}  // namespace
}  // namespace merge
}  // namespace piip

static const piip::Kernels kernels("CPU", {{"merge_forward", TORCH_BOX(&piip::merge::merge_forward_cpu)},
                                           {"merge_backward", TORCH_BOX(&piip::merge::merge_backward_cpu)}});
