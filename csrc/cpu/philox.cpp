// Vectorised Philox noise: add_randn / fill_randn of philox.h. Chunks of quads go through Philox
// in one loop and through Box-Muller in a second; both loops are branch-free so the compiler
// vectorises them (needs -fno-math-errno for sqrt, set in setup.py). On x86-64 GCC builds
// AVX-512, AVX2 and baseline clones and picks one at load time. Measured 2026-11-29 on one core
// of an AVX-512 EPYC: Philox 0.57 ns and Box-Muller 0.31 ns per normal (four normals per Philox
// call, two per log/sincos); a 768 x 768 gradient's noise on 2 threads went from 1.02 ms with one
// normal per Philox call (tl.randn's layout) to 0.36 ms.
#include "cpu/philox.h"

#include <algorithm>

namespace rmt {
namespace philox {

// Quads per chunk: the word and value buffers (~12 KiB) stay in L1.
constexpr int64_t kChunk = 256;

// x86-64-v3/v4 target names need GCC 11; other compilers get the baseline loop.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 11
#define RMT_TARGET_CLONES \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define RMT_TARGET_CLONES
#endif

// Value at position p of a chunk (quad p / 4, lane p % 4), for the unaligned ends.
inline float lane_value(const float* v0, const float* v1, const float* v2, const float* v3,
    int64_t p) {
  const int64_t i = p >> 2;
  switch (p & 3) {
    case 0: return v0[i];
    case 1: return v1[i];
    case 2: return v2[i];
    default: return v3[i];
  }
}

template <bool kAccumulate>
inline void store(float* dst, float value, float noise_std) {
  *dst = kAccumulate ? *dst + noise_std * value : noise_std * value;
}

// The loop of add_randn / fill_randn over stream elements [element, element + n): whole quads
// from element & ~3, in chunks: Philox over the chunk's quads, Box-Muller over its pairs (both
// loops branch-free, so they vectorise), a scalar pass for the rare tail pairs, then the lanes
// the call owns are interleaved into `out`. A call starting or ending inside a quad computes that
// quad and uses only its own lanes.
template <bool kAccumulate>
__attribute__((always_inline)) inline void randn_loop(float* out, int64_t n, uint64_t seed,
    uint64_t element, float noise_std) {
  uint32_t w0[kChunk], w1[kChunk], w2[kChunk], w3[kChunk];
  float v0[kChunk], v1[kChunk], v2[kChunk], v3[kChunk];
  const uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  const int64_t skip = static_cast<int64_t>(element & 3);  // lanes of the first quad not ours
  const uint64_t first_quad = element >> 2;
  const int64_t total = skip + n;  // positions counted from the first quad's lane 0
  for (int64_t begin = 0; begin < total; begin += 4 * kChunk) {
    const int64_t quads = std::min(kChunk, (total - begin + 3) / 4);
    const uint64_t q0 = first_quad + static_cast<uint64_t>(begin / 4);
    for (int64_t i = 0; i < quads; ++i) {
      const uint64_t q = q0 + static_cast<uint64_t>(i);
      const Words w =
          philox4x32(static_cast<uint32_t>(q), static_cast<uint32_t>(q >> 32), 0u, 0u, k0, k1);
      w0[i] = w.c0;
      w1[i] = w.c1;
      w2[i] = w.c2;
      w3[i] = w.c3;
    }
    for (int64_t i = 0; i < quads; ++i) {
      const float r01 = radius(w0[i]), r23 = radius(w2[i]);
      float s01, c01, s23, c23;
      sincos_f32(angle(w1[i]), s01, c01);
      sincos_f32(angle(w3[i]), s23, c23);
      v0[i] = r01 * c01;
      v1[i] = r01 * s01;
      v2[i] = r23 * c23;
      v3[i] = r23 * s23;
    }
    // Tail pairs (probability 2^-20 each): untruncated radius, same angle.
    for (int64_t i = 0; i < quads; ++i) {
      if (in_tail(w0[i]) | in_tail(w2[i])) {
        const uint64_t q = q0 + static_cast<uint64_t>(i);
        float s, c;
        if (in_tail(w0[i])) {
          const float r = tail_radius(seed, q, 0, w0[i]);
          sincos_f32(angle(w1[i]), s, c);
          v0[i] = r * c;
          v1[i] = r * s;
        }
        if (in_tail(w2[i])) {
          const float r = tail_radius(seed, q, 1, w2[i]);
          sincos_f32(angle(w3[i]), s, c);
          v2[i] = r * c;
          v3[i] = r * s;
        }
      }
    }
    // Interleave the lanes the call owns into out: position p (counted from the first quad's
    // lane 0) is out[p - skip]. Whole quads in the middle go four at a time; the ends of a call
    // that starts or stops inside a quad go one by one.
    const int64_t lo = std::max(begin, skip), hi = std::min(begin + 4 * quads, total);
    const int64_t body_begin = std::min((lo + 3) & ~int64_t{3}, hi);
    const int64_t body_end = std::max(hi & ~int64_t{3}, body_begin);
    for (int64_t p = lo; p < body_begin; ++p) {
      store<kAccumulate>(out + (p - skip), lane_value(v0, v1, v2, v3, p - begin), noise_std);
    }
    float* dst = out + (body_begin - skip);
    for (int64_t i = (body_begin - begin) / 4; i < (body_end - begin) / 4; ++i, dst += 4) {
      store<kAccumulate>(dst, v0[i], noise_std);
      store<kAccumulate>(dst + 1, v1[i], noise_std);
      store<kAccumulate>(dst + 2, v2[i], noise_std);
      store<kAccumulate>(dst + 3, v3[i], noise_std);
    }
    for (int64_t p = body_end; p < hi; ++p) {
      store<kAccumulate>(out + (p - skip), lane_value(v0, v1, v2, v3, p - begin), noise_std);
    }
  }
}

RMT_TARGET_CLONES
void add_randn(float* out, int64_t n, uint64_t seed, uint64_t element, float noise_std) {
  randn_loop<true>(out, n, seed, element, noise_std);
}

RMT_TARGET_CLONES
void fill_randn(float* out, int64_t n, uint64_t seed, uint64_t element, float noise_std) {
  randn_loop<false>(out, n, seed, element, noise_std);
}

}  // namespace philox
}  // namespace rmt
