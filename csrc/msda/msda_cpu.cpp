// Glue between ATen tensors and the torch-free CPU kernels of msda_cpu.h.
//
// The public op, its input checks, fake kernel and autograd live in
// piip_kernels/ops.py; this file only registers the private entry points
// piip_C::msda_forward / piip_C::msda_backward for CPU tensors. The checks here
// are the last line of defence for memory safety (someone may call the
// private op directly); the friendly messages come from the Python side.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros_like.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "msda_cpu.h"
#include "msda_glue.h"

namespace piip {
namespace msda {
namespace {

template <typename T> struct Acc { using type = float; };
template <> struct Acc<double> { using type = double; };

// Work per task is at least ~32k multiply-adds so that small calls do not
// pay for thread wake-ups.
int64_t grain(int64_t per_item) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(1, per_item)); }

// Calls f.template operator()<kD>() with kD = D for the head dims of PIIP
// (6, 12, 24, 32) and 64, whose channel loops then unroll (about 1.3x on the
// backward); kD = 0 (runtime D) for every other head dim.
template <typename F>
void with_head_dim(int64_t D, F&& f) {
  switch (D) {
    case 6: return f.template operator()<6>();
    case 12: return f.template operator()<12>();
    case 24: return f.template operator()<24>();
    case 32: return f.template operator()<32>();
    case 64: return f.template operator()<64>();
    default: return f.template operator()<0>();
  }
}

// Zero-fills a fresh buffer from all threads. For a new allocation the cost is
// page faults, not bandwidth (about 10x a memset of warm memory), and spreading
// the first touch over the threads divides it.
void zero_parallel(at::Tensor& t) {
  auto* p = static_cast<char*>(t.data_ptr());
  const int64_t bytes = t.numel() * t.element_size();
  at::parallel_for(0, bytes, 1 << 18, [&](int64_t b, int64_t e) { std::memset(p + b, 0, e - b); });
}

// The five inputs as the torch-free kernels take them (tensors already contiguous).
struct Args {
  at::Tensor value, shapes, starts, loc, attn;

