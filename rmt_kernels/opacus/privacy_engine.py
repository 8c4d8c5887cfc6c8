"""A PrivacyEngine whose ``make_private(..., denoise={...}, post_processors=[...])`` returns a
DP optimizer that post-processes the noisy gradient (denoising, temporal filters, a DP-aware
Adam: the chain of rmt_kernels/dp/stages/chain.py, shared with the native engine).

Opacus still wraps the model, builds the Poisson data loader, picks the optimizer flavour and
the noise generator, and attaches the accountant's step hook to the optimizer we return, so
epsilon is counted as in Opacus, with two differences: ``make_private_with_epsilon`` calibrates
with the package's bounded search (rmt_kernels/dp/calibration.py, as the native make_private),
and ``load_checkpoint`` charges again the steps released after the checkpoint it rolls back to
(Opacus's forgets them).

Written against opacus==1.6.0, where ``make_private`` calls ``self._prepare_optimizer(...)`` and
then ``optimizer.attach_step_hook(self.accountant.get_optimizer_hook_fn(...))``.

Ghost clipping (privacy invariant 6, PRIVACY.md). ``grad_sample_mode="ghost"`` wraps the model in
:class:`~rmt_kernels.opacus.ghost.CertifiedGradSampleModuleFastGradientClipping` (or its hooks-only
form for ``wrap_model=False``): Opacus's ghost clipping, with per-example norms from rmt_kernels'
certified ops (upper bounds of the exact norms, where Opacus's float32 Gram sums return 0 for a
crafted cancelling example) and clip factors from ``clip_scales``. Plain ``opacus.PrivacyEngine``
is unchanged. Trainable modules other than nn.Linear, nn.Embedding and nn.LayerNorm are refused
in ghost mode (their norms cannot be certified); "ghost_fsdp" and "ghost_tp" are refused too.

Hooks mode ("hooks", "functorch", "ew") is sound as Opacus does it: the optimizer computes each
per-example gradient g_b explicitly, its norm from that same computed tensor, and releases
``sum_b c_b g_b`` with ``c_b = min(1, C / (|g_b| + 1e-6))``. The norm and the released vector are
one and the same array, so no cancelling input can make them disagree: a sum of squares has no
cancellation, its float32 value is within a relative ``n 2^-24`` of the true one (n entries), and
``c_b |g_b| <= C (1 + n 2^-24)``; the 1e-6 usually covers that. Only the float rounding of the
final sum over examples remains, as in any float32 implementation. (How accurately g_b matches
the exact gradient does not matter for privacy: g_b depends on example b alone.)

Seeds. Outside secure mode Opacus draws the noise and the Poisson sampling from torch
generators: the global one, which scripts seed with a public ``torch.manual_seed(seed)``, or a
caller's, whose mt19937 keeps only the low 32 bits of any seed (a seed scan recovers it from
one released step). This engine instead draws the noise from the package's Philox stream
(``rmt_kernels.ops.add_gaussian_noise``, counter ``noise_offset(step, parameter, count)``) keyed
by 63 bits from the OS, through a twin of Opacus's optimizer class (only ``add_noise`` differs;
under torch.distributed only rank 0 noises, as in Opacus), and the batches from a
:class:`~rmt_kernels.dp.distributed.PoissonSampler` keyed by 128 bits from the OS
(:class:`KeyedDPDataLoader`). Neither key is in any ``state_dict`` or pickle. A caller's
``noise_generator`` keeps Opacus's noise path (the run's privacy then rests on that generator's
seed being secret, which the engine cannot know: it warns and reports ``noise_seed_is_secret =
False``). Secure mode is Opacus's, unchanged (torchcsprng). A flavour without a twin (adaptive
clipping) is refused outside secure mode without a ``noise_generator``.
"""

from __future__ import annotations

import math
import secrets
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

