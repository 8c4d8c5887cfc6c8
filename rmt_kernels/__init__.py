"""rmt-kernels: fast random-matrix-theory denoising and fused kernels for DP fine-tuning.

Importing the package loads the C++ extension, which registers the ``torch.ops.rmt`` library
(schemas and CPU kernels); :mod:`rmt_kernels.ops` adds the fake (meta) implementations and the
CUDA kernels built from Triton.
"""

# torch first: the extension links against libc10/libtorch, which only torch's import loads;
# without it `import rmt_kernels` (or `from rmt_kernels.opacus import ...`) as a program's first
# import fails with "libc10.so: cannot open shared object file".
import torch  # noqa: F401

from rmt_kernels import (
    _C,  # noqa: F401  (registers torch.ops.rmt.*)
    dp_ops,
)
from rmt_kernels.dp_ops import *  # noqa: F403  (the fused DP ops, dp_ops.__all__)
from rmt_kernels.ops import denoise, denoise_many

__all__ = ["denoise", "denoise_many", *dp_ops.__all__]
__version__ = "0.1.0"
