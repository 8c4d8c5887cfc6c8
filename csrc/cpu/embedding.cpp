// CPU kernels of the book-keeping DP ops for nn.Embedding.
//
// Example b's weight gradient has row v = sum_{t: ids_bt = v} dy_bt, so
// ||G_b||^2 = sum_{t,s} [ids_bt == ids_bs] (dy_bt . dy_bs). Two routes, neither forming a
// (num_embeddings x d) matrix per example:
//   Gram:    dy dy^T masked by id equality (T^2 d per example; the device path for T <= 256);
//   segment: sort each example's ids, sum the dy rows of equal ids, square (T d + T log T).
// The CPU kernel takes the segment route for every T, one example per worker thread.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "cpu/dp_common.h"

namespace rmt {
namespace {

// The CPU norms take the segment route at every T, per example on worker threads: a sort of T
// ids and one float64 pass over the rows, T d work against the Gram route's T^2 d. The ATen
// formulation (sort, gather, index_add over the batch) lost to a bmm Gram up to T = 256; done
// per example in place it wins everywhere. 2-core Xeon, 2026-12-02, d 768, half the positions
// one padding id: B 32, T 128 1.4 ms against 3.7 ms for the uncertified float32 Gram blocks and
// 33 ms for the float64 ones (minima); T 512: 11 against 74 and 172 ms. The device path keeps
// its own rule (EMBEDDING_GRAM_MAX_T in rmt_kernels/triton/device.py).

void check_ids(const char* op, const at::Tensor& ids, const at::Tensor& dy) {
  const auto dtype = ids.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kLong || dtype == at::kInt, op,
      ": ids must be int64 or int32 token ids, got ", dtype);
  TORCH_CHECK_VALUE(ids.dim() == 1 || ids.dim() == 2, op,
      ": ids must have 1 (B,) or 2 (B, T) dimensions, got ", ids.dim());
  TORCH_CHECK_VALUE(dy.dim() == ids.dim() + 1, op, ": dy must have ", ids.dim() + 1,
      " dimensions (ids' shape + d), got ", dy.dim());
  TORCH_CHECK_VALUE(ids.size(0) > 0, op, ": empty batch: ids has shape ", ids.sizes());
  TORCH_CHECK_VALUE(dy.size(0) == ids.size(0), op, ": dy must have the batch size of ids (",
      ids.size(0), "), got ", dy.size(0));
  if (ids.dim() == 2) {
    TORCH_CHECK_VALUE(dy.size(1) == ids.size(1), op, ": dy must have the sequence length of ids (",
        ids.size(1), "), got ", dy.size(1));
  }
  for (int64_t d = 0; d < dy.dim(); ++d) {
    TORCH_CHECK_VALUE(dy.size(d) > 0, op, ": dy must not have an empty dimension, got ",
        dy.sizes());
  }
  dp::check_float(op, "dy", dy);
}

// Certified bounds (dp_common.h), float64 from exactly converted dy; S = sum_t |dy_t| bounds
// the norm (triangle inequality: ||G_b||_F <= sum_t |dy_t|), u = 2^-53:
//   Gram:    G^dy_ts off by <= gamma_d |dy_t||dy_s|, the masked sum by gamma_{T^2}:
//            bound = P^ + 2 (d + 3T^2 + 3T + 8) u S^2;
//   segment: each row sum v^ off by <= gamma_T sum_{t in v} |dy_t| in norm, Q = fl(sum_v |v^|^2):
//            bound = Q (1 + 2 (d + T + 2) u) + 4 (T + 1) u S^2;
//   trivial: S^2 (1 + 3 (d + T + 8) u).
at::Tensor embedding_bound(const at::Tensor& route_part, const at::Tensor& S, int64_t T,
    int64_t d, bool gram) {
  const double u = dp::kU64;
  const at::Tensor S2 = S * S;
  const double Td = static_cast<double>(T), dd = static_cast<double>(d);
  const at::Tensor route =
      gram ? route_part + S2 * (2.0 * (dd + 3.0 * Td * Td + 3.0 * Td + 8.0) * u)
           : route_part * (1.0 + 2.0 * (dd + Td + 2.0) * u) + S2 * (4.0 * (Td + 1.0) * u);
  const at::Tensor trivial = S2 * (1.0 + 3.0 * (dd + Td + 8.0) * u);
  return dp::certified(route, trivial, at::isfinite(S));
}

// Example b: Q = sum over distinct ids of |sum of their dy rows|^2 and S = sum_t |dy_t|, float64.
// `row(t)` points at dy_t (float or double, unit stride). A singleton id's |v|^2 is its row's
// sum of squares, shared with S.
template <typename scalar_t, typename Row>
void segment_sums(const int64_t* id, int64_t T, int64_t d, Row row, std::vector<int64_t>& order,
    std::vector<double>& v, double* Q, double* S) {
  for (int64_t t = 0; t < T; ++t) order[t] = t;
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return id[a] < id[b]; });
  double q = 0.0, s = 0.0;
  for (int64_t g0 = 0; g0 < T;) {
    int64_t g1 = g0 + 1;
    while (g1 < T && id[order[g1]] == id[order[g0]]) ++g1;
    if (g1 == g0 + 1) {
      const double ss = dp::sum_sq64(row(order[g0]), d);
      s += std::sqrt(ss);
      q += ss;
    } else {
      std::fill(v.begin(), v.end(), 0.0);
      for (int64_t i = g0; i < g1; ++i) {
        const scalar_t* r = row(order[i]);
        s += std::sqrt(dp::sum_sq64(r, d));
        for (int64_t k = 0; k < d; ++k) v[k] += static_cast<double>(r[k]);
      }
      q += dp::sum_sq64(v.data(), d);
    }
    g0 = g1;
  }
  *Q = q;
  *S = s;
}

