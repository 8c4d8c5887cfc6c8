"""Compatibility name: the fused DP ops lived here before issue 13.

Public wrappers and fake impls: rmt_kernels/ops.py; layer rules: rmt_kernels/rules.py; device
(CUDA) implementations: rmt_kernels/triton/device.py. Every name that was importable from here
still is.
"""

from rmt_kernels import ops, rules
from rmt_kernels.ops import *  # noqa: F403
from rmt_kernels.ops import NOISE_STREAM_VERSION, OFFSET_STRIDE  # noqa: F401
from rmt_kernels.rules import *  # noqa: F403
from rmt_kernels.rules import (  # noqa: F401
    _RULES,
    _check_embedding_module,
    _check_layernorm_module,
    _embedding_grad_output,
)
from rmt_kernels.triton.device import (  # noqa: F401
    BLOCK_BYTES,
    EMBEDDING_GRAM_MAX_T,
    U64,
    add_gaussian_noise_device,
    bias_clipped_noisy_sum_device,
    bias_sq_norms_device,
    embedding_clipped_noisy_sum_device,
    embedding_sq_norms_device,
    layernorm_clipped_noisy_sum_device,
    layernorm_sq_norms_device,
    linear_clipped_noisy_sum_device,
    linear_sq_norm_bound,
    linear_sq_norms_device,
    use_gram_route,
)

__all__ = [name for name in [*ops.__all__, *rules.__all__] if not name.startswith("denoise")]
