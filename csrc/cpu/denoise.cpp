// CPU kernel of rmt::denoise: randomized range finder + Marchenko-Pastur shrinkage.
//
// All dense algebra goes through ATen (BLAS/LAPACK). `shrink` below is the C++ copy of the
// shrinker formulas (rmt_kernels/shrinkage.py states them; the Triton copy is `_shrink` in
// rmt_kernels/triton/reconstruct.py); tests/test_shrinkers_agree.py checks the three agree.
#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <string>

#include "constants.h"

namespace rmt {
namespace {

enum class Shrinker { kFrobenius, kOperator, kNuclear, kHard };
enum class NormCorrection { kNone, kPreserve, kDebiased };

Shrinker parse_shrinker(c10::string_view name) {
  if (name == "frobenius") return Shrinker::kFrobenius;
  if (name == "operator") return Shrinker::kOperator;
  if (name == "nuclear") return Shrinker::kNuclear;
  if (name == "hard") return Shrinker::kHard;
  TORCH_CHECK_VALUE(false,
      "denoise: shrinker must be one of 'frobenius', 'operator', 'nuclear', 'hard', got '",
      std::string(name), "'");
}

NormCorrection parse_norm(c10::string_view name) {
  if (name == "none") return NormCorrection::kNone;
  if (name == "preserve") return NormCorrection::kPreserve;
  if (name == "debiased") return NormCorrection::kDebiased;
  TORCH_CHECK_VALUE(false, "denoise: norm must be one of 'none', 'preserve', 'debiased', got '",
      std::string(name), "'");
}

void check_arguments(const at::Tensor& grad, double sigma, double kappa, int64_t rank,
    int64_t oversample, int64_t niter) {
  TORCH_CHECK_VALUE(grad.dim() == 2 || grad.dim() == 3,
      "denoise: grad must be a matrix (m, n) or a batch of matrices (b, m, n), got a tensor "
      "with ", grad.dim(), " dimensions");
  for (int64_t d = 0; d < grad.dim(); ++d) {
    TORCH_CHECK_VALUE(grad.size(d) > 0,
        "denoise: grad must not have an empty dimension, got shape ", grad.sizes());
  }
  const auto dtype = grad.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf,
      "denoise: grad must be float32, bfloat16 or float16, got ", dtype);
  TORCH_CHECK_VALUE(std::isfinite(sigma) && sigma > 0,
      "denoise: sigma (the per-entry noise std of grad) must be a finite number > 0, got ", sigma);
  TORCH_CHECK_VALUE(std::isfinite(kappa) && kappa > 0,
      "denoise: kappa (the multiplier of the bulk edge) must be a finite number > 0, got ", kappa);
  const int64_t full_rank = std::min(grad.size(-2), grad.size(-1));
  TORCH_CHECK_VALUE(rank == -1 || (rank >= 1 && rank <= full_rank),
      "denoise: rank must be -1 (adaptive) or between 1 and min(m, n) = ", full_rank, ", got ",
      rank);
  TORCH_CHECK_VALUE(oversample >= 0, "denoise: oversample must be >= 0, got ", oversample);
  TORCH_CHECK_VALUE(niter >= 0 && niter <= kMaxPowerIterations,
      "denoise: niter must be between 0 and ", kMaxPowerIterations, ", got ", niter);
}

// Householder QR through LAPACK: stays orthonormal even when the sketch is rank-deficient
// (an exactly low-rank or all-zero gradient), which Cholesky-based QR does not.
at::Tensor orthonormal_basis(const at::Tensor& y) {
  return std::get<0>(at::linalg_qr(y, "reduced"));
}

// Shrunk singular values; zero at or below the threshold kappa * bulk edge. noise_scale is
// kappa * sigma * sqrt(q): the shrinkers are evaluated at the kappa-scaled noise level, so they
// stay continuous (zero) at the threshold for every kappa.
at::Tensor shrink(const at::Tensor& s, double noise_scale, double beta, Shrinker shrinker) {
  const at::Tensor y = s / noise_scale;
  const at::Tensor t = y * y - (beta + 1.0);
  const at::Tensor root = (t * t - 4.0 * beta).clamp_min(0.0).sqrt();
  at::Tensor shrunk;
  switch (shrinker) {
    case Shrinker::kFrobenius:
      shrunk = root / y;
      break;
    case Shrinker::kOperator:
      shrunk = ((t + root) * 0.5).clamp_min(0.0).sqrt();
      break;
    case Shrinker::kNuclear: {
      const at::Tensor x = ((t + root) * 0.5).clamp_min(0.0).sqrt();
      shrunk = (x.pow(4) - std::sqrt(beta) * x * y - beta).clamp_min(0.0) / (x * x * y);
      break;
    }
    case Shrinker::kHard:
      shrunk = y;
      break;
  }
  const at::Tensor above = y > (1.0 + std::sqrt(beta));
  return at::where(above, shrunk * noise_scale, at::zeros_like(shrunk));
}

at::Tensor denoise_cpu(const at::Tensor& grad, double sigma, c10::string_view shrinker_name,
    double kappa, int64_t rank, int64_t oversample, int64_t niter, c10::string_view norm_name,
    int64_t seed) {
  check_arguments(grad, sigma, kappa, rank, oversample, niter);
  const Shrinker shrinker = parse_shrinker(shrinker_name);
  const NormCorrection norm = parse_norm(norm_name);

  const bool batched = grad.dim() == 3;
  at::Tensor a = (batched ? grad : grad.unsqueeze(0)).to(at::kFloat);
  // Work on the wide orientation (p <= q); the estimate is transpose-equivariant.
  const bool transposed = a.size(1) > a.size(2);
  if (transposed) a = a.transpose(1, 2);
  const int64_t p = a.size(1), q = a.size(2);
  const double beta = static_cast<double>(p) / static_cast<double>(q);
  const double noise_scale = kappa * sigma * std::sqrt(static_cast<double>(q));
  const double threshold = noise_scale * (1.0 + std::sqrt(beta));

  auto gen = at::make_generator<at::CPUGeneratorImpl>(static_cast<uint64_t>(seed));
  int64_t k = rank > 0 ? rank : std::min(kInitialRank, p);
  int64_t width = 0;
  at::Tensor basis, core_left, s, right;
  for (;;) {
    width = std::min(k + oversample, p);
    // Range finder (Halko, Martinsson & Tropp 2011): Q = orth((A A^T)^niter A Omega), then the
    // SVD of the small B = Q^T A.
    const at::Tensor omega = at::randn({q, width}, gen, a.options());
    const at::Tensor sketch = at::matmul(a, omega);
    // A NaN or Inf anywhere in grad reaches its row of the sketch: checking the (p x width)
    // sketch costs a fraction of a pass over grad, and keeps LAPACK away from NaN.
    TORCH_CHECK_VALUE(at::isfinite(sketch).all().item<bool>(), "denoise: grad contains NaN or Inf");
    basis = orthonormal_basis(sketch);
    // Orthonormalised once per application of A A^T rather than after each product: the
    // condition number grows by at most (s_1 / s_width)^2 per step, which Householder QR
    // absorbs, and it halves the QR calls.
    for (int64_t i = 0; i < niter; ++i) {
      basis = orthonormal_basis(at::matmul(a, at::matmul(a.transpose(1, 2), basis)));
    }
    // B^T = A^T Q (q x width); its SVD V S U_b^T gives A ~ (Q U_b) S V^T.
    const at::Tensor bt = at::matmul(a.transpose(1, 2), basis);
    auto [v, values, ub_t] = at::linalg_svd(bt, /*full_matrices=*/false);
    right = v;
    s = values;
    core_left = ub_t.transpose(1, 2);
    if (rank > 0 || width == p) break;
    // Adaptive rank: done once the k-th value of every matrix is at or below the threshold,
    // so every component above it is inside the sketch with `oversample` columns to spare.
    if ((s.select(1, k - 1) <= threshold).all().item<bool>()) break;
    k = std::min(2 * k, p);
  }

  at::Tensor eta = shrink(s, noise_scale, beta, shrinker);
  if (rank > 0 && width > rank) eta.narrow(1, rank, width - rank).zero_();
  if (norm != NormCorrection::kNone) {
    const at::Tensor grad_sq = a.square().sum({1, 2}, false, at::kDouble);
    const at::Tensor target = norm == NormCorrection::kPreserve
        ? grad_sq.sqrt()
        : (grad_sq - sigma * sigma * static_cast<double>(p * q)).clamp_min(0.0).sqrt();
    const at::Tensor estimate = eta.to(at::kDouble).square().sum(1).sqrt();
    // ||U diag(eta) V^T||_F = ||eta||_2, so the rescale needs no reconstruction. An estimate of
    // zero stays zero: there is no direction to give the target norm to.
    const at::Tensor factor =
        at::where(estimate > 0, target / estimate.clamp_min(1e-300), at::zeros_like(estimate));
    eta = eta * factor.unsqueeze(1).to(at::kFloat);
  }

  // Only components up to the last one kept in any matrix are reconstructed.
  const at::Tensor kept_columns = (eta > 0).any(0).nonzero();
  const int64_t kept = kept_columns.numel() == 0 ? 0 : kept_columns.max().item<int64_t>() + 1;
  // Fast path for the common DP case: nothing above the edge, so no reconstruction.
  if (kept == 0) {
    return at::zeros(grad.sizes(), grad.options().memory_format(at::MemoryFormat::Contiguous));
  }
  const at::Tensor left = at::matmul(
      basis, core_left.narrow(2, 0, kept) * eta.narrow(1, 0, kept).unsqueeze(1));  // (b, p, kept)
  const at::Tensor right_kept = right.narrow(2, 0, kept);
  at::Tensor out = transposed ? at::matmul(right_kept, left.transpose(1, 2))
                              : at::matmul(left, right_kept.transpose(1, 2));
  if (!batched) out = out.squeeze(0);
  return out.to(grad.scalar_type()).contiguous();
}

}  // namespace

TORCH_LIBRARY_IMPL(rmt, CPU, m) {
  m.impl("denoise", &denoise_cpu);
}

}  // namespace rmt
