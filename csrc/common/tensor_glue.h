// What every glue file takes from the LibTorch stable ABI: the tensor type, errors,
// allocation, and the registration of our kernels under a namespace chosen at load time.
//
// The glue is built with -DTORCH_TARGET_VERSION (setup.py): it may use only the stable
// C shim and the header-only parts of torch that the oldest supported torch (2.10) has,
// so one binary loads under every later torch. An ATen or c10 header fails to compile
// there. The kernels themselves include no torch header at all.
#pragma once

#include <torch/csrc/stable/c/shim.h>
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>
#include <torch/headeronly/util/BFloat16.h>
#include <torch/headeronly/util/Exception.h>
#include <torch/headeronly/util/Half.h>

#include <cstdint>
#include <sstream>
#include <string>
#include <vector>

namespace piip {

using Tensor = torch::stable::Tensor;
using torch::headeronly::ScalarType;

// What the checks read of a tensor, fetched once. Every accessor of the stable Tensor is
// a call into torch (size(d) one per dimension), and the checks of an op read dozens: with
// this, five calls per tensor.
struct Meta {
  int64_t dim = 0;
  const int64_t* sizes = nullptr;  // borrowed: valid while the tensor lives
  ScalarType dtype = ScalarType::Undefined;
  int32_t device_type = 0;
  int32_t device_index = 0;

  explicit Meta(const Tensor& t) {
    int64_t* s = nullptr;
    int32_t dt = 0;
    TORCH_ERROR_CODE_CHECK(aoti_torch_get_dim(t.get(), &dim));
    TORCH_ERROR_CODE_CHECK(aoti_torch_get_sizes(t.get(), &s));
    TORCH_ERROR_CODE_CHECK(aoti_torch_get_dtype(t.get(), &dt));
    TORCH_ERROR_CODE_CHECK(aoti_torch_get_device_type(t.get(), &device_type));
    TORCH_ERROR_CODE_CHECK(aoti_torch_get_device_index(t.get(), &device_index));
    sizes = s;
    dtype = torch::stable::detail::to<ScalarType>(torch::stable::detail::from(dt));
  }

