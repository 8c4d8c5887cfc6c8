// Constants shared by the C++ kernels and the Python side (the Triton paths and the argument
// checks), defined once here. csrc/rmt.cpp exposes them as attributes of rmt_kernels._C, which
// Python reads (rmt_kernels/_checks.py, rmt_kernels/triton/); never copy a value into Python.
#pragma once

#include <cstdint>

namespace rmt {

// The adaptive sketch of rmt::denoise starts at this rank and doubles: DP gradients rarely have
// more than a handful of components above the bulk edge, so most matrices are settled by the
// first sketch.
constexpr int64_t kInitialRank = 8;

// More power iterations than this buy nothing in fp32; the cap keeps a typo from hanging a step.
constexpr int64_t kMaxPowerIterations = 100;

// Stopping rule of the adaptive range finder (niter = -1, the default of rmt::denoise and
// rmt::denoise_warm). After each pass the Rayleigh-Ritz values of the Krylov space (what the
// estimate would use) are compared with those half a pass further on (from the product with grad
// that the next pass needs anyway). The pass is final once the shrunk values moved by at most
// kRitzTolerance * kappa * sigma * sqrt(max(m, n)) in norm and no value within kRitzWindow below
// the threshold still rises by more than kRitzTolerance (relative). A cold start applies the rule
// from its kColdPasses-th pass on: a component just above the threshold needs that many passes
// from a random start to show. Chosen by measurement on near-edge spectra
// (tests/test_denoise_edge.py; numbers in the commit message).
constexpr double kRitzTolerance = 0.02;
constexpr double kRitzWindow = 0.9;
constexpr int64_t kColdPasses = 3;
// Cap of the adaptive passes (a pass: one product with grad^T, one with grad).
constexpr int64_t kMaxAdaptivePasses = 8;

// rmt::denoise_warm returns the left singular vectors of the kept components and of this many
// more (the next ones down): a component just below the threshold at one step is where the next
// step's new component most likely comes from.
constexpr int64_t kBasisMargin = 4;

// Route rule of the Linear norms: per example the Gram ("ghost") route costs T^2 (d_in + d_out)
// multiply-adds (x x^T and dy dy^T), the per-example route T d_in d_out (dy^T x). Take the Gram
// route when it is cheaper: T (d_in + d_out) <= d_in d_out. For the RoBERTa shapes at T <= 128
// that is always the Gram route; long sequences on thin layers go per-example.
inline bool use_gram_route(int64_t T, int64_t d_in, int64_t d_out) {
  return T * (d_in + d_out) <= d_in * d_out;
}

}  // namespace rmt
