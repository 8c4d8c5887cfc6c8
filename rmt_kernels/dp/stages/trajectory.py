"""Shrinkage of the accumulated update: denoise the sum of the noisy gradients, not one step.

For SGD at a constant learning rate lr on the released gradients g_s, the weights are
W_t = W_0 - lr * S_t with S_t = g_1 + ... + g_t. The signal in S_t grows like t, its noise (i.i.d.
Gaussian, per-entry std sigma * sqrt(t) for a constant sigma) like sqrt(t): the signal-to-noise
ratio of the trajectory grows like sqrt(t), so a direction below one step's Marchenko-Pastur edge
clears the edge of the sum after enough steps. This is the limit of first-moment shrinkage as
the EMA's beta goes to 1 (rmt_kernels/dp/stages/temporal.py).

:class:`TrajectoryDenoiser` keeps S_t, shrinks it at its exact noise level (D_t = shrink(S_t))
and outputs D_t - D_{t-1}: plain SGD at a constant lr then gives W_t = W_0 - lr * D_t (up to
float rounding of the per-step updates). Post-processing: S_t and D_t are functions of released
noisy gradients and public numbers.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch

from rmt_kernels.dp.stages.denoiser import Denoiser
from rmt_kernels.dp.stages.options import DenoiseOptions
from rmt_kernels.dp.stages.protocol import Key, PostProcessor
from rmt_kernels.dp.stages.state import (
    check_fields,
    check_noise_variance,
    check_step_count,
    check_tensors,
    clone_tensors,
)

__all__ = ["TrajectoryDenoiser"]


class TrajectoryDenoiser(PostProcessor):
    """Singular-value shrinkage of the running sum of the noisy gradients; outputs the change of
    the shrunk sum ("shrinkage of the accumulated update").

    At its t-th call, for each selected matrix (the same rules as
    :class:`~rmt_kernels.dp.stages.denoiser.Denoiser`: key in ``keys``, 2-D, smaller side >=
    ``min_dim``; the native engine passes its ``denoise_filter`` decision with
    :meth:`restrict_to`), with g_t the input gradient::

        S_t = S_{t-1} + g_t                     (float32; S_0 = 0)
        D_t = Denoiser(options)(S_t, sigma_S)   sigma_S^2 = sigma_1^2 + ... + sigma_t^2
        out = D_t - D_{t-1}                     (D_0 = 0)

    sigma_S is S_t's exact per-entry noise std when the inputs' noises are independent across
    steps: put this stage directly on the released gradient (a temporal filter before it would
    correlate them). Every other gradient passes unchanged (SGD then sums it as it is). The
    sketch of step t is seeded as the Denoiser's (``seed + step``).

    Use with ``torch.optim.SGD(params, lr, momentum=0)`` at a constant learning rate and no
    weight decay: then W_t = W_0 - lr * D_t. The output is a step direction: ``terminal``,
    ``output_sigma`` NaN.

    Statistics (``record_stats``, :meth:`take_stats`): the Denoiser's kept rank and
    ||D_t|| / ||S_t||, and ``sigma``, the level sigma_S it shrank at.

    Args:
        options: ``denoise`` options, a dict or a
            :class:`~rmt_kernels.dp.stages.options.DenoiseOptions`
            (:func:`~rmt_kernels.dp.stages.options.check_denoise_options`).
        keys: the only keys it may denoise, or None for any.
    """

    terminal = True
    shrinks_matrices = True

    def __init__(
        self,
        options: Mapping[str, Any] | DenoiseOptions | None = None,
        *,
        keys: Iterable[Key] | None = None,
    ) -> None:
        self._denoiser = Denoiser(options, keys=keys)
        #: Calls so far.
        self.t = 0
        # The noise variance of S_t (sum of the sigmas squared).
        self._noise_var = 0.0
        self._sum: dict[Key, torch.Tensor] = {}
        self._previous: dict[Key, torch.Tensor] = {}
        self._recorded_sigma: float | None = None

    def __repr__(self) -> str:
        return f"TrajectoryDenoiser({self.options.given_options()!r})"

    # The Denoiser's selection rules, delegated (the engines treat both alike).
    @property
    def options(self) -> DenoiseOptions:
        """The denoise options (validated)."""
        return self._denoiser.options

    @property
    def keys(self) -> frozenset[Key] | None:
        """The only keys it may denoise (None: any)."""
        return self._denoiser.keys

    @property
    def min_dim(self) -> int:
        """Matrices whose smaller side is below this are left alone."""
        return self._denoiser.min_dim

    @property
    def record_stats(self) -> bool:
        """Set before a step to keep its statistics (:meth:`take_stats`)."""
        return self._denoiser.record_stats

    @record_stats.setter
    def record_stats(self, value: bool) -> None:
        self._denoiser.record_stats = bool(value)

    def eligible(self, shape: Sequence[int]) -> bool:
        """Whether a gradient of this shape can be denoised (a matrix, sides >= min_dim)."""
        return self._denoiser.eligible(shape)

    def restrict_to(self, keys: Iterable[Key]) -> None:
        """Denoise only these keys from now on (the engine's filter decision)."""
        self._denoiser.restrict_to(keys)

    def selected(self, grads: Mapping[Key, torch.Tensor]) -> list[Key]:
        """The keys of ``grads`` whose sums it shrinks, in ``grads``'s order."""
        return self._denoiser.selected(grads)

    def noise_std(self) -> float:
        """Per-entry noise std of S_t after the last call (0 before the first)."""
        return math.sqrt(self._noise_var)

    def __call__(
        self, grads: dict[Key, torch.Tensor], sigma: float, step: int
    ) -> dict[Key, torch.Tensor]:
        """Accumulate, shrink the sums at their noise level, return the change of the shrunk
        sums (the other gradients unchanged).

        Raises:
            ValueError: the selected keys or their shapes changed since the last step.
        """
        keys = self.selected(grads)
        if self._sum and (
            set(keys) != set(self._sum)
            or any(tuple(self._sum[k].shape) != tuple(grads[k].shape) for k in keys)
        ):
            raise ValueError(
                "TrajectoryDenoiser: the matrices it shrinks changed since the last step (a sum "
                "of gradients needs every one of them every step)"
            )
        self.t += 1
        self._noise_var += sigma**2
        if not keys:
            return grads
        for k in keys:
            g = grads[k]
            total = self._sum.get(k)
            if total is None:
                total = self._sum[k] = torch.zeros(g.shape, dtype=torch.float32, device=g.device)
            elif total.device != g.device:  # loaded from a checkpoint onto another device
                total = self._sum[k] = total.to(g.device)
            total.add_(g.float())
        sigma_sum = self.noise_std()
        shrunk = self._denoiser({k: self._sum[k] for k in keys}, sigma_sum, step)
        if self._denoiser.record_stats:
            self._recorded_sigma = sigma_sum
        out = dict(grads)
        for k in keys:
            d = shrunk[k].float()
            previous = self._previous.get(k)
            change = d.clone() if previous is None else d - previous.to(d.device)
            self._previous[k] = d.clone()
            out[k] = change.to(grads[k].dtype)
        return out

    def output_sigma(self, sigma: float, step: int) -> float:
        """NaN: the output is a step direction (the change of a shrunk sum)."""
        return math.nan

    def take_stats(self) -> dict[Key, dict[str, float]]:
        """Per matrix shrunk at the last step run with ``record_stats``: the kept rank of D_t,
        ||D_t|| / ||S_t|| and ``sigma`` (sigma_S). Empty if nothing was recorded; forgets."""
        stats = self._denoiser.take_stats()
        sigma = self._recorded_sigma
        self._recorded_sigma = None
        if sigma is not None:
            for record in stats.values():
                record["sigma"] = sigma
        return stats

    def state_dict(self) -> dict[str, Any]:
        """``t``, ``noise_var``, ``sum`` (S_t) and ``previous`` (D_t), float32 by key, and
        ``denoiser`` (the inner Denoiser's state)."""
        return {
            "t": self.t,
            "noise_var": self._noise_var,
            "sum": clone_tensors(self._sum),
            "previous": clone_tensors(self._previous),
            "denoiser": self._denoiser.state_dict(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output.

        Raises:
            TypeError, ValueError: not a TrajectoryDenoiser state, a bad value, sums and shrunk
                sums of other keys or shapes, or a key it does not denoise.
        """
        where = "TrajectoryDenoiser"
        state = check_fields(where, state, ("t", "noise_var", "sum", "previous", "denoiser"))
        t = check_step_count(where, state["t"])
        noise_var = check_noise_variance(where, state["noise_var"])
        sums = check_tensors(where, state["sum"], "sum")
        previous = check_tensors(where, state["previous"], "previous")
        if set(sums) != set(previous) or any(sums[k].shape != previous[k].shape for k in sums):
            raise ValueError(f"{where}.load_state_dict: 'sum' and 'previous' do not match")
        for k, s in sums.items():
            if (self.keys is not None and k not in self.keys) or not self.eligible(s.shape):
                raise ValueError(
                    f"{where}.load_state_dict: a sum for {k!r}, which it does not shrink"
                )
        if t == 0 and sums:
            raise ValueError(f"{where}.load_state_dict: t=0 with {len(sums)} sums")
        self._denoiser.load_state_dict(state["denoiser"])
        self.t, self._noise_var, self._sum, self._previous = t, noise_var, sums, previous
