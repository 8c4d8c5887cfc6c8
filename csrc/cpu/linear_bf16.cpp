// Clipped sum of a Linear weight's per-example gradients from bfloat16 activations on the CPU's
// bf16 GEMM units (AMX tiles / AVX512-BF16 dot products, through MKL's cblas_gemm_bf16bf16f32,
// which libtorch_cpu exports), issue 28 item 4: under torch.autocast(bfloat16) x and dy arrive as
// bf16, and the float32 route copied both to float32 for an sgemm that runs at ~0.4x the bf16
// rate here.
//
// Method: ONE GEMM PER EXAMPLE, the clip factor applied in float32 to the float32 product:
//     out += s_b * (dy_b^T x_b)          (BLAS alpha = s_b, beta = 1, float32 accumulator)
// The output is cut into kTileRows x kTileCols tiles (kept in L2 across the B examples); each
// worker thread owns whole tiles and adds the examples in index order, so the result does not
// depend on the number of threads.
//
// Why not the float32 route's single GEMM over the B*T rows with a row-scaled operand: the bf16
// units take bf16 operands, and rounding s_b * dy_b to bf16 (2^-9 relative per entry) moves
// example b's contribution by up to 2^-9 s_b S_b, S_b = sum_t |x_t||dy_t|. The norms are
// certified on the exact bf16 values, and S_b can far exceed the norm when tokens cancel:
// ReleaseGuard (rmt_kernels/rules/release_guard.py) computes apart only the examples with
// S_b > R ref_b (R = 2^8), so an unflagged, crafted example could move the released sum by up to
// (1 + 2^-9 R) C' = 1.5 C'. tests/test_linear_bf16.py crafts such examples.
//
// Sensitivity proof (privacy invariant 6, PRIVACY.md). Let X_t, D_t be example b's rows (bf16
// values, exact), G_b = sum_t D_t X_t^T, and s_b its float32 clip factor with s_b ||G_b|| <= C'
// (the certified norms, clip_scales). For an example that passes the gate below:
//  (1) Every product D_ti X_tj of two bf16 values is exact in float32 (8 x 8 significant bits).
//  (2) The bf16 units treat subnormal inputs as zero and flush subnormal results to zero,
//      whatever MXCSR says (measured here: 2^-130 * 2^100 gives 0, 2^-70 * 2^-70 gives 0). The
//      gate admits an example only if no entry of x_b or dy_b is subnormal and the smallest
//      nonzero entries' biased exponents satisfy Ex + Ed >= 142: every bf16 entry is then an
//      integer multiple of 2^(E-134), so every product is a multiple of q = 2^(Ex+Ed-268)
//      >= 2^-126, and so is every float32 partial sum (a float32 rounding of a multiple of a
//      power of two q >= 2^-126 is again one: exact below 2^24 q, else a multiple of its ulp
//      >= q). A nonzero multiple of q is normal: flushing never fires, and the units compute
//      IEEE float32 round-to-nearest sums of exact products, in some order.
//  (3) Hence the float32 product P_b satisfies, for any summation order (Higham, Thm 3.1),
//      |P_b - G_b| <= gamma_T |D|^T |X| entrywise, so ||P_b - G_b||_F <= gamma_T S_b
//      (gamma_T = T u / (1 - T u), u = 2^-24). alpha = s_b multiplies the float32 accumulator
//      (once, or once per K block: each partial sum is bounded by |D|^T |X| too), one more
//      rounding: example b's own error is <= gamma_{T+1} s_b S_b. The self check below verifies
//      that alpha is applied to the float32 result, not folded into a bf16 operand.
//  (4) The remaining rounding, adding s_b P_b onto the running tile (noise + earlier examples),
//      is the float32 summation that the float32 route's GEMM over the B*T rows does as well.
// The float32 route's own error for example b is fl(s_b D_t) (u relative per entry) plus its
// GEMM's gamma_K: (3) is no larger. So ReleaseGuard's bound holds unchanged: an unflagged example
// (s_b S_b <= R C') moves the released sum by at most C' + gamma_{T+1} R C' plus the summation
// rounding of (4), as on the float32 route; flagged ones are computed apart in float64.
// An example that fails the gate (some |entry| below ~2^-56, or a subnormal: never seen in
// ordinary activations) is computed on its own in float32 from its exactly converted rows
// (sgemm with gradual underflow, as the float32 route) and added with alpha s_b.
#include "cpu/linear_bf16.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <mutex>
#include <vector>

