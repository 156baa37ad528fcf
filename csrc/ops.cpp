// The resnext_kernels operator library: every schema, defined once (the strings live in schemas.h so
// that the emulated CUDA build in csrc/emu can define the same ones), and the Python module entry point.
// Kernels register themselves from csrc/cpu/*.cpp and csrc/cuda/*.cu with TORCH_LIBRARY_IMPL.
#include <Python.h>
#include <torch/library.h>

#include "schemas.h"

extern "C" {
// `import resnext_kernels._C` loads this shared library, which runs the registrations below.
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(resnext_kernels, m) {
  m.def(RK_SCHEMA_CONV_BN_RELU_INFER);
  m.def(RK_SCHEMA_CONV_BN_RELU_TRAIN);
  m.def(RK_SCHEMA_CONV_BN_RELU_TRAIN_BACKWARD);
  m.def(RK_SCHEMA_BOTTLENECK_INFER);
  m.def(RK_SCHEMA_CPU_CONFIG);
  m.def(RK_SCHEMA_PLAN_CONV);
  m.def(RK_SCHEMA_PLAN_CUDA_CONV);
}
