"""Temporal filters of the released noisy gradient: post-processors that average it over steps.

A weak but consistent gradient direction sits below ONE step's noise but adds up over steps,
while the noise averages out. Both filters here are linear in the noisy gradients, so their
output is the filtered clean gradient plus Gaussian noise with i.i.d. entries of a known std
(``output_sigma``, a function of public numbers): a
:class:`~rmt_kernels.dp.stages.denoiser.Denoiser` after one shrinks the filtered gradient at exactly
its own noise level. Its bulk edge is lower than one step's (about 0.23x at beta 0.9): the same
gain as a larger batch, for free, still post-processing ("first-moment shrinkage").

- :class:`EMAFilter`: Adam's first moment, m_t = beta m_{t-1} + (1 - beta) g_t, bias-corrected.
- :class:`DiSKFilter`: the simplified Kalman filter of DiSK (Zhang et al., ICLR 2025), and
  :class:`DiSKExtrapolation`, its last stage (the gradient at DiSK's extrapolated point).

Each reads only the gradients and sigma it is given (post-processing), keeps its running state
in ``state_dict()`` (tensors keyed by the gradients' keys, loadable with
``torch.load(weights_only=True)``) and counts its own steps: the ``step`` argument (a seed
counter in the Opacus drop-in, which advances only on denoised steps) is not used.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from typing import Any

import torch

from rmt_kernels.dp.stages.protocol import Key, PostProcessor
from rmt_kernels.dp.stages.state import (
    check_fields,
    check_hyper_parameters,
    check_noise_variance,
    check_step_count,
    check_tensors,
    clone_tensors,
    same_keys,
)

__all__ = [
    "DiSKExtrapolation",
    "DiSKFilter",
    "EMAFilter",
    "disk_noise_std",
    "ema_noise_std",
]


def _check_unit_interval(name: str, value: Any, *, closed_low: bool = True) -> float:
    """A real number in [0, 1) (or (0, 1] with ``closed_low=False`` read as (0, 1])."""
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    value = float(value)
    ok = 0 <= value < 1 if closed_low else 0 < value <= 1
    if not ok:
        raise ValueError(f"{name} must be in {'[0, 1)' if closed_low else '(0, 1]'}, got {value}")
    return value


def _check_filter_state(
    stage: str, state: Any, mine: Mapping[str, Any], name: str, what: str
) -> tuple[int, float, dict[Key, torch.Tensor]]:
    """A linear filter's checkpoint state (EMAFilter, DiSKFilter): its hyper-parameters
    ``mine`` (which must match), ``t``, ``noise_var`` and its running tensors under ``name``
    (``what`` they are, for the error), present exactly when ``t`` > 0. Returns those three.

    Raises:
        TypeError, ValueError: naming ``stage``, as the checks of state.py do.
    """
    state = check_fields(stage, state, (*mine, "t", "noise_var", name))
    check_hyper_parameters(stage, state, mine)
    t = check_step_count(stage, state["t"])
    noise_var = check_noise_variance(stage, state["noise_var"])
    tensors = check_tensors(stage, state[name], name)
    if (t == 0) != (not tensors):
        raise ValueError(f"{stage}.load_state_dict: t={t} with {len(tensors)} {what}")
    return t, noise_var, tensors


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
    second moment from the released gradient (rmt_kernels/dp/stages/dp_adam.py).

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
        mine = {"beta": self.beta, "bias_correction": self.bias_correction}
        self.t, self._noise_var, self._m = _check_filter_state(
            "EMAFilter", state, mine, "m", "moments"
        )


def disk_noise_std(sigma: float, kappa: float, t: int) -> float:
    """Per-entry noise std of :class:`DiSKFilter`'s output after ``t`` gradients each with
    i.i.d. noise of std ``sigma``.

    d_1 = g_1 and d_t = (1 - kappa) d_{t-1} + kappa g_t, so with r = (1 - kappa)^2 the noise
    variance is sigma^2 (r^(t-1) + kappa^2 (1 - r^(t-1)) / (1 - r)), i.e.::

        sigma * sqrt(r^(t-1) + kappa (1 - r^(t-1)) / (2 - kappa))

    (sqrt(kappa / (2 - kappa)) sigma for large t: 0.74 sigma at kappa 0.7; sigma at kappa 1).
    """
    kappa = _check_unit_interval("kappa", kappa, closed_low=False)
    if t < 1:
        raise ValueError(f"t must be >= 1, got {t}")
    r = (1 - kappa) ** 2
    return sigma * math.sqrt(r ** (t - 1) + kappa * (1 - r ** (t - 1)) / (2 - kappa))


class _DiSKStage(PostProcessor):
    """What DiSK's two halves share: the Kalman gain kappa, in (0, 1], checked and shown by
    the stage's own class name, and the count of calls."""

    def __init__(self, kappa: float) -> None:
        name = type(self).__name__
        self.kappa = _check_unit_interval(f"{name}: kappa", kappa, closed_low=False)
        #: Calls so far.
        self.t = 0

    def __repr__(self) -> str:
        return f"{type(self).__name__}(kappa={self.kappa})"


