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

// Route rule of the Linear norms: per example the Gram ("ghost") route costs T^2 (d_in + d_out)
// multiply-adds (x x^T and dy dy^T), the per-example route T d_in d_out (dy^T x). Take the Gram
// route when it is cheaper: T (d_in + d_out) <= d_in d_out. For the RoBERTa shapes at T <= 128
// that is always the Gram route; long sequences on thin layers go per-example.
inline bool use_gram_route(int64_t T, int64_t d_in, int64_t d_out) {
  return T * (d_in + d_out) <= d_in * d_out;
}

}  // namespace rmt
