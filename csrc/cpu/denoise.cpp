// CPU kernels of rmt::denoise and rmt::denoise_warm: a block Krylov range finder with a stopping
// rule, then Marchenko-Pastur shrinkage. Both ops share every step; denoise is the cold start.
//
// All dense algebra goes through ATen (BLAS/LAPACK). `shrink` below is the C++ copy of the
// shrinker formulas (rmt_kernels/shrinkage.py states them; the Triton copy is `_shrink` in
// rmt_kernels/triton/reconstruct.py); tests/denoise/test_shrinkers_agree.py checks the three agree.
// rmt_kernels/triton/denoise.py is the device path's copy of the range finder (same steps and
// stopping rule; its orthonormalisation, rmt_kernels/linalg.py, forms Gram matrices in float64,
// which GPUs do in one small GEMM, where this file keeps the tall work in float32 for MKL).
#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "constants.h"

namespace rmt {
namespace {

enum class Shrinker { kFrobenius, kOperator, kNuclear, kHard };
enum class NormCorrection { kNone, kPreserve, kDebiased };

Shrinker parse_shrinker(const char* op, c10::string_view name) {
  if (name == "frobenius") return Shrinker::kFrobenius;
  if (name == "operator") return Shrinker::kOperator;
  if (name == "nuclear") return Shrinker::kNuclear;
  if (name == "hard") return Shrinker::kHard;
  TORCH_CHECK_VALUE(false, op,
      ": shrinker must be one of 'frobenius', 'operator', 'nuclear', 'hard', got '",
      std::string(name), "'");
}

NormCorrection parse_norm(const char* op, c10::string_view name) {
  if (name == "none") return NormCorrection::kNone;
  if (name == "preserve") return NormCorrection::kPreserve;
  if (name == "debiased") return NormCorrection::kDebiased;
  TORCH_CHECK_VALUE(false, op, ": norm must be one of 'none', 'preserve', 'debiased', got '",
      std::string(name), "'");
}

void check_arguments(const char* op, const at::Tensor& grad, double sigma, double kappa,
    int64_t rank, int64_t oversample, int64_t niter) {
  TORCH_CHECK_VALUE(grad.dim() == 2 || grad.dim() == 3, op,
      ": grad must be a matrix (m, n) or a batch of matrices (b, m, n), got a tensor "
      "with ", grad.dim(), " dimensions");
  for (int64_t d = 0; d < grad.dim(); ++d) {
    TORCH_CHECK_VALUE(grad.size(d) > 0, op,
        ": grad must not have an empty dimension, got shape ", grad.sizes());
  }
  const auto dtype = grad.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf, op,
      ": grad must be float32, bfloat16 or float16, got ", dtype);
  TORCH_CHECK_VALUE(std::isfinite(sigma) && sigma > 0, op,
      ": sigma (the per-entry noise std of grad) must be a finite number > 0, got ", sigma);
  TORCH_CHECK_VALUE(std::isfinite(kappa) && kappa > 0, op,
      ": kappa (the multiplier of the bulk edge) must be a finite number > 0, got ", kappa);
  const int64_t full_rank = std::min(grad.size(-2), grad.size(-1));
  TORCH_CHECK_VALUE(rank == -1 || (rank >= 1 && rank <= full_rank), op,
      ": rank must be -1 (adaptive) or between 1 and min(m, n) = ", full_rank, ", got ", rank);
  TORCH_CHECK_VALUE(oversample >= 0, op, ": oversample must be >= 0, got ", oversample);
  TORCH_CHECK_VALUE(niter >= -1 && niter <= kMaxPowerIterations, op,
      ": niter must be -1 (adaptive) or between 0 and ", kMaxPowerIterations, ", got ", niter);
}

// The start basis of denoise_warm: one (m, k) float32 block per matrix, on grad's device,
// k <= min(m, n), finite. The messages are those of rmt_kernels._checks.check_denoise_basis.
void check_basis(const at::Tensor& grad, const at::Tensor& basis) {
  const char* op = "denoise_warm";
  TORCH_CHECK_VALUE(basis.dim() == grad.dim(), op, ": basis must have ", grad.dim(),
      " dimensions like grad (", grad.dim() == 2 ? "(m, k)" : "(b, m, k)", "), got ",
      basis.dim());
  if (grad.dim() == 3) {
    TORCH_CHECK_VALUE(basis.size(0) == grad.size(0), op,
        ": basis must have one block per matrix of grad (", grad.size(0), "), got ",
        basis.size(0));
  }
  TORCH_CHECK_VALUE(basis.size(-2) == grad.size(-2), op,
      ": basis must have m = ", grad.size(-2), " rows (grad's rows), got ", basis.size(-2));
  const int64_t full_rank = std::min(grad.size(-2), grad.size(-1));
  TORCH_CHECK_VALUE(basis.size(-1) <= full_rank, op,
      ": basis must have at most min(m, n) = ", full_rank, " columns, got ", basis.size(-1));
  TORCH_CHECK_TYPE(basis.scalar_type() == at::kFloat, op, ": basis must be float32, got ",
      basis.scalar_type());
  TORCH_CHECK_VALUE(basis.device() == grad.device(), op,
      ": basis must be on grad's device (", grad.device(), "), got ", basis.device());
  TORCH_CHECK_VALUE(basis.numel() == 0 || at::isfinite(basis).all().item<bool>(), op,
      ": basis contains NaN or Inf");
}

// The range finder keeps its tall blocks as rows: an (len, w) block of columns is stored as its
// transpose (w, len), w contiguous rows (see RowBlocks below).

// Householder QR through LAPACK of the columns the rows of `rows` (b, w, len) stand for, as rows:
// stays orthonormal even when the block is rank-deficient (an exactly low-rank or all-zero
// gradient, a repeated warm-start column), which Cholesky-based QR does not.
at::Tensor householder_rows(const at::Tensor& rows) {
  return std::get<0>(at::linalg_qr(rows.transpose(1, 2), "reduced")).transpose(1, 2).contiguous();
}

// L^-1 for the shifted Cholesky factor L of each w x w Gram matrix (b, w, w), float32 out,
// float64 inside: plain loops, as the matrices are a few dozen wide (a chain of tensor ops costs
// more in dispatch than in arithmetic here). The shift lets the factorisation succeed on
// (nearly) dependent rows; where it still breaks down the factor is NaN, which the caller's
// orthonormality check turns into its Householder fallback.
at::Tensor shifted_cholesky_inverse(const at::Tensor& gram) {
  const at::Tensor g64 = gram.to(at::kDouble).contiguous();
  const int64_t b = g64.size(0), w = g64.size(1);
  at::Tensor out = at::zeros({b, w, w}, gram.options().dtype(at::kFloat));
  std::vector<double> l(w * w), inv(w * w);
  for (int64_t i = 0; i < b; ++i) {
    const double* g = g64.data_ptr<double>() + i * w * w;
    float* o = out.data_ptr<float>() + i * w * w;
    double trace = 0.0;
    for (int64_t j = 0; j < w; ++j) trace += g[j * w + j];
    const double shift = 1e-12 * trace + 1e-300;
    bool ok = true;
    for (int64_t j = 0; j < w && ok; ++j) {
      double d = g[j * w + j] + shift;
      for (int64_t k = 0; k < j; ++k) d -= l[j * w + k] * l[j * w + k];
      if (!(d > 0.0)) {
        ok = false;
        break;
      }
      l[j * w + j] = std::sqrt(d);
      for (int64_t r = j + 1; r < w; ++r) {
        double v = g[r * w + j];
        for (int64_t k = 0; k < j; ++k) v -= l[r * w + k] * l[j * w + k];
        l[r * w + j] = v / l[j * w + j];
      }
    }
    if (!ok) {
      for (int64_t j = 0; j < w * w; ++j) o[j] = std::numeric_limits<float>::quiet_NaN();
      continue;
    }
    for (int64_t j = 0; j < w; ++j) {
      inv[j * w + j] = 1.0 / l[j * w + j];
      for (int64_t r = j + 1; r < w; ++r) {
        double v = 0.0;
        for (int64_t k = j; k < r; ++k) v -= l[r * w + k] * inv[k * w + j];
        inv[r * w + j] = v / l[r * w + r];
      }
      for (int64_t r = j; r < w; ++r) o[r * w + j] = static_cast<float>(inv[r * w + j]);
    }
  }
  return out;
}

// One shifted CholeskyQR step on rows (b, w, len) float32: the w x w Gram matrix (a float32
// GEMM), L^-1 of its shifted Cholesky factor (float64, small), and L^-1 rows (a float32 GEMM):
// level-3 BLAS only, where LAPACK's tall Householder QR runs panel by panel. The caller checks
// the result (float32 Gram matrices resolve condition numbers up to ~1e3 per step, which the
// Krylov blocks stay well within) and falls back to Householder QR where it is not orthonormal.
at::Tensor cholesky_qr_step(const at::Tensor& rows) {
  return at::matmul(shifted_cholesky_inverse(at::matmul(rows, rows.transpose(1, 2))), rows);
}

// Whether rows (b, w, len) are orthonormal to float32 accuracy (and finite): what CholeskyQR
// gives unless the block had (nearly) dependent rows.
bool orthonormal(const at::Tensor& rows) {
  const at::Tensor gram = at::matmul(rows, rows.transpose(1, 2)).contiguous();
  const int64_t w = gram.size(1);
  const float* g = gram.data_ptr<float>();
  for (int64_t i = 0; i < gram.numel(); ++i) {
    const int64_t r = (i / w) % w, c = i % w;
    if (!(std::abs(g[i] - (r == c ? 1.0f : 0.0f)) < 1e-4f)) return false;
  }
  return true;
}

// Orthonormal rows spanning those of `rows` (b, w, len), float32: CholeskyQR2 (Fukaya et al.
// 2014), or Householder QR where the rows are (nearly) dependent. Rows that are orthonormal
// already come back unchanged up to rounding (CholeskyQR's R has a positive diagonal).
at::Tensor orthonormal_rows(const at::Tensor& rows) {
  const at::Tensor q = cholesky_qr_step(cholesky_qr_step(rows));
  if (!orthonormal(q)) return householder_rows(rows);
  return q;
}

// Shrunk singular values; zero at or below the threshold kappa * bulk edge. noise_scale is
// kappa * sigma * sqrt(q): the shrinkers are evaluated at the kappa-scaled noise level, so they
// stay continuous (zero) at the threshold for every kappa. Above kShrinkIdentityAbove (in units
// of noise_scale) a value is its own shrunk value: the formulas only see y up to there, so y^4
// stays finite in float32 however small sigma is (a y of Inf, noise_scale 0, included).
at::Tensor shrink(const at::Tensor& s, double noise_scale, double beta, Shrinker shrinker) {
  const at::Tensor y_in = s / noise_scale;
  const at::Tensor y = y_in.clamp_max(kShrinkIdentityAbove);
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
  const at::Tensor value = at::where(y_in > kShrinkIdentityAbove, s, shrunk * noise_scale);
  const at::Tensor above = y_in > (1.0 + std::sqrt(beta));
  return at::where(above, value, at::zeros_like(value));
}

// The shrinkers of `shrink` for one normalised value 1 + sqrt(beta) < y <= kShrinkIdentityAbove,
// in units of the noise scale.
double shrink_unit(double y, double beta, Shrinker shrinker) {
  const double t = y * y - (beta + 1.0);
  const double root = std::sqrt(std::max(t * t - 4.0 * beta, 0.0));
  switch (shrinker) {
    case Shrinker::kFrobenius:
      return root / y;
    case Shrinker::kOperator:
      return std::sqrt(std::max((t + root) * 0.5, 0.0));
    case Shrinker::kNuclear: {
      const double x = std::sqrt(std::max((t + root) * 0.5, 0.0));
      return std::max(x * x * x * x - std::sqrt(beta) * x * y - beta, 0.0) / (x * x * y);
    }
    case Shrinker::kHard:
      break;
  }
  return y;
}

// `shrink` for one value: the same formulas, for the stopping rule's loops over a few dozen
// values (where a tensor expression per step costs more in dispatch than in arithmetic).
double shrink_value(double s, double noise_scale, double beta, Shrinker shrinker) {
  const double y = s / noise_scale;
  if (!(y > 1.0 + std::sqrt(beta))) return 0.0;
  if (y > kShrinkIdentityAbove) return s;
  return shrink_unit(y, beta, shrinker) * noise_scale;
}

// The rows of (A X)^T for rows x (b, w, n) of X^T: as A x^T, then transposed (a copy of the thin
// result). MKL runs this form at the speed of a stream over A for any w <= 16; x A^T, the
// direct form, is up to twice as slow for w between 8 and 14 (measured, 2.13 CPU build).
at::Tensor times_a(const at::Tensor& a, const at::Tensor& x) {
  return at::matmul(a, x.transpose(1, 2)).transpose(1, 2).contiguous();
}

// A ~ left^T diag(values) right: Rayleigh-Ritz triplets, values (b, W) descending, the singular
// vectors as rows: left (b, W, m), right (b, W, n). `basis` (b, W, m): orthonormal left Ritz
// vectors of the Krylov basis (equal to `left` where the estimate is the basis's own, close to
// it where it is the one ahead). Each is kept as a small factor times tall rows, so only the
// rows a caller needs (the kept components and a margin) are ever formed.
struct Ritz {
  at::Tensor values;
  at::Tensor left_factor, left_rows, right_factor, right_rows, basis_factor, basis_rows;
  bool left_divide = false, right_divide = false;  // divide by the values (A v / s, A^T u / s)

