"""rmt-kernels: fast random-matrix-theory denoising and fused kernels for DP fine-tuning.

Importing the package loads the C++ extension, which registers the ``torch.ops.rmt`` library
(schemas and CPU kernels); :mod:`rmt_kernels.ops` adds the public wrappers and the fake (meta)
implementations, :mod:`rmt_kernels.rules` the layer rules, and :mod:`rmt_kernels.triton.register`
the CUDA kernels built from Triton.
"""

# torch first: the extension links against libc10/libtorch, which only torch's import loads;
# without it `import rmt_kernels` (or `from rmt_kernels.opacus import ...`) as a program's first
# import fails with "libc10.so: cannot open shared object file".
import torch  # noqa: F401

from rmt_kernels import (
    _C,  # noqa: F401  (registers torch.ops.rmt.*)
    dp_ops,  # noqa: F401  (compatibility name of the DP ops)
)
from rmt_kernels.ops import (
    add_gaussian_noise,
    bias_clipped_noisy_sum,
    bias_sq_norms,
    clip_scales,
    denoise,
    denoise_many,
    embedding_clipped_noisy_sum,
    embedding_sq_norms,
    layernorm_clipped_noisy_sum,
    layernorm_sq_norms,
    linear_clipped_noisy_sum,
    linear_sq_norms,
    noise_offset,
)
from rmt_kernels.rules import LayerRule, get_layer_rule, register_layer_rule
from rmt_kernels.triton import register as _register  # noqa: F401  (CUDA kernels)

__all__ = [
    "LayerRule",
    "add_gaussian_noise",
    "bias_clipped_noisy_sum",
    "bias_sq_norms",
    "clip_scales",
    "denoise",
    "denoise_many",
    "embedding_clipped_noisy_sum",
    "embedding_sq_norms",
    "get_layer_rule",
    "layernorm_clipped_noisy_sum",
    "layernorm_sq_norms",
    "linear_clipped_noisy_sum",
    "linear_sq_norms",
    "noise_offset",
    "register_layer_rule",
]
__version__ = "0.1.0"