  int64_t size(int64_t d) const { return sizes[d]; }
  bool is_cpu() const {
    static const int32_t cpu = aoti_torch_device_type_cpu();
    return device_type == cpu;
  }
  bool is_cuda() const {
    static const int32_t cuda = aoti_torch_device_type_cuda();
    return device_type == cuda;
  }
  bool same_device(const Meta& o) const { return device_type == o.device_type && device_index == o.device_index; }
  // The first n sizes equal o's.
  bool same_sizes(const Meta& o, int64_t n) const {
    for (int64_t d = 0; d < n; ++d) {
      if (sizes[d] != o.sizes[d]) return false;
    }
    return true;
  }
  // "[2, 3, 4]", for error messages.
  std::string shape() const {
    std::ostringstream s;
    s << '[';
    for (int64_t d = 0; d < dim; ++d) s << (d ? ", " : "") << sizes[d];
    s << ']';
    return s.str();
  }
};

inline std::string shape_str(const Tensor& t) { return Meta(t).shape(); }

inline bool same_device(const Tensor& a, const Tensor& b) { return Meta(a).same_device(Meta(b)); }

// t's data as T (t's dtype already checked, as every glue function does when it dispatches).
template <typename T>
const T* ptr(const Tensor& t) {
  return static_cast<const T*>(t.const_data_ptr());
}
template <typename T>
T* mut_ptr(const Tensor& t) {
  return static_cast<T*>(t.mutable_data_ptr());
}

// t itself when already contiguous. The stable contiguous() always goes through the
// dispatcher (boxed), about a microsecond even when there is nothing to copy.
inline Tensor contig(const Tensor& t) { return t.is_contiguous() ? t : torch::stable::contiguous(t); }

// A new contiguous tensor of `sizes` and `dtype` on like's device, uninitialised. Straight
// through the C shim's allocator: the stable empty()/new_empty() are boxed dispatcher calls.
inline Tensor alloc(const std::vector<int64_t>& sizes, ScalarType dtype, const Tensor& like) {
  std::vector<int64_t> strides(sizes.size());
  int64_t step = 1;
  for (size_t d = sizes.size(); d-- > 0;) {
    strides[d] = step;
    step *= sizes[d] > 0 ? sizes[d] : 1;
  }
  int32_t device_type = 0;
  TORCH_ERROR_CODE_CHECK(aoti_torch_get_device_type(like.get(), &device_type));
  const int32_t dt = torch::stable::detail::to<int32_t>(torch::stable::detail::from(dtype));
  AtenTensorHandle h = nullptr;
  TORCH_ERROR_CODE_CHECK(aoti_torch_empty_strided(static_cast<int64_t>(sizes.size()), sizes.data(), strides.data(), dt,
                                                  device_type, like.get_device_index(), &h));
  return Tensor(h);
}

inline std::vector<int64_t> sizes_of(const Tensor& t) { return t.sizes().vec(); }

inline Tensor alloc_like(const Tensor& t) { return alloc(sizes_of(t), t.scalar_type(), t); }

// t in `dtype` (t itself when it already is).
inline Tensor cast(const Tensor& t, ScalarType dtype) {
  return t.scalar_type() == dtype ? t : torch::stable::to(t, dtype);
}

inline Tensor alloc_zeros(const std::vector<int64_t>& sizes, ScalarType dtype, const Tensor& like) {
  Tensor t = alloc(sizes, dtype, like);
  TORCH_ERROR_CODE_CHECK(aoti_torch_zero_(t.get()));
  return t;
}

inline Tensor zeros_as(const Tensor& t) { return alloc_zeros(sizes_of(t), t.scalar_type(), t); }

// The kernel variant an op was asked for (the schemas' `int variant`): 0 is the default, and
// the tuned dispatch table (piip_kernels/tuned) picks others by name. `count` is how many
// variants this backend compiles for the op; a number outside them is an error, never a
// silent fallback to another variant.
inline void check_variant(const char* op, const char* backend, int64_t variant, int64_t count) {
  STD_TORCH_CHECK(variant >= 0 && variant < count, op, " (", backend, "): no kernel variant ", variant, "; this build has ",
                  count, " (0..", count - 1, "), listed in piip_kernels/variants.py");
}

// --- registration ------------------------------------------------------------
//
// Each glue file adds the kernels it implements with one static Kernels object; nothing
// touches torch while the library loads. register_kernels(ns, key) then registers them
// under the namespace the loader picks (through the module's register(), module_glue.h):
// piip_C for the package (piip_kernels/_ext.py), another for a kernels-hub build, which
// loads the very same binary beside it.

using BoxedKernel = void (*)(StableIValue*, uint64_t, uint64_t);

struct KernelEntry {
  const char* key;   // "CPU" or "CUDA"
  const char* name;  // the private op, e.g. "msda_forward"
  BoxedKernel fn;
};

inline std::vector<KernelEntry>& kernel_table() {
  static std::vector<KernelEntry> table;
  return table;
}

struct Kernels {
  Kernels(const char* key, std::initializer_list<std::pair<const char*, BoxedKernel>> entries) {
    for (const auto& [name, fn] : entries) kernel_table().push_back({key, name, fn});
  }
};

// Registers, under namespace `ns` and dispatch key `key`, every kernel of kernel_table()
// for that key (and the schemas first when `schemas` is given). Returns nullptr, or what
// went wrong (a namespace already taken, say). The library objects stay alive for the
// life of the process, as a static TORCH_LIBRARY's do.
inline const char* register_kernels(const char* ns, const char* key, const std::vector<const char*>& schemas) {
  static std::string error;
  static std::vector<TorchLibraryHandle> alive;
  TorchLibraryHandle lib = nullptr;
  if (!schemas.empty()) {
    if (aoti_torch_library_init_def(ns, __FILE__, __LINE__, &lib) != AOTI_TORCH_SUCCESS || lib == nullptr) {
      error = std::string("cannot define the op namespace ") + ns + " (already defined in this process?)";
      return error.c_str();
    }
    alive.push_back(lib);
    for (const char* schema : schemas) {
      if (aoti_torch_library_def(lib, schema) != AOTI_TORCH_SUCCESS) {
        error = std::string("cannot define ") + ns + "::" + schema;
        return error.c_str();
      }
    }
  }
  lib = nullptr;
  if (aoti_torch_library_init_impl(ns, key, __FILE__, __LINE__, &lib) != AOTI_TORCH_SUCCESS || lib == nullptr) {
    error = std::string("cannot open the ") + key + " implementations of " + ns;
    return error.c_str();
  }
  alive.push_back(lib);
  for (const auto& k : kernel_table()) {
    if (std::string(k.key) != key) continue;
    // The extension's build version (not the target): torch converts for older builds.
    if (torch_library_impl(lib, k.name, k.fn, TORCH_ABI_VERSION) != AOTI_TORCH_SUCCESS) {
      error = std::string("cannot register ") + ns + "::" + k.name + " for " + key;
      return error.c_str();
    }
  }
  return nullptr;
}

}  // namespace piip