  // factor (b, W, W') @ rows (b, W', len), first k rows; an undefined factor: rows as they are.
  at::Tensor first(const at::Tensor& factor, const at::Tensor& rows, bool divide,
      int64_t k) const {
    const at::Tensor out = factor.defined() ? at::matmul(factor.narrow(1, 0, k), rows)
                                            : rows.narrow(1, 0, k);
    if (!divide) return out;
    return out / values.narrow(1, 0, k).clamp_min(1e-30).unsqueeze(2);
  }
  at::Tensor left(int64_t k) const { return first(left_factor, left_rows, left_divide, k); }
  at::Tensor right(int64_t k) const { return first(right_factor, right_rows, right_divide, k); }
  at::Tensor basis(int64_t k) const { return first(basis_factor, basis_rows, false, k); }
};

// A growing set of row blocks (b, used, len) in a buffer of fixed capacity, with the float64
// Gram matrix of its rows: the blocks of the Krylov range finder, stored as rows (a block of w
// columns of an (len, w) matrix is w contiguous rows), so that appending one is a copy of its
// rows only (no growing concatenation) and products with grad are GEMMs on contiguous operands.
// The Gram matrix is accumulated in float64 from float64 copies of the rows: the estimate half a
// pass ahead divides by the small singular values of the Krylov basis, so it needs the Gram
// matrices of the float32 rows to float64 accuracy (only the new rows are converted, and only
// their products with the old ones computed).
struct RowBlocks {
  at::Tensor rows, rows64, gram;  // (b, cap, len) float32, float64; (b, cap, cap) float64
  int64_t used = 0;

