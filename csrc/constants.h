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
// rmt::denoise_warm). Each pass ends with two estimates: Rayleigh-Ritz on the Krylov basis
// ("now") and on the other side's Krylov space, half a pass further on ("ahead", from the product
// with grad that the next pass needs anyway). The pass is final, and returns "ahead", once
// ||estimate now - estimate ahead||_F, plus the shrunk value of every value within kRitzWindow
// below the threshold that would cross (1 + kRiseMargin) times it if it kept rising for
// kRiseSteps more half passes, is at most kRitzTolerance times the error scale of the exact
// shrinker (its expected Frobenius loss on the kept components, plus one noise component's
// kappa * sigma * sqrt(max(m, n))). A cold start applies the rule from its kColdPasses-th pass:
// its first pass sees a component near the threshold too weakly to tell. A warm start watches
// rising values in its first pass only (its start basis's components that the new noise pushed
// under the threshold; later its fresh columns rise through the window as any search does).
// Chosen by measurement on near-edge spectra (tests/denoise/test_edge.py; numbers in the commit
// message).
constexpr double kRitzTolerance = 0.1;
constexpr double kRitzWindow = 0.85;
constexpr double kRiseSteps = 3.0;
constexpr double kRiseMargin = 0.02;
constexpr int64_t kColdPasses = 2;
// Relative size below which a direction of the Krylov space is left out of the estimate half a
// pass ahead: grad applied to it would be float32 rounding divided by a tiny number.
constexpr double kDirectionFloor = 1e-4;
// Cap of the adaptive passes (a pass: one product with grad^T, one with grad).
constexpr int64_t kMaxAdaptivePasses = 8;

// Above this normalised value y = s / (kappa sigma sqrt(max(m, n))) every shrinker equals y to
// within a relative 3 / y^2 (under one unit of double rounding): the shrinkers return the value
// itself there. Their formulas, which square y twice, are only evaluated at or below it (y^4 =
// 1e32 fits float32), so they stay finite however small sigma is next to grad.
constexpr double kShrinkIdentityAbove = 1e8;

// The range finder's float32 products with grad (A^T Q of size ~||A||, A A^T Q of size ~||A||^2,
// and their float32 Gram matrices, ~||A||^4) stay finite and normal while the largest entry of
// each product it checks lies in [kProductFloor, kProductCeiling]. Outside it (or non-finite),
// and before an exact SVD, the largest entry of grad is read once: NaN or Inf there is an error;
// where the range of ||grad||_2 it bounds (itself to sqrt(m n) times it) leaves
// [sqrt(kProductFloor), sqrt(kProductCeiling)], grad (and sigma) are scaled by the power of two
// that puts it in [1, 2) and the range finder restarts.
// The shrinker is homogeneous (denoise(a G, a sigma) = a denoise(G, sigma)), so the estimate is
// the same up to rounding, for any finite grad.
constexpr double kProductCeiling = 0x1p50;
constexpr double kProductFloor = 0x1p-50;

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
