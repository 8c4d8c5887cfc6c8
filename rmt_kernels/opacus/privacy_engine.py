"""A PrivacyEngine whose ``make_private(..., denoise={...})`` returns a denoising DP optimizer.

Only Opacus's ``_prepare_optimizer`` is extended: Opacus still wraps the model, builds the
Poisson data loader, picks the optimizer flavour and the noise generator, and attaches the
accountant's step hook to the optimizer we return, so epsilon is counted exactly as in Opacus.

Written against opacus==1.6.0, where ``make_private`` calls ``self._prepare_optimizer(...)`` and
then ``optimizer.attach_step_hook(self.accountant.get_optimizer_hook_fn(...))``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from opacus import PrivacyEngine
from opacus.distributed import DifferentiallyPrivateDistributedDataParallel
from opacus.optimizers import DPOptimizer, get_optimizer_class
from torch.distributed._composable.fsdp import FSDPModule
from torch.nn.parallel import DistributedDataParallel

from rmt_kernels.opacus.optimizers import denoising_optimizer_class, validate_denoise_options

__all__ = ["DenoisingPrivacyEngine"]

# "denoise not passed": Opacus's make_private_with_epsilon calls make_private without it, and
# that inner call must keep the options of the outer one instead of resetting them to None.
_UNSET: Any = object()


class DenoisingPrivacyEngine(PrivacyEngine):
    """Opacus's PrivacyEngine with a ``denoise`` option on ``make_private`` and
    ``make_private_with_epsilon``.

    ``denoise`` is a dict of :func:`rmt_kernels.denoise` options (``{}`` for the defaults) or None
    (the default), in which case the engine returns exactly the optimizer Opacus would. The
    options are validated before anything is wrapped, so a typo fails before the model is touched.

    Example:
        >>> engine = DenoisingPrivacyEngine(accountant="rdp")
        >>> model, optimizer, loader = engine.make_private(
        ...     module=model, optimizer=optimizer, data_loader=loader,
        ...     noise_multiplier=1.0, max_grad_norm=1.0, denoise={"norm": "preserve"})
        >>> # ... train as with Opacus ...
        >>> engine.get_epsilon(delta=1e-5)  # unchanged: denoising is post-processing
    """

    def __init__(self, *, accountant: str = "prv", secure_mode: bool = False) -> None:
        super().__init__(accountant=accountant, secure_mode=secure_mode)
        # Options of the make_private call in progress: Opacus's make_private forwards its
        # **kwargs to the optimizer, the criterion and (via make_private_with_epsilon) to
        # get_noise_multiplier, so ``denoise`` travels on the engine instead of through kwargs.
        self._denoise: dict[str, Any] | None = None

    def make_private(  # type: ignore[override]
        self, *, denoise: Mapping[str, Any] | None = _UNSET, **kwargs: Any
    ) -> tuple[Any, ...]:
        """Opacus's ``make_private`` plus ``denoise`` (see the class docstring).

        Returns what Opacus returns: (module, optimizer, data_loader), or (module, optimizer,
        criterion, data_loader) for ghost clipping; the optimizer denoises when ``denoise`` is
        not None.

        Raises:
            TypeError / ValueError: an unknown or invalid ``denoise`` option.
            NotImplementedError: ``denoise`` with an optimizer flavour that has no denoising twin
                (distributed, FSDP, adaptive clipping).
        """
        previous = self._denoise
        if denoise is not _UNSET:
            self._denoise = validate_denoise_options(denoise)
        try:
            if self._denoise is not None:
                _check_flavour_early(kwargs)
            return super().make_private(**kwargs)
        finally:
            self._denoise = previous

    def make_private_with_epsilon(  # type: ignore[override]
        self, *, denoise: Mapping[str, Any] | None = None, **kwargs: Any
    ) -> tuple[Any, ...]:
        """Opacus's ``make_private_with_epsilon`` plus ``denoise``.

        The noise multiplier is calibrated for the target epsilon exactly as in Opacus: denoising
        is post-processing and costs no privacy.
        """
        options = validate_denoise_options(denoise)
        previous, self._denoise = self._denoise, options
        try:
            # Opacus calls self.make_private, i.e. ours, without ``denoise``: see _UNSET.
            return super().make_private_with_epsilon(**kwargs)
        finally:
            self._denoise = previous

    def _prepare_optimizer(self, **kwargs: Any) -> DPOptimizer:
        """Let Opacus choose the flavour and generator, then build its denoising twin.

        Building Opacus's optimizer first (cheap: it only wraps the torch optimizer) reuses its
        choice of class (clipping, distributed, grad_sample_mode) and of noise generator (the
        engine's secure RNG in secure mode), so neither is duplicated here.
        """
        opacus_optimizer = super()._prepare_optimizer(**kwargs)
        if self._denoise is None:
            return opacus_optimizer
        twin = denoising_optimizer_class(type(opacus_optimizer))
        for key in ("optimizer", "noise_generator", "distributed", "clipping", "grad_sample_mode"):
            kwargs.pop(key, None)
        return twin(
            opacus_optimizer.original_optimizer,
            denoise=self._denoise,
            generator=opacus_optimizer.generator,
            secure_mode=opacus_optimizer.secure_mode,
            **kwargs,
        )


def _check_flavour_early(make_private_kwargs: dict[str, Any]) -> None:
    """Raise NotImplementedError for a flavour without a denoising twin before Opacus wraps the
    model (which attaches hooks to the caller's module), not after.

    Repeats Opacus 1.6.0's choice of optimizer class from make_private's arguments. It is only a
    courtesy: ``_prepare_optimizer`` checks the class Opacus actually built either way.
    """
    module = make_private_kwargs.get("module")
    distributed = isinstance(
        module, (DifferentiallyPrivateDistributedDataParallel, DistributedDataParallel, FSDPModule)
    )
    try:
        opacus_class = get_optimizer_class(
            clipping=make_private_kwargs.get("clipping", "flat"),
            distributed=distributed,
            grad_sample_mode=make_private_kwargs.get("grad_sample_mode", "hooks"),
        )
    except ValueError:
        return  # a combination Opacus itself rejects, with its own message, a moment later
    denoising_optimizer_class(opacus_class)
