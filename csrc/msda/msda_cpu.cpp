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
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "../common/cpu_glue.h"
#include "msda_cpu.h"
#include "msda_glue.h"

namespace piip {
namespace msda {
namespace {

using cpu::Acc;
using cpu::grain;
using cpu::with_head_dim;
using cpu::zero_parallel;

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

at::Tensor msda_forward_cpu(const at::Tensor& value, const at::Tensor& spatial_shapes,
                            const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                            const at::Tensor& attention_weights) {
  Sizes z = check_and_sizes(value, spatial_shapes, level_start_index, sampling_locations,
                            attention_weights, /*cuda=*/false);
  const Args args{value.contiguous(), spatial_shapes.contiguous(), level_start_index.contiguous(),
                  sampling_locations.contiguous(), attention_weights.contiguous()};
  auto out = at::empty({z.N, z.Lq, z.M * z.D}, value.options());
  cpu::dispatch_types("ms_deform_attn", value.scalar_type(), args.loc.scalar_type(), [&]<typename T, typename U>() {
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
  cpu::dispatch_types("ms_deform_attn", value.scalar_type(), args.loc.scalar_type(), [&]<typename T, typename U>() {
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