  RowBlocks(int64_t b, int64_t cap, int64_t len, const at::TensorOptions& options, bool with_gram) {
    rows = at::empty({b, cap, len}, options.dtype(at::kFloat));
    if (with_gram) {
      rows64 = at::empty({b, cap, len}, options.dtype(at::kDouble));
      gram = at::empty({b, cap, cap}, options.dtype(at::kDouble));
    }
  }
  at::Tensor view() const { return rows.narrow(1, 0, used); }
  at::Tensor gram_view() const { return gram.narrow(1, 0, used).narrow(2, 0, used); }

  void append(const at::Tensor& block) {  // (b, w, len) float32
    const int64_t w = block.size(1);
    rows.narrow(1, used, w).copy_(block);
    if (gram.defined()) {
      const at::Tensor new64 = rows64.narrow(1, used, w);
      new64.copy_(block);
      // The new rows against all rows so far (itself included): one GEMM, the Gram matrix's new
      // columns, and their transpose its new rows.
      const at::Tensor cols = at::matmul(rows64.narrow(1, 0, used + w), new64.transpose(1, 2));
      gram.narrow(1, 0, used + w).narrow(2, used, w).copy_(cols);
      if (used > 0) {
        gram.narrow(1, used, w).narrow(2, 0, used).copy_(cols.narrow(1, 0, used).transpose(1, 2));
      }
    }
    used += w;
  }
};

// The estimates of the range finder, one per product with grad after the first pass, from the
// Gram matrices G1 = M^T M and G2 = (AM)^T (AM) alone (float64, b x W x W; M = A^T Q, AM = A M):
// now:   P_Q A, whose SVD is M = V_L diag(s_L) E^T (E, s_L^2 the eigenpairs of G1): left Q E,
//        right M E / s_L. Available once A^T Q_j is known.
// ahead: A P_V, V = orth(M) = M C, C = E diag(1 / s_L) (directions under kDirectionFloor left
//        out); its SVD is A V = (AM C X diag(1 / s_R)) diag(s_R) X^T with X, s_R^2 the eigenpairs
//        of C^T G2 C: left AM C X / s_R, right M C X. Available once A M is known, half a pass
//        after "now".
// Consecutive estimates differ by a Frobenius distance that needs no tall product: see settled.
struct Now {
  at::Tensor s, e;  // (b, W), (b, W, W)
};

// Eigenpairs of symmetric (b, W, W) float64 matrices, largest first: values as sqrt(max(., 0))
// (singular values from a Gram matrix), vectors as columns.
std::pair<at::Tensor, at::Tensor> descending_eigh(const at::Tensor& sym) {
  auto [lam, vec] = at::linalg_eigh(sym);
  lam = lam.contiguous();
  vec = vec.contiguous();
  const int64_t b = sym.size(0), w = sym.size(1);
  at::Tensor s = at::empty({b, w}, lam.options());
  at::Tensor v = at::empty({b, w, w}, vec.options());
  for (int64_t i = 0; i < b; ++i) {
    const double* l_in = lam.data_ptr<double>() + i * w;
    const double* v_in = vec.data_ptr<double>() + i * w * w;
    double* s_out = s.data_ptr<double>() + i * w;
    double* v_out = v.data_ptr<double>() + i * w * w;
    for (int64_t j = 0; j < w; ++j) {
      s_out[j] = std::sqrt(std::max(l_in[w - 1 - j], 0.0));
      for (int64_t r = 0; r < w; ++r) v_out[r * w + j] = v_in[r * w + (w - 1 - j)];
    }
  }
  return {s, v};
}

Now now_estimate(const at::Tensor& g1) {
  auto [s, e] = descending_eigh(g1);
  return {s, e};
}

struct Ahead {
  at::Tensor s, x, cx;  // s_R (b, W), X (b, W, W), C X
};

Ahead ahead_estimate(const Now& now, const at::Tensor& g2) {
  const int64_t b = now.s.size(0), w = now.s.size(1);
  at::Tensor c = now.e.clone();
  for (int64_t i = 0; i < b; ++i) {
    const double* s = now.s.data_ptr<double>() + i * w;
    double* ci = c.data_ptr<double>() + i * w * w;
    for (int64_t j = 0; j < w; ++j) {
      const double inv = s[j] > kDirectionFloor * s[0] ? 1.0 / std::max(s[j], 1e-300) : 0.0;
      for (int64_t r = 0; r < w; ++r) ci[r * w + j] *= inv;
    }
  }
  auto [s_ahead, x] = descending_eigh(at::matmul(at::matmul(c.transpose(1, 2), g2), c));
  return {s_ahead, x, at::matmul(c, x)};
}

// <now, ahead>_F / (eta_now_i eta_ahead_j) summed as eta_now^T K eta_ahead: V_L^T V_R = X and
// U_L^T U_R = diag(s_L) X diag(1 / s_R), so K = diag(s_L) X^2 diag(1 / s_R).
at::Tensor kernel_now_ahead(const Now& now, const Ahead& ahead) {
  const int64_t b = now.s.size(0), w = now.s.size(1);
  at::Tensor k = at::empty({b, w, w}, now.s.options());
  for (int64_t i = 0; i < b; ++i) {
    const double* s_l = now.s.data_ptr<double>() + i * w;
    const double* s_r = ahead.s.data_ptr<double>() + i * w;
    const double* x = ahead.x.data_ptr<double>() + i * w * w;
    double* ki = k.data_ptr<double>() + i * w * w;
    for (int64_t r = 0; r < w; ++r) {
      for (int64_t j = 0; j < w; ++j) {
        ki[r * w + j] = s_l[r] * x[r * w + j] * x[r * w + j] / std::max(s_r[j], 1e-300);
      }
    }
  }
  return k;
}

// Whether the newer of two consecutive estimates (values s_old, s_new; their inner product
// eta_old^T kernel eta_new) is final: the rule of kRitzTolerance in csrc/constants.h, in every
// matrix.
bool settled(const at::Tensor& s_old_in, const at::Tensor& s_new_in, const at::Tensor& kernel_in,
    double noise_scale, double beta, Shrinker shrinker, bool guard) {
  const double threshold = noise_scale * (1.0 + std::sqrt(beta));
  const at::Tensor s_old_t = s_old_in.contiguous(), s_new_t = s_new_in.contiguous(),
                   kernel_t = kernel_in.contiguous();
  const int64_t b = s_old_t.size(0), wo = s_old_t.size(1), wn = s_new_t.size(1);
  const int64_t w = std::min(wo, wn);
  const double* s_old_all = s_old_t.data_ptr<double>();
  const double* s_new_all = s_new_t.data_ptr<double>();
  const double* kernel_all = kernel_t.data_ptr<double>();
  std::vector<double> eta_old(wo), eta_new(wn);
  for (int64_t i = 0; i < b; ++i) {
    const double* s_old = s_old_all + i * wo;
    const double* s_new = s_new_all + i * wn;
    const double* kernel = kernel_all + i * wo * wn;
    double change = 0.0, loss = 0.0;
    for (int64_t j = 0; j < wo; ++j) {
      eta_old[j] = shrink_value(s_old[j], noise_scale, beta, shrinker);
      change += eta_old[j] * eta_old[j];
    }
    for (int64_t j = 0; j < wn; ++j) {
      eta_new[j] = shrink_value(s_new[j], noise_scale, beta, shrinker);
      change += eta_new[j] * eta_new[j];
    }
    for (int64_t j = 0; j < wo; ++j) {
      if (eta_old[j] == 0.0) continue;
      for (int64_t l = 0; l < wn; ++l) {
        change -= 2.0 * eta_old[j] * kernel[j * wn + l] * eta_new[l];
      }
    }
    change = std::max(change, 0.0);
    for (int64_t j = 0; j < w; ++j) {
      // Values still rising toward the threshold count with the shrunk value they would reach
      // (the first min(W_old, W_new) values are compared in order).
      const double projected = s_new[j] + kRiseSteps * (s_new[j] - s_old[j]);
      if (guard && s_new[j] >= kRitzWindow * threshold && s_new[j] <= threshold &&
          projected > (1.0 + kRiseMargin) * threshold) {
        const double potential = shrink_value(projected, noise_scale, beta, shrinker);
        change += potential * potential;
      }
    }
    // Error scale of the exact Frobenius shrinker: per kept component x^2 - eta^2 (x the
    // debiased value), in units of noise_scale^2, plus one noise component.
    // (Evaluated at y up to kShrinkIdentityAbove, where x^2 - eta^2 has reached its limit.)
    for (int64_t j = 0; j < wn; ++j) {
      const double y_in = s_new[j] / noise_scale;
      if (!(y_in > 1.0 + std::sqrt(beta))) continue;
      const double y = std::min(y_in, kShrinkIdentityAbove);
      const double e = shrink_unit(y, beta, Shrinker::kFrobenius);
      if (e <= 0.0) continue;
      const double t = y * y - (beta + 1.0);
      const double x2 = (t + std::sqrt(std::max(t * t - 4.0 * beta, 0.0))) * 0.5;
      loss += std::max(x2 - e * e, 0.0);
    }
    const double scale = (loss + 1.0) * (noise_scale * noise_scale);
    if (!(change <= kRitzTolerance * kRitzTolerance * scale)) return false;
  }
  return true;
}

// The float32 matrix the range finder works on, a = grad / scale (scale a power of two: 1 unless
// grad's magnitude calls for another), the magnitude check of its products with grad
// (kProductFloor, kProductCeiling in csrc/constants.h) and the count of passes over grad.
class ScaleGuard {
 public:
  explicit ScaleGuard(at::Tensor a) : a_(std::move(a)) {}
  const at::Tensor& a() const { return a_; }
  double scale() const { return scale_; }
  // Passes over grad: products with it, and one for an exact SVD (the cheap read of check(), a
  // maximum, is not counted).
  int64_t passes = 0;

