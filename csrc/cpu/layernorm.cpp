// CPU kernels of the book-keeping DP ops for the LayerNorm weight (its bias is bias_* in
// linear.cpp: the same sum of dy over t).
//
// Normalisation over the last dimension (how transformers use nn.LayerNorm). Example b's weight
// gradient is the d-vector sum_t dy_bt * xhat_bt with xhat = (x - mean) / sqrt(var + eps), so
// per-example vectors (B, d) are as small as the bias's and are formed directly.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>

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

at::Tensor layernorm_sq_norms_cpu(const at::Tensor& x, const at::Tensor& dy, double eps) {
  constexpr const char* op = "layernorm_sq_norms";
  check_shapes(op, x, dy);
  check_eps(op, eps);
  return per_example_weight_grad(x, dy, eps).square().sum(1);
}

at::Tensor layernorm_clipped_noisy_sum_cpu(const at::Tensor& x, const at::Tensor& dy,
    const at::Tensor& scale, double eps, double noise_std, int64_t seed, int64_t offset) {
  constexpr const char* op = "layernorm_clipped_noisy_sum";
  check_shapes(op, x, dy);
  check_eps(op, eps);
  dp::check_scale(op, scale, x.size(0));
  dp::check_noise(op, noise_std, seed, offset, x.size(-1));
  at::Tensor out =
      at::mv(per_example_weight_grad(x, dy, eps).t(), scale.to(at::kFloat)).contiguous();
  dp::add_noise_(out, noise_std, seed, offset);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(rmt, CPU, m) {
  m.impl("layernorm_sq_norms", &layernorm_sq_norms_cpu);
  m.impl("layernorm_clipped_noisy_sum", &layernorm_clipped_noisy_sum_cpu);
}

}  // namespace rmt
