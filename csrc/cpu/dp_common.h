// Shared pieces of the fused DP gradient ops (linear.cpp, embedding.cpp, layernorm.cpp):
// argument checks that name the argument, and the noise "epilogue" that adds counter-based
// Philox noise to a freshly computed clipped sum in place, so it is written once.
//
// The messages match rmt_kernels/_checks.py (fake and Triton paths) word for word.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "cpu/philox.h"

namespace rmt {
namespace dp {

// Elements of noise per parallel task: amortises the thread hand-off over ~0.1 ms of Philox.
constexpr int64_t kNoiseGrain = int64_t{1} << 14;

inline void check_float(const char* op, const char* name, const at::Tensor& t) {
  const auto dtype = t.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf, op, ": ",
      name, " must be float32, bfloat16 or float16, got ", dtype);
}

// x (B, d_in) or (B, T, d_in) and dy (B, d_out) or (B, T, d_out), non-empty, same B and T.
inline void check_activations(const char* op, const char* x_name, const at::Tensor& x,
    const at::Tensor& dy) {
  TORCH_CHECK_VALUE(x.dim() == 2 || x.dim() == 3, op, ": ", x_name,
      " must have 2 (B, d) or 3 (B, T, d) dimensions, got ", x.dim());
  TORCH_CHECK_VALUE(dy.dim() == x.dim(), op, ": dy must have as many dimensions as ", x_name,
      " (", x.dim(), "), got ", dy.dim());
  TORCH_CHECK_VALUE(x.size(0) > 0, op, ": empty batch: ", x_name, " has shape ", x.sizes());
  TORCH_CHECK_VALUE(dy.size(0) == x.size(0), op, ": dy must have the batch size of ", x_name,
      " (", x.size(0), "), got ", dy.size(0));
  if (x.dim() == 3) {
    TORCH_CHECK_VALUE(dy.size(1) == x.size(1), op, ": dy must have the sequence length of ",
        x_name, " (", x.size(1), "), got ", dy.size(1));
  }
  for (int64_t d = 0; d < x.dim(); ++d) {
    TORCH_CHECK_VALUE(x.size(d) > 0, op, ": ", x_name, " must not have an empty dimension, got ",
        x.sizes());
    TORCH_CHECK_VALUE(dy.size(d) > 0, op, ": dy must not have an empty dimension, got ",
        dy.sizes());
  }
}

// One clip factor per example, finite and >= 0 (a negative one would flip an example's
// contribution; an infinite one would void the sensitivity bound).
inline void check_scale(const char* op, const at::Tensor& scale, int64_t batch) {
  TORCH_CHECK_VALUE(scale.dim() == 1, op, ": scale must be 1-D (one clip factor per example), got ",
      scale.dim(), " dimensions");
  TORCH_CHECK_VALUE(scale.size(0) == batch, op, ": scale must have one entry per example (",
      batch, "), got ", scale.size(0));
  check_float(op, "scale", scale);
  TORCH_CHECK_VALUE((at::isfinite(scale) & (scale >= 0)).all().item<bool>(), op,
      ": scale must be finite and >= 0 in every entry");
}

// noise_std finite >= 0; seed and offset >= 0; counters offset .. offset + numel - 1 fit in
// int64, so no element counter wraps around onto another call's stream.
inline void check_noise(const char* op, double noise_std, int64_t seed, int64_t offset,
    int64_t numel) {
  TORCH_CHECK_VALUE(std::isfinite(noise_std) && noise_std >= 0, op,
      ": noise_std must be a finite number >= 0, got ", noise_std);
  TORCH_CHECK_VALUE(seed >= 0, op, ": seed must be >= 0, got ", seed);
  TORCH_CHECK_VALUE(offset >= 0 && offset <= std::numeric_limits<int64_t>::max() - numel, op,
      ": offset must be >= 0 and offset + numel (", numel, ") must fit in int64, got ", offset);
}

// The epilogue: out[k] += noise_std * randn(seed, offset + k) over the contiguous float32 `out`.
inline void add_noise_(at::Tensor& out, double noise_std, int64_t seed, int64_t offset) {
  TORCH_INTERNAL_ASSERT(out.is_contiguous() && out.scalar_type() == at::kFloat);
  if (noise_std == 0.0) return;  // exactly the clipped sum
  float* data = out.data_ptr<float>();
  const float std_f = static_cast<float>(noise_std);
  const uint64_t key = static_cast<uint64_t>(seed);
  const uint64_t base = static_cast<uint64_t>(offset);
  at::parallel_for(0, out.numel(), kNoiseGrain, [&](int64_t begin, int64_t end) {
    philox::add_randn(data + begin, end - begin, key, base + static_cast<uint64_t>(begin), std_f);
  });
}

// A new contiguous float32 tensor holding only the noise: out[k] = noise_std * randn(seed,
// offset + k), zeros when noise_std == 0. Kernels then accumulate their clipped sum into it
// (BLAS beta = 1, index_add_), so the noise costs no extra pass over the output.
inline at::Tensor noise_tensor(at::IntArrayRef size, const at::TensorOptions& options,
    double noise_std, int64_t seed, int64_t offset) {
  if (noise_std == 0.0) return at::zeros(size, options.dtype(at::kFloat));
  at::Tensor out = at::empty(size, options.dtype(at::kFloat));
  float* data = out.data_ptr<float>();
  const float std_f = static_cast<float>(noise_std);
  const uint64_t key = static_cast<uint64_t>(seed);
  const uint64_t base = static_cast<uint64_t>(offset);
  at::parallel_for(0, out.numel(), kNoiseGrain, [&](int64_t begin, int64_t end) {
    philox::fill_randn(data + begin, end - begin, key, base + static_cast<uint64_t>(begin), std_f);
  });
  return out;
}

// (B, d) -> (B, 1, d), so every kernel works on (B, T, d).
inline at::Tensor as_sequence(const at::Tensor& t) {
  return t.dim() == 2 ? t.unsqueeze(1) : t;
}

// ---------------------------------------------------------------------------------------------
// Certified norms (privacy invariant 6, PRIVACY.md). Every *_sq_norms kernel returns an UPPER
// BOUND of the exact squared norm of each per-example gradient (exact real arithmetic on the given
// float inputs), never an estimate that rounding may push below it. The cancellation-prone sums are
// formed in float64 from the float32/bf16/fp16 inputs (conversion is exact) and the rigorous
// forward error bound of that float64 computation is added:
//   |fl(sum_i a_i) - sum_i a_i| <= gamma_n sum_i |a_i|,  gamma_n = n u / (1 - n u), u = 2^-53,
// for any summation order, with or without FMA. Products of at most four float32 values lie
// within float64's normal range (2^-596 .. 2^512), so no underflow or overflow term enters for
// finite inputs. Each kernel also computes a trivial bound (triangle inequality) and returns the
// smaller; a non-finite input gives +inf (the clip factor is then 0 and the example contributes
// nothing). Constants below are generous (a factor >= 1.5 over gamma_n with n u <= 1e-6), so the
// handful of float64 roundings in the bound formula itself are covered too.
constexpr double kU64 = 1.1102230246251565e-16;  // 2^-53

// sum_k a_k^2 in float64 (each element widened exactly), with 8 independent partial sums that the
// compiler vectorises (a single running sum is a serial chain of dependent adds, ~4x slower); the
// summation order is immaterial to the bounds (gamma_n holds for any order).
template <typename scalar_t>
inline double sum_sq64(const scalar_t* a, int64_t n) {
  double acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t k = 0;
  for (; k + 8 <= n; k += 8) {
    for (int j = 0; j < 8; ++j) {
      const double v = static_cast<double>(a[k + j]);
      acc[j] += v * v;
    }
  }
  double s = 0.0;
  for (; k < n; ++k) s += static_cast<double>(a[k]) * static_cast<double>(a[k]);
  for (int j = 0; j < 8; ++j) s += acc[j];
  return s;
}

// (n, T, d) float tensor -> float64 (n, T) Euclidean row norms, each element converted first.
inline at::Tensor row_norms64(const at::Tensor& a) {
  return at::linalg_vector_norm(a.to(at::kDouble), 2, {-1}, /*keepdim=*/false);
}

// The float64 bound as float32, rounded UP (round-to-nearest may go down by half an ulp; a
// bound above float32's range becomes +inf), NaN mapped to +inf.
inline at::Tensor bound_to_float(const at::Tensor& bound64) {
  const double inf = std::numeric_limits<double>::infinity();
  const at::Tensor b = at::where(at::isnan(bound64), inf, bound64);
  const at::Tensor f = b.to(at::kFloat);
  return at::where(f.to(at::kDouble) < b, at::nextafter(f, at::full_like(f, inf)), f);
}

// min(route, trivial) for finite inputs (`finite` per example), +inf otherwise. fmin: a NaN
// route (e.g. 0 * inf inside it) leaves the trivial bound, which holds alone.
inline at::Tensor certified(const at::Tensor& route, const at::Tensor& trivial,
    const at::Tensor& finite) {
  const double inf = std::numeric_limits<double>::infinity();
  return bound_to_float(at::where(finite, at::fmin(route, trivial), inf));
}

// Examples with clip factor exactly 0 contribute exactly 0 even when their inputs are not finite
// (0 * inf = NaN would otherwise poison the whole sum): zero their rows in `t` (B, ...). Returns
// `t` unchanged (no copy) when no factor is 0.
inline at::Tensor drop_zero_scaled(const at::Tensor& t, const at::Tensor& scale) {
  const at::Tensor keep = scale != 0;
  if (keep.all().item<bool>()) return t;
  std::vector<int64_t> shape(t.dim(), 1);
  shape[0] = t.size(0);
  return at::where(keep.view(shape), t, at::zeros({}, t.options()));
}

}  // namespace dp
}  // namespace rmt
