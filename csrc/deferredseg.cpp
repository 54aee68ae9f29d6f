// Op schemas of the `deferredseg` library and the Python module `deferredseg_kernels._C`.
//
// Schemas are declared once here; each device registers its kernels in
// TORCH_LIBRARY_IMPL blocks next to the kernels (cpu/, cuda/). Fake kernels and
// autograd are registered from Python (deferredseg_kernels/ops/).
#include <Python.h>
#include <torch/library.h>

#ifndef DS_TORCH_VERSION
#define DS_TORCH_VERSION "unknown"
#endif
#ifndef DS_CUDA_VERSION
#define DS_CUDA_VERSION ""  // empty: built without CUDA kernels
#endif

TORCH_LIBRARY(deferredseg, m) {
  // SPEC section 4. threshold_logit is logit(threshold); final is empty (shape (0,))
  // when expert_labels is None.
  m.def(
      "route(Tensor logits, int num_classes, int num_experts, float threshold_logit, bool router_mode, "
      "Tensor? expert_labels) -> (Tensor assignment, Tensor defer_prob, Tensor model_pred, Tensor final)");
  // SPEC section 3, fused. The contract of both ops (layout of `stats`, `fparams`,
  // `iparams`, `terms`) is documented in deferredseg_kernels/ops/fused.py.
  m.def(
      "loss_stats(Tensor logits, Tensor target, Tensor expert_labels, Tensor? class_weight, "
      "int num_classes, int num_experts, int ignore_index, bool check_expert_labels) -> Tensor");
  m.def(
      "loss_fused(Tensor logits, Tensor target, Tensor expert_labels, Tensor? class_weight, "
      "Tensor stats, Tensor? balance_low, Tensor? balance_high, int num_classes, int num_experts, "
      "int ignore_index, float[] fparams, int[] iparams, bool compute_grad) -> (Tensor terms, Tensor grad)");
}

static struct PyModuleDef ds_module = {PyModuleDef_HEAD_INIT, "_C",
                                       "Compiled kernels of deferredseg (registered as torch.ops.deferredseg).",
                                       -1, nullptr};

// Importing the module loads the shared library, which runs the TORCH_LIBRARY
// registrations above; the module itself only records how it was built.
PyMODINIT_FUNC PyInit__C(void) {
  PyObject* m = PyModule_Create(&ds_module);
  if (m == nullptr) return nullptr;
  PyModule_AddStringConstant(m, "torch_version", DS_TORCH_VERSION);
  PyModule_AddStringConstant(m, "cuda_version", DS_CUDA_VERSION);
#ifdef DS_WITH_CUDA
  PyModule_AddIntConstant(m, "with_cuda", 1);
#else
  PyModule_AddIntConstant(m, "with_cuda", 0);
#endif
  return m;
}
