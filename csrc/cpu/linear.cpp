// CPU kernels of the book-keeping DP ops for nn.Linear (weight and bias).
//
// Per-example weight gradient of example b: G_b = dy_b^T x_b (d_out x d_in), summed over t.
// Norms never form all B of them; the clipped sum is ONE GEMM over the B*T rows with the smaller
// operand row-scaled, accumulated by BLAS onto the freshly generated noise (the CPU "epilogue").
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "constants.h"
#include "cpu/dp_common.h"
#include "cpu/linear_bf16.h"

namespace rmt {
namespace {

// use_gram_route: csrc/constants.h (shared with the device path).

// The Gram route's sum is symmetric in (t, s), so only the upper triangle is computed: the
// sequence is cut into strips of kGramStrip rows, and strip i is multiplied against rows i.. T
// (one GEMM per strip and operand; the strip's diagonal block counts once, the rest twice).
// That is (T / strip + 1) / (2 T / strip) of the full T x T flops, 62.5% at T = 128. Measured
// 2026-11-29 on a 2-core EPYC, RoBERTa shapes, B in {8, 32}, T in {64, 128}: strips of 32 are
// 8-19% faster than tiles of 64 and 13-31% faster than full T x T bmm; strips of 16 and a
// recursive halving of the triangle lose bmm efficiency again. Re-measured 2026-12-02 for the
// float64 per-example dgemm below (2-core Xeon, AVX-512): strips of 32-48 best, 8/16/128 lose
// 10-60%.
constexpr int64_t kGramStrip = 32;

// Per-example float64 work of the certified norms: each worker thread converts ONE example at a
// time into its own float64 buffers (reused across its examples, so they stay in cache and no
// page is faulted in per call) and runs single-threaded dgemm on them; the row norms come from
// the Gram diagonals. Measured 2026-12-02 on a 2-core Xeon (AVX-512), norms alone, B 32, T 128:
// 768x768 8.6 ms against 20.7 ms for the previous float64 formulation (bmm over 32 MiB blocks
// converted up front, separate row-norm pass) and 4.9 ms for the uncertified float32 Gram;
// 768x3072 24 against 31 and 16 ms. dgemm runs at half the sgemm rate, so ~1.5-2x the float32
// time is what any float64 Gram costs.
//
// Why not float32 Gram strips plus a rigorous error term (and float64 only where it is large)?
// With G^ = fl32(x x^T), |e_ts| <= gamma_d |x_t||x_s| (gamma_d = d 2^-24 / (1 - d 2^-24), any BLAS
// order), the certified excess is sum_ts (gamma_din |x_t||x_s||G^dy_ts| + gamma_dout |dy_t||dy_s|
// |G^x_ts| + gamma_din gamma_dout |x_t||x_s||dy_t||dy_s|): it sums |G_ts| over T^2 entries while
// P = sum_ts G^x_ts G^dy_ts cancels, so excess / P ~ gamma_d T / sqrt(d) on random data and
// ~gamma_d T when rows share a direction (real activations). Measured (T 64-128, RoBERTa widths):
// 3e-4 to 1e-3 relative on random data, 2e-3 to 1.5e-2 on correlated data, while the float32
// result is in fact within 1e-7. A test against 2^-20 would send every example to the float64
// fallback (no gain); a loose one would inflate norms by up to 1.5% (clipping distorted, every
// reference comparison at rtol 2e-5..1e-4 broken). Even a one-rounding-per-entry Gram leaves
// ~2^-24 T. Hence float64 throughout, made cheap.
// Re-measured for a hybrid (issue 28 item 3, 2026-12-08, 1 thread, load 4-5, python -m
// bench.gram32_width): bound width / N per example, B 32, median (max): random RoBERTa shapes
// 2.6e-4 (2.6e-4) at 768x768 T 64 to 9.8e-4 (9.9e-4) at 768x3072 T 128, bf16 inputs alike; a
// random-init 2-layer RoBERTa-base on random tokens (B 8, T 128) 9.2e-5 (attention query, output)
// to 3.7e-3 (key), FFN 2.3e-4; crafted cancelling pairs 9e3..2e4. So at 2^-20 or 1e-6 (what the
// reference tests' rtol 2e-5 allows) NO clipped example is decided on any input: only "factor 1"
// (bound <= C^2) ones, i.e. the unclipped fraction (0.75-0.88 / 0.44-0.50 / 0.06-0.12 at C clipping
// 10% / 50% / 90%). Time, two runs: a float32 Gram (full T x T bmm) 5-83 ms against 8-149 ms for
// these float64 norms, whose fused op (norms + sum) is 27-426 ms: even with every example decided
// and the bound free, the hybrid would save 6-22% of the fused op (8-17% re-measured with nothing
// else running, load 1.7; bmm; strips at 62.5% of the bmm might reach ~30%); with a fraction p of the examples unclipped it saves p t64 - t32, >= 15% of
// the fused op only for p >= ~0.66 (768x768, T 128) to ~0.9 (the 3072-wide layers), never at T 64
// for those. DP fine-tuning usually clips most examples (p near 0), where the hybrid only adds the
// float32 pass. Not built. It would also need the engine: the factor depends on the sum of all
// layers' bounds, so a layer can decide nothing alone (an API returning (upper, width) per layer,
// then a float64 recomputation for the undecided examples' rows only).
struct Example64 {
  at::Tensor x, dy;      // (T, d_in), (T, d_out) float64
  at::Tensor gx, gdy;    // flat scratch for Gram strips or the per-example gradient
};

// sum_k a_k b_k in float64 with 8 independent partial sums: the compiler vectorises them (a single
// running sum is a serial chain of dependent adds, 4x slower and more than the dgemm here). The
// summation order is immaterial to the bounds (gamma_n holds for any order).
double dot64(const double* a, const double* b, int64_t n) {
  double acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t k = 0;
  for (; k + 8 <= n; k += 8) {
    for (int j = 0; j < 8; ++j) acc[j] += a[k + j] * b[k + j];
  }
  double s = 0.0;
  for (; k < n; ++k) s += a[k] * b[k];
  for (int j = 0; j < 8; ++j) s += acc[j];
  return s;
}

// Sum over t of |x_t| |dy_t| (float64 row norms of the converted rows): S of the bound.
double row_norm_products(const at::Tensor& x64, const at::Tensor& dy64) {
  const int64_t T = x64.size(0), d_in = x64.size(1), d_out = dy64.size(1);
  const double* xp = x64.const_data_ptr<double>();
  const double* dp = dy64.const_data_ptr<double>();
  double S = 0.0;
  for (int64_t t = 0; t < T; ++t) {
    const double* xt = xp + t * d_in;
    const double* dt = dp + t * d_out;
    S += std::sqrt(dot64(xt, xt, d_in)) * std::sqrt(dot64(dt, dt, d_out));
  }
  return S;
}

// P^ = sum_{t,s} (x_t . x_s)(dy_t . dy_s) of one example, float64, strip by strip. Also returns
// S = sum_t sqrt(G^x_tt) sqrt(G^dy_tt) from the strips' diagonals: the row norms come for free,
// with the same error bound as any other float64 sum of squares.
double gram_sq_norm64(Example64& w, double* S) {
  const int64_t T = w.x.size(0);
  double total = 0.0, s_sum = 0.0;
  for (int64_t i = 0; i < T; i += kGramStrip) {
    const int64_t rows = std::min(kGramStrip, T - i), cols = T - i;
    at::Tensor gx = w.gx.narrow(0, 0, rows * cols).view({rows, cols});
    at::Tensor gdy = w.gdy.narrow(0, 0, rows * cols).view({rows, cols});
    at::mm_out(gx, w.x.narrow(0, i, rows), w.x.narrow(0, i, cols).t());
    at::mm_out(gdy, w.dy.narrow(0, i, rows), w.dy.narrow(0, i, cols).t());
    const double* a = gx.const_data_ptr<double>();
    const double* b = gdy.const_data_ptr<double>();
    // The strip's diagonal block (columns < rows) counts once, the rest stands for its mirror.
    double diag = 0.0, off = 0.0;
    for (int64_t r = 0; r < rows; ++r) {
      diag += dot64(a + r * cols, b + r * cols, rows);
      off += dot64(a + r * cols + rows, b + r * cols + rows, cols - rows);
      s_sum += std::sqrt(a[r * cols + r]) * std::sqrt(b[r * cols + r]);
    }
    total += diag + 2.0 * off;
  }
  *S = s_sum;
  return total;
}

// Q = fl(sum_ij G^_ij^2) with G^ = dy^T x in float64, one example.
double per_example_sq_norm64(Example64& w) {
  const int64_t d_in = w.x.size(1), d_out = w.dy.size(1);
  at::Tensor g = w.gx.narrow(0, 0, d_out * d_in).view({d_out, d_in});
  at::mm_out(g, w.dy.t(), w.x);
  const double* a = g.const_data_ptr<double>();
  return dot64(a, a, d_out * d_in);
}

// Certified upper bound of N_b = ||sum_t dy_t x_t^T||_F^2 (rmt_kernels.ops.linear_sq_norms
// states it; rmt_kernels.triton.device.linear_sq_norm_bound proves it and computes the same
// formula on the device path). With
// S = sum_t |x_t| |dy_t| (float64 row norms; N <= S^2 by the triangle inequality) and
// u = 2^-53, everything below in float64 from exactly converted inputs:
//   Gram route:  G^x_ts, G^dy_ts each off by <= gamma_d |x_t||x_s| (|dy_t||dy_s|), so
//                |P^ - N| <= (gamma_din + gamma_dout + 3 gamma_{T^2+T+2} + ...) S^2
//                bound = P^ + 2 (d_in + d_out + 3T^2 + 3T + 8) u S^2;
//   per example: G^ = dy^T x entrywise off by gamma_T (|dy|^T|x|), whose Frobenius norm is <= S,
//                so N <= (|G^| + gamma_T S)^2: bound = Q (1 + 2(d_in d_out + 2) u) + 4(T+1) u S^2
//                with Q = fl(sum G^^2);
//   trivial:     S^2 (1 + 3(d_in + d_out + T + 8) u).
// Any summation order is covered (the gamma_n bounds hold for every order, FMA or not), so the
// per-example loops below may sum as they like.
enum class Route { kRankOne, kGram, kPerExample };

at::Tensor linear_sq_norm_bound(const at::Tensor& part, const at::Tensor& S, int64_t T,
    int64_t d_in, int64_t d_out, Route route) {
  const double u = dp::kU64;
  const at::Tensor S2 = S * S;
  const at::Tensor trivial = S2 * (1.0 + 3.0 * static_cast<double>(d_in + d_out + T + 8) * u);
  at::Tensor bound;
  if (route == Route::kRankOne) {  // ||dy x^T||^2 = |dy|^2 |x|^2 = S^2: the trivial bound is exact
    bound = trivial;
  } else if (route == Route::kGram) {
    const double K = static_cast<double>(d_in + d_out + 3 * T * T + 3 * T + 8);
    bound = part + S2 * (2.0 * K * u);
  } else {
    bound = part * (1.0 + 2.0 * static_cast<double>(d_in * d_out + 2) * u) +
            S2 * (4.0 * static_cast<double>(T + 1) * u);
  }
  return dp::certified(bound, trivial, at::isfinite(S));
}

at::Tensor linear_sq_norms_cpu(const at::Tensor& x, const at::Tensor& dy) {
  constexpr const char* op = "linear_sq_norms";
  dp::check_activations(op, "x", x, dy);
  dp::check_float(op, "x", x);
  dp::check_float(op, "dy", dy);
  const at::Tensor x3 = dp::as_sequence(x), dy3 = dp::as_sequence(dy);
  const int64_t B = x3.size(0), T = x3.size(1), d_in = x3.size(2), d_out = dy3.size(2);
  const Route route = T == 1                          ? Route::kRankOne
                      : use_gram_route(T, d_in, d_out) ? Route::kGram
                                                       : Route::kPerExample;
  if (route == Route::kRankOne) {  // S alone; batched (per-example tasks cost more than the work)
    const at::Tensor S = (dp::row_norms64(x3) * dp::row_norms64(dy3)).sum(1);
    return linear_sq_norm_bound(S, S, T, d_in, d_out, route);
  }
  const int64_t scratch = route == Route::kGram ? std::min(kGramStrip, T) * T : d_in * d_out;
  const auto f64 = x.options().dtype(at::kDouble);
  at::Tensor part = at::zeros({B}, f64), S = at::empty({B}, f64);
  double* part_p = part.data_ptr<double>();
  double* S_p = S.data_ptr<double>();
  auto work = [&](int64_t b0, int64_t b1) {
    Example64 w{at::empty({T, d_in}, f64), at::empty({T, d_out}, f64), at::empty({scratch}, f64),
        at::empty({route == Route::kGram ? scratch : 0}, f64)};
    for (int64_t b = b0; b < b1; ++b) {
      w.x.copy_(x3[b]);  // exact conversion
      w.dy.copy_(dy3[b]);
      if (route == Route::kGram) {
        part_p[b] = gram_sq_norm64(w, &S_p[b]);
      } else {
        S_p[b] = row_norm_products(w.x, w.dy);
        part_p[b] = per_example_sq_norm64(w);
      }
    }
  };
  // One example per task, single-threaded dgemm inside (at::parallel_for turns off nested
  // parallelism): small GEMMs scale better across examples than within one. With fewer examples
  // than threads, one loop and multi-threaded dgemm instead.
  if (B >= at::get_num_threads()) {
    at::parallel_for(0, B, 1, work);
  } else {
    work(0, B);
  }
  return linear_sq_norm_bound(part, S, T, d_in, d_out, route);
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
  // bf16 activations (autocast): per-example bf16 GEMMs, the clip factor applied in float32
  // (linear_bf16.cpp: its proof that no operand is rounded with the factor folded in).
  if (linear_bf16::applies(x3, dy3)) {
    at::Tensor out = dp::noise_tensor({d_out, d_in}, x.options(), noise_std, seed, offset);
    linear_bf16::add_clipped_sum_(out, x3, dy3, scale);
    return out;
  }
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
// Computed per example on worker threads (any summation order is covered): converting the whole
// (B, T, d) batch to float64 first cost 12x the float32 sum (37 vs 3.0 ms at B 32, T 128,
// d 3072, 2-core Xeon, 2026-12-02), more than the weight's norms; now 5.0 ms.
constexpr int64_t kBiasChunkBytes = int64_t{256} << 10;

at::Tensor bias_sq_norms_bound(const at::Tensor& dy3) {
  const int64_t B = dy3.size(0), T = dy3.size(1), d = dy3.size(2);
  const double u = dp::kU64;
  const auto f64 = dy3.options().dtype(at::kDouble);
  at::Tensor Q = at::empty({B}, f64), S = at::empty({B}, f64);
  double* Q_p = Q.data_ptr<double>();
  double* S_p = S.data_ptr<double>();
  // float32 rows with unit stride are read in place (each element widened exactly as it is
  // summed); other dtypes and layouts are converted kBiasChunkBytes of rows at a time, so the
  // copy stays in L2.
  const bool direct = dy3.scalar_type() == at::kFloat && dy3.stride(2) == 1;
  auto work = [&](int64_t b0, int64_t b1) {
    const int64_t chunk = std::clamp<int64_t>(kBiasChunkBytes / (8 * d), 1, T);
    at::Tensor rows = direct ? at::Tensor() : at::empty({chunk, d}, f64);
    std::vector<double> v(d);
    for (int64_t b = b0; b < b1; ++b) {
      std::fill(v.begin(), v.end(), 0.0);
      double s = 0.0;
      if (direct) {
        const float* base = dy3.const_data_ptr<float>() + b * dy3.stride(0);
        for (int64_t t = 0; t < T; ++t) {
          const float* r = base + t * dy3.stride(1);
          s += std::sqrt(dp::sum_sq64(r, d));
          for (int64_t k = 0; k < d; ++k) v[k] += static_cast<double>(r[k]);
        }
      } else {
        for (int64_t t0 = 0; t0 < T; t0 += chunk) {
          const int64_t n = std::min(chunk, T - t0);
          rows.narrow(0, 0, n).copy_(dy3[b].narrow(0, t0, n));  // exact conversion
          const double* p = rows.const_data_ptr<double>();
          for (int64_t t = 0; t < n; ++t) {
            const double* r = p + t * d;
            s += std::sqrt(dot64(r, r, d));
            for (int64_t k = 0; k < d; ++k) v[k] += r[k];
          }
        }
      }
      S_p[b] = s;
      Q_p[b] = dot64(v.data(), v.data(), d);
    }
  };
  if (B >= at::get_num_threads()) {
    at::parallel_for(0, B, 1, work);
  } else {
    work(0, B);
  }
  const at::Tensor S2 = S * S;
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

}  // namespace

TORCH_LIBRARY_IMPL(rmt, CPU, m) {
  m.impl("linear_sq_norms", &linear_sq_norms_cpu);
  m.impl("linear_clipped_noisy_sum", &linear_clipped_noisy_sum_cpu);
  m.impl("bias_sq_norms", &bias_sq_norms_cpu);
  m.impl("bias_clipped_noisy_sum", &bias_clipped_noisy_sum_cpu);
}

}  // namespace rmt
