// CPU kernels of the book-keeping DP ops for nn.Embedding.
//
// Example b's weight gradient has row v = sum_{t: ids_bt = v} dy_bt, so
// ||G_b||^2 = sum_{t,s} [ids_bt == ids_bs] (dy_bt . dy_bs). Two routes, neither forming a
// (num_embeddings x d) matrix per example:
//   Gram:    block of examples, bmm dy dy^T masked by id equality (T^2 d per example);
//   segment: sort each example's ids, sum the dy rows of equal ids, square (T d + T log T).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>

#include "cpu/dp_common.h"

namespace rmt {
namespace {

// The Gram route's bmm beats sort + gather + index_add up to about this sequence length
// (T^2 d against T d, but bmm runs near peak and the scatter does not). Measured 2026-11-29 on a
// 2-core AMD EPYC, d = 768, B = 32: Gram 17 ms vs segment 19 ms at T = 256, 67 vs 55 ms at
// T = 512. Also in rmt_kernels/dp_ops.py.
constexpr int64_t kEmbeddingGramMaxT = 256;

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

at::Tensor embedding_sq_norms_cpu(const at::Tensor& ids, const at::Tensor& dy) {
  constexpr const char* op = "embedding_sq_norms";
  check_ids(op, ids, dy);
  const at::Tensor ids2 = ids.dim() == 1 ? ids.unsqueeze(1) : ids;
  const at::Tensor dy3 = dp::as_sequence(dy);
  const int64_t B = dy3.size(0), T = dy3.size(1), d = dy3.size(2);
  if (T <= kEmbeddingGramMaxT) {  // T == 1 included: the Gram route is then |dy|^2
    at::Tensor out = at::empty({B}, dy.options().dtype(at::kFloat));
    const int64_t block =
        std::clamp<int64_t>(dp::kBlockBytes / (8 * (T * T + T * d)), 1, B);
    for (int64_t b0 = 0; b0 < B; b0 += block) {
      const int64_t n = std::min(block, B - b0);
      const at::Tensor ib = ids2.narrow(0, b0, n);
      const at::Tensor dyb = dy3.narrow(0, b0, n).to(at::kDouble);
      at::Tensor g = at::bmm(dyb, dyb.transpose(1, 2));
      g.mul_(ib.unsqueeze(2) == ib.unsqueeze(1));
      const at::Tensor S = dp::row_norms64(dyb).sum(1);
      out.narrow(0, b0, n).copy_(embedding_bound(g.sum({1, 2}), S, T, d, /*gram=*/true));
    }
    return out;
  }
  // Segment route: after sorting, equal ids of one example are adjacent; every example starts a
  // new segment, so segments never straddle two examples.
  const auto [sorted, perm] = ids2.sort(1);
  const at::Tensor rows = dy3.gather(1, perm.unsqueeze(2).expand({B, T, d}))
                              .reshape({B * T, d})
                              .to(at::kDouble);
  at::Tensor starts = at::ones({B, T}, ids.options().dtype(at::kBool));
  starts.narrow(1, 1, T - 1).copy_(sorted.narrow(1, 1, T - 1) != sorted.narrow(1, 0, T - 1));
  const at::Tensor flat_starts = starts.reshape({B * T});
  const at::Tensor segment = flat_starts.cumsum(0) - 1;
  const int64_t segments = flat_starts.sum().item<int64_t>();
  const at::Tensor sums = at::zeros({segments, d}, rows.options()).index_add_(0, segment, rows);
  const at::Tensor example =
      at::arange(B, ids.options().dtype(at::kLong)).repeat_interleave(T).masked_select(flat_starts);
  const at::Tensor Q = at::zeros({B}, rows.options()).index_add_(0, example, sums.square().sum(1));
  const at::Tensor S = dp::row_norms64(rows.view({B, T, d})).sum(1);
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
