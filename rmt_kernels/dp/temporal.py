"""Temporal filters of the released noisy gradient: post-processors that average it over steps.

A weak but consistent gradient direction sits below ONE step's noise but adds up over steps,
while the noise averages out. Both filters here are linear in the noisy gradients, so their
output is the filtered clean gradient plus Gaussian noise with i.i.d. entries of a known std
(``output_sigma``, a function of public numbers): a
:class:`~rmt_kernels.dp.postprocess.Denoiser` after one shrinks the filtered gradient at exactly
its own noise level. Its bulk edge is lower than one step's (about 0.23x at beta 0.9): the same
gain as a larger batch, for free, still post-processing ("first-moment shrinkage").

- :class:`EMAFilter`: Adam's first moment, m_t = beta m_{t-1} + (1 - beta) g_t, bias-corrected.
- :class:`DiSKFilter`: the simplified Kalman filter of DiSK (Zhang et al., ICLR 2025).

Each reads only the gradients and sigma it is given (post-processing), keeps its running state
in ``state_dict()`` (tensors keyed by the gradients' keys, loadable with
``torch.load(weights_only=True)``) and counts its own steps: the ``step`` argument (a seed
counter in the Opacus drop-in, which advances only on denoised steps) is not used.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Hashable, Mapping
from typing import Any

import torch

from rmt_kernels.dp.postprocess import PostProcessor
from rmt_kernels.dp.stage_state import (
    check_fields,
    check_hyper_parameters,
    check_step_count,
    check_tensors,
    clone_tensors,
    same_keys,
)

__all__ = ["EMAFilter", "ema_noise_std"]

Key = Hashable


def _check_unit_interval(name: str, value: Any, *, closed_low: bool = True) -> float:
    """A real number in [0, 1) (or (0, 1] with ``closed_low=False`` read as (0, 1])."""
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    value = float(value)
    ok = 0 <= value < 1 if closed_low else 0 < value <= 1
    if not ok:
        raise ValueError(f"{name} must be in {'[0, 1)' if closed_low else '(0, 1]'}, got {value}")
    return value


def ema_noise_std(sigma: float, beta: float, t: int, *, bias_correction: bool = True) -> float:
    """Per-entry noise std of an EMA of ``t`` gradients each with i.i.d. noise of std ``sigma``.

    m_t = beta m_{t-1} + (1 - beta) g_t (m_0 = 0) = (1 - beta) sum_j beta^j g_{t-j}, so its
    noise variance is sigma^2 (1 - beta)^2 (1 - beta^(2t)) / (1 - beta^2); bias correction
    divides m_t by (1 - beta^t)::

        sigma * sqrt((1 - beta)(1 - beta^(2t)) / ((1 + beta)(1 - beta^t)^2))

    (about 0.23 sigma at beta 0.9 for large t; sigma at t = 1).

    Args:
        sigma: the noise std of each gradient (the same every step).
        beta: the EMA's decay, in [0, 1).
        t: the number of gradients averaged, >= 1.
        bias_correction: divide by 1 - beta^t (Adam's correction).
    """
    beta = _check_unit_interval("beta", beta)
    if t < 1:
        raise ValueError(f"t must be >= 1, got {t}")
    variance = (1 - beta) * (1 - beta ** (2 * t)) / (1 + beta)
    if bias_correction:
        variance /= (1 - beta**t) ** 2
    return sigma * math.sqrt(variance)


class EMAFilter(PostProcessor):
    """Exponential moving average of the noisy gradients (Adam's first moment), bias-corrected.

    At its t-th call (t = 1, 2, ...), for every gradient g_t it is given::

        m_t = beta * m_{t-1} + (1 - beta) * g_t        (m_0 = 0, kept in float32)
        out = m_t / (1 - beta^t)   (bias_correction)   or   m_t

    A linear filter of the noisy gradients: its output's noise has i.i.d. Gaussian entries of std
    :meth:`output_sigma`, tracked exactly from the sigmas it was given (the variance of m_t is
    beta^2 var_{t-1} + (1 - beta)^2 sigma_t^2); for a constant sigma that is
    :func:`ema_noise_std`. Every gradient is filtered (all parameters, like Adam's moment), and
    each call must bring the same keys and shapes (a running average of a parameter that skipped
    a step would be another filter).

    Recipes: ``[EMAFilter(0.9), Denoiser(options)]`` then SGD is momentum SGD on the shrunk
    moment; ``[EMAFilter(0.9), Denoiser(options), DPAdam(beta1=0.0,
    second_moment_from="released")]`` then plain SGD is Adam on the shrunk moment, with the
    second moment from the released gradient (rmt_kernels/dp/dp_adam.py).

    Args:
        beta: the decay, in [0, 1) (0: the identity).
        bias_correction: divide by 1 - beta^t (without it the first steps are scaled down).
    """

    def __init__(self, beta: float = 0.9, bias_correction: bool = True) -> None:
        self.beta = _check_unit_interval("EMAFilter: beta", beta)
        if not isinstance(bias_correction, bool):
            raise TypeError(
                f"EMAFilter: bias_correction must be a bool, got {type(bias_correction).__name__}"
            )
        self.bias_correction = bias_correction
        #: Calls so far (the t of the formulas after a call).
        self.t = 0
        # Noise variance of m_t (not bias-corrected), from the sigmas given.
        self._noise_var = 0.0
        self._m: dict[Key, torch.Tensor] = {}

    def __repr__(self) -> str:
        return f"EMAFilter(beta={self.beta}, bias_correction={self.bias_correction})"

    def _scale(self) -> float:
        return 1 / (1 - self.beta**self.t) if self.bias_correction else 1.0

    def __call__(
        self, grads: dict[Key, torch.Tensor], sigma: float, step: int
    ) -> dict[Key, torch.Tensor]:
        """One step of the average; the (bias-corrected) moments, by key, in the gradients'
        dtypes. ``step`` is not used (the filter counts its own calls)."""
        same_keys("EMAFilter", self._m, grads)
        self.t += 1
        self._noise_var = self.beta**2 * self._noise_var + (1 - self.beta) ** 2 * sigma**2
        scale = self._scale()
        out = {}
        for key, g in grads.items():
            m = self._m.get(key)
            if m is None:
                m = self._m[key] = torch.zeros(g.shape, dtype=torch.float32, device=g.device)
            elif m.device != g.device:  # loaded from a checkpoint onto another device
                m = self._m[key] = m.to(g.device)
            m.mul_(self.beta).add_(g.float(), alpha=1 - self.beta)
            out[key] = (m * scale).to(g.dtype)
        return out

    def output_sigma(self, sigma: float, step: int) -> float:
        """Per-entry noise std of the last output (exact; :func:`ema_noise_std` for a constant
        sigma). Before the first call: ``sigma``."""
        if self.t == 0:
            return sigma
        return math.sqrt(self._noise_var) * self._scale()

    def state_dict(self) -> dict[str, Any]:
        """``beta``, ``bias_correction`` (checked at load), ``t``, ``noise_var`` and ``m`` (the
        raw moments, float32, by key)."""
        return {
            "beta": self.beta,
            "bias_correction": self.bias_correction,
            "t": self.t,
            "noise_var": self._noise_var,
            "m": clone_tensors(self._m),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output.

        Raises:
            TypeError, ValueError: not an EMAFilter state, another beta or bias correction, or
                a bad value.
        """
        fields = ("beta", "bias_correction", "t", "noise_var", "m")
        state = check_fields("EMAFilter", state, fields)
        check_hyper_parameters(
            "EMAFilter", state, {"beta": self.beta, "bias_correction": self.bias_correction}
        )
        t = check_step_count("EMAFilter", state["t"])
        noise_var = state["noise_var"]
        if not (isinstance(noise_var, numbers.Real) and 0 <= noise_var < math.inf):
            raise ValueError(f"EMAFilter.load_state_dict: bad noise_var {noise_var!r}")
        m = check_tensors("EMAFilter", state["m"], "m")
        if (t == 0) != (not m):
            raise ValueError(f"EMAFilter.load_state_dict: t={t} with {len(m)} moments")
        self.t, self._noise_var, self._m = t, float(noise_var), m
