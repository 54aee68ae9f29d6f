// Op schemas of the `deferredseg` library and the Python module `deferredseg_kernels._C`.
//
// The ops are defined here, with the schemas of schemas.h; each device registers its kernels in
// TORCH_LIBRARY_IMPL blocks next to the kernels (cpu/, cuda/), except empty_cpu_cache, which
// has one kernel for every device, given here. Fake kernels and
// autograd are registered from Python (deferredseg_kernels/ops/).
#include <Python.h>
#include <torch/library.h>

#include "contract.h"
#include "cpu/grad_cache.h"
#include "schemas.h"

#ifndef DS_TORCH_VERSION
#define DS_TORCH_VERSION "unknown"
#endif
#ifndef DS_CUDA_VERSION
#define DS_CUDA_VERSION ""  // empty: built without CUDA kernels
#endif

TORCH_LIBRARY(deferredseg, m) {
  m.def(deferredseg::kRouteSchema);
  m.def(deferredseg::kLossStatsSchema);
  m.def(deferredseg::kLossFusedSchema);
  m.def(deferredseg::kEmptyCpuCacheSchema, &deferredseg::cpu_loss::empty_cpu_cache);
}

static struct PyModuleDef ds_module = {
    PyModuleDef_HEAD_INIT, "_C",
    "Compiled kernels of deferredseg (registered as torch.ops.deferredseg).", -1, nullptr};

// The constants of contract.h as a dict {dotted name: value}, the table of
// deferredseg_kernels.contract.constants(), which the package compares at import.
static PyObject* contract_table() {
  PyObject* table = PyDict_New();
  if (table == nullptr) return nullptr;
  for (const auto& c : deferredseg::contract::kConstants) {
    PyObject* v = PyLong_FromLong(c.value);
    if (v == nullptr || PyDict_SetItemString(table, c.name, v) < 0) {
      Py_XDECREF(v);
      Py_DECREF(table);
      return nullptr;
    }
    Py_DECREF(v);
  }
  return table;
}

// Importing the module loads the shared library, which runs the TORCH_LIBRARY
// registrations above; the module itself records how it was built and the option
// contract (contract.h) its kernels were compiled with.
PyMODINIT_FUNC PyInit__C(void) {
  PyObject* m = PyModule_Create(&ds_module);
  if (m == nullptr) return nullptr;
  PyObject* table = contract_table();
  if (table == nullptr || PyModule_AddObject(m, "contract", table) < 0) {
    Py_XDECREF(table);
    Py_DECREF(m);
    return nullptr;
  }
  PyModule_AddStringConstant(m, "torch_version", DS_TORCH_VERSION);
  PyModule_AddStringConstant(m, "cuda_version", DS_CUDA_VERSION);
#ifdef DS_WITH_CUDA
  PyModule_AddIntConstant(m, "with_cuda", 1);
#else
  PyModule_AddIntConstant(m, "with_cuda", 0);
#endif
  return m;
}
