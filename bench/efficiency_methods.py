"""The methods the sample-efficiency experiments compare, as ``rmt-glue train`` settings.

A method is a name, a one-line description and the ``GlueConfig`` fields it sets on top of the
shared set-up (bench/sample_efficiency.py), plus its own learning rate: every method is compared
at the best learning rate found for it on SST-2 (``--sweep``; the record is
``bench/results/sst2-minilm-100/tuning.md``), never at one shared value, because a denoiser may
pay off precisely by allowing a larger step.

The post-processing options (filters, moment and trajectory shrinkage, DP-Adam) are the flags
of ``rmt-glue train``; each reads only the released noisy gradient and public numbers.

Two experiments (bench/sample_efficiency.py ``--experiment``): :data:`METHODS`, the 100-step
one at B = 512 (``sst2-minilm-100``), and :data:`METHODS_2048`, the early phase at B = 2048
(``sst2-minilm-2048``), where most of the encoder's clean gradient stands above the detection
threshold in the first steps and none of it by step 30 (issue 25's probe): per-step shrinkage
can only pay early and must stop deleting the update once the signal is gone.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

# The Frobenius shrinker at the bulk edge: the theory's default (kappa is swept separately).
SHRINK = {"kappa": 1.0, "shrinker": "frobenius", "norm": "none", "min_dim": 32}


@dataclass(frozen=True)
class Method:
    """One arm of the experiment.

    Attributes:
        name: file-name-safe identifier (logs are ``<name>-seed<seed>.json``).
        description: what it does, for the table.
        overrides: ``GlueConfig`` fields set on top of the shared set-up.
        lr: its learning rate (the best of its sweep on SST-2, seed 0).
        private: False for the non-private reference.
        sweep: the learning rates ``--sweep`` given no values tries for it (seed 0).
    """

    name: str
    description: str
    overrides: dict[str, Any] = field(default_factory=dict)
    lr: float = 3e-3
    private: bool = True
    sweep: tuple[float, ...] = ()


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("dp", "DP-SGD, AdamW (baseline)", {}, lr=3e-3),
        # Removing the noise variance from v scales the step by about s / |signal| per entry:
        # its learning rates are an order of magnitude below Adam's.
        # (3e-3 diverged; 3e-4 is the best of its sweep, see tuning.md.)
        Method(
            "dp-adambc", "DP-AdamBC (noise variance removed from v)", {"dp_adam": "bc"}, lr=3e-4
        ),
        # Adam's first moment already is an EMA filter at beta 0.9 (with --dp-adam plain the
        # chain [EMA(0.9), DPAdam(beta1=0)] is Adam); the low-pass anchor (DOPPLER's idea) is
        # a longer filter ahead of Adam's normaliser. An EMA in front of AdamW would average
        # twice and shrink v by the filter's variance factor (it diverged at lr 3e-3).
        Method(
            "ema",
            "EMA low-pass filter (beta 0.97), v from the noisy gradient (Adam's normaliser)",
            {"filter": "ema", "filter_beta": 0.97, "dp_adam": "plain"},
        ),
        # DiSK-Adam (--filter disk with --dp-adam none is DiSK-SGD, i.e. DP-SGD at the
        # extrapolated points: not an Adam-family anchor).
        Method(
            "disk", "DiSK filter (kappa 0.7), then Adam", {"filter": "disk", "dp_adam": "plain"}
        ),
        Method(
            "shrink-grad",
            "gradient shrinkage (kappa 1), then AdamW",
            # Explicit, as every arm: an arm must not change when a default does.
            {"denoise": True, "denoise_target": "gradient", "denoise_options": dict(SHRINK)},
        ),
        # Below kappa 1 the threshold sits inside the noise bulk (a fixed share of the noise
        # kept every step). 0.75 is the best of 0.25 / 0.5 / 0.75 on seed 0 by the sweep's rule,
        # by 0.0003 over 0.5: a tie (tuning.md).
        Method(
            "shrink-grad-kappa0.75",
            "gradient shrinkage (kappa 0.75, the best of its sweep), then AdamW",
            {
                "denoise": True,
                "denoise_target": "gradient",
                "denoise_options": {**SHRINK, "kappa": 0.75},
            },
        ),
        Method(
            "shrink-moment",
            "first-moment shrinkage at its exact noise level, v from the noisy gradient",
            {"denoise": True, "denoise_target": "moment", "denoise_options": dict(SHRINK)},
        ),
        # The combination: DiSK (the best anchor measured) as the filter whose output is shrunk
        # at its exact noise level (disk_noise_std), then Adam's normaliser.
        Method(
            "disk-moment",
            "DiSK filter, its output shrunk at its exact noise level, then Adam's normaliser",
            {
                "filter": "disk",
                "denoise": True,
                "denoise_target": "moment",
                "denoise_options": dict(SHRINK),
            },
        ),
        # The trajectory identity W_t = W_0 - lr * D_t needs SGD at a constant rate; its
        # reference is plain DP-SGD with the same optimizer and schedule (SGD's learning rates
        # are of another scale than Adam's). Both at 0.3, the best of 0.3 / 1 / 3 on seed 0 by the
        # sweep's rule (mean of the last 4 evaluations; tuning.md).
        Method(
            "dp-sgd",
            "DP-SGD, plain SGD at a constant rate (the trajectory's reference)",
            {"optimizer": "sgd", "lr_schedule": "constant"},
            lr=0.3,
        ),
        Method(
            "shrink-trajectory",
            "shrinkage of the accumulated update, SGD at a constant rate",
            {
                "denoise": True,
                "denoise_target": "trajectory",
                "denoise_options": dict(SHRINK),
                "lr_schedule": "constant",
            },
            lr=0.3,
        ),
        Method("non-private", "no privacy (reference)", {"dp": False}, lr=1e-4, private=False),
    )
}


# The arms at B = 2048 (60 of 100 accounted steps, linear decay over the 60). Each starts at the
# rate of the first look (issue 25: plain DP-Adam at 3e-3 constant, 0.818 at step 24) until its
# sweep has run; ``sweep`` is the plan, three rates a factor 2-3 apart around where the
# mechanism puts it: AdamW's per-entry normalisation makes the step size of an AdamW arm
# nearly independent of the shrinker (1e-3 to 6e-3, as the baseline); an arm whose numerator
# is shrunk but whose v is the released gradient's (``dp_adam plain``: the noise variance
# dominates v) takes steps smaller by about the kept norm ratio, so it gets rates twice as large.
ADAMW_SWEEP = (1e-3, 3e-3, 6e-3)
ADAM_SHRUNK_SWEEP = (3e-3, 6e-3, 1.2e-2)
FIRST_LOOK_LR = 3e-3


def _at_2048(name: str, sweep: tuple[float, ...]) -> Method:
    """An arm of the 100-step experiment, as it is, at B = 2048: untuned there (the first
    look's rate) until its sweep has run."""
    return replace(METHODS[name], lr=FIRST_LOOK_LR, sweep=sweep)


METHODS_2048: dict[str, Method] = {
    m.name: m
    for m in (
        Method(
            "dp", "DP-Adam (AdamW), linear decay (baseline)", {}, FIRST_LOOK_LR, sweep=ADAMW_SWEEP
        ),
        # The collapse at B = 512 (a matrix zeroed for steps, AdamW's v starved, then a
        # coherent step of about lr / 2 per entry) scales with lr: a lower rate is in its sweep.
        _at_2048("shrink-grad", (3e-4, 1e-3, 3e-3)),
        Method(
            "shrink-grad-adam",
            "gradient shrinkage (kappa 1), then Adam with v from the released gradient",
            {
                "denoise": True,
                "denoise_target": "gradient",
                "denoise_options": dict(SHRINK),
                "dp_adam": "plain",
            },
            sweep=ADAM_SHRUNK_SWEEP,
        ),
        # A partial restoration: the operator-norm shrinker (debiasing) keeps the same
        # components as the Frobenius one but restores each kept singular value to its
        # estimated clean value instead of shrinking it further toward 0 near the edge. Under
        # AdamW the scale of the kept part would be normalised away, so it runs under Adam with
        # v from the released gradient, where the restored magnitude is the step.
        Method(
            "shrink-grad-operator",
            "gradient shrinkage, operator-norm shrinker (kept values restored to their clean "
            "estimate), then Adam with v from the released gradient",
            {
                "denoise": True,
                "denoise_target": "gradient",
                "denoise_options": {**SHRINK, "shrinker": "operator"},
                "dp_adam": "plain",
            },
            sweep=ADAM_SHRUNK_SWEEP,
        ),
        _at_2048("disk", ADAMW_SWEEP),
        _at_2048("disk-moment", ADAM_SHRUNK_SWEEP),
        # The switch-off: shrink a matrix only while its released spectrum shows a component
        # above the edge (plus a Tracy-Widom margin), pass it through otherwise. Below the edge
        # it is plain DP-Adam bit for bit and AdamW's v keeps the noise's scale.
        Method(
            "shrink-grad-passthrough",
            "gradient shrinkage (kappa 1) only while a component stands above the edge, the "
            "noisy gradient passed through otherwise, then AdamW",
            {
                "denoise": True,
                "denoise_target": "gradient",
                "denoise_options": {**SHRINK, "passthrough_below_edge": True},
            },
            sweep=ADAMW_SWEEP,
        ),
    )
}


def get_method(name: str, methods: Mapping[str, Method] | None = None) -> Method:
    """The method called ``name`` among ``methods`` (default :data:`METHODS`).

    Raises:
        ValueError: no such method (the message lists them).
    """
    methods = METHODS if methods is None else methods
    try:
        return methods[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; methods are {', '.join(methods)}") from None


__all__ = ["METHODS", "METHODS_2048", "SHRINK", "Method", "get_method"]
