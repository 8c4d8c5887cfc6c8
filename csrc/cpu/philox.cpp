// Vectorised Philox noise: add_randn of philox.h. Chunks of counters go through Philox in one
// loop and through Box-Muller in a second; both loops are branch-free so the compiler
// vectorises them (needs -fno-math-errno for sqrt, set in setup.py). On x86-64 GCC builds
// AVX-512, AVX2 and baseline clones and picks one at load time: 2.5 ns per element per core on
// an AVX-512 EPYC against 30 ns for the scalar glibc logf/cosf loop (measured 2026-11-29).
#include "cpu/philox.h"

#include <algorithm>

namespace rmt {
namespace philox {

// Counters per chunk: the two word buffers (2 KiB) stay in L1.
constexpr int64_t kChunk = 256;

// x86-64-v3/v4 target names need GCC 11; other compilers get the baseline loop.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 11
#define RMT_TARGET_CLONES \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define RMT_TARGET_CLONES
#endif

// The loop of add_randn / fill_randn: Philox over a chunk of counters, then Box-Muller.
template <bool kAccumulate>
__attribute__((always_inline)) inline void randn_loop(float* out, int64_t n, uint64_t seed,
    uint64_t counter, float noise_std) {
  uint32_t w0[kChunk], w1[kChunk], w2[kChunk];
  float values[kChunk];
  const uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int64_t begin = 0; begin < n; begin += kChunk) {
    const int64_t m = std::min(kChunk, n - begin);
    for (int64_t i = 0; i < m; ++i) {
      const uint64_t c = counter + static_cast<uint64_t>(begin + i);
      const Words w = philox4x32(
          static_cast<uint32_t>(c), static_cast<uint32_t>(c >> 32), 0u, 0u, k0, k1);
      w0[i] = w.c0;
      w1[i] = w.c1;
      w2[i] = w.c2;
    }
    for (int64_t i = 0; i < m; ++i) values[i] = box_muller(w0[i], w1[i]);
    // The rare tail draws (probability 2^-20 each) get their untruncated value in a scalar pass,
    // which keeps the loop above branch-free and vectorised.
    for (int64_t i = 0; i < m; ++i) {
      if (in_tail(w0[i])) values[i] = tail_normal(w0[i], w1[i], w2[i]);
    }
    float* dst = out + begin;
    for (int64_t i = 0; i < m; ++i) {
      const float value = noise_std * values[i];
      dst[i] = kAccumulate ? dst[i] + value : value;
    }
  }
}

RMT_TARGET_CLONES
void add_randn(float* out, int64_t n, uint64_t seed, uint64_t counter, float noise_std) {
  randn_loop<true>(out, n, seed, counter, noise_std);
}

RMT_TARGET_CLONES
void fill_randn(float* out, int64_t n, uint64_t seed, uint64_t counter, float noise_std) {
  randn_loop<false>(out, n, seed, counter, noise_std);
}

}  // namespace philox
}  // namespace rmt
