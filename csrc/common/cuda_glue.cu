// The CUDA side's link to torch, and the Python module piip_kernels._C_cuda.
//
// torch's current CUDA stream comes from aoti_torch_get_current_cuda_stream, a C function
// of libtorch_cuda. This binary does not link libtorch_cuda: it looks the function up at
// load time in the copy torch has already loaded (a CUDA build of torch loads it at
// `import torch`). So the build needs no CUDA build of torch, and on a torch without
// libtorch_cuda the module refuses to load with a message instead of an undefined symbol.
#include <dlfcn.h>

#include <string>

#include "cuda_glue.h"
#include "module_glue.h"

namespace piip {
namespace cuda_glue {
namespace {

using StreamFn = AOTITorchError (*)(int32_t, void**);

struct StreamLookup {
  StreamFn fn = nullptr;
  std::string error;

  StreamLookup() {
    // RTLD_NOLOAD: only a copy already in the process (torch's own), never a second one.
    void* lib = dlopen("libtorch_cuda.so", RTLD_NOW | RTLD_NOLOAD);
    if (lib == nullptr) {
      error = "libtorch_cuda.so is not loaded: this torch is not a CUDA build";
      return;
    }
    fn = reinterpret_cast<StreamFn>(dlsym(lib, "aoti_torch_get_current_cuda_stream"));
    if (fn == nullptr) error = "libtorch_cuda.so has no aoti_torch_get_current_cuda_stream";
  }
};

const StreamLookup& lookup() {
  static const StreamLookup l;
  return l;
}

}  // namespace

const char* stream_lookup_error() { return lookup().fn != nullptr ? nullptr : lookup().error.c_str(); }

cudaStream_t current_stream(int32_t device) {
  STD_TORCH_CHECK(lookup().fn != nullptr, "piip_kernels (cuda): ", lookup().error);
  void* stream = nullptr;
  STD_TORCH_CHECK(lookup().fn(device, &stream) == AOTI_TORCH_SUCCESS,
                  "piip_kernels (cuda): cannot get torch's current CUDA stream on device ", device);
  return static_cast<cudaStream_t>(stream);
}

}  // namespace cuda_glue
}  // namespace piip

// CUDA_VERSION ("13.0"): the toolkit the kernels were built with, hence the CUDA major
// version torch must have. ARCHS: the compute capabilities with machine code ("7.5 8.0 ...").
PyMODINIT_FUNC PyInit__C_cuda(void) {
  if (const char* err = piip::cuda_glue::stream_lookup_error()) {
    PyErr_SetString(PyExc_ImportError, (std::string("piip_kernels._C_cuda: ") + err).c_str());
    return nullptr;
  }
  static PyModuleDef def = {PyModuleDef_HEAD_INIT, "_C_cuda", nullptr, -1, nullptr, nullptr, nullptr, nullptr, nullptr};
  std::string archs;
#ifdef __CUDA_ARCH_LIST__
  for (int a : {__CUDA_ARCH_LIST__}) archs += (archs.empty() ? "" : " ") + std::to_string(a / 100) + "." + std::to_string(a / 10 % 10);
#endif
  return piip::module::create(&def, {"CUDA", nullptr},
                              {{"CUDA_VERSION", std::to_string(CUDART_VERSION / 1000) + "." + std::to_string(CUDART_VERSION / 10 % 100)},
                               {"ARCHS", archs}});
}
