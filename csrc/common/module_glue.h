// The Python modules piip_kernels._C (schemas and CPU kernels) and piip_kernels._C_cuda
// (CUDA kernels), on Python's limited API (an abi3 extension: one binary for every
// CPython from 3.10 on).
//
// Loading a module registers nothing with torch. Its register(namespace) function does:
// piip_kernels registers as piip_C, and a kernels-hub build loads the same binary under
// a namespace of its own, so the two can sit in one process.
#pragma once

#ifndef Py_LIMITED_API
#define Py_LIMITED_API 0x030A0000
#endif
#include <Python.h>

#include <vector>

#include "tensor_glue.h"

namespace piip {
namespace module {

// What this binary's register() registers: the kernels of one dispatch key, and the
// schemas in the module that defines them (registration.cpp; none in the CUDA module,
// which adds kernels to them).
struct Contents {
  const char* key;
  const std::vector<const char*>* schemas;
};
inline Contents& contents() {
  static Contents c{"CPU", nullptr};
  return c;
}

inline PyObject* register_(PyObject*, PyObject* arg) {
  const char* ns = PyUnicode_AsUTF8AndSize(arg, nullptr);
  if (ns == nullptr) return nullptr;
  static const std::vector<const char*> none;
  if (const char* err = register_kernels(ns, contents().key, contents().schemas ? *contents().schemas : none)) {
    PyErr_SetString(PyExc_RuntimeError, err);
    return nullptr;
  }
  Py_RETURN_NONE;
}

// The module of `def` with register(namespace: str) -> None and the string `constants`.
inline PyObject* create(PyModuleDef* def, Contents what, std::initializer_list<std::pair<const char*, std::string>> constants) {
  static PyMethodDef methods[] = {
      {"register", register_, METH_O, "register(namespace): registers these kernels under torch.ops.<namespace>"},
      {nullptr, nullptr, 0, nullptr}};
  contents() = what;
  def->m_methods = methods;
  PyObject* m = PyModule_Create(def);
  if (m == nullptr) return nullptr;
  for (const auto& [name, value] : constants) {
    if (PyModule_AddStringConstant(m, name, value.c_str()) != 0) {
      Py_DECREF(m);
      return nullptr;
    }
  }
  return m;
}

}  // namespace module
}  // namespace piip
