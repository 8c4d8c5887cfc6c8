// Counter-based Gaussian noise, bit-for-bit the same Philox4x32-10 stream as Triton's
// `tl.randn(seed, offset)` (triton/language/random.py, Triton 3.6), so a (seed, offset) key gives
// the same noise on the CPU and on the GPU.
//
// Element counter: noise element k of a call keyed (seed, offset) is randn(seed, offset + k), with
// the 64-bit counter split into Philox words c0 = low 32 bits, c1 = high 32 bits (c2 = c3 = 0) and
// the 64-bit seed into the key (k0 = low, k1 = high). For a (rows, cols) gradient k = i * cols + j.
// Two calls never share noise as long as their counter ranges [offset, offset + numel) are
// disjoint or their seeds differ; rmt_kernels.dp_ops.noise_offset gives each (step, parameter) its
// own 2^32-wide range.
//
// Only the Philox words and the uniforms are guaranteed bit-identical; the normal passes through
// logf/cosf, whose last-ulp rounding depends on the math library (glibc here, NumPy under
// TRITON_INTERPRET=1, libdevice on a GPU), so CPU and GPU agree to a few float32 ulps.
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

// tl.randn(seed, counter): Box-Muller on the first two Philox words, cosine branch.
inline float randn(uint64_t seed, uint64_t counter) {
  const Words w = philox4x32(static_cast<uint32_t>(counter), static_cast<uint32_t>(counter >> 32),
      0u, 0u, static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
  const float u1 = std::fmax(1.0e-7f, uniform(w.c0));
  const float u2 = uniform(w.c1);
  const float theta = 6.283185307179586f * u2;
  const float radius = std::sqrt(-2.0f * std::log(u1));
  return radius * std::cos(theta);
}

}  // namespace philox
}  // namespace rmt
