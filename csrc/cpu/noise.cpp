// CPU kernel of rmt::add_gaussian_noise: noise for a gradient computed elsewhere (a custom layer
// rule). The stream is specified once, in csrc/cpu/philox.h.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "cpu/dp_common.h"

namespace rmt {
namespace {

// float32 copy of x + noise, element k of the row-major flattening using counter offset + k.
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
  m.impl("add_gaussian_noise", &add_gaussian_noise_cpu);
}

}  // namespace rmt
