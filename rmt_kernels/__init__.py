"""rmt-kernels: fast random-matrix-theory denoising and fused kernels for DP fine-tuning.

Importing the package loads the C++ extension, which registers the ``torch.ops.rmt`` library
(schemas and CPU kernels); :mod:`rmt_kernels.ops` adds the public wrappers,
:mod:`rmt_kernels.fake_impls` the fake (meta) implementations, :mod:`rmt_kernels.rules` the layer
rules, and :mod:`rmt_kernels.triton.register` the CUDA kernels built from Triton.
"""

# torch first: the extension links against libc10/libtorch, which only torch's import loads;
# without it `import rmt_kernels` (or `from rmt_kernels.opacus import ...`) as a program's first
# import fails with "libc10.so: cannot open shared object file".
import torch  # noqa: F401

from rmt_kernels import (
    _C,  # noqa: F401  (registers torch.ops.rmt.*)
    fake_impls,  # noqa: F401  (registers the fake (meta) implementations)
    ops,
    rules,
)

# The per-example language-model loss (issue 27): rmt_kernels.lm_loss is the function; its module
# stays importable as `from rmt_kernels.lm_loss import ...`.
from rmt_kernels.lm_loss import lm_loss, per_example_lm_loss
from rmt_kernels.ops import *  # noqa: F403  (every public op wrapper, ops.__all__)
from rmt_kernels.rules import *  # noqa: F403  (rules.__all__: LayerRule, ReleaseGuard, ...)
from rmt_kernels.triton import register as _register  # noqa: F401  (CUDA kernels)

__all__ = [*ops.__all__, *rules.__all__, "lm_loss", "per_example_lm_loss"]
__version__ = "0.1.0"
