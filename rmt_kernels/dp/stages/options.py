"""The ``denoise`` options: one frozen, validated :class:`DenoiseOptions`, built once from the
user's dict (``make_private(denoise={...})``, the Opacus drop-in's ``denoise={...}``, the CLI's
flags) and carried as it is by the chain and its shrinking stages.

The options are the keyword options of :func:`rmt_kernels.denoise` (their defaults read from its
signature, so the two never drift) plus three that are the Denoiser's own: ``min_dim`` (matrices
whose smaller side is below it are left alone, see :data:`MIN_DENOISE_DIM`), ``warm_start``
(start each matrix's range finder from its basis of the step before,
:func:`rmt_kernels.denoise_warm`: a gradient's subspace moves slowly, so one pass usually
settles it) and ``passthrough_below_edge`` (shrink a matrix only while its released spectrum
shows a component above the noise; pass it through unchanged otherwise: see
:func:`~rmt_kernels.dp.stages.denoiser.detection_threshold`).
"""

from __future__ import annotations

import dataclasses
import inspect
import numbers
from collections.abc import Mapping
from typing import Any

import torch

from rmt_kernels import ops
from rmt_kernels._checks import SEED_LIMIT
from rmt_kernels.op_options import DenoiseOpOptions

__all__ = [
    "DENOISE_OPTIONS",
    "MIN_DENOISE_DIM",
    "DenoiseOptionError",
    "DenoiseOptions",
    "check_denoise_options",
]

# Marchenko-Pastur's edge is an asymptotic statement about large m and n. A classifier head
# (2 x 384) has two singular values and no bulk: thresholding it at the "edge" zeroes its whole
# gradient whenever the signal is below the noise (measured on SST-2: the head never learned).
MIN_DENOISE_DIM = 32

# The op's keyword options and their defaults, read from its signature.
_OP_DEFAULTS: dict[str, Any] = {
    name: parameter.default
    for name, parameter in inspect.signature(ops.denoise).parameters.items()
    if parameter.kind is inspect.Parameter.KEYWORD_ONLY
}
# Checked in this order (a NumPy integer is made an int: it would overflow silently in
# seed + step); the booleans must be exactly bools.
_INT_OPTIONS = ("seed", "rank", "oversample", "niter", "min_dim")
_BOOL_OPTIONS = ("warm_start", "passthrough_below_edge")


class DenoiseOptionError(TypeError, ValueError):
    """An unknown ``denoise`` option.

    Both a TypeError (what Python raises for an unexpected keyword, and what the Opacus drop-in
    raised) and a ValueError (what ``make_private`` raised), so code catching either keeps
    working now that both engines share :func:`check_denoise_options`.
    """


