// Every op schema of the `rmt` library, in one place. Kernels live beside their backend:
// csrc/cpu/*.cpp (C++), rmt_kernels/triton/ (CUDA, registered from Python), and the fake
// (meta) implementations for tracing in rmt_kernels/fake_impls.py.
#include <Python.h>
#include <torch/library.h>

#include "constants.h"
#include "cpu/linear_bf16.h"
#include "cpu/philox.h"

TORCH_LIBRARY(rmt, m) {
  // Singular-value-shrinkage denoising of a noisy gradient matrix (or a batch of them).
  // See rmt_kernels.denoise for the meaning of every argument.
  m.def(
      "denoise(Tensor grad, float sigma, *, str shrinker=\"frobenius\", float kappa=1.0, "
      "int rank=-1, int oversample=8, int niter=-1, str norm=\"none\", int seed=0) -> Tensor");
  // The same, started from a basis (for example the one it returned at the last step): returns
  // (estimate, new basis, passes). See rmt_kernels.denoise_warm.
  m.def(
      "denoise_warm(Tensor grad, float sigma, Tensor basis, str shrinker=\"frobenius\", "
      "float kappa=1.0, int rank=-1, int oversample=8, int niter=-1, str norm=\"none\", "
      "int seed=0) -> (Tensor, Tensor, Tensor)");

  // Fused DP-SGD gradient ops (book-keeping clipping): per-example squared gradient norms without
  // per-example gradients, and the clipped sum with counter-based Philox noise in one pass.
  // Noise element k (row-major) is element offset + k of the stream of key seed (specified in
  // csrc/cpu/philox.h); see rmt_kernels/ops.py for every argument and how to pick offsets.
  m.def("linear_sq_norms(Tensor x, Tensor dy) -> Tensor");
  m.def(
      "linear_clipped_noisy_sum(Tensor x, Tensor dy, Tensor scale, float noise_std, int seed, "
      "int offset) -> Tensor");
  m.def("bias_sq_norms(Tensor dy) -> Tensor");
  m.def(
      "bias_clipped_noisy_sum(Tensor dy, Tensor scale, float noise_std, int seed, int offset) "
      "-> Tensor");
  m.def("embedding_sq_norms(Tensor ids, Tensor dy) -> Tensor");
  m.def(
      "embedding_clipped_noisy_sum(Tensor ids, Tensor dy, Tensor scale, int num_embeddings, "
      "float noise_std, int seed, int offset) -> Tensor");
  m.def("layernorm_sq_norms(Tensor x, Tensor dy, float eps) -> Tensor");
  m.def(
      "layernorm_clipped_noisy_sum(Tensor x, Tensor dy, Tensor scale, float eps, "
      "float noise_std, int seed, int offset) -> Tensor");
  m.def("add_gaussian_noise(Tensor x, float noise_std, int seed, int offset) -> Tensor");
  // RMSNorm weight (no centring): rmt_kernels.ops.rmsnorm_sq_norms / rmsnorm_clipped_noisy_sum.
  m.def("rmsnorm_sq_norms(Tensor x, Tensor dy, float eps) -> Tensor");
  m.def(
      "rmsnorm_clipped_noisy_sum(Tensor x, Tensor dy, Tensor scale, float eps, "
      "float noise_std, int seed, int offset) -> Tensor");
}