from opacus import PrivacyEngine
from opacus.data_loader import DPDataLoader
from opacus.distributed import DifferentiallyPrivateDistributedDataParallel
from opacus.grad_sample import AbstractGradSampleModule, GradSampleHooks
from opacus.optimizers import DPOptimizer, get_optimizer_class
from torch import nn
from torch.distributed._composable.fsdp import FSDPModule
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from rmt_kernels.dp import distributed
from rmt_kernels.dp.calibration import (
    calibrate_noise_multiplier,
    check_accountant,
    run_steps,
    spent_epsilon,
    warn_delta,
)
from rmt_kernels.dp.stages.chain import build_chain
from rmt_kernels.dp.stages.options import DenoiseOptions, check_denoise_options
from rmt_kernels.opacus.ghost import (
    CertifiedGradSampleHooksFastGradientClipping,
    CertifiedGradSampleModuleFastGradientClipping,
)
from rmt_kernels.opacus.optimizers import NOISE_SEED_BITS, denoising_optimizer_class

__all__ = ["DenoisingPrivacyEngine"]

# "denoise not passed": Opacus's make_private_with_epsilon calls make_private without it, and
# that inner call must keep the options of the outer one instead of resetting them to None.
_UNSET: Any = object()


class DenoisingPrivacyEngine(PrivacyEngine):
    """Opacus's PrivacyEngine with ``denoise`` and ``post_processors`` options on
    ``make_private`` and ``make_private_with_epsilon``.

    ``denoise`` is a dict of :func:`rmt_kernels.denoise` options (``{}`` for the defaults) or None
    (the default); ``post_processors`` a list of stages (rmt_kernels/dp/stages/chain.py: e.g.
    ``[EMAFilter(0.9), Denoiser({"kappa": 1.0}), DPAdam(beta1=0.0)]``, then a plain SGD as the
    wrapped optimizer) or None. With both None the engine returns the optimizer Opacus would
    (exactly so with a ``noise_generator`` or in secure mode; otherwise its twin, whose only
    change is the Philox noise of the module docstring). Both are validated before anything is
    wrapped, so a typo fails before the model is touched. The stages' keys are the parameters'
    indices in ``optimizer.params``; every 2-D gradient is a Denoiser's candidate (Opacus knows
    no modules).

    Example:
        >>> engine = DenoisingPrivacyEngine(accountant="rdp")
        >>> model, optimizer, loader = engine.make_private(
        ...     module=model, optimizer=optimizer, data_loader=loader,
        ...     noise_multiplier=1.0, max_grad_norm=1.0, denoise={"norm": "preserve"})
        >>> # ... train as with Opacus ...
        >>> engine.get_epsilon(delta=1e-5)  # unchanged: denoising is post-processing
    """

    def __init__(self, *, accountant: str = "prv", secure_mode: bool = False) -> None:
        check_accountant(accountant)  # "gdp" under-reports epsilon: refused
        super().__init__(accountant=accountant, secure_mode=secure_mode)
        # Options of the make_private call in progress: Opacus's make_private forwards its
        # **kwargs to the optimizer, the criterion and (via make_private_with_epsilon) to
        # get_noise_multiplier, so ``denoise`` and ``post_processors`` travel on the engine
        # instead of through kwargs.
        self._denoise: DenoiseOptions | None = None
        self._post_processors: list | None = None
        # Whether the noise of the last make_private comes from a seed nobody chose: True for
        # the default (OS-seeded generator) and secure mode, False with a caller's
        # noise_generator; None before make_private. The optimizer carries the same attribute.
        self.noise_seed_is_secret: bool | None = None
        # Every release (noisy step) of this engine's optimizers in this process, as
        # [sigma, q, count] runs, and a token naming this engine in its checkpoints: Opacus's
        # load_checkpoint replaces the accountant's history by the checkpoint's, which forgets
        # the steps released after that checkpoint (they used data all the same).
        self._releases: list[list] = []
        self._run_token = secrets.token_hex(16)

    def make_private(  # type: ignore[override]
        self,
        *,
        denoise: Mapping[str, Any] | None = _UNSET,
        post_processors: Sequence[Any] | None = _UNSET,
        **kwargs: Any,
    ) -> tuple[Any, ...]:
        """Opacus's ``make_private`` plus ``denoise`` and ``post_processors`` (see the class
        docstring; the chain is built as in :func:`rmt_kernels.dp.make_private`: ``denoise=D``
        is a Denoiser at the front of ``post_processors``).

        Returns what Opacus returns: (module, optimizer, data_loader), or (module, optimizer,
        criterion, data_loader) for ghost clipping; the optimizer post-processes when
        ``denoise`` or ``post_processors`` is given.

        Raises:
            TypeError / ValueError: an unknown or invalid ``denoise`` option, or a bad chain.
            NotImplementedError: post-processing with an optimizer flavour that has no twin
                (FSDP, adaptive clipping).
            ValueError: the optimizer does not hold every trainable parameter of the module
                (one left out would never be updated: Opacus #820), naming one.
        """
        previous = self._denoise, self._post_processors
        if denoise is not _UNSET:
            self._denoise = check_denoise_options(denoise)
        if post_processors is not _UNSET:
            self._post_processors = None if post_processors is None else list(post_processors)
        try:
            if self._post_processing():
                build_chain(self._denoise, self._post_processors)  # checked before any wrap
            if self._post_processing() or self._philox_noise(kwargs):
                _check_flavour_early(kwargs, self._post_processing())
            _check_optimizer_holds_trainable(kwargs.get("module"), kwargs.get("optimizer"))
            returned = super().make_private(**kwargs)
        finally:
            self._denoise, self._post_processors = previous
        self._count_releases(returned[1])
        return returned

    def make_private_with_epsilon(  # type: ignore[override]
        self,
        *,
        target_epsilon: float,
        target_delta: float,
        epochs: float,
        data_loader: DataLoader,
        denoise: Mapping[str, Any] | None = None,
        post_processors: Sequence[Any] | None = None,
        **kwargs: Any,
    ) -> tuple[Any, ...]:
        """Opacus's ``make_private_with_epsilon`` plus ``denoise`` and ``post_processors``.

        The noise multiplier is Opacus's (the same search over sigma, at Opacus's sampling
        rate ``1 / len(data_loader)``) over the steps the run takes
        (:func:`~rmt_kernels.dp.calibration.run_steps` of the epochs and the loader's batches per
        epoch, where Opacus's ``int(epochs / rate)`` can drop one), found by
        :func:`rmt_kernels.dp.calibration.calibrate_noise_multiplier` as in
        :func:`rmt_kernels.dp.make_private`: bounded in time, refused for a target epsilon that
        is not in (0, 100] (Opacus's search ran minutes for 1e3 with PRV and returned sigma 10
        for NaN). A ``target_delta`` of 1/n or more is warned of (it allows publishing an
        example outright). Post-processing costs no privacy. The other keyword arguments are
        Opacus's ``make_private``'s.

        Raises:
            ValueError: target_epsilon, target_delta or epochs out of range, an empty
                data_loader, or a calibration that cannot finish (see
                :func:`~rmt_kernels.dp.calibration.calibrate_noise_multiplier`); all before
                the model is wrapped.
        """
        options = check_denoise_options(denoise)
        if not (isinstance(target_delta, (int, float)) and 0 < target_delta < 1):
            raise ValueError(f"target_delta must be in (0, 1), got {target_delta}")
        if not (isinstance(epochs, (int, float)) and 0 < epochs < math.inf):
            raise ValueError(f"epochs must be a finite number > 0, got {epochs}")
        if len(data_loader) == 0:
            raise ValueError("data_loader is empty")
        warn_delta(target_delta, len(data_loader.dataset), "target_delta")
        if len(self.accountant) > 0:
            warnings.warn(  # as Opacus says it
                "make_private_with_epsilon: privacy budget already spent; the noise multiplier "
                "is calibrated from zero, so the total epsilon will be higher",
                stacklevel=2,
            )
        sample_rate = 1 / len(data_loader)  # the rate Opacus's accountant hook charges
        # The steps the run takes, not Opacus's int(epochs / sample_rate), which truncates a
        # float quotient (3 epochs of 75 batches: 224 of the 225 steps, and epsilon 8.0094
        # spent against 8). A Poisson epoch is Opacus's loader's int(1 / sample_rate) batches
        # (92 for 93: Opacus's count there); without Poisson sampling, the loader's own.
        poisson = kwargs.get("poisson_sampling", True)
        per_epoch = (
            distributed.poisson_batches_per_epoch(sample_rate) if poisson else len(data_loader)
        )
        noise_multiplier = calibrate_noise_multiplier(
            target_epsilon,
            target_delta,
            sample_rate,
            run_steps(epochs, per_epoch),
            self.accountant.mechanism(),
        )
        return self.make_private(
            data_loader=data_loader,
            noise_multiplier=noise_multiplier,
            denoise=options,
            post_processors=post_processors,
            **kwargs,
        )

    def _philox_noise(self, make_private_kwargs: Mapping[str, Any]) -> bool:
        """Whether the make_private call draws the package's Philox noise (a twin optimizer):
        outside secure mode, without a caller's noise_generator."""
        return not self.secure_mode and make_private_kwargs.get("noise_generator") is None

    def get_epsilon(self, delta: float) -> float:
        """Opacus's epsilon at ``delta``, never below 0 (the PRV accountant returns a negative
        upper bound where the run is (0, delta)-DP: see
        :func:`rmt_kernels.dp.calibration.spent_epsilon`)."""
        return spent_epsilon(self.accountant, delta)

    def _count_releases(self, optimizer: DPOptimizer) -> None:
        """Record each step the accountant charges through ``optimizer`` in the engine's own
        run-length list (see :meth:`load_checkpoint`)."""
        charge = optimizer.step_hook

        def charge_and_record(optim: DPOptimizer) -> None:
            charge(optim)
            sigma, rate = self.accountant.history[-1][:2]
            if self._releases and self._releases[-1][:2] == [sigma, rate]:
                self._releases[-1][2] += 1
            else:
                self._releases.append([sigma, rate, 1])

        optimizer.attach_step_hook(charge_and_record)

    def save_checkpoint(self, *, checkpoint_dict: dict | None = None, **kwargs: Any) -> None:
        """Opacus's ``save_checkpoint``; the checkpoint also records how many of this engine's
        releases its accountant state holds (``rmt_releases``), for :meth:`load_checkpoint`."""
        checkpoint_dict = dict(checkpoint_dict or {})
        released = sum(run[2] for run in self._releases)
        checkpoint_dict["rmt_releases"] = {"run": self._run_token, "released": released}
        super().save_checkpoint(checkpoint_dict=checkpoint_dict, **kwargs)

    def load_checkpoint(self, **kwargs: Any) -> dict:
        """Opacus's ``load_checkpoint``, which sets the accountant to the checkpoint's history,
        plus every step this engine released that the checkpoint does not hold: a rollback to
        an earlier checkpoint of this engine (steps released after it are charged again) or a
        checkpoint of another run after steps of this one (all of this engine's steps).

        Opacus alone forgets them: 2 steps, a checkpoint, 5 steps, load it, 5 steps charged 7
        of the 12 steps that used data. (The twin's noise stream does not roll back, so no
        noise is reused; Opacus's own generator in secure mode or a caller's does not roll back
        either.) A checkpoint written otherwise than by :meth:`save_checkpoint` counts none of
        this engine's releases.
        """
        checkpoint = super().load_checkpoint(**kwargs)
        mark = checkpoint.pop("rmt_releases", None)
        counted = mark["released"] if mark and mark.get("run") == self._run_token else 0
        for sigma, rate, count in self._releases:
            uncounted = max(0, count - counted)
            counted = max(0, counted - count)
            for _ in range(uncounted):
                self.accountant.step(noise_multiplier=sigma, sample_rate=rate)
        return checkpoint

    def _post_processing(self) -> bool:
        """Whether the make_private call in progress post-processes (a twin optimizer)."""
        return self._denoise is not None or bool(self._post_processors)

    def _prepare_model(
        self,
        module: nn.Module,
        *,
        batch_first: bool = True,
        max_grad_norm: float | list[float] = 1.0,
        loss_reduction: str = "mean",
        grad_sample_mode: str = "hooks",
        wrap_model: bool = True,
    ) -> Any:
        """Opacus's model wrapper, with certified norms in ghost mode (module docstring).

        Raises:
            NotImplementedError: ghost mode with a module whose norms cannot be certified, or
                "ghost_fsdp" / "ghost_tp" (their norm samplers are Opacus's float32 ones); before
                any hook is attached.
            ValueError: a model already wrapped by Opacus's (uncertified) ghost wrapper.
        """
        if "ghost" not in grad_sample_mode:
            return super()._prepare_model(
                module,
                batch_first=batch_first,
                max_grad_norm=max_grad_norm,
                loss_reduction=loss_reduction,
                grad_sample_mode=grad_sample_mode,
                wrap_model=wrap_model,
            )
        if grad_sample_mode != "ghost":
            raise NotImplementedError(
                f"DenoisingPrivacyEngine: grad_sample_mode={grad_sample_mode!r} uses Opacus's "
                "float32 ghost norms, which a crafted cancelling example defeats (privacy "
                "invariant 6, PRIVACY.md); use grad_sample_mode='ghost' or 'hooks'"
            )
        self.validate(module=module, optimizer=None, data_loader=None)
        if isinstance(module, (AbstractGradSampleModule, GradSampleHooks)):
            if wrap_model and isinstance(module, CertifiedGradSampleModuleFastGradientClipping):
                if module.batch_first != batch_first or module.loss_reduction != loss_reduction:
                    raise ValueError(
                        f"DenoisingPrivacyEngine: the given {type(module).__name__} has "
                        f"batch_first={module.batch_first}, loss_reduction="
                        f"{module.loss_reduction!r}; make_private asked for {batch_first}, "
                        f"{loss_reduction!r}. Pass the plain nn.Module instead"
                    )
                return module
            raise ValueError(
                f"DenoisingPrivacyEngine: the module is already wrapped by Opacus "
                f"({type(module).__name__}); pass the plain nn.Module so that ghost clipping "
                "uses certified norms"
            )
        if not (isinstance(max_grad_norm, (int, float)) and not isinstance(max_grad_norm, bool)):
            raise ValueError(
                "DenoisingPrivacyEngine: ghost clipping takes one max_grad_norm (a number), got "
                f"{type(max_grad_norm).__name__}"
            )
        cls = (
            CertifiedGradSampleModuleFastGradientClipping
            if wrap_model
            else CertifiedGradSampleHooksFastGradientClipping
        )
        return cls(
            module,
            batch_first=batch_first,
            loss_reduction=loss_reduction,
            max_grad_norm=max_grad_norm,
        )

    def _prepare_data_loader(self, data_loader, **kwargs: Any):
        """Opacus's loader; outside secure mode its Poisson batches come from a
        :class:`~rmt_kernels.dp.distributed.PoissonSampler` keyed by 128 bits from the OS
        (Opacus would draw them from a torch generator, whose seed keeps 32 bits, or from the
        global one, whose seed is often public: knowing which examples formed each batch voids
        the amplification by sampling)."""
        loader = super()._prepare_data_loader(data_loader, **kwargs)
        if self.secure_mode or not kwargs.get("poisson_sampling", False):
            return loader
        return KeyedDPDataLoader(loader)

    def _prepare_optimizer(self, **kwargs: Any) -> DPOptimizer:
        """Let Opacus choose the flavour and generator, then build its twin.

        Building Opacus's optimizer first (cheap: it only wraps the torch optimizer) reuses its
        choice of class (clipping, distributed, grad_sample_mode) and of noise generator (the
        engine's secure RNG in secure mode), so neither is duplicated here. Outside secure mode
        and without a caller's ``noise_generator``, the twin draws the package's Philox noise
        keyed by 63 bits from the OS (see the module docstring).
        """
        noise_seed = None
        if self.secure_mode:
            secret = True
        elif kwargs.get("noise_generator") is not None:
            secret = False
            warnings.warn(
                "DenoisingPrivacyEngine: noise_generator given: the run is private only if that "
                "generator's seed is secret (a seed in a script or log lets anyone subtract the "
                "noise; a torch generator keeps only 32 bits of its seed); noise_seed_is_secret "
                "is False. Leave it None for Philox noise keyed from the OS",
                stacklevel=4,  # the caller of make_private
            )
        else:
            noise_seed = secrets.randbits(NOISE_SEED_BITS)
            secret = True
        self.noise_seed_is_secret = secret
        optimizer = self._build_optimizer(noise_seed, **kwargs)
        optimizer.noise_seed_is_secret = secret
        return optimizer

    def _build_optimizer(self, noise_seed: int | None, **kwargs: Any) -> DPOptimizer:
        opacus_optimizer = super()._prepare_optimizer(**kwargs)
        if not self._post_processing() and noise_seed is None:
            return opacus_optimizer
        twin = _twin_class(type(opacus_optimizer), self._post_processing())
        for key in ("optimizer", "noise_generator", "distributed", "clipping", "grad_sample_mode"):
            kwargs.pop(key, None)
        return twin(
            opacus_optimizer.original_optimizer,
            denoise=self._denoise,
            post_processors=self._post_processors,
            generator=opacus_optimizer.generator,
            secure_mode=opacus_optimizer.secure_mode,
            noise_seed=noise_seed,
            **kwargs,
        )


