"""The DP-SGD layer: make any model built from covered layers private, with fused clipping and
noise and optional denoising.

Where things are: make_private.py (the entry point), engine.py (the private step as a template:
clip and accumulate, add noise, all-reduce, post-process, write gradients, account),
layout_verification.py (the one-time check that dim 0 of every tracked layer is the example),
noise_key.py (the noise seed, its ledger stream id, re-keying), param_guards.py (only the
privatised parameters are trained, each only through its own module), stages/ (the
post-processing stages of the released gradient, shared with rmt_kernels.opacus: their protocol,
the denoise options, the Denoiser, the chain, temporal filters, DP-Adam, trajectory shrinkage,
their checkpoint state), optimizer.py (DPOptimizer), checkpoint.py (checkpoints and resume,
through the engine's state_dict), checkpoint_file.py (their file format), ledger.py (the privacy
ledger), data_fingerprint.py (what names the training data of a checkpoint), capture.py (the
hooks), distributed.py (ranks, Poisson sampling)."""

from rmt_kernels.dp.capture import LayoutError
from rmt_kernels.dp.checkpoint import (
    ResumeWarning,
    attach_ledger,
    checkpoint_extra,
    load_checkpoint,
    save_checkpoint,
)
from rmt_kernels.dp.checkpoint_file import CheckpointError
from rmt_kernels.dp.data_fingerprint import dataset_fingerprint
from rmt_kernels.dp.distributed import PoissonSampler
from rmt_kernels.dp.engine import PrivateEngine
from rmt_kernels.dp.make_private import make_private
from rmt_kernels.dp.optimizer import DPOptimizer
from rmt_kernels.dp.stages.denoiser import Denoiser, denoise_linear_weights
from rmt_kernels.dp.stages.dp_adam import DPAdam
from rmt_kernels.dp.stages.options import DenoiseOptions, check_denoise_options
from rmt_kernels.dp.stages.protocol import PostProcessor
from rmt_kernels.dp.stages.temporal import (
    DiSKExtrapolation,
    DiSKFilter,
    EMAFilter,
    disk_noise_std,
    ema_noise_std,
)
from rmt_kernels.dp.stages.trajectory import TrajectoryDenoiser

__all__ = [
    "CheckpointError",
    "DPAdam",
    "DPOptimizer",
    "DenoiseOptions",
    "Denoiser",
    "DiSKExtrapolation",
    "DiSKFilter",
    "EMAFilter",
    "LayoutError",
    "PoissonSampler",
    "PostProcessor",
    "PrivateEngine",
    "ResumeWarning",
    "TrajectoryDenoiser",
    "attach_ledger",
    "check_denoise_options",
    "checkpoint_extra",
    "dataset_fingerprint",
    "denoise_linear_weights",
    "disk_noise_std",
    "ema_noise_std",
    "load_checkpoint",
    "make_private",
    "save_checkpoint",
]
