"""``make_private``: a model, an optimizer and a data loader in; their private versions out."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence

from torch import nn
from torch.utils.data import DataLoader

from rmt_kernels.dp import distributed
from rmt_kernels.dp.calibration import (
    MAX_TARGET_EPSILON,
    check_accountant,
    run_noise_multiplier,
    run_steps,
    warn_delta,
)
from rmt_kernels.dp.engine import PrivateEngine
from rmt_kernels.dp.optimizer import DPOptimizer
from rmt_kernels.dp.stages.denoiser import DenoiseFilter, denoise_linear_weights
from rmt_kernels.dp.stages.protocol import PostProcessor


def make_private(
    model: nn.Module,
    optimizer,
    data_loader: DataLoader,
    *,
    target_delta: float,
    max_grad_norm: float,
    noise_multiplier: float | None = None,
    target_epsilon: float | None = None,
    epochs: int | None = None,
    denoise: dict | None = None,
    denoise_filter: DenoiseFilter = denoise_linear_weights,
    post_processors: Sequence[PostProcessor | Callable] | None = None,
    poisson_sampling: bool = True,
    seed: int | None = None,
    secure_mode: bool = False,
    accountant: str = "prv",
    loss_reduction: str = "mean",
    process_group=None,
    verify_layout: bool = True,
) -> tuple[nn.Module, DPOptimizer, DataLoader]:
    """Make a model's training differentially private (DP-SGD with book-keeping clipping).

    Every trainable parameter is covered by a layer rule (Linear, Embedding, LayerNorm, and any
    registered with :func:`rmt_kernels.register_layer_rule`); a trainable parameter without one
    is an error naming its module. One forward and one backward per batch: no per-example
    gradients are materialised.

    The guarantee. Adding or removing one example moves the pre-noise clipped sum of a logical
    step by at most ``max_grad_norm``, and every coordinate of every privatised parameter gets
    Gaussian noise of std ``noise_multiplier * max_grad_norm`` on that sum, under these
    conditions, each checked (an error names what fails) unless marked *assumed*:

    - the batch is dim 0 of the model's first tensor argument, and every tracked layer (a module
      owning a trainable parameter) sees one example per row of dim 0: its input, output and
      output gradient have that leading size (checked at every forward and backward; a layer
      input of leading size 1, such as BERT's position ids, is a broadcast shared by the batch
      and gets one copy per example);
    - no op mixes examples: at the first forward of a batch with two examples or more (and at the
      first forward that runs a tracked layer skipped until then) the model is run again with
      gradients enabled (nothing kept, no ``.grad`` written), once as is and once per row set of
      :func:`rmt_kernels.dp.layout_verification.layout_row_sets` (2 * ceil(log2 B) sets splitting
      every pair of rows), giving those examples' inputs random values and perturbing their rows in
      every tracked layer's output; every other example's rows (in every tracked layer and in every
      model output whose dim 0 is the batch) must stay unchanged, and a backward through the whole
      graph from the other rows of the outputs must give every tracked layer the unchanged batch's
      output gradient on those rows and zero on the perturbed ones; then all again at 2^40 times the
      perturbation (tiny always-on mixing). This catches a sequence-first model even with T == B,
      flattened (B*T, d) layers, attention or pooling over dim 0, BatchNorm batch statistics, losses
      over pairs of outputs and mixing in backward at any tracked layer (a custom autograd Function,
      a tensor hook); a tracked layer's input modified after the layer ran (in place or through
      ``.data``) is refused at every step. *Assumed*: the loss is a sum (``loss_reduction="sum"``)
      or mean over examples of a function of the model output's row b (not a mean over tokens, as
      Hugging Face's MLM, CLM and token-classification heads compute it: a loss the model
      returns in that form is refused, rmt_kernels/dp/loss_coupling.py; for a language model use
      :func:`rmt_kernels.lm_loss`), and the model's
      data-dependent branches that the verified batch did not take mix no examples either
      (``verify_layout=False`` skips the check: then the whole layout is assumed);
    - each logical step clips exactly the examples the returned Poisson loader drew for it,
      one row each: a step whose rows differ from that batch's size (a batch flattened to
      ``(B * T, d)`` before the model call), or a step with no new batch once the loader is in
      use, is refused before release (rmt_kernels/dp/drawn_batches.py; a loop that never
      iterates the returned loader is not compared);
    - each trainable parameter is used only inside its own module's forward, once per forward
      (a direct use such as ``F.linear(h, emb.weight)``, a loss term on the weights, or a
      module called twice is an error at backward; tied weights are refused here, except a
      tied embedding, one ``nn.Embedding``'s weight as one ``nn.Linear`` head's, whose two uses
      are clipped as one gradient: rmt_kernels/rules/tied_embedding.py);
    - the parameters trained are those trainable now: unfreezing one later, or adding a
      parameter group to the wrapped optimizer, is an error at the next ``step()``;
    - the noise seed is secret (the default, drawn from the OS; ``seed=N`` is for experiments
      and the run is then not private).

    An empty batch (Poisson sampling can draw one): skip forward and backward and call
    ``optimizer.step()`` alone; it adds the noise and counts the step.

    Args:
        model: any module built from covered layers (e.g. Hugging Face RoBERTa or BERT).
        optimizer: any torch optimizer over the model's trainable parameters.
        data_loader: the training data (the whole dataset, on every rank; its batch size is the
            GLOBAL logical batch); with ``poisson_sampling`` it is replaced by a Poisson-sampling
            loader (what the accountant's analysis assumes) over this rank's shard, see
            :class:`rmt_kernels.dp.distributed.PoissonSampler`.
        target_delta: the delta of the (epsilon, delta) guarantee, in (0, 1); a warning says
            when it is not below 1 / len(dataset).
        max_grad_norm: C, the per-example clipping norm over all parameters together.
        noise_multiplier: sigma (noise std = sigma * C); or give ``target_epsilon``.
        target_epsilon: calibrate sigma (Opacus's search, bounded in time:
            :func:`rmt_kernels.dp.calibration.calibrate_noise_multiplier`) to spend this over
            ``epochs``; at most 100.
        epochs: the run length, ``rmt_kernels.dp.calibration.run_steps(epochs, len(loader))``
            steps (the nearest whole number): required with ``target_epsilon``, which is
            calibrated for them; with ``noise_multiplier``, optional, and the accountant must
            then account them (``run_epsilon``: a positive epsilon, in bounded time).
        denoise: options of :func:`rmt_kernels.denoise` (e.g. ``{"kappa": 1.0, "norm":
            "debiased"}``, plus ``min_dim``: matrices whose smaller side is below it, default
            32, are left alone), or None for plain DP-SGD. Applied with ``sigma = noise_multiplier *
            max_grad_norm / expected_batch_size`` to the parameters ``denoise_filter`` selects
            (by default the 2-D weights of nn.Linear layers); a fixed ``rank`` is capped at
            each matrix's smaller side. Post-processing: privacy is unchanged. Validated here by
            :func:`rmt_kernels.dp.stages.options.check_denoise_options` (the Opacus drop-in's
            check too: one frozen DenoiseOptions, carried by the chain); the denoiser is
            ``optimizer.engine.denoiser``. With
            ``post_processors`` too, this Denoiser is the chain's first stage.
        post_processors: the post-processing chain of the released gradient, in order
            (rmt_kernels/dp/stages/chain.py): e.g. ``[EMAFilter(0.9), Denoiser({"kappa": 1.0}),
            DPAdam(beta1=0.0)]`` (first-moment shrinkage with a DP-aware Adam; then use
            ``SGD(lr, momentum=0)`` as ``optimizer``). Each stage gets the previous one's
            output and its exact noise std; every Denoiser (and TrajectoryDenoiser) in it is
            restricted to the matrices ``denoise_filter`` selects. ``denoise=D`` with
            ``post_processors=[A, ...]`` is the chain ``[Denoiser(D), A, ...]``. A stage is a
            :class:`~rmt_kernels.dp.PostProcessor` or a plain callable ``(grads, sigma, step)
            -> grads`` (wrapped in a stage that keeps no state). Their states
            are in ``optimizer.engine.state_dict()`` (checkpoints). Post-processing: privacy is
            unchanged.
        poisson_sampling: sample each logical batch by Poisson sampling (recommended: the
            accountant's analysis assumes it). With False the loader is used as given and the
            accountant is told the rate ``batch_size / len(dataset)``; for a rate below 1 that
            is the common shuffling-as-Poisson approximation, not a proven bound (a warning
            says so).
        seed: None (the default) draws the noise seed from the OS. An int in [0, 2**63) makes
            the noise reproducible (noise key = (seed, step, parameter index)) and the run NOT
            private, since anyone who knows the seed can subtract the noise: a warning says so
            and ``optimizer.noise_seed_is_secret`` is False. For experiments only. The Poisson
            sampling is seeded from the OS too, unless ``seed`` is given (then from
            ``data_loader.generator`` when it has one, for reproducible batches).
        secure_mode: draw the seed from the OS (as the default does) and also the Poisson
            sampler's generator; contradicts ``seed``. A secret seed is never written to a log
            or a checkpoint in either mode; only an explicit ``seed`` is checkpointed (so a
            resume on the same data can replay its lost steps for free).
        accountant: "prv" (default) or "rdp", Opacus's accountants ("gdp", a central-limit
            approximation that under-reports epsilon, is refused).
        loss_reduction: "mean" if the loss averages over the batch, "sum" if it sums.
        process_group: the torch.distributed group to train in; by default the whole world when
            torch.distributed is initialized. Parameters are broadcast from rank 0, the noise
            seed is rank 0's, the clipped sums are all-reduced and rank 0 alone adds the noise;
            the accountant sees the global sample rate, so epsilon is the same on every rank.
            Do not wrap the model in DistributedDataParallel.
        verify_layout: run the one-time layout verification described above (True, the
            default); False trusts the model's layout.

    Returns:
        ``(model, optimizer, data_loader)``: the same model with hooks, a :class:`DPOptimizer`
        (``optimizer.engine`` is the :class:`PrivateEngine`; ``optimizer.get_epsilon(delta)``),
        and the data loader to iterate.
    """
    from opacus.accountants import create_accountant

    # make_private's own arguments; those it passes on (max_grad_norm, noise_multiplier, seed,
    # secure_mode, loss_reduction, verify_layout, denoise, post_processors) are checked in one
    # place, PrivateEngine's constructor (public: a direct construction is checked too).
    if not (isinstance(target_delta, (int, float)) and 0 < target_delta < 1):
        raise ValueError(f"target_delta must be in (0, 1), got {target_delta}")
    check_accountant(accountant)
    if (noise_multiplier is None) == (target_epsilon is None):
        raise ValueError("give exactly one of noise_multiplier and target_epsilon")
    if target_epsilon is not None and epochs is None:
        raise ValueError("target_epsilon needs epochs: the calibration depends on the run length")
    if target_epsilon is not None and not (0 < target_epsilon < math.inf):
        raise ValueError(
            f"target_epsilon must be a finite number > 0, got {target_epsilon} (for no privacy, "
            "train without make_private)"
        )
    if target_epsilon is not None and target_epsilon > MAX_TARGET_EPSILON:
        raise ValueError(
            f"target_epsilon must be at most {MAX_TARGET_EPSILON:g}, got {target_epsilon}: a "
            "larger epsilon bounds nothing (give noise_multiplier for a fixed noise)"
        )
    if (
        epochs is not None
        and noise_multiplier is not None
        and not (isinstance(noise_multiplier, (int, float)) and 0 <= noise_multiplier < math.inf)
    ):
        # The one argument make_private uses before the engine checks it: with epochs, the
        # accountant runs on the given noise (run_noise_multiplier) before the engine is built.
        raise ValueError(f"noise_multiplier must be a finite number >= 0, got {noise_multiplier}")
    if epochs is not None and not (isinstance(epochs, (int, float)) and 0 < epochs < math.inf):
        raise ValueError(f"epochs must be a finite number > 0, got {epochs}")
    if len(data_loader) == 0:
        raise ValueError("data_loader is empty")

    dataset_size = len(data_loader.dataset)
    steps_per_epoch = len(data_loader)  # the caller's batches (Poisson ones: as many, expected)
    # delta >= 1/n lets a mechanism publish an example outright: said, not refused (the
    # library leaves the choice to its caller; rmt-glue refuses it).
    warn_delta(target_delta, dataset_size, "target_delta")
    if poisson_sampling:
        sample_rate = 1 / len(data_loader)
        expected_batch_size = max(1, round(sample_rate * dataset_size))
    else:
        # The loader's batches are used as they are: each holds batch_size examples (the last
        # one maybe fewer), so the rate is batch_size / N, not 1 / len(loader) (which is smaller
        # when N is not a multiple of batch_size, and would under-count epsilon).
        batch_size = data_loader.batch_size
        if batch_size is None:
            raise ValueError(
                "poisson_sampling=False needs a DataLoader with a batch_size (not a batch "
                "sampler): the accountant's sampling rate is batch_size / len(dataset)"
            )
        sample_rate = min(1.0, batch_size / dataset_size)
        expected_batch_size = batch_size
        if sample_rate < 1:
            warnings.warn(
                "make_private: poisson_sampling=False with batches smaller than the dataset: "
                f"the accountant treats them as Poisson-sampled at rate {sample_rate:.4g}, a "
                "common approximation that is not a proven bound for shuffled fixed-size "
                "batches; use poisson_sampling=True for the stated guarantee",
                stacklevel=2,
            )
    if seed is not None:
        warnings.warn(
            f"make_private: seed={seed} makes the noise reproducible by anyone who knows the "
            "seed: this run is NOT differentially private (for experiments only; "
            "optimizer.noise_seed_is_secret is False). Leave seed=None for a seed from the OS",
            stacklevel=2,
        )
    rank, world_size = distributed.world(process_group)
    if world_size > 1 and not poisson_sampling:
        raise ValueError(
            "poisson_sampling=False under torch.distributed: each rank would need its own "
            "shard and the accountant its sampling; use poisson_sampling=True"
        )
    if poisson_sampling:
        # The global rate: each example joins a logical batch with probability sample_rate
        # whichever rank holds it, so the global expected batch is sample_rate * dataset_size.
        data_loader = distributed.poisson_loader(
            data_loader,
            sample_rate=sample_rate,
            rank=rank,
            world_size=world_size,
            # Which examples formed a batch must be as secret as the noise (the amplification by
            # sampling assumes it): the loader's own generator, often seeded publicly, keys the
            # sampling only in a run that already has a public noise seed.
            secure_mode=secure_mode or seed is None,
        )
    distributed.broadcast_parameters(model, process_group)
    if epochs is not None:
        # The run's steps as rmt-glue counts them; the noise calibrated for them (Opacus's
        # search, bounded in time: an absurd target hung it for minutes), or the given noise
        # checked to be accountable over them.
        noise_multiplier = run_noise_multiplier(
            target_delta,
            sample_rate,
            run_steps(epochs, steps_per_epoch),
            accountant,
            target_epsilon=target_epsilon,
            noise_multiplier=None if target_epsilon is not None else noise_multiplier,
        )
    engine = PrivateEngine(
        model,
        noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm,
        expected_batch_size=expected_batch_size,
        sample_rate=sample_rate,
        accountant=create_accountant(mechanism=accountant),
        denoise=denoise,
        denoise_filter=denoise_filter,
        post_processors=post_processors,
        loss_reduction=loss_reduction,
        seed=seed,
        secure_mode=secure_mode,
        process_group=process_group,
        verify_layout=verify_layout,
    )
    if poisson_sampling:
        # Each logical step must clip exactly the examples this loader drew for it.
        engine.drawn_batches = data_loader.batch_sampler.drawn
    return model, DPOptimizer(optimizer, engine), data_loader
