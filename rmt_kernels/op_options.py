"""The keyword options of ``rmt::denoise`` and ``rmt::denoise_warm``, as one frozen object.

The public wrappers (rmt_kernels/ops.py) spell the options out for their users; every layer
below them (the fake implementations, the device kernels in rmt_kernels/triton/denoise.py)
receives whatever the dispatcher passes, builds one :class:`DenoiseOpOptions` and carries it, so
the option list, its defaults and its check exist once on the Python side. The defaults are the
schema's (csrc/rmt.cpp); tests/denoise/test_tracing.py checks that the two agree.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from rmt_kernels._checks import check_denoise_arguments


@dataclasses.dataclass(frozen=True)
class DenoiseOpOptions:
    """One call's options; the meaning of each: :func:`rmt_kernels.denoise`.

    The fields are in the schema's order, so ``DenoiseOpOptions(*args, **kwargs)`` reads the
    options of ``rmt::denoise_warm`` (positional in its schema) as the dispatcher passes them;
    the dispatcher leaves out trailing options at their defaults, which the fields supply.
    """

    shrinker: str = "frobenius"
    kappa: float = 1.0
    rank: int = -1
    oversample: int = 8
    niter: int = -1
    norm: str = "none"
    seed: int = 0

    def check(self, grad: torch.Tensor, sigma: float, *, check_seed: bool = True) -> None:
        """Raise a ValueError/TypeError naming the first bad argument (metadata only).

        ``check_seed=False`` where the seed already went through the schema's int64 binding
        (the dispatcher's callees): the public wrappers check it before that binding.
        """
        check_denoise_arguments(
            grad,
            sigma,
            self.shrinker,
            self.kappa,
            self.rank,
            self.oversample,
            self.niter,
            self.norm,
            self.seed if check_seed else None,
        )

    def op_arguments(self) -> dict[str, Any]:
        """The options as the schema's types (``int`` and ``float``, not NumPy scalars), by name;
        call after :meth:`check`."""
        return {
            "shrinker": self.shrinker,
            "kappa": float(self.kappa),
            "rank": int(self.rank),
            "oversample": int(self.oversample),
            "niter": int(self.niter),
            "norm": self.norm,
            "seed": int(self.seed),
        }
