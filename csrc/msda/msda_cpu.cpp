// Glue between stable-ABI tensors and the torch-free CPU kernels of msda_cpu.h.
//
// The public op, its input checks, fake kernel and autograd live in
// piip_kernels/ops.py; this file only registers the private entry points
// piip_C::msda_forward / piip_C::msda_backward for CPU tensors. The checks here
// are the last line of defence for memory safety (someone may call the
// private op directly); the friendly messages come from the Python side.
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
using cpu::parallel_for;
using cpu::with_head_dim;
using cpu::zero_parallel;

// The five inputs as the torch-free kernels take them (tensors already contiguous).
struct Args {
  Tensor value, shapes, starts, loc, attn;

  template <typename T, typename U>
  Inputs<T, U> get() const {
    return {ptr<T>(value), ptr<int64_t>(shapes),
            ptr<int64_t>(starts), ptr<U>(loc), ptr<U>(attn)};
  }
};

template <typename T, typename U>
void forward_impl(const Sizes& z, const Args& args, Tensor& out) {
  using acc_t = typename Acc<T>::type;
  const Inputs<T, U> in = args.get<T, U>();
  T* o = mut_ptr<T>(out);
  parallel_for(0, z.N * z.Lq, grain(z.M * z.L * z.P * 4 * z.D), [&](int64_t b, int64_t e) {
    std::vector<acc_t> acc(z.D);
    with_head_dim(z.D, [&]<int kD>() {
      forward_rows<T, U, acc_t, kD>(z, in, o, b, e, acc.data());
    });
  });
}

template <typename T, typename U>
void backward_impl(const Sizes& z, const Args& args, const Tensor& grad_out, Tensor& grad_value_acc,
                   Tensor& grad_loc, Tensor& grad_attn) {
  using acc_t = typename Acc<T>::type;
  const Inputs<T, U> in = args.get<T, U>();
  const T* go = ptr<T>(grad_out);
  acc_t* gv = mut_ptr<acc_t>(grad_value_acc);
  U* gl = mut_ptr<U>(grad_loc);
  U* ga = mut_ptr<U>(grad_attn);
  // A task is one image and a block of heads; it owns that slice of
  // grad_value. Heads are split only as far as needed to feed every thread:
  // one task walking all heads of a query reads whole rows of value, which
  // neighbouring queries then find in cache.
  const int64_t threads = cpu::num_threads();
  const int64_t chunks = std::min<int64_t>(z.M, std::max<int64_t>(1, (threads + z.N - 1) / z.N));
  const int64_t per = (z.M + chunks - 1) / chunks;
  parallel_for(0, z.N * chunks, 1, [&](int64_t b, int64_t e) {
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

Tensor msda_forward_cpu(const Tensor& value, const Tensor& spatial_shapes, const Tensor& level_start_index,
                        const Tensor& sampling_locations, const Tensor& attention_weights, int64_t variant) {
  check_variant("ms_deform_attn forward", "cpu", variant, 1);
  Sizes z = check_and_sizes(value, spatial_shapes, level_start_index, sampling_locations,
                            attention_weights, /*cuda=*/false);
  const Args args{contig(value), contig(spatial_shapes), contig(level_start_index),
                  contig(sampling_locations), contig(attention_weights)};
  Tensor out = alloc({z.N, z.Lq, z.M * z.D}, value.scalar_type(), value);
  cpu::dispatch_types("ms_deform_attn", value.scalar_type(), args.loc.scalar_type(), [&]<typename T, typename U>() {
    forward_impl<T, U>(z, args, out);
  });
  return out;
}

std::tuple<Tensor, Tensor, Tensor> msda_backward_cpu(const Tensor& grad_output, const Tensor& value,
                                                     const Tensor& spatial_shapes, const Tensor& level_start_index,
                                                     const Tensor& sampling_locations,
                                                     const Tensor& attention_weights, int64_t variant) {
  check_variant("ms_deform_attn backward", "cpu", variant, 1);
  Sizes z = check_and_sizes(value, spatial_shapes, level_start_index, sampling_locations,
                            attention_weights, /*cuda=*/false);
  check_grad_output(grad_output, value, z);
  const Args args{contig(value), contig(spatial_shapes), contig(level_start_index),
                  contig(sampling_locations), contig(attention_weights)};
  const Tensor go = contig(grad_output);
  // grad_value accumulates in fp32 (fp64 for fp64) and is cast at the end.
  const ScalarType acc_type = value.scalar_type() == ScalarType::Double ? ScalarType::Double : ScalarType::Float;
  if (z.N * z.Lq * z.M * z.L * z.P * z.D == 0) {
    // No sampled products at all: every gradient is zero (and the task split
    // below would divide by zero).
    return {zeros_as(value), zeros_as(args.loc), zeros_as(args.attn)};
  }
  Tensor gv = alloc(sizes_of(value), acc_type, value);
  zero_parallel(gv);
  Tensor gl = alloc_like(args.loc);
  Tensor ga = alloc_like(args.attn);
  cpu::dispatch_types("ms_deform_attn", value.scalar_type(), args.loc.scalar_type(), [&]<typename T, typename U>() {
    backward_impl<T, U>(z, args, go, gv, gl, ga);
  });
  return {cast(gv, value.scalar_type()), gl, ga};
}

}  // namespace
}  // namespace msda
}  // namespace piip

static const piip::Kernels kernels("CPU", {{"msda_forward", TORCH_BOX(&piip::msda::msda_forward_cpu)},
                                           {"msda_backward", TORCH_BOX(&piip::msda::msda_backward_cpu)}});
