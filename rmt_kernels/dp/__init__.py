"""The DP-SGD layer: make any model built from covered layers private, with fused clipping and
noise and optional denoising."""

from rmt_kernels.dp.engine import PrivateEngine, denoise_linear_weights
from rmt_kernels.dp.make_private import make_private
from rmt_kernels.dp.optimizer import DPOptimizer

__all__ = ["DPOptimizer", "PrivateEngine", "denoise_linear_weights", "make_private"]