at::Tensor embedding_sq_norms_cpu(const at::Tensor& ids, const at::Tensor& dy) {
  constexpr const char* op = "embedding_sq_norms";
  check_ids(op, ids, dy);
  const at::Tensor ids2 = (ids.dim() == 1 ? ids.unsqueeze(1) : ids).to(at::kLong).contiguous();
  const at::Tensor dy3 = dp::as_sequence(dy);
  const int64_t B = dy3.size(0), T = dy3.size(1), d = dy3.size(2);
  const auto f64 = dy.options().dtype(at::kDouble);
  at::Tensor Q = at::empty({B}, f64), S = at::empty({B}, f64);
  double* Q_p = Q.data_ptr<double>();
  double* S_p = S.data_ptr<double>();
  const int64_t* id_p = ids2.const_data_ptr<int64_t>();
  // float32 rows with unit stride are read in place (widened exactly as summed); other dtypes
  // and layouts are converted per example into a reused float64 buffer (exact).
  const bool direct = dy3.scalar_type() == at::kFloat && dy3.stride(2) == 1;
  auto work = [&](int64_t b0, int64_t b1) {
    std::vector<int64_t> order(T);
    std::vector<double> v(d);
    at::Tensor buf = direct ? at::Tensor() : at::empty({T, d}, f64);
    for (int64_t b = b0; b < b1; ++b) {
      if (direct) {
        const float* base = dy3.const_data_ptr<float>() + b * dy3.stride(0);
        const int64_t st = dy3.stride(1);
        segment_sums<float>(id_p + b * T, T, d, [&](int64_t t) { return base + t * st; }, order,
            v, &Q_p[b], &S_p[b]);
      } else {
        buf.copy_(dy3[b]);
        const double* base = buf.const_data_ptr<double>();
        segment_sums<double>(id_p + b * T, T, d, [&](int64_t t) { return base + t * d; }, order,
            v, &Q_p[b], &S_p[b]);
      }
    }
  };
  if (B >= at::get_num_threads()) {
    at::parallel_for(0, B, 1, work);
  } else {
    work(0, B);
  }
  return embedding_bound(Q, S, T, d, /*gram=*/false);
}

at::Tensor embedding_clipped_noisy_sum_cpu(const at::Tensor& ids, const at::Tensor& dy,
    const at::Tensor& scale, int64_t num_embeddings, double noise_std, int64_t seed,
    int64_t offset) {
  constexpr const char* op = "embedding_clipped_noisy_sum";
  check_ids(op, ids, dy);
  const int64_t B = dy.size(0), d = dy.size(-1);
  TORCH_CHECK_VALUE(num_embeddings > 0, op, ": num_embeddings must be > 0, got ", num_embeddings);
  TORCH_CHECK_VALUE(
      ((ids >= 0) & (ids < num_embeddings)).all().item<bool>(), op,
      ": ids must lie in [0, num_embeddings = ", num_embeddings, ")");
  dp::check_scale(op, scale, B);
  dp::check_noise(op, noise_std, seed, offset, num_embeddings * d);
  const at::Tensor dy3 = dp::as_sequence(dy);
  const at::Tensor rows =
      (dp::drop_zero_scaled(dy3, scale).to(at::kFloat) * scale.to(at::kFloat).view({B, 1, 1}))
          .reshape({-1, d});
  // The table starts as noise and the scaled rows are scattered onto it: one pass over the
  // (num_embeddings x d) output instead of zero-fill plus noise.
  at::Tensor out =
      dp::noise_tensor({num_embeddings, d}, dy.options(), noise_std, seed, offset);
  return out.index_add_(0, ids.reshape({-1}), rows);
}

}  // namespace

TORCH_LIBRARY_IMPL(rmt, CPU, m) {
  m.impl("embedding_sq_norms", &embedding_sq_norms_cpu);
  m.impl("embedding_clipped_noisy_sum", &embedding_clipped_noisy_sum_cpu);
}

}  // namespace rmt