// MKL's bf16 GEMM (C = alpha op(A) op(B) + beta C, float32 accumulation), exported by torch's
// MKL builds of libtorch_cpu. Weak: a torch without it leaves the pointer null and the float32
// route runs. Integers are MKL's LP64 int; enums are CBLAS_LAYOUT / CBLAS_TRANSPOSE.
extern "C" void cblas_gemm_bf16bf16f32(int layout, int transa, int transb, int m, int n, int k,
    float alpha, const uint16_t* a, int lda, const uint16_t* b, int ldb, float beta, float* c,
    int ldc) __attribute__((weak));

namespace rmt {
namespace linear_bf16 {
namespace {

constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112;

// Output tile (rows of d_out x columns of d_in), float32, 256 KiB: stays in L2 over the examples.
// 256 x 256 beat 256 x 512 (T 128: 0.42-0.51x against 0.43-0.48x, T 64: 0.58-0.64x against
// 0.53-0.65x) and 512 x 768 (0.39-0.59x, 0.69-0.78x) in the same measurement.
constexpr int64_t kTileRows = 256, kTileCols = 256;
// Biased bf16 exponents of the smallest nonzero entries of x_b and dy_b must sum to at least
// this (step (2) of the proof): products and partial sums are then multiples of 2^-126.
constexpr int kMinExponentSum = 142;

// out (m x n, ld n) += alpha a^T b, a (k x m, ld lda) and b (k x n, ld ldb) bf16.
void gemm_tn(int64_t m, int64_t n, int64_t k, float alpha, const at::BFloat16* a, int64_t lda,
    const at::BFloat16* b, int64_t ldb, float* c, int64_t ldc) {
  cblas_gemm_bf16bf16f32(kRowMajor, kTrans, kNoTrans, static_cast<int>(m), static_cast<int>(n),
      static_cast<int>(k), alpha, reinterpret_cast<const uint16_t*>(a), static_cast<int>(lda),
      reinterpret_cast<const uint16_t*>(b), static_cast<int>(ldb), 1.0f, c,
      static_cast<int>(ldc));
}

// Hardware bf16 and a GEMM that computes exactly what the proof assumes, checked once: with
// alpha = 1 + 2^-12 (not a bf16 value) on small integers the exact result is a float32 value,
// and folding alpha into a bf16 operand, or rounding the output to bf16, would change it.
bool hardware_ok() {
  if (cblas_gemm_bf16bf16f32 == nullptr) return false;
  if (!__builtin_cpu_supports("avx512bf16") && !__builtin_cpu_supports("amx-bf16")) return false;
  const float a_vals[6] = {1, 2, 3, 4, 5, 6};      // a: k = 3 rows, m = 2 columns
  const float b_vals[6] = {1, -1, 2, 0.5, -3, 4};  // b: k = 3 rows, n = 2 columns
  at::BFloat16 a[6], b[6];
  for (int i = 0; i < 6; ++i) {
    a[i] = at::BFloat16(a_vals[i]);
    b[i] = at::BFloat16(b_vals[i]);
  }
  const double alpha = 1.0 + 0x1p-12;
  float c[4] = {0.25f, 0.25f, 0.25f, 0.25f};
  gemm_tn(2, 2, 3, static_cast<float>(alpha), a, 2, b, 2, c, 2);
  for (int i = 0; i < 2; ++i) {
    for (int j = 0; j < 2; ++j) {
      double dot = 0;
      for (int t = 0; t < 3; ++t) dot += a_vals[t * 2 + i] * b_vals[t * 2 + j];
      if (static_cast<double>(c[i * 2 + j]) != 0.25 + alpha * dot) return false;
    }
  }
  return true;
}

// Smallest biased exponent over the nonzero entries of n bf16 values (0: a subnormal; 255: all
// zero, or only inf/NaN). Branch-free, so the compiler vectorises it.
int min_exponent(const at::BFloat16* p, int64_t n) {
  const uint16_t* bits = reinterpret_cast<const uint16_t*>(p);
  uint16_t lowest = 0xFF;
  for (int64_t k = 0; k < n; ++k) {
    const uint16_t magnitude = bits[k] & 0x7FFF;
    const uint16_t e = magnitude == 0 ? uint16_t{0xFF} : static_cast<uint16_t>(magnitude >> 7);
    lowest = std::min(lowest, e);
  }
  return lowest;
}

}  // namespace

bool available() {
  static std::once_flag once;
  static bool ok = false;
  std::call_once(once, [] { ok = hardware_ok(); });
  return ok;
}

bool applies(const at::Tensor& x3, const at::Tensor& dy3) {
  if (x3.scalar_type() != at::kBFloat16 || dy3.scalar_type() != at::kBFloat16) return false;
  const int64_t T = x3.size(1), d_in = x3.size(2), d_out = dy3.size(2);
  const int64_t int_max = std::numeric_limits<int>::max();
  if (T < kMinTokens || T > int_max || d_in > int_max || d_out > int_max) return false;
  return available();
}

void add_clipped_sum_(at::Tensor& out, const at::Tensor& x3_in, const at::Tensor& dy3_in,
    const at::Tensor& scale) {
  TORCH_INTERNAL_ASSERT(out.is_contiguous() && out.scalar_type() == at::kFloat);
  const at::Tensor x3 = x3_in.contiguous(), dy3 = dy3_in.contiguous();
  const int64_t B = x3.size(0), T = x3.size(1), d_in = x3.size(2), d_out = dy3.size(2);
  const at::Tensor s32 = scale.to(at::kFloat).contiguous();
  const float* s = s32.const_data_ptr<float>();
  const at::BFloat16* xp = x3.const_data_ptr<at::BFloat16>();
  const at::BFloat16* dp = dy3.const_data_ptr<at::BFloat16>();

  // The gate (proof step (2)), per example; zero-scaled examples take no part at all.
  std::vector<char> gated(B, 0);
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      if (s[b] == 0.0f) continue;
      const int ex = min_exponent(xp + b * T * d_in, T * d_in);
      const int ed = min_exponent(dp + b * T * d_out, T * d_out);
      gated[b] = ex >= 1 && ed >= 1 && ex + ed >= kMinExponentSum ? 1 : 2;
    }
  });
  std::vector<int64_t> fast, slow;
  for (int64_t b = 0; b < B; ++b) {
    if (gated[b] == 1) fast.push_back(b);
    if (gated[b] == 2) slow.push_back(b);
  }

  float* op = out.data_ptr<float>();
  const int64_t tiles_i = (d_out + kTileRows - 1) / kTileRows;
  const int64_t tiles_j = (d_in + kTileCols - 1) / kTileCols;
  if (!fast.empty()) {
    at::parallel_for(0, tiles_i * tiles_j, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t tile = t0; tile < t1; ++tile) {
        const int64_t i0 = (tile / tiles_j) * kTileRows, j0 = (tile % tiles_j) * kTileCols;
        const int64_t m = std::min(kTileRows, d_out - i0), n = std::min(kTileCols, d_in - j0);
        for (const int64_t b : fast) {
          gemm_tn(m, n, T, s[b], dp + b * T * d_out + i0, d_out, xp + b * T * d_in + j0, d_in,
              op + i0 * d_in + j0, d_in);
        }
      }
    });
  }
  for (const int64_t b : slow) {  // exact float32 conversion, sgemm with gradual underflow
    out.add_(at::mm(dy3[b].to(at::kFloat).t(), x3[b].to(at::kFloat)), s[b]);
  }
}

}  // namespace linear_bf16
}  // namespace rmt
