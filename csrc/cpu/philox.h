// Counter-based Gaussian noise: the one written specification of the DP noise stream (every other
// description points here). Every CPU kernel draws it; the Triton kernels draw the same values
// (rmt_kernels/triton/gaussian.py, dp_randn), so a (seed, offset) key gives the same noise on the
// CPU and on the GPU.
//
// The stream. Noise element e (a 64-bit index; a call keyed (seed, offset) gives its element k
// the stream element e = offset + k, so for a (rows, cols) gradient e = offset + i * cols + j)
// lies in quad q = e >> 2, lane l = e & 3. One Philox4x32-10 call per quad, key (low, high 32
// bits of seed), counter (low, high 32 bits of q, 0, 0), gives four words w0..w3 (Triton's
// `tl.randint4x(seed, q)`). Lanes 0 and 1 are the Box-Muller pair of (w0, w1), lanes 2 and 3
// that of (w2, w3): r cos(theta) and r sin(theta) with r = sqrt(-2 ln u(w_first)) and
// theta = 2 pi u(w_second), u the folded 31-bit uniform of tl.randn. Four normals per Philox call
// and two per log/sqrt/sincos, where tl.randn spends one call and one log/sqrt/cos per normal:
// 2.8x faster on the CPU with the same vectorised loops (768 x 768 noise on 2 threads, 1.02 ->
// 0.36 ms, measured 2026-11-29), the same Box-Muller arithmetic otherwise.
//
// Untruncated tails: tl.randn clamps u at 1e-7, so |z| <= 5.68, a truncated Gaussian that the
// Gaussian mechanism's analysis does not cover. Where a pair's first word folds below kTailBits
// (u < 2^-20, probability 2^-20) its radius comes from a 63-bit uniform in double: those 11 bits
// above word p of a second Philox call on counter (low q, high q, 1, 0) (p = the pair's index in
// the quad; c2 = 1 never occurs in the main stream, so these bits are fresh). |z| <= 9.4, tail
// mass ~1e-20.
//
// Two calls never share noise as long as their element ranges [offset, offset + numel) are
// disjoint or their seeds differ (a quad may straddle two calls; each uses its own lanes);
// rmt_kernels.noise_offset gives each (step, parameter) its own 2^32-wide range.
//
// Philox words and uniforms are bit-identical across backends; the normals pass through log,
// sin and cos, whose last-ulp rounding depends on the implementation (Cephes polynomials here,
// NumPy under TRITON_INTERPRET=1, the GPU's math library), so CPU and GPU agree to a few float32
// ulps (tested to 4e-6).
#pragma once

#include <cmath>
#include <cstdint>

namespace rmt {
namespace philox {

// Version of the stream's definition above. 1 was tl.randn's layout (one normal per Philox call);
// 2 is the quad layout. Change it with any change to the values drawn: checkpoints record it
// (rmt_kernels.ops.NOISE_STREAM_VERSION reads it) and refuse to resume under another.
constexpr int kNoiseStreamVersion = 2;

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

// Sine and cosine for 0 <= x < 8192 (Cephes sinf/cosf: octant reduction with a three-part pi/4,
// ~1 ulp), branch-free, with integer masks rather than float selects, for the same reason as
// log_f32. Box-Muller only needs [0, 2 pi).
inline void sincos_f32(float x, float& sin_out, float& cos_out) {
  int32_t j = static_cast<int32_t>(x * 1.27323954473516f);  // octant, x * 4 / pi
  j += j & 1;
  const float y = static_cast<float>(j);
  j &= 7;
  // cos: octants 4..7 are cos(x - pi) = -cos(x); within 0..3, octants 2, 3 flip again.
  // sin: octants 4..7 are -sin; the polynomial pair swaps in octants 1, 2 for both.
  const int32_t upper = j >> 2;
  const int32_t jj = j - 4 * upper;
  const float cos_sign = 1.0f - 2.0f * static_cast<float>((upper + (jj >> 1)) & 1);
  const float sin_sign = 1.0f - 2.0f * static_cast<float>(upper);
  const float r = ((x - y * 0.78515625f) - y * 2.4187564849853515625e-4f) -
                  y * 3.77489497744594108e-8f;
  const float z = r * r;
  const float c = ((2.443315711809948e-5f * z - 1.388731625493765e-3f) * z +
                      4.166664568298827e-2f) * z * z - 0.5f * z + 1.0f;
  const float s = ((-1.9515295891e-4f * z + 8.3321608736e-3f) * z - 1.6666654611e-1f) * z * r + r;
  const float swap = static_cast<float>((jj == 1) | (jj == 2));
  cos_out = cos_sign * (swap * s + (1.0f - swap) * c);
  sin_out = sin_sign * (swap * c + (1.0f - swap) * s);
}

// Box-Muller radius of a pair outside the tail: sqrt(-2 ln u), u from the pair's first word.
inline float radius(uint32_t first) {
  return std::sqrt(-2.0f * log_f32(clamp_uniform(uniform(first))));
}

// Box-Muller angle of a pair: 2 pi u, u from the pair's second word.
inline float angle(uint32_t second) { return 6.283185307179586f * uniform(second); }

constexpr int32_t kTailBits = 2048;

inline int32_t folded(uint32_t bits) {
  const int32_t x = static_cast<int32_t>(bits);
  return x < 0 ? ~x : x;
}

inline bool in_tail(uint32_t first) { return folded(first) < kTailBits; }

// The words of quad q (main stream, c2 = 0) or of its tail extension (c2 = 1).
inline Words quad_words(uint64_t seed, uint64_t quad, uint32_t c2) {
  return philox4x32(static_cast<uint32_t>(quad), static_cast<uint32_t>(quad >> 32), c2, 0u,
      static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
}

// Radius of pair `pair` (0 or 1) of quad q whose first word is in the tail: 63-bit uniform from
// its 11 folded bits and word `pair` of the extension call, in double.
inline float tail_radius(uint64_t seed, uint64_t quad, int pair, uint32_t first) {
  const Words ext = quad_words(seed, quad, 1u);
  const uint32_t low = pair == 0 ? ext.c0 : ext.c1;
  const double u = (static_cast<double>(folded(first)) * 4294967296.0 + static_cast<double>(low) +
                       0.5) * 0x1p-63;
  return static_cast<float>(std::sqrt(-2.0 * std::log(u)));
}

// Stream element e, one at a time (the reference the vectorised loops reproduce).
inline float randn(uint64_t seed, uint64_t element) {
  const uint64_t quad = element >> 2;
  const int lane = static_cast<int>(element & 3);
  const int pair = lane >> 1;
  const Words w = quad_words(seed, quad, 0u);
  const uint32_t first = pair == 0 ? w.c0 : w.c2, second = pair == 0 ? w.c1 : w.c3;
  const float r = in_tail(first) ? tail_radius(seed, quad, pair, first) : radius(first);
  float s, c;
  sincos_f32(angle(second), s, c);
  return r * ((lane & 1) ? s : c);
}

// out[k] += noise_std * randn(seed, element + k) for k in [0, n): the vectorised form of randn,
// same values (philox.cpp).
void add_randn(float* out, int64_t n, uint64_t seed, uint64_t element, float noise_std);
// out[k] = noise_std * randn(seed, element + k): for outputs that start as noise and are then
// accumulated into (saves a zero-fill and a pass).
void fill_randn(float* out, int64_t n, uint64_t seed, uint64_t element, float noise_std);

}  // namespace philox
}  // namespace rmt
