// CPU kernels of the book-keeping DP ops for the LayerNorm weight (its bias is bias_* in
// linear.cpp: the same sum of dy over t).
//
// Normalisation over the last dimension (how transformers use nn.LayerNorm). Example b's weight
// gradient is the d-vector sum_t dy_bt * xhat_bt with xhat = (x - mean) / sqrt(var + eps), so
// per-example vectors (B, d) are as small as the bias's and are formed directly.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>
#include <limits>

#include "cpu/dp_common.h"

namespace rmt {
namespace {

void check_eps(const char* op, double eps) {
  TORCH_CHECK_VALUE(std::isfinite(eps) && eps >= 0, op, ": eps must be a finite number >= 0, got ",
      eps);
}

// (B, d): each example's weight gradient, from the layer input x (not xhat) as a hook sees it.
at::Tensor per_example_weight_grad(const at::Tensor& x, const at::Tensor& dy, double eps) {
  const at::Tensor x3 = dp::as_sequence(x).to(at::kFloat);
  const auto [var, mean] = at::var_mean(x3, {2}, /*correction=*/0, /*keepdim=*/true);
  const at::Tensor xhat = (x3 - mean) * (var + eps).rsqrt();
  return (dp::as_sequence(dy).to(at::kFloat) * xhat).sum(1);
}

void check_shapes(const char* op, const at::Tensor& x, const at::Tensor& dy) {
  dp::check_activations(op, "x", x, dy);
  dp::check_float(op, "x", x);
  dp::check_float(op, "dy", dy);
  TORCH_CHECK_VALUE(dy.size(-1) == x.size(-1), op,
      ": dy must have the normalised size of x (", x.size(-1), "), got ", dy.size(-1));
}

// Certified bound of ||g_b||^2, g_b = sum_t dy_t * xhat_t with the EXACT xhat of the given x
// (rmt_kernels.ops.layernorm_sq_norms states the proof). Per row (float64, u = 2^-53): the
// mean is off by <= eta = 1.1 (d + 3) u max|x|, the computed D^ = sqrt(var^ + eps) satisfies
// D^2 in (var + eps + e^2)(1 +- gam), gam = 1.1 (d + 8) u, hence var + eps >= L = D^2 (1 - gam)
// - eta^2 and, with rho = eta^2 / L, |xhat - xhat^| <= eps_t = sqrt(d) (rho / 2 + eta / D^ +
// 1.2 (d + 12) u) (capped at 2.1 sqrt(d): both vectors have norm <= sqrt(d)). Then
// ||g|| <= sqrt(Q (1 + 2 (d + 2) u)) + sum_t M_t (eps_t + 1.2 (T + 1) u sqrt(d)), M_t = max|dy_t|,
// Q = fl(|g^|^2); trivial: ||g|| <= sqrt(d) sum_t M_t. Valid where var + eps > 0 (elsewhere the
// layer's own output is NaN).
at::Tensor layernorm_sq_norms_cpu(const at::Tensor& x, const at::Tensor& dy, double eps) {
  constexpr const char* op = "layernorm_sq_norms";
  check_shapes(op, x, dy);
  check_eps(op, eps);
  const double u = dp::kU64, inf = std::numeric_limits<double>::infinity();
  const at::Tensor x64 = dp::as_sequence(x).to(at::kDouble);
  const at::Tensor dy64 = dp::as_sequence(dy).to(at::kDouble);
  const int64_t T = x64.size(1);
  const double d = static_cast<double>(x64.size(2)), sqd = std::sqrt(d);
  const at::Tensor c = x64 - x64.mean(2, /*keepdim=*/true);
  const at::Tensor D = (c.square().mean(2, /*keepdim=*/true) + eps).sqrt();
  const at::Tensor Q = (dy64 * (c / D)).sum(1).square().sum(1);
  const at::Tensor Dt = D.squeeze(2);
  const at::Tensor eta = x64.abs().amax(2) * (1.1 * (d + 3.0) * u);
  const at::Tensor L = Dt * Dt * (1.0 - 1.1 * (d + 8.0) * u) - eta * eta;
  const at::Tensor rho = at::where(L > 0, eta * eta / L, inf);
  const at::Tensor eps_t =
      at::fmin((rho * 0.5 + eta / Dt + 1.2 * (d + 12.0) * u) * (sqd * (1.0 + 8.0 * u)),
          at::full_like(rho, 2.1 * sqd));
  const at::Tensor M_t = dy64.abs().amax(2);
  const at::Tensor err = (M_t * (eps_t + 1.2 * static_cast<double>(T + 1) * u * sqd)).sum(1);
  const at::Tensor route =
      ((Q * (1.0 + 2.0 * (d + 2.0) * u)).sqrt() + err * (1.0 + 8.0 * u)).square() * (1.0 + 8.0 * u);
  const at::Tensor M = M_t.sum(1);
  const at::Tensor trivial = M * M * (d * (1.0 + 3.0 * static_cast<double>(T + 2) * u));
  const at::Tensor finite = at::isfinite(M) & at::isfinite(x64.sum({1, 2}));
  return dp::certified(route, trivial, finite);
}

at::Tensor layernorm_clipped_noisy_sum_cpu(const at::Tensor& x, const at::Tensor& dy,
    const at::Tensor& scale, double eps, double noise_std, int64_t seed, int64_t offset) {
  constexpr const char* op = "layernorm_clipped_noisy_sum";
  check_shapes(op, x, dy);
  check_eps(op, eps);
  dp::check_scale(op, scale, x.size(0));
  dp::check_noise(op, noise_std, seed, offset, x.size(-1));
  const at::Tensor per_example = dp::drop_zero_scaled(per_example_weight_grad(x, dy, eps), scale);
  at::Tensor out = at::mv(per_example.t(), scale.to(at::kFloat)).contiguous();
  dp::add_noise_(out, noise_std, seed, offset);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(rmt, CPU, m) {
  m.impl("layernorm_sq_norms", &layernorm_sq_norms_cpu);
  m.impl("layernorm_clipped_noisy_sum", &layernorm_clipped_noisy_sum_cpu);
}

}  // namespace rmt