class KeyedDPDataLoader(DPDataLoader):
    """Opacus's :class:`~opacus.data_loader.DPDataLoader` (its dataset, collate that shapes
    empty batches, ``sample_rate``, length and loader options) whose batches come from a
    :class:`~rmt_kernels.dp.distributed.PoissonSampler` with a secret 128-bit key.

    Each batch holds each example independently with probability ``sample_rate``, as
    Opacus's sampler; ``len()`` is the same ``int(1 / sample_rate)``, so Opacus's accountant
    sees the same rate. Under torch.distributed each rank samples its shard of the same
    shuffled permutation, as Opacus's distributed sampler, but empty local batches are yielded
    rather than skipped (the ranks stay in step). The key is never written (not in the
    sampler's ``state_dict``, not in a pickle).
    """

    def __init__(self, like: DPDataLoader) -> None:
        rank, world_size = distributed.world() if like.distributed else (0, 1)
        self.sample_rate = like.sample_rate
        self.distributed = like.distributed
        sampler = distributed.PoissonSampler(
            num_samples=len(like.dataset),
            sample_rate=like.sample_rate,
            steps=len(like),
            rank=rank,
            world_size=world_size,
        )
        DataLoader.__init__(
            self,
            like.dataset,
            batch_sampler=sampler,
            collate_fn=like.collate_fn,
            num_workers=like.num_workers,
            pin_memory=like.pin_memory,
            timeout=like.timeout,
            worker_init_fn=like.worker_init_fn,
            multiprocessing_context=like.multiprocessing_context,
            generator=distributed.worker_seed_generator(None),
            prefetch_factor=like.prefetch_factor,
            persistent_workers=like.persistent_workers,
        )