class DiSKFilter(_DiSKStage):
    """DiSK's simplified Kalman filter of the noisy gradients (Zhang, Bu, Balle, Hong,
    Razaviyayn & Mirrokni, ICLR 2025, arXiv 2410.03883), the form without an extra gradient.

    What it computes. At its t-th call, for every gradient g_t it is given (float32)::

        d_1 = g_1,    d_t = (1 - kappa) d_{t-1} + kappa g_t

    DiSK is this filter with the gradient g_t evaluated not at the iterate x_t but at the
    extrapolated point z_t = x_t + gamma (x_t - x_{t-1}), gamma = (1 - kappa) / kappa: the
    Kalman prediction step's Hessian-vector product H (x_t - x_{t-1}), approximated by a finite
    difference, folds into that one evaluation (with another gamma it needs a second gradient,
    at x_t, which no post-processor can provide). Read alone this stage is the filter at the
    current point (an EMA with weight kappa on the new gradient, initialised at g_1); with
    :class:`DiSKExtrapolation` as the chain's last stage the model's parameters hold z_t and
    the run is DiSK exactly (its docstring has the algebra, and the DiSK-SGD special case).

    The paper's update (its README and Algorithm 1: weight kappa on the new gradient) is
    followed; the authors' Opacus code (``research/disk_optimizer``, ``lerp_(grad, 1 -
    kappa)``) weighs the new gradient by 1 - kappa with the same gamma = (1 - kappa) / kappa,
    which agrees only at kappa 0.5. Default kappa 0.7 (their default).

    A linear filter: its output's noise is Gaussian, i.i.d. per entry, of std
    :meth:`output_sigma` (tracked exactly; :func:`disk_noise_std` for a constant sigma), so a
    Denoiser may follow at that level.

    Args:
        kappa: the Kalman gain, the weight of the new gradient, in (0, 1] (1: the identity).
    """

    def __init__(self, kappa: float = 0.7) -> None:
        super().__init__(kappa)
        self._noise_var = 0.0
        self._d: dict[Key, torch.Tensor] = {}

    def __call__(
        self, grads: dict[Key, torch.Tensor], sigma: float, step: int
    ) -> dict[Key, torch.Tensor]:
        """One step of the filter; the estimates d_t, by key, in the gradients' dtypes
        (``step`` is not used)."""
        same_keys("DiSKFilter", self._d, grads)
        self.t += 1
        k = self.kappa
        first = self.t == 1
        self._noise_var = sigma**2 if first else (1 - k) ** 2 * self._noise_var + k**2 * sigma**2
        out = {}
        for key, g in grads.items():
            if first:
                d = self._d[key] = g.detach().float().clone()
            else:
                d = self._d[key]
                if d.device != g.device:  # loaded from a checkpoint onto another device
                    d = self._d[key] = d.to(g.device)
                d.mul_(1 - k).add_(g.float(), alpha=k)
            out[key] = d.to(g.dtype, copy=True)
        return out

    def output_sigma(self, sigma: float, step: int) -> float:
        """Per-entry noise std of the last output (exact; :func:`disk_noise_std` for a
        constant sigma). Before the first call: ``sigma``."""
        return sigma if self.t == 0 else math.sqrt(self._noise_var)

    def state_dict(self) -> dict[str, Any]:
        """``kappa`` (checked at load), ``t``, ``noise_var`` and ``d`` (float32, by key)."""
        return {
            "kappa": self.kappa,
            "t": self.t,
            "noise_var": self._noise_var,
            "d": clone_tensors(self._d),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output.

        Raises:
            TypeError, ValueError: not a DiSKFilter state, another kappa, or a bad value.
        """
        mine = {"kappa": self.kappa}
        self.t, self._noise_var, self._d = _check_filter_state(
            "DiSKFilter", state, mine, "d", "estimates"
        )


class DiSKExtrapolation(_DiSKStage):
    """The last stage of DiSK: moves the model's parameters along DiSK's extrapolated points,
    so that the next gradient is evaluated at z_{t+1} = x_{t+1} + gamma (x_{t+1} - x_t),
    gamma = (1 - kappa) / kappa (see :class:`DiSKFilter`).

    The model's parameters hold z_t, not DiSK's iterate x_t. With a ``direction`` a_t per step
    (this stage's input: the filter's d_t for DiSK-SGD, a DPAdam direction for DiSK-Adam) and
    plain SGD at a constant learning rate eta applied to this stage's output u_t::

        u_1 = (1 + gamma) a_1,    u_t = (1 + gamma) a_t - gamma a_{t-1}

    gives z_{t+1} = z_t - eta u_t, which is exactly DiSK's x_{t+1} = x_t - eta a_t with
    z_t = x_t + gamma (x_t - x_{t-1}) (x_0 = x_1: no extrapolation at the first step). The
    iterate itself is x_t = z_t + eta * gamma * a_{t-1} (:meth:`iterate_offset` times the
    learning rate): evaluate there (it is also x_t = kappa z_t + (1 - kappa) x_{t-1}, an
    average of the z's). Under a learning-rate schedule the same output moves x by
    -eta_t a_t + gamma (eta_t - eta_{t-1}) a_{t-1} per step: DiSK up to a drift of the order of
    the schedule's change per step.

    DiSK-SGD is DP-SGD in disguise: with a_t = d_t, u_t = (1/kappa)(d_t - (1 - kappa) d_{t-1})
    = g_t for t >= 2 (and g_1 / kappa at t = 1), so z follows plain DP-SGD on the released
    gradients and x is the exponential average of the z's. Its gain (if any) is in evaluating
    at x; the recipe with an adaptive step (DiSK-Adam: ``[DiSKFilter(k), DPAdam(beta1=0.0),
    DiSKExtrapolation(k)]``) is not so reducible.

    Output: a step direction, not a noisy gradient (``terminal``; ``output_sigma`` NaN). It may
    follow another terminal stage (a DPAdam): ``after_direction``.

    Args:
        kappa: DiSK's Kalman gain (the same as the :class:`DiSKFilter`'s), in (0, 1].
    """

    terminal = True
    #: May come after a stage whose output is a direction (DPAdam).
    after_direction = True

    def __init__(self, kappa: float = 0.7) -> None:
        super().__init__(kappa)
        self.gamma = (1 - self.kappa) / self.kappa
        self._previous: dict[Key, torch.Tensor] = {}

    def __call__(
        self, grads: dict[Key, torch.Tensor], sigma: float, step: int
    ) -> dict[Key, torch.Tensor]:
        """The SGD directions u_t of the extrapolated points, by key (``step`` unused)."""
        same_keys("DiSKExtrapolation", self._previous, grads)
        self.t += 1
        out = {}
        for key, a in grads.items():
            a32 = a.detach().float()
            u = a32 * (1 + self.gamma)
            previous = self._previous.get(key)
            if previous is not None:
                u.sub_(previous.to(a.device), alpha=self.gamma)
            self._previous[key] = a32.clone()
            out[key] = u.to(a.dtype)
        return out

    def iterate_offset(self) -> dict[Key, torch.Tensor]:
        """gamma * a_{t-1} by key: DiSK's iterate is x_t = z_t + lr * this (constant lr; the
        last step's lr under a schedule); empty before the first step."""
        return {k: self.gamma * a for k, a in self._previous.items()}

    def output_sigma(self, sigma: float, step: int) -> float:
        """NaN: the output is a step direction."""
        return math.nan

    def state_dict(self) -> dict[str, Any]:
        """``kappa`` (checked at load), ``t`` and ``previous`` (a_{t-1}, float32, by key)."""
        return {"kappa": self.kappa, "t": self.t, "previous": clone_tensors(self._previous)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output.

        Raises:
            TypeError, ValueError: not a DiSKExtrapolation state, another kappa, a bad value.
        """
        state = check_fields("DiSKExtrapolation", state, ("kappa", "t", "previous"))
        check_hyper_parameters("DiSKExtrapolation", state, {"kappa": self.kappa})
        t = check_step_count("DiSKExtrapolation", state["t"])
        previous = check_tensors("DiSKExtrapolation", state["previous"], "previous")
        if (t == 0) != (not previous):
            raise ValueError(f"DiSKExtrapolation.load_state_dict: t={t} with {len(previous)}")
        self.t, self._previous = t, previous
