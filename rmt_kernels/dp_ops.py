"""Compatibility name: the fused DP ops lived here before issue 13.

Public wrappers and fake impls: rmt_kernels/ops.py; layer rules: rmt_kernels/rules.py; device
(CUDA) implementations: rmt_kernels/triton/device.py. Every name that was importable from here
still is.
"""

from rmt_kernels.ops import (  # noqa: F401
    NOISE_STREAM_VERSION,
    OFFSET_STRIDE,
    add_gaussian_noise,
    bias_clipped_noisy_sum,
    bias_sq_norms,
    clip_scales,
    embedding_clipped_noisy_sum,
    embedding_sq_norms,
    layernorm_clipped_noisy_sum,
    layernorm_sq_norms,
    linear_clipped_noisy_sum,
    linear_sq_norms,
    noise_offset,
)
from rmt_kernels.rules import (  # noqa: F401
    _RULES,
    LayerRule,
    _check_embedding_module,
    _check_layernorm_module,
    _embedding_grad_output,
    get_layer_rule,
    register_layer_rule,
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

__all__ = [
    "LayerRule",
    "add_gaussian_noise",
    "bias_clipped_noisy_sum",
    "bias_sq_norms",
    "clip_scales",
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
