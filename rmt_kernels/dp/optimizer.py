"""The optimizer users step: any torch optimizer, fed private gradients."""

from __future__ import annotations

from collections.abc import Callable

import torch

from rmt_kernels.dp.engine import PrivateEngine


class DPOptimizer(torch.optim.Optimizer):
    """Wraps a torch optimizer (SGD, Adam, AdamW, any) so that ``step()`` is a DP-SGD step.

    ``step()`` turns the physical batches seen since the last step into one noisy, clipped,
    averaged (and optionally denoised) gradient, lets the wrapped optimizer use it, and counts
    the step with the accountant. Gradient accumulation is the ordinary loop: several
    ``forward``/``backward`` passes, then one ``step()``; Opacus's ``BatchMemoryManager`` works
    too (it calls :meth:`signal_skip_step`).

    Raises:
        ValueError: the optimizer holds a trainable parameter that is not in the model, or does
            not hold one that the engine privatises (it would never be updated), naming it.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, engine: PrivateEngine) -> None:
        # Share the wrapped optimizer's state and groups (as Opacus's DPOptimizer does), so
        # schedulers and state_dict act on it.
        self.original_optimizer = optimizer
        self.engine = engine
        self._skip_next = False
        self._last_skipped = False
        tracked = {id(p) for _, _, p in engine.params}
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.requires_grad and id(p) not in tracked:
                    raise ValueError(
                        "make_private: the optimizer holds a trainable parameter that is not in "
                        "the model; DP-SGD could not noise it"
                    )
        # The converse (Opacus #820: DP-LoRA adapters that silently never moved): a parameter
        # the engine privatises but the optimizer does not hold gets a private gradient that no
        # step applies, e.g. an optimizer built before get_peft_model froze the base and added
        # the adapters.
        held = {id(p) for group in optimizer.param_groups for p in group["params"]}
        missing = [
            name
            for name, (_, _, p) in zip(engine.param_names, engine.params, strict=True)
            if id(p) not in held
        ]
        if missing:
            raise ValueError(
                f"make_private: the optimizer does not hold {len(missing)} trainable "
                f"parameter(s) of the model, e.g. {missing[:3]}: their private gradients would "
                "be computed but no step would ever update them. Build the optimizer over the "
                "model's trainable parameters after freezing and after adding adapters "
                "(get_peft_model), e.g. [p for p in model.parameters() if p.requires_grad]"
            )

    # torch.optim.Optimizer plumbing, delegated.
    @property
    def param_groups(self):  # type: ignore[override]
        return self.original_optimizer.param_groups

    @property
    def state(self):  # type: ignore[override]
        return self.original_optimizer.state

    @property
    def defaults(self):  # type: ignore[override]
        return self.original_optimizer.defaults

    def state_dict(self):
        return self.original_optimizer.state_dict()

    def load_state_dict(self, state_dict) -> None:
        self.original_optimizer.load_state_dict(state_dict)

    def add_param_group(self, param_group) -> None:
        raise RuntimeError("DPOptimizer: parameters cannot be added after make_private")

    @property
    def noise_seed_is_secret(self) -> bool:
        """Whether the noise seed came from the OS (False: a reproducible seed was given, so
        anyone who knows it can subtract the noise; the run is not private)."""
        return self.engine.noise_seed_is_secret

    def __repr__(self) -> str:
        return f"DPOptimizer({self.original_optimizer!r}, {self.engine!r})"

    def signal_skip_step(self, do_skip: bool = True) -> None:
        """Make the next ``step()`` only accumulate (Opacus's BatchMemoryManager protocol)."""
        self._skip_next = do_skip

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear gradients; partial sums of a logical step in progress are kept."""
        self.original_optimizer.zero_grad(set_to_none=set_to_none)
        if not self._last_skipped:
            self.engine.zero_grad()

    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """One DP-SGD step (or, after ``signal_skip_step(True)``, one accumulated batch).

        Without a forward since the last step (an empty Poisson batch) the step is noise
        alone, counted by the accountant: that is the way to handle an empty batch.

        Raises:
            RuntimeError: a parameter the engine did not privatise would be updated (unfrozen or
                added to the optimizer after make_private), naming it.
        """
        if closure is not None:
            with torch.enable_grad():
                closure()
        # Privacy invariant 8 (PRIVACY.md): nothing the engine did not privatise may be updated,
        # however it got into the model or the optimizer since make_private (checked every step).
        self.engine.check_updates(self.param_groups)
        if self._skip_next:
            self.engine.accumulate_pending()
            self._last_skipped = True
            self._skip_next = False
            return None
        self._last_skipped = False
        # The private step's template (rmt_kernels/dp/engine.py): noise, all-reduce,
        # post-processing, p.grad; then the update and the accountant.
        self.engine.privatize()
        self.engine.step_accounted()
        return self.original_optimizer.step()

    def get_epsilon(self, delta: float) -> float:
        """Privacy spent so far, at ``delta``."""
        return self.engine.get_epsilon(delta)