  template <typename T, typename U>
  Inputs<T, U> get() const {
    return {value.const_data_ptr<T>(), shapes.const_data_ptr<int64_t>(),
            starts.const_data_ptr<int64_t>(), loc.const_data_ptr<U>(), attn.const_data_ptr<U>()};
  }
};

template <typename T, typename U>
void forward_impl(const Sizes& z, const Args& args, at::Tensor& out) {
  using acc_t = typename Acc<T>::type;
  const Inputs<T, U> in = args.get<T, U>();
  T* o = out.mutable_data_ptr<T>();
  at::parallel_for(0, z.N * z.Lq, grain(z.M * z.L * z.P * 4 * z.D), [&](int64_t b, int64_t e) {
    std::vector<acc_t> acc(z.D);
    with_head_dim(z.D, [&]<int kD>() {
      forward_rows<T, U, acc_t, kD>(z, in, o, b, e, acc.data());
    });
  });
}

template <typename T, typename U>
void backward_impl(const Sizes& z, const Args& args, const at::Tensor& grad_out,
                   at::Tensor& grad_value_acc, at::Tensor& grad_loc, at::Tensor& grad_attn) {
  using acc_t = typename Acc<T>::type;
  const Inputs<T, U> in = args.get<T, U>();
  const T* go = grad_out.const_data_ptr<T>();
  acc_t* gv = grad_value_acc.mutable_data_ptr<acc_t>();
  U* gl = grad_loc.mutable_data_ptr<U>();
  U* ga = grad_attn.mutable_data_ptr<U>();
  // A task is one image and a block of heads; it owns that slice of
  // grad_value. Heads are split only as far as needed to feed every thread:
  // one task walking all heads of a query reads whole rows of value, which
  // neighbouring queries then find in cache.
  const int64_t threads = at::get_num_threads();
  const int64_t chunks = std::min<int64_t>(z.M, std::max<int64_t>(1, (threads + z.N - 1) / z.N));
  const int64_t per = (z.M + chunks - 1) / chunks;
  at::parallel_for(0, z.N * chunks, 1, [&](int64_t b, int64_t e) {
    std::vector<acc_t> g(z.D);
    for (int64_t u = b; u < e; ++u) {
      const int64_t n = u / chunks, m0 = (u % chunks) * per;
      const int64_t m1 = std::min(z.M, m0 + per);
      with_head_dim(z.D, [&]<int kD>() {
        backward_heads<T, U, acc_t, kD>(z, in, go, gv, gl, ga, n, m0, m1, g.data());
      });
    }
  });
}

// Calls f.template operator()<T, U>() for the supported dtype pairs:
// U == T, or U == float with a 16-bit T (fp32 locations beside bf16 values
// is what autocast produces and keeps sub-pixel precision).
template <typename F>
void dispatch_types(at::ScalarType vt, at::ScalarType lt, F&& f) {
  using at::ScalarType;
  if (vt == lt) {
    switch (vt) {
      case ScalarType::Float: return f.template operator()<float, float>();
      case ScalarType::Double: return f.template operator()<double, double>();
      case ScalarType::Half: return f.template operator()<c10::Half, c10::Half>();
      case ScalarType::BFloat16: return f.template operator()<c10::BFloat16, c10::BFloat16>();
      default: break;
    }
  } else if (lt == ScalarType::Float) {
    if (vt == ScalarType::Half) return f.template operator()<c10::Half, float>();
    if (vt == ScalarType::BFloat16) return f.template operator()<c10::BFloat16, float>();
  }
  TORCH_CHECK(false, "ms_deform_attn (cpu): unsupported dtypes value=", vt,
              " sampling_locations/attention_weights=", lt,
              "; value must be float32/float64/float16/bfloat16 and the locations and weights "
              "the same dtype, or float32 beside a 16-bit value");
}

at::Tensor msda_forward_cpu(const at::Tensor& value, const at::Tensor& spatial_shapes,
                            const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                            const at::Tensor& attention_weights) {
  Sizes z = check_and_sizes(value, spatial_shapes, level_start_index, sampling_locations,
                            attention_weights, /*cuda=*/false);
  const Args args{value.contiguous(), spatial_shapes.contiguous(), level_start_index.contiguous(),
                  sampling_locations.contiguous(), attention_weights.contiguous()};
  auto out = at::empty({z.N, z.Lq, z.M * z.D}, value.options());
  dispatch_types(value.scalar_type(), args.loc.scalar_type(), [&]<typename T, typename U>() {
    forward_impl<T, U>(z, args, out);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> msda_backward_cpu(
    const at::Tensor& grad_output, const at::Tensor& value, const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights) {
  Sizes z = check_and_sizes(value, spatial_shapes, level_start_index, sampling_locations,
                            attention_weights, /*cuda=*/false);
  check_grad_output(grad_output, value, z);
  const Args args{value.contiguous(), spatial_shapes.contiguous(), level_start_index.contiguous(),
                  sampling_locations.contiguous(), attention_weights.contiguous()};
  auto go = grad_output.contiguous();
  // grad_value accumulates in fp32 (fp64 for fp64) and is cast at the end.
  const auto acc_type = value.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  if (z.N * z.Lq * z.M * z.L * z.P * z.D == 0) {
    // No sampled products at all: every gradient is zero (and the task split
    // below would divide by zero).
    return {at::zeros_like(value), at::zeros_like(args.loc), at::zeros_like(args.attn)};
  }
  auto gv = at::empty(value.sizes(), value.options().dtype(acc_type));
  zero_parallel(gv);
  auto gl = at::empty(args.loc.sizes(), args.loc.options());
  auto ga = at::empty(args.attn.sizes(), args.attn.options());
  dispatch_types(value.scalar_type(), args.loc.scalar_type(), [&]<typename T, typename U>() {
    backward_impl<T, U>(z, args, go, gv, gl, ga);
  });
  return {gv.to(value.scalar_type()), gl, ga};
}

}  // namespace
}  // namespace msda
}  // namespace piip

TORCH_LIBRARY_IMPL(piip_C, CPU, m) {
  m.impl("msda_forward", &piip::msda::msda_forward_cpu);
  m.impl("msda_backward", &piip::msda::msda_backward_cpu);
}
