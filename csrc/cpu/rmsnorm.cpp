// CPU kernels of the book-keeping DP ops for the RMSNorm weight (torch.nn.RMSNorm and the
// Hugging Face Llama/Qwen/Mistral/Gemma norms, rmt_kernels/rules/rmsnorm.py).
//
// Normalisation over the last dimension without centring: example b's weight gradient is the
// d-vector sum_t dy_bt * xhat_bt with xhat = x / sqrt(mean(x^2) + eps), so per-example vectors
// (B, d) are formed directly, as for the LayerNorm weight (layernorm.cpp).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>

#include "cpu/dp_common.h"

namespace rmt {
namespace {

void check_rmsnorm(const char* op, const at::Tensor& x, const at::Tensor& dy, double eps) {
  dp::check_activations(op, "x", x, dy);
  dp::check_float(op, "x", x);
  dp::check_float(op, "dy", dy);
  TORCH_CHECK_VALUE(dy.size(-1) == x.size(-1), op,
      ": dy must have the normalised size of x (", x.size(-1), "), got ", dy.size(-1));
  TORCH_CHECK_VALUE(std::isfinite(eps) && eps >= 0, op,
      ": eps must be a finite number >= 0, got ", eps);
}

// (B, d) float32: each example's weight gradient, from the layer input x (not xhat). sqrt and
// division are correctly rounded (rsqrt need not be), which the release guard's spread assumes
// (rmt_kernels.rules.rmsnorm.RMSNormTerms.spread).
at::Tensor per_example_weight_grad(const at::Tensor& x, const at::Tensor& dy, double eps) {
  const at::Tensor x3 = dp::as_sequence(x).to(at::kFloat);
  const at::Tensor D = (x3.square().mean(2, /*keepdim=*/true) + eps).sqrt();
  return (dp::as_sequence(dy).to(at::kFloat) * (x3 / D)).sum(1);
}

// Certified bound of ||g_b||^2, g_b = sum_t dy_t * xhat_t with the EXACT xhat of the given x
// (rmt_kernels.ops.rmsnorm_sq_norms states the proof). In float64 (u = 2^-53) the normaliser
// sums d non-negative squares, so D^ = sqrt(ms^ + eps) is off by a relative gamma_{d+5} / 2 and
// each entry of xhat^ by 0.6 (d + 8) u relative; ||xhat|| <= sqrt(d), hence
// ||xhat^_t - xhat_t|| <= eps_t = 1.2 (d + 12) u sqrt(d). Then
// ||g|| <= sqrt(Q (1 + 2 (d + 2) u)) + sum_t M_t (eps_t + 1.2 (T + 1) u sqrt(d)), M_t = max|dy_t|,
// Q = fl(|g^|^2); trivial: ||g|| <= sqrt(d) sum_t M_t. A row with mean(x^2) + eps = 0 (the
// layer's own output is NaN there) makes Q NaN: the trivial bound alone is returned.
at::Tensor rmsnorm_sq_norms_cpu(const at::Tensor& x, const at::Tensor& dy, double eps) {
  constexpr const char* op = "rmsnorm_sq_norms";
  check_rmsnorm(op, x, dy, eps);
  const double u = dp::kU64;
  const at::Tensor x64 = dp::as_sequence(x).to(at::kDouble);
  const at::Tensor dy64 = dp::as_sequence(dy).to(at::kDouble);
  const int64_t T = x64.size(1);
  const double d = static_cast<double>(x64.size(2)), sqd = std::sqrt(d);
  const at::Tensor D = (x64.square().mean(2, /*keepdim=*/true) + eps).sqrt();
  const at::Tensor Q = (dy64 * (x64 / D)).sum(1).square().sum(1);
  const double eps_t = 1.2 * (d + 12.0) * u * sqd * (1.0 + 8.0 * u);
  const at::Tensor M_t = dy64.abs().amax(2);
  const at::Tensor err = (M_t * (eps_t + 1.2 * static_cast<double>(T + 1) * u * sqd)).sum(1);
  const at::Tensor route =
      ((Q * (1.0 + 2.0 * (d + 2.0) * u)).sqrt() + err * (1.0 + 8.0 * u)).square() * (1.0 + 8.0 * u);
  const at::Tensor M = M_t.sum(1);
  const at::Tensor trivial = M * M * (d * (1.0 + 3.0 * static_cast<double>(T + 2) * u));
  const at::Tensor finite = at::isfinite(M) & at::isfinite(x64.sum({1, 2}));
  return dp::certified(route, trivial, finite);
}

at::Tensor rmsnorm_clipped_noisy_sum_cpu(const at::Tensor& x, const at::Tensor& dy,
    const at::Tensor& scale, double eps, double noise_std, int64_t seed, int64_t offset) {
  constexpr const char* op = "rmsnorm_clipped_noisy_sum";
  check_rmsnorm(op, x, dy, eps);
  dp::check_scale(op, scale, x.size(0));
  dp::check_noise(op, noise_std, seed, offset, x.size(-1));
  const at::Tensor per_example = dp::drop_zero_scaled(per_example_weight_grad(x, dy, eps), scale);
  at::Tensor out = at::mv(per_example.t(), scale.to(at::kFloat)).contiguous();
  dp::add_noise_(out, noise_std, seed, offset);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(rmt, CPU, m) {
  m.impl("rmsnorm_sq_norms", &rmsnorm_sq_norms_cpu);
  m.impl("rmsnorm_clipped_noisy_sum", &rmsnorm_clipped_noisy_sum_cpu);
}

}  // namespace rmt
