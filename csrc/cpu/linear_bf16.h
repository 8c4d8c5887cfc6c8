// The clipped sum of a Linear weight's per-example gradients from bfloat16 activations, on the
// CPU's bf16 GEMM units (AMX / AVX512-BF16) without a float32 copy of x and dy. linear_bf16.cpp
// holds the method and the proof that each example's released contribution is the one its
// certified norm bounds (privacy invariant 6, PRIVACY.md).
#pragma once

#include <ATen/ATen.h>

namespace rmt {
namespace linear_bf16 {

// Fewer tokens per example than this: the per-example GEMMs (K = T) are too thin and the float32
// route's one GEMM over the B*T rows wins. Measured 2026-12-08 (2-core Xeon with AMX, 1 thread,
// load 5-8, medians of 7 interleaved calls, bf16 route / float32 route, clipped sum alone, RoBERTa
// shapes, B 32, several runs): T 128 0.42-0.60x, T 64 0.53-0.77x, T 48 0.62-0.93x, T 32
// 0.67-1.06x (3072x768 breaks even at T 32-40), T 16 1.2-1.7x, T 4 3-7x. The fixed cost is MKL's
// per call: its update of the C tile, ~0.6 ns per element whatever K (a 256 x 256 tile: 39 us
// at K 8 and 32, 52 us at K 128, 1 thread). oneDNN's brgemm (ATen's cpublas: dy^T and VNNI-packed
// x blocks of 64 columns prepared once per example, our own float32 epilogue) was tried: in the
// same run 0.46-1.06x the float32 route against 0.40-1.11x for MKL, no clear gain for more code
// on ATen internals, so not kept.
inline constexpr int64_t kMinTokens = 32;
// Whether this CPU and torch build have a hardware bf16 GEMM (MKL's cblas_gemm_bf16bf16f32 with
// AVX512-BF16 or AMX) that passed the self check (alpha applied to the float32 result). Cached.
bool available();

// Whether the bf16 route takes this call: x3 (B, T, d_in) and dy3 (B, T, d_out) both bfloat16,
// T >= kMinTokens, sizes within the BLAS's int, and a hardware bf16 GEMM that passed its self
// check. Otherwise the caller's float32 route runs.
bool applies(const at::Tensor& x3, const at::Tensor& dy3);

// out (d_out, d_in), contiguous float32 holding the noise (or zeros): adds
// sum_b scale_b * dy_b^T x_b onto it in place. Examples with scale 0 contribute nothing, whatever
// their values.
void add_clipped_sum_(at::Tensor& out, const at::Tensor& x3, const at::Tensor& dy3,
    const at::Tensor& scale);

}  // namespace linear_bf16
}  // namespace rmt
