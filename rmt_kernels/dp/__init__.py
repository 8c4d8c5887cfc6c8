"""The DP-SGD layer: make any model built from covered layers private, with fused clipping and
noise and optional denoising."""

from rmt_kernels.dp.capture import LayoutError
from rmt_kernels.dp.checkpoint import (
    CheckpointError,
    ResumeWarning,
    attach_ledger,
    checkpoint_extra,
    dataset_fingerprint,
    load_checkpoint,
    save_checkpoint,
)
from rmt_kernels.dp.distributed import PoissonSampler
from rmt_kernels.dp.engine import PrivateEngine, denoise_linear_weights
from rmt_kernels.dp.make_private import make_private
from rmt_kernels.dp.optimizer import DPOptimizer

__all__ = [
    "CheckpointError",
    "DPOptimizer",
    "LayoutError",
    "PoissonSampler",
    "PrivateEngine",
    "ResumeWarning",
    "attach_ledger",
    "checkpoint_extra",
    "dataset_fingerprint",
    "denoise_linear_weights",
    "load_checkpoint",
    "make_private",
    "save_checkpoint",
]
