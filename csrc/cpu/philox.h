// Counter-based Gaussian noise, bit-for-bit the same Philox4x32-10 stream as Triton's
// `tl.randn(seed, offset)` (triton/language/random.py, Triton 3.6) with untruncated tails
// (randn_wide of rmt_kernels/triton/gaussian.py, see tail_normal below), so a (seed, offset) key
// gives the same noise on the CPU and on the GPU.
//
// Element counter: noise element k of a call keyed (seed, offset) is randn(seed, offset + k), with
// the 64-bit counter split into Philox words c0 = low 32 bits, c1 = high 32 bits (c2 = c3 = 0) and
// the 64-bit seed into the key (k0 = low, k1 = high). For a (rows, cols) gradient k = i * cols + j.
// Two calls never share noise as long as their counter ranges [offset, offset + numel) are
// disjoint or their seeds differ; rmt_kernels.dp_ops.noise_offset gives each (step, parameter) its
// own 2^32-wide range.
//
// Only the Philox words and the uniforms are guaranteed bit-identical; the normal passes through
// log and cos, whose last-ulp rounding depends on the implementation (Cephes polynomials here,
// NumPy under TRITON_INTERPRET=1, the GPU's math library), so CPU and GPU agree to a few float32
// ulps: measured max |difference| 4.8e-7 over 4M draws against glibc, < 4e-6 tested vs Triton.
#pragma once

#include <cmath>
#include <cstdint>