def _check_optimizer_holds_trainable(module: Any, optimizer: Any) -> None:
    """Refuse an optimizer that does not hold every trainable parameter of ``module``.

    Opacus clips, noises and steps only the optimizer's parameters. One that requires grad but
    is not among them is never updated, silently (Opacus #820: DP-LoRA adapters that never moved,
    e.g. an optimizer built before ``get_peft_model`` froze the base and added the adapters),
    and its ``.grad`` is the raw, unclipped gradient of the batch.

    Raises:
        ValueError: naming the first parameters left out.
    """
    if not isinstance(module, nn.Module) or not hasattr(optimizer, "param_groups"):
        return  # Opacus's own checks name a bad module or optimizer
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    missing = [n for n, p in module.named_parameters() if p.requires_grad and id(p) not in held]
    if missing:
        raise ValueError(
            f"DenoisingPrivacyEngine: the optimizer does not hold {len(missing)} trainable "
            f"parameter(s) of the module, e.g. {missing[:3]}: they would never update. Build "
            "the optimizer over the module's trainable parameters after freezing and after "
            "adding adapters (get_peft_model), e.g. [p for p in model.parameters() if "
            "p.requires_grad]"
        )


def _twin_class(opacus_class: type[DPOptimizer], post_processing: bool) -> type[DPOptimizer]:
    """The twin of ``opacus_class``, with an error naming the reason it is needed."""
    try:
        return denoising_optimizer_class(opacus_class)
    except NotImplementedError as err:
        if post_processing:
            raise
        raise NotImplementedError(
            f"DenoisingPrivacyEngine: {opacus_class.__name__} has no twin that draws Philox "
            "noise, and its own torch generator keeps only 32 bits of a secret seed. Pass "
            "secure_mode=True, or a noise_generator you seed secretly (the run is then "
            "reported as noise_seed_is_secret=False)"
        ) from err


def _check_flavour_early(make_private_kwargs: dict[str, Any], post_processing: bool) -> None:
    """Raise NotImplementedError for a flavour without a twin before Opacus wraps the model
    (which attaches hooks to the caller's module), not after.

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
    _twin_class(opacus_class, post_processing)
