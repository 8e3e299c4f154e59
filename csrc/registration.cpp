// Schemas of the private kernel entry points, and the Python module stub.
//
// The public ops (piip::*) are defined in piip_kernels/ops.py together with
// their fake kernels, autograd and FLOP formulas; they call these private
// entry points for the compiled backends. Each kernel file registers its own
// implementation with TORCH_LIBRARY_IMPL(piip_C, <CPU|CUDA>, m).
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(piip_C, m) {
  m.def(
      "msda_forward(Tensor value, Tensor spatial_shapes, Tensor level_start_index, "
      "Tensor sampling_locations, Tensor attention_weights) -> Tensor");
  m.def(
      "msda_backward(Tensor grad_output, Tensor value, Tensor spatial_shapes, "
      "Tensor level_start_index, Tensor sampling_locations, Tensor attention_weights) "
      "-> (Tensor, Tensor, Tensor)");
  // GPU kernels scatter with atomics; this variant accumulates in fixed point so that
  // every run gives the same bits (the CPU backward always does).
  m.def(
      "msda_backward_deterministic(Tensor grad_output, Tensor value, Tensor spatial_shapes, "
      "Tensor level_start_index, Tensor sampling_locations, Tensor attention_weights) "
      "-> (Tensor, Tensor, Tensor)");
  m.def(
      "dca_forward(Tensor value, Tensor offsets, Tensor logits, int Hv, int Wv, int Hq, int Wq) "
      "-> Tensor");
  m.def(
      "dca_backward(Tensor grad_output, Tensor value, Tensor offsets, Tensor logits, int Hv, "
      "int Wv, int Hq, int Wq, bool deterministic) -> (Tensor, Tensor, Tensor)");
  m.def(
      "merge_forward(Tensor[] features, Tensor weights, int Ho, int Wo, bool align_corners, "
      "ScalarType out_dtype) -> Tensor");
  m.def(
      "merge_backward(Tensor grad_output, Tensor[] features, Tensor weights, bool align_corners) "
      "-> (Tensor[], Tensor)");
}

// `import piip_kernels._C` loads this library (and with it the registrations
// above); the module itself has no Python-level members.
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&def);
}