namespace rmt {
namespace philox {

constexpr uint32_t kKeyA = 0x9E3779B9u;
constexpr uint32_t kKeyB = 0xBB67AE85u;
constexpr uint32_t kRoundA = 0xD2511F53u;
constexpr uint32_t kRoundB = 0xCD9E8D57u;
constexpr int kRounds = 10;

struct Words {
  uint32_t c0, c1, c2, c3;
};

// philox_impl of triton/language/random.py, 32-bit branch.
inline Words philox4x32(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0,
    uint32_t k1) {
  for (int round = 0; round < kRounds; ++round) {
    const uint64_t prod_b = static_cast<uint64_t>(kRoundB) * c2;
    const uint64_t prod_a = static_cast<uint64_t>(kRoundA) * c0;
    const uint32_t next_c0 = static_cast<uint32_t>(prod_b >> 32) ^ c1 ^ k0;
    const uint32_t next_c2 = static_cast<uint32_t>(prod_a >> 32) ^ c3 ^ k1;
    c1 = static_cast<uint32_t>(prod_b);
    c3 = static_cast<uint32_t>(prod_a);
    c0 = next_c0;
    c2 = next_c2;
    k0 += kKeyA;
    k1 += kKeyB;
  }
  return {c0, c1, c2, c3};
}

// uint_to_uniform_float (32-bit branch): fold the sign so the result lies in [0, 1). Triton's
// `-x - 1` for negative x equals ~x in two's complement, without the signed overflow at INT_MIN.
inline float uniform(uint32_t bits) {
  int32_t x = static_cast<int32_t>(bits);
  if (x < 0) x = ~x;
  return static_cast<float>(x) * 4.6566127342e-10f;
}

inline uint32_t float_bits(float f) { return __builtin_bit_cast(uint32_t, f); }
inline float bits_float(uint32_t u) { return __builtin_bit_cast(float, u); }

// max(1e-7, u) of pair_uniform_to_normal, as an integer max of the bit patterns (equal for
// non-negative floats): float selects block GCC's vectoriser without -ffast-math.
inline float clamp_uniform(float u) {
  const uint32_t bits = float_bits(u), floor_bits = float_bits(1.0e-7f);
  return bits_float(bits > floor_bits ? bits : floor_bits);
}

// Natural log of a positive normal float (Cephes logf, ~1 ulp). Written branch-free, with
// integer masks rather than float selects, so that a loop over it vectorises; glibc's logf does
// not, and it was half of the noise cost.
inline float log_f32(float x) {
  const uint32_t bits = float_bits(x);
  float e = static_cast<float>(static_cast<int32_t>(bits >> 23) - 127);
  float m = bits_float((bits & 0x007fffffu) | 0x3f800000u);  // x = m * 2^e, m in [1, 2)
  const int32_t big = m > 1.41421356f;                        // fold m into [sqrt(1/2), sqrt(2))
  m *= 1.0f - 0.5f * static_cast<float>(big);
  e += static_cast<float>(big);
  const float f = m - 1.0f, z = f * f;
  float y = 7.0376836292e-2f;
  y = y * f - 1.1514610310e-1f;
  y = y * f + 1.1676998740e-1f;
  y = y * f - 1.2420140846e-1f;
  y = y * f + 1.4249322787e-1f;
  y = y * f - 1.6668057665e-1f;
  y = y * f + 2.0000714765e-1f;
  y = y * f - 2.4999993993e-1f;
  y = y * f + 3.3333331174e-1f;
  y = y * f * z;
  y += -2.12194440e-4f * e;  // log(2) split in two for an exact e * log(2)
  y += -0.5f * z;
  return (f + y) + 0.693359375f * e;
}

// Cosine for 0 <= x < 8192 (Cephes cosf: octant reduction with a three-part pi/4, ~1 ulp),
// branch-free for the same reason as log_f32. Box-Muller only needs [0, 2 pi).
inline float cos_f32(float x) {
  int32_t j = static_cast<int32_t>(x * 1.27323954473516f);  // octant, x * 4 / pi
  j += j & 1;
  const float y = static_cast<float>(j);
  j &= 7;
  const int32_t upper = j >> 2;  // octants 4..7: cos(x - pi) = -cos(x)
  j -= 4 * upper;
  const int32_t flips = upper + (j >> 1);  // octants 2, 3: -sin / -cos
  const float sign = 1.0f - 2.0f * static_cast<float>(flips & 1);
  const float r = ((x - y * 0.78515625f) - y * 2.4187564849853515625e-4f) -
                  y * 3.77489497744594108e-8f;
  const float z = r * r;
  const float c = ((2.443315711809948e-5f * z - 1.388731625493765e-3f) * z +
                      4.166664568298827e-2f) * z * z - 0.5f * z + 1.0f;
  const float s = ((-1.9515295891e-4f * z + 8.3321608736e-3f) * z - 1.6666654611e-1f) * z * r + r;
  const int32_t use_sin = (j == 1) | (j == 2);
  const float pick = static_cast<float>(use_sin);
  return sign * (pick * s + (1.0f - pick) * c);
}

// pair_uniform_to_normal, cosine branch, from the first two Philox words.
inline float box_muller(uint32_t w0, uint32_t w1) {
  const float u1 = clamp_uniform(uniform(w0));
  const float theta = 6.283185307179586f * uniform(w1);
  return std::sqrt(-2.0f * log_f32(u1)) * cos_f32(theta);
}

// Untruncated tails (rmt_kernels/triton/gaussian.py, randn_wide): tl.randn's radius comes from
// one 32-bit uniform clamped at 1e-7, so |z| <= 5.68, a truncated Gaussian that the Gaussian
// mechanism's analysis does not cover. Where the first word's folded 31-bit value is below
// kTailBits (u1 < 2^-20, probability 2^-20) the radius instead comes from a 63-bit uniform built
// with the third word, in double: |z| <= 9.4, tail mass ~1e-20.
constexpr int32_t kTailBits = 2048;

inline int32_t folded(uint32_t bits) {
  const int32_t x = static_cast<int32_t>(bits);
  return x < 0 ? ~x : x;
}

inline bool in_tail(uint32_t w0) { return folded(w0) < kTailBits; }

inline float tail_normal(uint32_t w0, uint32_t w1, uint32_t w2) {
  const double u = (static_cast<double>(folded(w0)) * 4294967296.0 + static_cast<double>(w2) +
                       0.5) * 0x1p-63;
  const float radius = static_cast<float>(std::sqrt(-2.0 * std::log(u)));
  return radius * cos_f32(6.283185307179586f * uniform(w1));
}

// randn_wide(seed, counter): tl.randn(seed, counter) with untruncated tails.
inline float randn(uint64_t seed, uint64_t counter) {
  const Words w = philox4x32(static_cast<uint32_t>(counter), static_cast<uint32_t>(counter >> 32),
      0u, 0u, static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
  return in_tail(w.c0) ? tail_normal(w.c0, w.c1, w.c2) : box_muller(w.c0, w.c1);
}

// out[k] += noise_std * randn(seed, counter + k) for k in [0, n): the vectorised form of randn,
// same values (philox.cpp).
void add_randn(float* out, int64_t n, uint64_t seed, uint64_t counter, float noise_std);
// out[k] = noise_std * randn(seed, counter + k): for outputs that start as noise and are then
// accumulated into (saves a zero-fill and a pass).
void fill_randn(float* out, int64_t n, uint64_t seed, uint64_t counter, float noise_std);

}  // namespace philox
}  // namespace rmt