  // Whether the range finder may go on from `product`, a product with a: its largest entry is
  // in [kProductFloor, kProductCeiling] (or grad was checked already); otherwise check(). A NaN
  // or Inf in grad reaches its row of a product (0 * Inf is NaN), so checking the first product
  // finds it before LAPACK does, at a fraction of a pass.
  bool accept(const at::Tensor& product) {
    if (checked_) return true;
    const auto [lo, hi] = at::aminmax(product);
    const double top = std::max(std::abs(lo.item<double>()), std::abs(hi.item<double>()));
    if (top >= kProductFloor && top <= kProductCeiling) return true;  // NaN fails
    return check();
  }

  // Reads grad's largest entry (once per call): NaN or Inf is an error. The largest entry bounds
  // ||A||_2 between itself and sqrt(m n) times it; unless that range lies in
  // [sqrt(kProductFloor), sqrt(kProductCeiling)] (the products' range, as ||A||^2 bounds them),
  // a becomes grad times the power of two that puts the entry in [1, 2). Returns false when that
  // changed a (the range finder starts again on it), true to go on.
  bool check() {
    if (checked_) return true;
    checked_ = true;
    const auto [lo, hi] = at::aminmax(a_);
    const double l = lo.item<double>(), h = hi.item<double>();
    TORCH_CHECK_VALUE(std::isfinite(l) && std::isfinite(h), "denoise: grad contains NaN or Inf");
    const double top = std::max(-l, h);
    const double bound = top * std::sqrt(static_cast<double>(a_.size(1) * a_.size(2)));
    if (top == 0.0 ||
        (top >= std::sqrt(kProductFloor) && bound <= std::sqrt(kProductCeiling))) {
      return true;
    }
    const int e = std::ilogb(top);
    if (e == 0) return true;
    // In float64: 2^-e reaches 2^149 (a subnormal grad), past float32's range; the products
    // are exact.
    a_ = (a_.to(at::kDouble) * std::ldexp(1.0, -e)).to(at::kFloat);
    scale_ = std::ldexp(1.0, e);
    return false;
  }

