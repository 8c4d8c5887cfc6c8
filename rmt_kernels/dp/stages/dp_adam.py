"""A DP-aware Adam as the last post-processing stage: the Adam direction of the released
gradient, for plain SGD to apply.

Adam's second moment of a DP gradient is dominated by the noise variance s^2 (s = noise_multiplier
* C / B, public), so Adam divides by ~s everywhere and behaves as DP-SGD with a rescaled step;
when a denoiser zeroes a matrix for several steps and then passes a component, a v built from
the denoised numerator is tiny and the step huge. Two known answers, both here:

- DP-AdamBC (Tang, Shpilevskiy & Lecuyer, AAAI 2024): subtract the known noise variance from the
  bias-corrected second moment, floored: v' = max(v_hat - s^2, floor);
- compute v from the released noisy gradient (``second_moment_from="released"``) while the
  numerator is the previous stage's output (a shrunk moment, say).

Output: ``m_hat / (sqrt(v') + eps)`` per entry; use it with ``torch.optim.SGD(params, lr,
momentum=0)`` (SGD's ``weight_decay`` is then AdamW's decoupled decay: SGD adds ``wd * p`` to the
direction, so the update is ``-lr * (direction + wd * p)``, AdamW's). Post-processing: it reads
only the gradients and noise stds the stage before hands it (and, with "released", the released
gradient and its std).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from typing import Any

import torch

from rmt_kernels.dp.stages import state as state_checks
from rmt_kernels.dp.stages.protocol import Key, PostProcessor

__all__ = ["SECOND_MOMENT_SOURCES", "DPAdam"]

SECOND_MOMENT_SOURCES = ("released", "input")
# DP-AdamBC's gamma': the floor of the corrected second moment (a small constant in the paper;
# the reference implementation of the paper's method uses 5e-8 with eps 1e-8). It bounds the
# step of an entry whose corrected variance is <= 0 by m_hat / sqrt(floor).
DEFAULT_VARIANCE_FLOOR = 1e-8


def _number(name: str, value: Any, low: float, high: float, *, high_open: bool = True) -> float:
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise TypeError(f"DPAdam: {name} must be a number, got {type(value).__name__}")
    value = float(value)
    if not (low <= value and (value < high if high_open else value <= high)):
        raise ValueError(
            f"DPAdam: {name} must be in [{low}, {high}{')' if high_open else ']'}, got {value}"
        )
    return value


class DPAdam(PostProcessor):
    """Adam's direction from the noisy gradients, optionally bias-corrected for the DP noise.

    At its t-th call (t = 1, 2, ...), with x the input gradient (the previous stage's output) and
    y the gradient the second moment is built from (the released one with
    ``second_moment_from="released"``, else x), per entry, in float32::

        m_t = beta1 m_{t-1} + (1 - beta1) x          m_hat = m_t / (1 - beta1^t)
        v_t = beta2 v_{t-1} + (1 - beta2) y^2        v_hat = v_t / (1 - beta2^t)
        v'  = max(v_hat - phi_hat, floor)  (variance_correction)   or   v_hat
        out = m_hat / (sqrt(v') + eps)

    phi_hat is the same bias-corrected EMA of y's per-entry noise variance (s^2 for a constant
    noise std s): exactly E[v_hat] - E[clean v_hat], the DP-AdamBC correction. beta1 = 0 gives
    m_hat = x: use it when x is already a moment (an EMAFilter, possibly shrunk, before this
    stage), so the numerator is not filtered twice.

    Recipes (the stage is last, then ``SGD(lr, momentum=0)``):

    - DP-Adam: ``[DPAdam(variance_correction=False, second_moment_from="input")]``
      (torch's Adam on the released gradient, up to rounding);
    - DP-AdamBC: ``[DPAdam()]``;
    - Adam on a shrunk first moment with v from the released gradient:
      ``[EMAFilter(0.9), Denoiser(options), DPAdam(beta1=0.0)]``.

    Its output has no Gaussian noise level (a nonlinear rescaling): :meth:`output_sigma` is NaN
    and the stage must be the chain's last (``terminal``).

    Args:
        beta1, beta2: Adam's decays, in [0, 1).
        eps: added to sqrt(v'), >= 0.
        variance_correction: subtract the noise variance (DP-AdamBC).
        second_moment_from: ``"released"`` (the released noisy gradient, whatever the stages
            before did to x; ``needs_released``) or ``"input"`` (x itself).
        floor: DP-AdamBC's floor of v' (gamma' in the paper), > 0.
    """

    #: The output is a step direction, not a noisy gradient: nothing may follow.
    terminal = True

    def __init__(
        self,
        beta1: float = 0.9,
        beta2: float = 0.999,
        eps: float = 1e-8,
        variance_correction: bool = True,
        second_moment_from: str = "released",
        floor: float = DEFAULT_VARIANCE_FLOOR,
    ) -> None:
        self.beta1 = _number("beta1", beta1, 0.0, 1.0)
        self.beta2 = _number("beta2", beta2, 0.0, 1.0)
        self.eps = _number("eps", eps, 0.0, math.inf)
        self.floor = _number("floor", floor, 0.0, math.inf)
        if self.floor == 0:
            raise ValueError("DPAdam: floor must be > 0 (a zero variance would divide by eps)")
        if not isinstance(variance_correction, bool):
            raise TypeError(
                "DPAdam: variance_correction must be a bool, got "
                f"{type(variance_correction).__name__}"
            )
        if second_moment_from not in SECOND_MOMENT_SOURCES:
            raise ValueError(
                f"DPAdam: second_moment_from must be one of {SECOND_MOMENT_SOURCES}, got "
                f"{second_moment_from!r}"
            )
        self.variance_correction = variance_correction
        self.second_moment_from = second_moment_from
        #: With "released", post_process also hands the released gradient and its std.
        self.needs_released = second_moment_from == "released"
        #: Calls so far.
        self.t = 0
        # EMA of y's noise variance (phi), not bias-corrected.
        self._noise_var = 0.0
        self._m: dict[Key, torch.Tensor] = {}
        self._v: dict[Key, torch.Tensor] = {}

    def __repr__(self) -> str:
        return (
            f"DPAdam(beta1={self.beta1}, beta2={self.beta2}, eps={self.eps}, "
            f"variance_correction={self.variance_correction}, "
            f"second_moment_from={self.second_moment_from!r}, floor={self.floor})"
        )

    def __call__(
        self,
        grads: dict[Key, torch.Tensor],
        sigma: float,
        step: int,
        *,
        released: Mapping[Key, torch.Tensor] | None = None,
        released_sigma: float | None = None,
    ) -> dict[Key, torch.Tensor]:
        """The Adam directions, by key, in the gradients' dtypes (``step`` is not used).

        Raises:
            ValueError: ``second_moment_from="released"`` without ``released`` (call it through
                :func:`rmt_kernels.dp.stages.chain.post_process`), or the keys changed.
        """
        if self.needs_released:
            if released is None or released_sigma is None:
                raise ValueError(
                    "DPAdam(second_moment_from='released') needs the released gradient: run it "
                    "through rmt_kernels.dp.stages.chain.post_process"
                )
            source, noise_std = released, released_sigma
        else:
            source, noise_std = grads, sigma
        state_checks.same_keys("DPAdam", self._v, grads)
        self.t += 1
        b1, b2 = self.beta1, self.beta2
        self._noise_var = b2 * self._noise_var + (1 - b2) * noise_std**2
        scale1 = 1 / (1 - b1**self.t)
        scale2 = 1 / (1 - b2**self.t)
        phi_hat = self._noise_var * scale2
        out = {}
        for key, g in grads.items():
            x, y = g.float(), source[key].float()
            v = self._state(self._v, key, g)
            v.mul_(b2).addcmul_(y, y, value=1 - b2)
            if b1 > 0:
                m = self._state(self._m, key, g)
                m.mul_(b1).add_(x, alpha=1 - b1)
                m_hat = m * scale1
            else:
                m_hat = x
            v_hat = v * scale2
            if self.variance_correction:
                v_hat = (v_hat - phi_hat).clamp_(min=self.floor)
            out[key] = (m_hat / (v_hat.sqrt_() + self.eps)).to(g.dtype)
        return out

    @staticmethod
    def _state(store: dict[Key, torch.Tensor], key: Key, g: torch.Tensor) -> torch.Tensor:
        t = store.get(key)
        if t is None:
            t = store[key] = torch.zeros(g.shape, dtype=torch.float32, device=g.device)
        elif t.device != g.device:  # loaded from a checkpoint onto another device
            t = store[key] = t.to(g.device)
        return t

    def output_sigma(self, sigma: float, step: int) -> float:
        """NaN: a rescaled direction has no per-entry Gaussian noise level (nothing follows)."""
        return math.nan

    def _hyper_parameters(self) -> dict[str, Any]:
        return {
            "beta1": self.beta1,
            "beta2": self.beta2,
            "eps": self.eps,
            "variance_correction": self.variance_correction,
            "second_moment_from": self.second_moment_from,
            "floor": self.floor,
        }

    def state_dict(self) -> dict[str, Any]:
        """The hyper-parameters (checked at load), ``t``, ``noise_var`` (phi) and the raw
        moments ``m`` (empty for beta1 = 0) and ``v``, float32, by key."""
        return {
            **self._hyper_parameters(),
            "t": self.t,
            "noise_var": self._noise_var,
            "m": state_checks.clone_tensors(self._m),
            "v": state_checks.clone_tensors(self._v),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output.

        Raises:
            TypeError, ValueError: not a DPAdam state, other hyper-parameters, or a bad value.
        """
        mine = self._hyper_parameters()
        state = state_checks.check_fields("DPAdam", state, (*mine, "t", "noise_var", "m", "v"))
        state_checks.check_hyper_parameters("DPAdam", state, mine)
        t = state_checks.check_step_count("DPAdam", state["t"])
        noise_var = state_checks.check_noise_variance("DPAdam", state["noise_var"])
        m = state_checks.check_tensors("DPAdam", state["m"], "m")
        v = state_checks.check_tensors("DPAdam", state["v"], "v")
        if (t == 0) != (not v) or (self.beta1 > 0 and set(m) != set(v)) or (self.beta1 == 0 and m):
            raise ValueError(
                f"DPAdam.load_state_dict: t={t} with {len(m)} first and {len(v)} second moments"
            )
        if any(bool((x < 0).any()) for x in v.values()):
            raise ValueError("DPAdam.load_state_dict: a second moment is negative")
        self.t, self._noise_var, self._m, self._v = t, noise_var, m, v
