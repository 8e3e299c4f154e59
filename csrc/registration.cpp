// Schemas of the private kernel entry points, and the Python module piip_kernels._C.
// `int variant` picks one of an op's kernel variants (piip_kernels/variants.py names them;
// the tuned dispatch table chooses per GPU); 0 is the default, and the CPU has only that.
//
// The public ops (piip::*) are defined in piip_kernels/ops.py together with
// their fake kernels, autograd and FLOP formulas; they call these private
// entry points for the compiled backends. Each kernel file lists its own
// implementations (a static piip::Kernels); _C.register(namespace) defines the
// schemas below and registers the CPU ones, _C_cuda.register(namespace) the CUDA ones.
#include <string>
#include <vector>

#include "common/module_glue.h"

namespace {

const std::vector<const char*> schemas = {
    "msda_forward(Tensor value, Tensor spatial_shapes, Tensor level_start_index, "
    "Tensor sampling_locations, Tensor attention_weights, int variant=0) -> Tensor",
    "msda_backward(Tensor grad_output, Tensor value, Tensor spatial_shapes, "
    "Tensor level_start_index, Tensor sampling_locations, Tensor attention_weights, int variant=0) "
    "-> (Tensor, Tensor, Tensor)",
      // GPU kernels scatter with atomics; this variant accumulates in fixed point so that
      // every run gives the same bits (the CPU backward always does).
    "msda_backward_deterministic(Tensor grad_output, Tensor value, Tensor spatial_shapes, "
    "Tensor level_start_index, Tensor sampling_locations, Tensor attention_weights, int variant=0) "
    "-> (Tensor, Tensor, Tensor)",
    "dca_forward(Tensor value, Tensor offsets, Tensor logits, int Hv, int Wv, int Hq, int Wq) -> Tensor",
    "dca_backward(Tensor grad_output, Tensor value, Tensor offsets, Tensor logits, int Hv, "
    "int Wv, int Hq, int Wq, bool deterministic) -> (Tensor, Tensor, Tensor)",
    "merge_forward(Tensor[] features, Tensor weights, int Ho, int Wo, bool align_corners, "
    "ScalarType out_dtype, int variant=0) -> Tensor",
    "merge_backward(Tensor grad_output, Tensor[] features, Tensor weights, bool align_corners, int variant=0) "
    "-> (Tensor[], Tensor)",
};

}  // namespace

// TORCH_TARGET = "2.10": the oldest torch this binary loads under (setup.py sets
// TORCH_TARGET_VERSION; a build without it targets the torch it was built with).
PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr, nullptr, nullptr, nullptr, nullptr};
  const unsigned long long v = TORCH_FEATURE_VERSION;
  return piip::module::create(&def, {"CPU", &schemas},
                              {{"TORCH_TARGET", std::to_string(v >> 56) + "." + std::to_string((v >> 48) & 0xff)}});
}