 private:
  at::Tensor a_;
  double scale_ = 1.0;
  bool checked_ = false;
};

// The exact SVD of a (b, m, n) as Ritz triplets.
Ritz exact_ritz(const at::Tensor& a) {
  auto [u, values, vh] = at::linalg_svd(a, /*full_matrices=*/false);
  Ritz est;
  est.values = values;
  est.left_rows = u.transpose(1, 2).contiguous();
  est.right_rows = vh;
  est.basis_rows = est.left_rows;
  return est;
}

// The next Krylov block, as rows: y (b, w, len) orthonormalised against the orthonormal rows q
// (b, W, len) and within itself, in float32: block classical Gram-Schmidt with
// reorthogonalisation (BCGS2: project out q, CholeskyQR, twice; Barlow & Smoktunowicz 2013).
// Where a row lost most of its norm to q (the Krylov space is exhausted: an exactly low-rank
// grad) or the result is not orthonormal, the last rows of a Householder QR of [q, y] instead,
// which stays orthonormal whatever y holds.
at::Tensor next_block(const at::Tensor& q, const at::Tensor& y) {
  const at::Tensor qt = q.transpose(1, 2);
  at::Tensor r = y - at::matmul(at::matmul(y, qt), q);
  if ((r.norm(2, {2}) >= 1e-2 * y.norm(2, {2})).all().item<bool>()) {
    r = cholesky_qr_step(r);
    r = r - at::matmul(at::matmul(r, qt), q);
    r = cholesky_qr_step(r);
    if (orthonormal(r)) return r;
  }
  return householder_rows(at::cat({q, y}, 1)).narrow(1, q.size(1), y.size(1)).contiguous();
}

// Orthonormal rows that equal `left` (b, k, m) where it already is orthonormal (up to
// rounding). A row whose value is (nearly) zero carries no direction (0 / 0) and is replaced
// by the same row of `fallback`, an orthonormal basis of the same Krylov space.
at::Tensor orthonormal_like(const at::Tensor& left, const at::Tensor& values,
    const at::Tensor& fallback) {
  const at::Tensor top = values.narrow(1, 0, 1);
  const at::Tensor usable = (values > 1e-6 * top) & (top > 0);
  return orthonormal_rows(at::where(usable.unsqueeze(2), left, fallback));
}

// Block Krylov range finder (Musco & Musco 2015) started from `start` (b, k0, m rows) plus fresh
// columns: Q_0 = orth([start, fresh]), Q_{j+1} = orth(A A^T Q_j) against Q_0..Q_j. Each pass
// multiplies by A^T (Z_j = A^T Q_j) and, unless it is a fixed schedule's last, by A
// (Y_{j+1} = A Z_j). A fixed niter >= 0 takes niter + 1 passes and returns Rayleigh-Ritz on
// span(Q_0..Q_niter); niter = -1 stops on the rule of `settled` and returns the estimate half a
// pass ahead. Once the basis would hold min(m, n) columns it returns the exact SVD instead: it
// costs about what the products would, and Rayleigh-Ritz on a basis of min(m, n) columns is
// exact only if the basis holds A's column space, which a tall A's start basis and fresh
// Gaussian rows (not in that space) break. All blocks are rows (b, w, len): Z_j^T = Q_j^T A and
// Y_{j+1}^T = Z_j^T A^T. The matrix is guard.a(); returns nullopt where the guard rescaled it
// (call again).
std::optional<Ritz> krylov_range(ScaleGuard& guard, at::Tensor start, int64_t rank,
    int64_t oversample, int64_t niter, double noise_scale, double beta, Shrinker shrinker,
    uint64_t seed) {
  const at::Tensor a = guard.a();
  const double threshold = noise_scale * (1.0 + std::sqrt(beta));
  const int64_t b = a.size(0), m = a.size(1), n = a.size(2);
  const int64_t full = std::min(m, n);
  auto gen = at::make_generator<at::CPUGeneratorImpl>(seed);
  const int64_t k0_in = start.defined() ? start.size(1) : 0;
  int64_t k = rank > 0 ? rank : std::min(std::max(kInitialRank, k0_in), full);
  const int64_t max_passes = niter >= 0 ? niter + 1 : kMaxAdaptivePasses;
  Ritz est;
  for (bool first_round = true;; first_round = false) {
    const int64_t k0 = start.defined() ? start.size(1) : 0;
    int64_t width = std::min(std::max(k + oversample, k0), full);
    if (first_round && k0 > 0 && rank < 0) {
      // A caller's warm start (denoise_warm's basis: the kept components and kBasisMargin
      // more): the fresh columns fill the block up to 2 kInitialRank = 16 columns, the widest
      // that MKL multiplies with grad at the cost of a narrower one (wider costs ~1.4x), and
      // are at least oversample - kBasisMargin (the basis's margin columns do the rest of the
      // oversampling's work) and at most oversample.
      const int64_t fresh = std::clamp(2 * kInitialRank - k0,
          std::max<int64_t>(oversample - kBasisMargin, 0), oversample);
      width = std::min(std::max(k0 + fresh, k), full);
    }
    bool exact = width >= full;
    bool done = false;
    if (!exact) {
      const int64_t fresh = width - k0;
      // Fresh rows. A cold start sketches, Omega^T A^T (Halko, Martinsson & Tropp 2011): one
      // product with grad, after which its first pass is the classic randomized SVD. A warm
      // start already holds grad's main directions (the last step's), so its fresh rows are
      // plain Gaussian vectors: the passes turn them into a search for new directions, and the
      // start costs no product.
      at::Tensor block;
      if (fresh > 0 && k0 == 0) {
        block = times_a(a, at::randn({b, fresh, n}, gen, a.options()));
        ++guard.passes;
        if (!guard.accept(block)) return std::nullopt;
      } else if (fresh > 0) {
        block = at::cat({start, at::randn({b, fresh, m}, gen, a.options())}, 1);
      } else {
        block = start;
      }
      // Q, M = A^T Q (with G1 = M^T M) and AM (with G2 = (AM)^T AM), as rows. The Krylov
      // basis holds fewer than min(m, n) columns.
      const int64_t cap = std::min(full, width * max_passes);
      RowBlocks q(b, cap, m, a.options(), /*with_gram=*/false);
      RowBlocks mz(b, cap, n, a.options(), /*with_gram=*/niter < 0);
      RowBlocks am(b, cap, m, a.options(), /*with_gram=*/niter < 0);
      at::Tensor q_last = orthonormal_rows(block);
      q.append(q_last);
      for (int64_t pass = 1;; ++pass) {
        const at::Tensor z = at::matmul(q_last, a);  // (b, w, n): (A^T Q_j)^T
        ++guard.passes;
        mz.append(z);
        const bool last = pass >= max_passes;
        if (last && niter >= 0) {
          if (!guard.accept(z)) return std::nullopt;
          break;
        }
        // A warm start watches for rising values in its first pass only: there they are the
        // start basis's components that the new noise pushed under the threshold. Later, its
        // fresh columns rise through the window as any search does; a new component that
        // crosses the threshold still shows in the estimates' difference.
        const bool cold = k0 == 0;
        const at::Tensor y = times_a(a, z);  // (A A^T Q_j)^T: the next block and the look ahead
        ++guard.passes;
        if (!guard.accept(y)) return std::nullopt;
        am.append(y);
        if (niter < 0 && (last || pass >= (cold ? kColdPasses : 1))) {
          const Now now = now_estimate(mz.gram_view());
          const Ahead ahead = ahead_estimate(now, am.gram_view());
          if (last || settled(now.s, ahead.s, kernel_now_ahead(now, ahead), noise_scale, beta,
                          shrinker, cold || pass == 1)) {
            // The estimate half a pass ahead: left (AM C X / s_R)^T, right (M C X)^T (float32
            // products with small float64 factors). The basis for the next call: (Q E)^T,
            // orthonormal.
            const at::Tensor cx_t = ahead.cx.transpose(1, 2).to(at::kFloat);
            est.values = ahead.s.to(at::kFloat);
            est.left_factor = cx_t;
            est.left_rows = am.view();
            est.left_divide = true;
            est.right_factor = cx_t;
            est.right_rows = mz.view();
            est.right_divide = false;
            est.basis_factor = now.e.transpose(1, 2).to(at::kFloat);
            est.basis_rows = q.view();
            done = true;
            break;
          }
        }
        if (mz.used + y.size(1) >= full) {
          exact = true;
          break;
        }
        q_last = next_block(q.view(), y);
        q.append(q_last);
      }
      if (!done && !exact) {
        // P_Q A = Q (A^T Q)^T; the SVD of A^T Q = V S Wb^T gives A ~ (Q Wb) S V^T.
        auto [v, values, wh] = at::linalg_svd(mz.view().transpose(1, 2), /*full_matrices=*/false);
        est = Ritz();
        est.values = values;
        est.left_rows = at::matmul(wh, q.view());
        est.right_rows = v.transpose(1, 2);
        est.basis_rows = est.left_rows;
      }
    }
    if (exact) {
      if (!guard.check()) return std::nullopt;
      est = exact_ritz(a);
      ++guard.passes;
    }
    if (rank > 0 || est.values.size(1) >= full || k >= full) break;
    // Adaptive rank: done once the k-th value of every matrix is at or below the threshold, so
    // every component above it was found with `oversample` columns to spare. Otherwise start
    // again, twice as wide, from what was found (a warm start).
    if ((est.values.select(1, k - 1) <= threshold).all().item<bool>()) break;
    start = est.basis(std::min(k, est.values.size(1))).contiguous();
    k = std::min(2 * k, full);
  }
  return est;
}

struct Options {
  double sigma, kappa;
  Shrinker shrinker;
  NormCorrection norm;
  int64_t rank, oversample, niter, seed;
};

// Shared body of both ops. grad (m, n) or (b, m, n); start (b, k0, m) rows or undefined.
// Returns (estimate like grad, new basis (b, m, k') if want_basis, passes).
std::tuple<at::Tensor, at::Tensor, int64_t> denoise_impl(const at::Tensor& grad,
    const at::Tensor& start, const Options& o, bool want_basis) {
  const bool batched = grad.dim() == 3;
  ScaleGuard guard((batched ? grad : grad.unsqueeze(0)).to(at::kFloat));
  const int64_t m = grad.size(-2), n = grad.size(-1);
  const int64_t p = std::min(m, n), q = std::max(m, n);
  const double beta = static_cast<double>(p) / static_cast<double>(q);
  // In units of the matrix the range finder works on (grad / scale); the second round, if any,
  // runs on a rescaled matrix.
  double sigma = o.sigma, noise_scale = 0.0;
  std::optional<Ritz> found;
  while (!found) {
    sigma = o.sigma / guard.scale();
    noise_scale = o.kappa * sigma * std::sqrt(static_cast<double>(q));
    found = krylov_range(guard, start, o.rank, o.oversample, o.niter, noise_scale, beta,
        o.shrinker, static_cast<uint64_t>(o.seed));
  }
  const Ritz& est = *found;
  const at::Tensor& a = guard.a();
  const int64_t width = est.values.size(1);

  at::Tensor eta = shrink(est.values, noise_scale, beta, o.shrinker);
  if (o.rank > 0 && width > o.rank) eta.narrow(1, o.rank, width - o.rank).zero_();
  if (o.norm != NormCorrection::kNone) {
    const at::Tensor grad_sq = a.square().sum({1, 2}, false, at::kDouble);
    const at::Tensor target = o.norm == NormCorrection::kPreserve
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
  // The next call's start: the estimate's own left vectors (orthonormalised: those of the
  // estimate ahead are only up to rounding), kept components first.
  at::Tensor new_basis;
  if (want_basis) {
    const int64_t k = std::min(kept + kBasisMargin, width);
    new_basis = orthonormal_like(est.left(k), est.values.narrow(1, 0, k), est.basis(k))
                    .transpose(1, 2)
                    .contiguous();
  }
  // Fast path for the common DP case: nothing above the edge, so no reconstruction.
  if (kept == 0) {
    return {at::zeros(grad.sizes(), grad.options().memory_format(at::MemoryFormat::Contiguous)),
        new_basis, guard.passes};
  }
  // The left factor as contiguous columns (b, m, kept): MKL's batched GEMM with a transposed
  // operand of a few columns runs up to 13x slower than the same product on a contiguous one
  // (3072 x 768 at rank 6: 8.6 against 0.67 ms, 2.13 CPU build), which made this product a
  // fifth of a cold call.
  const at::Tensor left =
      (est.left(kept) * eta.narrow(1, 0, kept).unsqueeze(2)).transpose(1, 2).contiguous();
  at::Tensor out = at::matmul(left, est.right(kept));
  // Back to grad's units (2^e with e in [-149, 127]: a float32 power of two, an exact product).
  if (guard.scale() != 1.0) out.mul_(guard.scale());
  if (!batched) out = out.squeeze(0);
  return {out.to(grad.scalar_type()).contiguous(), new_basis, guard.passes};
}

at::Tensor denoise_cpu(const at::Tensor& grad, double sigma, c10::string_view shrinker,
    double kappa, int64_t rank, int64_t oversample, int64_t niter, c10::string_view norm,
    int64_t seed) {
  check_arguments("denoise", grad, sigma, kappa, rank, oversample, niter);
  const Options o{sigma, kappa, parse_shrinker("denoise", shrinker), parse_norm("denoise", norm),
      rank, oversample, niter, seed};
  return std::get<0>(denoise_impl(grad, at::Tensor(), o, /*want_basis=*/false));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> denoise_warm_cpu(const at::Tensor& grad,
    double sigma, const at::Tensor& basis, c10::string_view shrinker, double kappa, int64_t rank,
    int64_t oversample, int64_t niter, c10::string_view norm, int64_t seed) {
  check_arguments("denoise_warm", grad, sigma, kappa, rank, oversample, niter);
  check_basis(grad, basis);
  const Options o{sigma, kappa, parse_shrinker("denoise_warm", shrinker),
      parse_norm("denoise_warm", norm), rank, oversample, niter, seed};
  at::Tensor start;
  if (basis.size(-1) > 0) {
    start = (grad.dim() == 3 ? basis : basis.unsqueeze(0)).transpose(1, 2);
    // Each column divided by its largest entry: only its direction counts, and the float32
    // Gram matrices of the orthonormalisation hold the squares (a column of 1e38 overflows).
    const at::Tensor top = start.abs().amax({2}, /*keepdim=*/true);
    start = at::where(top > 0, start / top, at::zeros_like(start)).contiguous();
  }
  auto [out, new_basis, passes] = denoise_impl(grad, start, o, /*want_basis=*/true);
  if (grad.dim() == 2) new_basis = new_basis.squeeze(0);
  return {out, new_basis, at::scalar_tensor(passes, grad.options().dtype(at::kLong))};
}

}  // namespace

TORCH_LIBRARY_IMPL(rmt, CPU, m) {
  m.impl("denoise", &denoise_cpu);
  m.impl("denoise_warm", &denoise_warm_cpu);
}

}  // namespace rmt