@dataclasses.dataclass(frozen=True)
class DenoiseOptions:
    """Every ``denoise`` option, validated when built (module docstring); immutable, so a
    caller's later change to its dict never reaches training.

    ``given`` names the options the user gave (in their order): :meth:`given_options` is what
    logs, ``repr`` and the checkpoint's fingerprint show, and only the given op options are
    passed to the op (:meth:`op_options`). Built directly, every option counts as given.

    Raises:
        TypeError: an option has the wrong type.
        ValueError: an option has an invalid value (the op's own argument check, so the
            messages are the op's).
    """

    shrinker: str = _OP_DEFAULTS["shrinker"]
    kappa: float = _OP_DEFAULTS["kappa"]
    rank: int = _OP_DEFAULTS["rank"]
    oversample: int = _OP_DEFAULTS["oversample"]
    niter: int = _OP_DEFAULTS["niter"]
    norm: str = _OP_DEFAULTS["norm"]
    seed: int = _OP_DEFAULTS["seed"]
    min_dim: int = MIN_DENOISE_DIM
    warm_start: bool = True
    passthrough_below_edge: bool = False
    given: tuple[str, ...] | None = dataclasses.field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        for name in _INT_OPTIONS:
            value = getattr(self, name)
            if not isinstance(value, numbers.Integral) or isinstance(value, bool):
                raise TypeError(f"denoise: {name} must be an int, got {type(value).__name__}")
            object.__setattr__(self, name, int(value))
        for name in _BOOL_OPTIONS:
            # Exactly a bool: a 0/1 or a "no" string would read as the opposite of a typo's intent.
            value = getattr(self, name)
            if not isinstance(value, bool):
                raise TypeError(f"denoise: {name} must be a bool, got {type(value).__name__}")
        if self.min_dim < 1:
            raise ValueError(f"denoise: min_dim must be >= 1, got {self.min_dim}")
        # A meta matrix big enough for any rank checks everything else without allocating;
        # ``rank`` is checked again per matrix at each step (where it is capped at the
        # matrix's smaller side, see the Denoiser).
        size = max(self.rank, 2)
        # The op's own options object checks the op's options (one check for both layers).
        op_fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(DenoiseOpOptions)}
        DenoiseOpOptions(**op_fields).check(torch.empty(size, size, device="meta"), 1.0)
        given = DENOISE_OPTIONS_NAMES if self.given is None else tuple(self.given)
        unknown = [name for name in given if name not in DENOISE_OPTIONS_NAMES]
        if unknown:
            raise DenoiseOptionError(f"DenoiseOptions: given names unknown options {unknown}")
        object.__setattr__(self, "given", given)

    @classmethod
    def from_mapping(cls, denoise: Mapping[str, Any]) -> DenoiseOptions:
        """The options of a user's dict (absent ones take their defaults).

        Raises:
            TypeError: ``denoise`` is not a mapping, or an option has the wrong type.
            DenoiseOptionError: an unknown option (a TypeError and a ValueError).
            ValueError: an option has an invalid value.
        """
        if not isinstance(denoise, Mapping):
            raise TypeError(
                f"denoise must be a dict of rmt_kernels.denoise options or None, got "
                f"{type(denoise).__name__}"
            )
        unknown = sorted(set(denoise) - set(DENOISE_OPTIONS_NAMES), key=str)
        if unknown:
            raise DenoiseOptionError(
                f"denoise: unknown option(s) {', '.join(map(repr, unknown))}; valid options are "
                f"{', '.join(sorted(DENOISE_OPTIONS_NAMES))}"
            )
        return cls(**denoise, given=tuple(denoise))

    def given_options(self) -> dict[str, Any]:
        """The options the user gave, as a plain dict in their order (ints as ``int``)."""
        assert self.given is not None  # set by __post_init__
        return {name: getattr(self, name) for name in self.given}

    def op_options(self, step: int) -> dict[str, Any]:
        """The keyword options to pass :func:`rmt_kernels.denoise` (or its warm and batched
        forms) at ``step``: the op options the user gave, ``rank`` left out (the caller caps
        it per matrix), and ``seed`` always, as ``seed + step`` (the sketch's test matrix: a
        component missed in one step is not missed in every step)."""
        options = {
            name: value
            for name, value in self.given_options().items()
            if name in _OP_DEFAULTS and name not in ("rank", "seed")
        }
        options["seed"] = (self.seed + step) % SEED_LIMIT
        return options


# Every option's name, the op's first, in the dataclass's order.
DENOISE_OPTIONS_NAMES: tuple[str, ...] = tuple(
    f.name for f in dataclasses.fields(DenoiseOptions) if f.name != "given"
)
#: Every option with its default.
DENOISE_OPTIONS: dict[str, Any] = {
    f.name: f.default for f in dataclasses.fields(DenoiseOptions) if f.name != "given"
}


def check_denoise_options(
    denoise: Mapping[str, Any] | DenoiseOptions | None,
) -> DenoiseOptions | None:
    """Validate ``denoise`` options once, before any data is touched (both engines call this).

    A typo (``kapa=2``) or a bad value would otherwise surface only after the first forward and
    backward pass of a possibly long job, or be silently ignored.

    Args:
        denoise: a dict of keyword options of :func:`rmt_kernels.denoise` (``shrinker``,
            ``kappa``, ``rank``, ``oversample``, ``niter``, ``norm``, ``seed``) plus
            ``min_dim``, ``warm_start`` and ``passthrough_below_edge`` (bools), or a
            :class:`DenoiseOptions` (returned as it is), or None for no denoising.

    Returns:
        The :class:`DenoiseOptions` (a frozen copy: later changes to the caller's dict do not
        leak into training), or None.

    Raises:
        TypeError: ``denoise`` is not a mapping, or an option has the wrong type.
        DenoiseOptionError: an unknown option (a TypeError and a ValueError).
        ValueError: an option has an invalid value.
    """
    if denoise is None or isinstance(denoise, DenoiseOptions):
        return denoise
    return DenoiseOptions.from_mapping(denoise)