// `import rmt_kernels._C` loads this shared library, which runs the registrations above. The
// module exposes the constants Python shares with C++, so that it reads them instead of copying
// them: INITIAL_RANK, MAX_POWER_ITERATIONS, the stopping rule of the range finder
// (RITZ_TOLERANCE, RITZ_WINDOW, RISE_STEPS, RISE_MARGIN, COLD_PASSES,
// MAX_ADAPTIVE_PASSES, DIRECTION_FLOOR), BASIS_MARGIN, SHRINK_IDENTITY_ABOVE,
// PRODUCT_CEILING, PRODUCT_FLOOR and
// use_gram_route(T, d_in, d_out) (csrc/constants.h), linear_bf16_available() and
// LINEAR_BF16_MIN_TOKENS (csrc/cpu/linear_bf16.h),
// TAIL_BITS and NOISE_STREAM_VERSION (the noise stream's tail threshold and version,
// csrc/cpu/philox.h).
namespace {

PyObject* use_gram_route_py(PyObject* /*self*/, PyObject* args) {
  long long T = 0, d_in = 0, d_out = 0;
  if (!PyArg_ParseTuple(args, "LLL", &T, &d_in, &d_out)) return nullptr;
  return PyBool_FromLong(rmt::use_gram_route(T, d_in, d_out));
}

PyObject* linear_bf16_available_py(PyObject* /*self*/, PyObject* /*args*/) {
  return PyBool_FromLong(rmt::linear_bf16::available());
}

PyMethodDef methods[] = {
    {"use_gram_route", use_gram_route_py, METH_VARARGS,
        "use_gram_route(T, d_in, d_out) -> bool: whether the Linear norms take the Gram route "
        "(its cost T^2 (d_in + d_out) is at most the per-example route's T d_in d_out)."},
    {"linear_bf16_available", linear_bf16_available_py, METH_NOARGS,
        "linear_bf16_available() -> bool: whether linear_clipped_noisy_sum takes its bf16 route "
        "(per-example bf16 GEMMs, csrc/cpu/linear_bf16.cpp) for bfloat16 x and dy with at least "
        "LINEAR_BF16_MIN_TOKENS tokens per example on this CPU."},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods};
  PyObject* module = PyModule_Create(&module_def);
  if (module == nullptr) return nullptr;
  if (PyModule_AddIntConstant(module, "INITIAL_RANK", rmt::kInitialRank) < 0 ||
      PyModule_AddIntConstant(module, "MAX_POWER_ITERATIONS", rmt::kMaxPowerIterations) < 0 ||
      PyModule_AddIntConstant(module, "MAX_ADAPTIVE_PASSES", rmt::kMaxAdaptivePasses) < 0 ||
      PyModule_AddIntConstant(module, "COLD_PASSES", rmt::kColdPasses) < 0 ||
      PyModule_AddIntConstant(module, "BASIS_MARGIN", rmt::kBasisMargin) < 0 ||
      PyModule_AddObject(module, "RITZ_TOLERANCE", PyFloat_FromDouble(rmt::kRitzTolerance)) < 0 ||
      PyModule_AddObject(module, "RITZ_WINDOW", PyFloat_FromDouble(rmt::kRitzWindow)) < 0 ||
      PyModule_AddObject(module, "RISE_STEPS", PyFloat_FromDouble(rmt::kRiseSteps)) < 0 ||
      PyModule_AddObject(module, "RISE_MARGIN", PyFloat_FromDouble(rmt::kRiseMargin)) < 0 ||
      PyModule_AddObject(module, "DIRECTION_FLOOR", PyFloat_FromDouble(rmt::kDirectionFloor)) <
          0 ||
      PyModule_AddObject(module, "SHRINK_IDENTITY_ABOVE",
          PyFloat_FromDouble(rmt::kShrinkIdentityAbove)) < 0 ||
      PyModule_AddObject(module, "PRODUCT_CEILING", PyFloat_FromDouble(rmt::kProductCeiling)) <
          0 ||
      PyModule_AddObject(module, "PRODUCT_FLOOR", PyFloat_FromDouble(rmt::kProductFloor)) < 0 ||
      PyModule_AddIntConstant(module, "TAIL_BITS", rmt::philox::kTailBits) < 0 ||
      PyModule_AddIntConstant(module, "LINEAR_BF16_MIN_TOKENS", rmt::linear_bf16::kMinTokens) <
          0 ||
      PyModule_AddIntConstant(module, "NOISE_STREAM_VERSION", rmt::philox::kNoiseStreamVersion) <
          0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
}
