// Every op schema of the `rmt` library, in one place. Kernels live beside their backend:
// csrc/cpu/*.cpp (C++), rmt_kernels/triton/ (CUDA, registered from Python), and the fake
// (meta) implementations for tracing in rmt_kernels/ops.py.
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(rmt, m) {
  // Singular-value-shrinkage denoising of a noisy gradient matrix (or a batch of them).
  // See rmt_kernels.denoise for the meaning of every argument.
  m.def(
      "denoise(Tensor grad, float sigma, *, str shrinker=\"frobenius\", float kappa=1.0, "
      "int rank=-1, int oversample=8, int niter=2, str norm=\"none\", int seed=0) -> Tensor");
}

// `import rmt_kernels._C` loads this shared library, which runs the registrations above.
// The module itself exposes nothing.
extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}
