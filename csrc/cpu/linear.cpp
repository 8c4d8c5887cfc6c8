// CPU kernels of the book-keeping DP ops for nn.Linear (weight and bias) and of the plain noise op.
//
// Per-example weight gradient of example b: G_b = dy_b^T x_b (d_out x d_in), summed over t.
// Norms never form all B of them; the clipped sum is ONE GEMM over the B*T rows with the smaller
// operand row-scaled, accumulated by BLAS onto the freshly generated noise (the CPU "epilogue").
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>

#include "cpu/dp_common.h"

namespace rmt {
namespace {

// Route rule (also in rmt_kernels/dp_ops.py): per example the Gram ("ghost") route costs
// T^2 (d_in + d_out) multiply-adds (x x^T and dy dy^T), the per-example route T d_in d_out
// (dy^T x). Take the Gram route when it is cheaper: T (d_in + d_out) <= d_in d_out. For the
// RoBERTa shapes at T <= 128 that is always the Gram route; long sequences on thin layers go
// per-example.
bool use_gram_route(int64_t T, int64_t d_in, int64_t d_out) {
  return T * (d_in + d_out) <= d_in * d_out;
}

// The Gram route's sum is symmetric in (t, s), so only the upper triangle is computed: the
// sequence is cut into strips of kGramStrip rows, and strip i is multiplied against rows i.. T
// (one bmm per strip and operand; the strip's diagonal block counts once, the rest twice).
// That is (T / strip + 1) / (2 T / strip) of the full T x T flops, 62.5% at T = 128. Measured
// 2026-11-29 on a 2-core EPYC, RoBERTa shapes, B in {8, 32}, T in {64, 128}: strips of 32 are
// 8-19% faster than tiles of 64 and 13-31% faster than full T x T bmm; strips of 16 and a
// recursive halving of the triangle lose bmm efficiency again.
constexpr int64_t kGramStrip = 32;

// sum_{t,s} (x_t . x_s)(dy_t . dy_s) for a block of examples (n, T, d); float64 here (the
// certified norms), any float dtype works.
at::Tensor gram_sq_norms(const at::Tensor& x, const at::Tensor& dy) {
  const int64_t T = x.size(1);
  at::Tensor total;
  for (int64_t i = 0; i < T; i += kGramStrip) {
    const int64_t rows = std::min(kGramStrip, T - i);
    at::Tensor g = at::bmm(x.narrow(1, i, rows), x.narrow(1, i, T - i).transpose(1, 2));
    g.mul_(at::bmm(dy.narrow(1, i, rows), dy.narrow(1, i, T - i).transpose(1, 2)));
    // 2 * (whole strip) - (its diagonal block): off-diagonal blocks stand for their mirror too.
    at::Tensor part = g.sum({1, 2}).mul_(2.0).sub_(g.narrow(2, 0, rows).sum({1, 2}));
    total = total.defined() ? total.add_(part) : part;
  }
  return total;
}

// Certified upper bound of N_b = ||sum_t dy_t x_t^T||_F^2 (rmt_kernels.dp_ops.linear_sq_norms
// states it). With S = sum_t |x_t| |dy_t| (float64 row norms; N <= S^2 by the triangle
// inequality) and u = 2^-53, everything below in float64 from exactly converted inputs:
//   Gram route:  G^x_ts, G^dy_ts each off by <= gamma_d |x_t||x_s| (|dy_t||dy_s|), so
//                |P^ - N| <= (gamma_din + gamma_dout + 3 gamma_{T^2+T+2} + ...) S^2
//                bound = P^ + 2 (d_in + d_out + 3T^2 + 3T + 8) u S^2;
//   per example: G^ = dy^T x entrywise off by gamma_T (|dy|^T|x|), whose Frobenius norm is <= S,
//                so N <= (|G^| + gamma_T S)^2: bound = Q (1 + 2(d_in d_out + 2) u) + 4(T+1) u S^2
//                with Q = fl(sum G^^2);
//   trivial:     S^2 (1 + 3(d_in + d_out + T + 8) u).
at::Tensor linear_sq_norms_block(const at::Tensor& x, const at::Tensor& dy, bool gram) {
  const int64_t T = x.size(1), d_in = x.size(2), d_out = dy.size(2);
  const double u = dp::kU64;
  const at::Tensor xb = x.to(at::kDouble), dyb = dy.to(at::kDouble);
  const at::Tensor S = (dp::row_norms64(xb) * dp::row_norms64(dyb)).sum(1);
  const at::Tensor S2 = S * S;
  const at::Tensor trivial = S2 * (1.0 + 3.0 * static_cast<double>(d_in + d_out + T + 8) * u);
  at::Tensor route;
  if (T == 1) {  // rank one: ||dy x^T||^2 = |dy|^2 |x|^2 = S^2, the trivial bound is exact
    route = trivial;
  } else if (gram) {
    const double K = static_cast<double>(d_in + d_out + 3 * T * T + 3 * T + 8);
    route = gram_sq_norms(xb, dyb) + S2 * (2.0 * K * u);
  } else {
    const at::Tensor Q = at::bmm(dyb.transpose(1, 2), xb).square().sum({1, 2});
    route = Q * (1.0 + 2.0 * static_cast<double>(d_in * d_out + 2) * u) +
            S2 * (4.0 * static_cast<double>(T + 1) * u);
  }
  return dp::certified(route, trivial, at::isfinite(S));
}

at::Tensor linear_sq_norms_cpu(const at::Tensor& x, const at::Tensor& dy) {
  constexpr const char* op = "linear_sq_norms";
  dp::check_activations(op, "x", x, dy);
  dp::check_float(op, "x", x);
  dp::check_float(op, "dy", dy);
  const at::Tensor x3 = dp::as_sequence(x), dy3 = dp::as_sequence(dy);
  const int64_t B = x3.size(0), T = x3.size(1), d_in = x3.size(2), d_out = dy3.size(2);
  at::Tensor out = at::empty({B}, x.options().dtype(at::kFloat));
  const bool gram = use_gram_route(T, d_in, d_out);
  // float64 copies of the inputs plus the Gram matrices or per-example gradients.
  const int64_t per_example_bytes =
      8 * (T * (d_in + d_out) + (T == 1 ? 0 : gram ? 2 * T * T : d_in * d_out));
  const int64_t block = std::clamp<int64_t>(dp::kBlockBytes / per_example_bytes, 1, B);
  for (int64_t b0 = 0; b0 < B; b0 += block) {
    const int64_t n = std::min(block, B - b0);
    out.narrow(0, b0, n).copy_(
        linear_sq_norms_block(x3.narrow(0, b0, n), dy3.narrow(0, b0, n), gram));
  }
  return out;
}

at::Tensor linear_clipped_noisy_sum_cpu(const at::Tensor& x, const at::Tensor& dy,
    const at::Tensor& scale, double noise_std, int64_t seed, int64_t offset) {
  constexpr const char* op = "linear_clipped_noisy_sum";
  dp::check_activations(op, "x", x, dy);
  dp::check_float(op, "x", x);
  dp::check_float(op, "dy", dy);
  const int64_t B = x.size(0), d_in = x.size(-1), d_out = dy.size(-1);
  dp::check_scale(op, scale, B);
  dp::check_noise(op, noise_std, seed, offset, d_out * d_in);
  const at::Tensor x3 = dp::as_sequence(x), dy3 = dp::as_sequence(dy);
  const int64_t rows = B * x3.size(1);
  const at::Tensor s = scale.to(at::kFloat).view({B, 1, 1});
  // Row-scale whichever operand is narrower: the scaled copy is the only extra traffic.
  at::Tensor xs = dp::drop_zero_scaled(x3, scale).to(at::kFloat);
  at::Tensor dys = dp::drop_zero_scaled(dy3, scale).to(at::kFloat);
  if (d_out <= d_in) {
    dys = dys * s;
  } else {
    xs = xs * s;
  }
  const at::Tensor lhs = dys.reshape({rows, d_out}).t(), rhs = xs.reshape({rows, d_in});
  if (noise_std == 0.0) return at::mm(lhs, rhs);
  // The GEMM accumulates onto the noise (beta = 1): the noisy sum is written once.
  at::Tensor out = dp::noise_tensor({d_out, d_in}, x.options(), noise_std, seed, offset);
  return out.addmm_(lhs, rhs);
}

// Bias (and any parameter whose per-example gradient is sum_t dy_t): tiny, so per-example
// vectors (B, d) are fine.
//
// Certified bound of ||sum_t dy_t||^2 (dp_common.h): v^ = sum_t dy_t in float64 is off by
// <= gamma_T sum_t |dy_t| in norm, so with S = sum_t |dy_t| and Q = fl(|v^|^2):
// bound = min(Q (1 + 2(d + 2) u) + 4 (T + 1) u S^2, S^2 (1 + 3 (d + T + 8) u)).
at::Tensor bias_sq_norms_bound(const at::Tensor& dy3) {
  const int64_t T = dy3.size(1), d = dy3.size(2);
  const double u = dp::kU64;
  const at::Tensor dy64 = dy3.to(at::kDouble);
  const at::Tensor S = dp::row_norms64(dy64).sum(1);
  const at::Tensor S2 = S * S;
  const at::Tensor Q = dy64.sum(1).square().sum(1);
  const at::Tensor route = Q * (1.0 + 2.0 * static_cast<double>(d + 2) * u) +
                           S2 * (4.0 * static_cast<double>(T + 1) * u);
  const at::Tensor trivial = S2 * (1.0 + 3.0 * static_cast<double>(d + T + 8) * u);
  return dp::certified(route, trivial, at::isfinite(S));
}

at::Tensor bias_sq_norms_cpu(const at::Tensor& dy) {
  constexpr const char* op = "bias_sq_norms";
  dp::check_activations(op, "dy", dy, dy);
  dp::check_float(op, "dy", dy);
  return bias_sq_norms_bound(dp::as_sequence(dy));
}

at::Tensor bias_clipped_noisy_sum_cpu(const at::Tensor& dy, const at::Tensor& scale,
    double noise_std, int64_t seed, int64_t offset) {
  constexpr const char* op = "bias_clipped_noisy_sum";
  dp::check_activations(op, "dy", dy, dy);
  dp::check_float(op, "dy", dy);
  dp::check_scale(op, scale, dy.size(0));
  dp::check_noise(op, noise_std, seed, offset, dy.size(-1));
  const at::Tensor per_example =
      dp::drop_zero_scaled(dp::as_sequence(dy).sum(1, false, at::kFloat), scale);  // (B, d)
  at::Tensor out = at::mv(per_example.t(), scale.to(at::kFloat)).contiguous();
  dp::add_noise_(out, noise_std, seed, offset);
  return out;
}

// Noise for a gradient computed elsewhere (a custom layer rule): float32 copy of x + noise,
// element k of the row-major flattening using counter offset + k.
at::Tensor add_gaussian_noise_cpu(const at::Tensor& x, double noise_std, int64_t seed,
    int64_t offset) {
  constexpr const char* op = "add_gaussian_noise";
  dp::check_float(op, "x", x);
  dp::check_noise(op, noise_std, seed, offset, x.numel());
  at::Tensor out = x.to(at::kFloat, /*non_blocking=*/false, /*copy=*/true,
      at::MemoryFormat::Contiguous);
  dp::add_noise_(out, noise_std, seed, offset);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(rmt, CPU, m) {
  m.impl("linear_sq_norms", &linear_sq_norms_cpu);
  m.impl("linear_clipped_noisy_sum", &linear_clipped_noisy_sum_cpu);
  m.impl("bias_sq_norms", &bias_sq_norms_cpu);
  m.impl("bias_clipped_noisy_sum", &bias_clipped_noisy_sum_cpu);
  m.impl("add_gaussian_noise", &add_gaussian_noise_cpu);
}

}  // namespace rmt
