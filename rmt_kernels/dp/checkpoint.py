"""Checkpoint and resume of a private run: what a checkpoint holds, and how a resume counts the
steps a crash lost so that epsilon is never under-counted.

A checkpoint (format version 2: rmt_kernels/dp/checkpoint_file.py; written atomically with its
data sidecar: rmt_kernels/atomic_file.py) is a ``torch.save`` of a dict with every field of
``_FIELDS``: the fingerprint a resume must agree on (parameters' names, shapes and dtypes, privacy
settings), the id of its data sidecar, the model's and optimizer's state, the engine's
``state_dict()`` (step counter, noise seed when public, stream id, accountant, each
post-processor's state, e.g. the denoiser's warm-start bases, so that a resume denoises
bit-identically) with the ledger's mark, each rank's sampler position and RNG states (dropout),
the caller's ``extra``. A file without a field is refused, naming it; so is a post-processor
state its post-processor refuses (a basis of the wrong shape), before the model is touched.

A secret noise seed (the default: drawn from the OS) is never written, nor a secret sampling
key (drawn from the OS unless the loader's generator keys a run with a public seed): the
sampler's entry holds its position, and its key only when the caller chose it. Only a seed the
caller gave (``make_private(seed=N)``: reproducible, not private) is written. A resumed run
with a secret seed draws a fresh one from the OS; that is safe because the noise key is (seed,
step, parameter): with a new seed no key of the crashed run is reused, and the steps it lost
are counted (below). A resumed secret sampler continues its position with a fresh key: fresh,
independent batches, and the lost steps are charged.

Counting the lost steps. The privacy ledger (rmt_kernels/dp/ledger.py) has a line for every
step whose data may have entered a computation. When a checkpoint is written every line of the
ledger was already counted by the accountant (finished steps when they finished, a crashed
run's steps at its resume). On :func:`load_checkpoint` the (step, seed_id) pairs after the
checkpoint's mark that are new are counted at once, so ``get_epsilon`` right after loading
already covers every step that touched data. The resumed run then skips counting a step whose
(step, seed_id) pair is in the ledger: with the same seed and the same sampler position it draws
the same batch and the same noise, so it releases the same mechanism output again, which costs
nothing; an uninterrupted run and a crashed-and-resumed one end at the same epsilon. A resume
that cannot replay (secure mode's fresh seed, a secret sampling key, or a data loader whose
position was not restored, for which the seed is re-keyed so that no noise is reused on other
data) counts the lost steps in addition. The ledger's lines up to the mark must be those the
checkpoint counted (their number and the last one's SHA-256), else the resume is refused.

Free replay only on the same data. The replay argument assumes the resumed run recomputes the
lost steps exactly: same data, same preprocessing, same code path. Releasing the same noise on
other data (a smaller max length, another training subset, another dataset of the same size)
would publish the noise-free difference of the two steps. So a free replay needs ALL of:

- the noise seed is in the checkpoint (a public seed: a secret one is never written);
- the data loader is given and its sampling position and (public) key restored;
- the data fingerprint saved with the checkpoint is verifiable and equal to the resumed run's: a
  SHA-256 of the loader's dataset when it is a ``TensorDataset`` (or a ``Subset`` of one: dtypes,
  shapes and bytes of every tensor, the subset's indices) and/or the caller's ``data_fingerprint``
  string, for data the library cannot hash (the ``rmt-glue`` CLI passes a hash of the tokenized
  training set and of every setting of the computation);
- the model, privacy and denoise settings, world size and noise stream's version agree (else the
  checkpoint is refused, ``_check_fingerprint``).

The data fingerprint lives beside the checkpoint, in ``<checkpoint>.data``, tied to it by a random
id: a hash of the whole training set lets anyone who knows all examples but one test guesses of
that one, so it is as private as the data (keep it with the data; the checkpoint itself holds
nothing derived from the data but the private model, optimizer state, post-processor states,
which are functions of the released noisy gradients as the model is, and public counters). A
missing or foreign sidecar is unverifiable.

When any fails, the resume is NOT refused: the noise is re-keyed (a seed derived from the old one
and the ledger's length, so no (seed, step, parameter) key of the crashed run is reused) and the
lost steps are charged, exactly as a secure-mode resume; a :class:`ResumeWarning` says why and how
many steps were charged. This covers the run resumed after an out-of-memory crash with a smaller
``--max-length``: it continues and pays for the steps it lost. What the fingerprint cannot see is
the caller's own training loop (loss, augmentation, collate): change it and pass another
``data_fingerprint`` (or none), never the same one.

One process at a time: the first to attach, save or load the ledger takes its lock
(:func:`rmt_kernels.dp.ledger.lock_ledger`); another is refused with a :class:`CheckpointError`.

A run killed before its first checkpoint left a ledger and no checkpoint: :func:`attach_ledger`
with ``charge_existing=True`` starts it over in its place, counting every recorded step (with the
noise multiplier and sampling rate the ledger line records) and re-keying the noise.
"""

from __future__ import annotations

import io
import os
import secrets
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rmt_kernels import ops
from rmt_kernels.atomic_file import write_atomically
from rmt_kernels.dp import distributed
from rmt_kernels.dp.checkpoint_file import (
    FORMAT_VERSION,
    CheckpointError,
    read_checkpoint_file,
    seal,
)
from rmt_kernels.dp.data_fingerprint import data_fingerprint_of
from rmt_kernels.dp.ledger import (
    PrivacyLedger,
    check_charged,
    ledger_path,
    lock_ledger,
    open_ledger,
)
from rmt_kernels.dp.optimizer import DPOptimizer

# The fields of a checkpoint of this format version (module docstring): all are required.
_FIELDS = (
    "format_version",
    "fingerprint",
    "data_id",
    "model",
    "optimizer",
    "engine",
    "ranks",
    "extra",
)
_ENGINE_FIELDS = (
    "steps",
    "seed",
    "seed_id",
    "accountant",
    "post_processors",
    "ledger_lines",
    "ledger_head",
)


class ResumeWarning(UserWarning):
    """A resume that could not replay the lost steps for free: the noise was re-keyed and the
    lost steps were charged to the accountant (the message says why and how many)."""


def data_path(path: str | os.PathLike) -> Path:
    """Where the data fingerprint of the checkpoint at ``path`` lives (module docstring: it is
    derived from the training data, so it is kept out of the checkpoint)."""
    return Path(f"{os.fspath(path)}.data")


def _open_ledger(engine, path: str | os.PathLike) -> PrivacyLedger:
    """The locked ledger of the checkpoint at ``path``, appending with ``engine``'s mechanism."""
    return open_ledger(path, (engine.noise_multiplier, engine.sample_rate))


def attach_ledger(
    optimizer: DPOptimizer, path: str | os.PathLike, *, charge_existing: bool = False
) -> None:
    """Start the privacy ledger of a run checkpointed at ``path`` (call before the first step;
    :func:`save_checkpoint` and :func:`load_checkpoint` do it too).

    Args:
        optimizer: the DPOptimizer ``make_private`` returned.
        path: the checkpoint file the run will write (its ledger is ``<path>.ledger``).
        charge_existing: continue the ledger of a run killed before its first checkpoint (a
            ledger with steps, no checkpoint at ``path``): start over in its place with every
            recorded step counted by the accountant at once (with the noise multiplier and
            sampling rate each line records) and the noise re-keyed, so that no noise of the
            killed run is reused. Call it on every rank then (rank 0 sends the ledger).

    Raises:
        CheckpointError: the ledger already holds another run's steps and ``charge_existing``
            is False (resume that run with :func:`load_checkpoint`, or checkpoint elsewhere), or
            a checkpoint exists at ``path`` (resume it with :func:`load_checkpoint`).
    """
    engine = _engine(optimizer)
    if not charge_existing:
        if engine.ledger is not None or engine.rank != 0:
            return
        ledger = _open_ledger(engine, path)
        existing = ledger.entries()
        # Another run's records must never be mistaken for this run's (a matching (step, seed
        # id) pair would skip counting a real step): only load_checkpoint may continue a ledger.
        if existing:
            how = (
                "resume it (load_checkpoint / --resume)"
                if Path(path).exists()
                else "it was killed before its first checkpoint: start over with its steps "
                "charged (attach_ledger(..., charge_existing=True) / --resume)"
            )
            raise CheckpointError(
                f"{ledger.path} already records {len(existing)} private steps of another run: "
                f"{how}, or use another checkpoint path"
            )
        ledger.repair()
        ledger.path.parent.mkdir(parents=True, exist_ok=True)
        engine.set_ledger(ledger)
        return
    if Path(path).exists():
        raise CheckpointError(
            f"checkpoint {path} exists: resume it with load_checkpoint, not attach_ledger"
        )
    if engine.steps:
        raise CheckpointError("attach_ledger(charge_existing=True): call it before the first step")
    records = _open_ledger(engine, path).records() if engine.rank == 0 else None
    records = distributed.broadcast_object(records, engine.process_group)
    # A step whose line is torn or missing (no mechanism recorded) is charged with the costliest
    # mechanism in sight: the smallest noise multiplier and the largest sampling rate of the
    # ledger and this run (epsilon falls with the first, grows with the second, so the pair
    # costs at least what the lost step did, if it ran one of them).
    costliest = (
        min([r["sigma"] for r in records if "sigma" in r] + [engine.noise_multiplier]),
        max([r["q"] for r in records if "q" in r] + [engine.sample_rate]),
    )
    counted = set()
    for record in records:
        counted.add((record["step"], record["seed_id"]))  # no pair twice: records() refuses
        engine.accountant.step(
            noise_multiplier=record.get("sigma", costliest[0]),
            sample_rate=record.get("q", costliest[1]),
        )
    if not engine.secure_mode:
        # A new key, so the restarted run's steps never share a (seed, step) with the killed
        # run's (secure mode drew a fresh seed and a random stream id already).
        engine.rekey_noise(len(records))
    ledger = None
    if engine.rank == 0:
        ledger = _open_ledger(engine, path)
        ledger.repair()
    engine.set_ledger(ledger, counted)
    _barrier(engine)


def _engine(optimizer: DPOptimizer):
    if not isinstance(optimizer, DPOptimizer):
        raise TypeError(
            f"optimizer must be the DPOptimizer returned by make_private, got "
            f"{type(optimizer).__name__}"
        )
    return optimizer.engine


def _fingerprint(engine) -> dict:
    """What a checkpoint must agree on with the run that loads it."""
    return {
        "parameters": [
            [name, list(p.shape), str(p.dtype)]
            for name, (_, _, p) in zip(engine.param_names, engine.params, strict=True)
        ],
        "privacy": {
            "noise_multiplier": engine.noise_multiplier,
            "max_grad_norm": engine.max_grad_norm,
            "sample_rate": engine.sample_rate,
            "expected_batch_size": engine.expected_batch_size,
            "accountant": engine.accountant.mechanism(),
            "world_size": engine.world_size,
            "secure_mode": engine.secure_mode,
            "loss_reduction": engine.loss_reduction,
            "denoise": engine.denoise_options,
            "noise_stream": ops.NOISE_STREAM_VERSION,
        },
    }


def _sampler(data_loader):
    sampler = getattr(data_loader, "batch_sampler", None)
    if not isinstance(sampler, distributed.PoissonSampler):
        raise TypeError(
            "data_loader: only the Poisson loader returned by make_private can be "
            f"checkpointed (its sampler is {type(sampler).__name__})"
        )
    return sampler


def save_checkpoint(
    path: str | os.PathLike,
    model: nn.Module,
    optimizer: DPOptimizer,
    data_loader=None,
    extra: dict | None = None,
    *,
    data_fingerprint: str | None = None,
) -> None:
    """Write a checkpoint of a private run to ``path`` (atomically; module docstring).

    Call between logical steps, on every rank of a distributed run (rank 0 writes, the others
    hand it their sampler position and wait). Starts the privacy ledger ``<path>.ledger`` if
    :func:`attach_ledger` was not called.

    Args:
        path: the checkpoint file.
        model: the model given to ``make_private``.
        optimizer: the DPOptimizer ``make_private`` returned.
        data_loader: the loader ``make_private`` returned (its sampling position), or None.
        extra: anything else to restore (plain Python values and tensors), returned by
            :func:`load_checkpoint`.
        data_fingerprint: a string naming the training data, its preprocessing and the
            training loop (e.g. a hash of them), for data the library cannot hash itself (any
            dataset but a TensorDataset); a resume replays the lost steps for free only when it
            passes the same string (module docstring).
    """
    engine = _engine(optimizer)
    data = data_fingerprint_of(data_loader, data_fingerprint)
    data_id = secrets.token_hex(16)
    if engine.step_in_progress():
        raise RuntimeError("save_checkpoint: a logical step is in progress; save after step()")
    attach_ledger(optimizer, path)
    # Per rank: the sampler's position and the global RNGs (dropout draws from them: a resumed
    # run must replay a lost step exactly, see the module docstring).
    local = {
        "sampler": None,
        "rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
    }
    if data_loader is not None:
        # The position always; the sampling key only when it is public (a secret sampler's
        # state_dict holds nothing that determines its key, in secure mode or not).
        local["sampler"] = _sampler(data_loader).state_dict()
    ranks = _gather(local, engine)
    if engine.rank == 0:
        payload = {
            "format_version": FORMAT_VERSION,
            "fingerprint": _fingerprint(engine),
            # Names the sidecar of the data fingerprint that belongs to this very checkpoint.
            "data_id": data_id,
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "engine": {**engine.state_dict(), **_ledger_mark(engine.ledger)},
            "ranks": ranks,
            "extra": extra,
        }
        sidecar = {"data_id": data_id, "data": data}
        # Both files are written and synced under temporary names before either is renamed: a
        # write that fails (a full disk) leaves the previous checkpoint and its sidecar as they
        # were. The sidecar is renamed first: a crash between the two renames leaves the old
        # checkpoint with a sidecar of another id, which is unverifiable (re-key and charge),
        # never a mismatch taken for a match.
        write_atomically((data_path(path), _sealed(sidecar)), (Path(path), _sealed(payload)))
    _barrier(engine)


def _sealed(payload: dict) -> bytes:
    """``payload`` as the bytes of a checkpoint file (rmt_kernels/dp/checkpoint_file.py)."""
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    return seal(buffer.getvalue())


def _ledger_mark(ledger: PrivacyLedger) -> dict:
    """What a checkpoint records of its ledger: how many lines it counted and the SHA-256 of the
    last (through the chain, every counted line is fixed by it)."""
    lines = len(ledger.records())
    return {"ledger_lines": lines, "ledger_head": ledger.digest(lines)}


def _counted_lines(path: Path, saved: dict) -> list[dict]:
    """The ledger's records (:meth:`PrivacyLedger.records`), verified against the checkpoint's
    mark (rank 0).

    Raises:
        CheckpointError: the ledger is shorter than the checkpoint counted, its line at the mark
            is not the one the checkpoint counted, :meth:`PrivacyLedger.records` refuses it, or
            the checkpoint's accountant did not charge its counted lines (:func:`check_charged`).
    """
    ledger = PrivacyLedger(ledger_path(path))
    records = ledger.records()
    lines = saved["ledger_lines"]
    if len(records) < lines:
        raise CheckpointError(
            f"privacy ledger {ledger.path} has {len(records)} records, the checkpoint "
            f"{path} counted {lines}: it was truncated or replaced, and the "
            "privacy spent cannot be established"
        )
    if ledger.digest(lines) != saved["ledger_head"]:
        raise ledger.fail(
            f"line {lines} is not the line the checkpoint {path} counted last (another "
            "SHA-256): the counted lines were edited or replaced"
        )
    check_charged(path, saved["accountant"], records[:lines])
    return records


def _gather(state, engine) -> list:
    if engine.world_size == 1:
        return [state]
    import torch.distributed as dist

    out = [None] * engine.world_size
    dist.all_gather_object(out, state, group=engine.process_group)
    return out


def _barrier(engine) -> None:
    if engine.world_size > 1:
        import torch.distributed as dist

        dist.barrier(group=engine.process_group)


def _read_checkpoint(path: Path) -> dict[str, Any]:
    """The checkpoint at ``path``, verified (rmt_kernels/dp/checkpoint_file.py) and holding every
    field of this format version.

    Raises:
        CheckpointError: as :func:`read_checkpoint_file`, or a field is missing (naming it).
    """
    state = read_checkpoint_file(path)
    missing = [f for f in _FIELDS if f not in state]
    if not missing:
        missing = [f"engine.{f}" for f in _ENGINE_FIELDS if f not in state["engine"]]
    if missing:
        raise CheckpointError(
            f"checkpoint {path} lacks {', '.join(missing)}: not a checkpoint of format version "
            f"{FORMAT_VERSION}"
        )
    return state


def _check_fingerprint(path: Path, saved: dict, current: dict) -> None:
    params_saved, params_now = saved["parameters"], current["parameters"]
    if params_saved != params_now:
        for a, b in zip(params_saved, params_now, strict=False):
            if a != b:
                raise CheckpointError(
                    f"checkpoint {path} is of another model: parameter {a} in the checkpoint, "
                    f"{b} in this model"
                )
        raise CheckpointError(
            f"checkpoint {path} is of another model: {len(params_saved)} trainable parameters "
            f"in the checkpoint, {len(params_now)} in this model"
        )
    for key, value in current["privacy"].items():
        if saved["privacy"].get(key) != value:
            raise CheckpointError(
                f"checkpoint {path} has other privacy settings: {key} = "
                f"{saved['privacy'].get(key)!r} in the checkpoint, {value!r} in this run"
            )


def _saved_data(path: Path, state: dict) -> dict | None:
    """The data fingerprint of the checkpoint ``state`` read from ``path`` (None: unknown)."""
    try:
        sidecar = read_checkpoint_file(data_path(path))
    except CheckpointError:
        return None
    if state["data_id"] is None or sidecar.get("data_id") != state["data_id"]:
        return None
    return sidecar.get("data")


def checkpoint_extra(path: str | os.PathLike) -> dict | None:
    """The ``extra`` of the checkpoint at ``path`` and its step count, without loading it into
    a model: ``{"steps": ..., "extra": ...}`` (e.g. to check a resume's options before
    building anything).

    Raises:
        CheckpointError: the file is missing, truncated, corrupt, of another format version or
            lacks a field of this one.
    """
    state = _read_checkpoint(Path(path))
    return {"steps": int(state["engine"]["steps"]), "extra": state["extra"]}


def _replay_blockers(saved_seed, saved_sampler, saved_data, current_data) -> list[str]:
    """Why the lost steps cannot be replayed for free (empty: they can; module docstring).

    ``saved_sampler``: the sampler state restored into this run's loader (None: none was)."""
    blockers = []
    if saved_seed is None:
        blockers.append(
            "the noise seed is secret (drawn from the OS, never written), so a fresh one was drawn"
        )
    if saved_sampler is None:
        blockers.append("the data loader's sampling position was not restored")
    elif not distributed.PoissonSampler.restores_batches(saved_sampler):
        blockers.append(
            "the sampling key is secret (drawn from the OS, never written), so the lost steps' "
            "batches cannot be drawn again"
        )
    if saved_data is None or current_data is None:
        blockers.append(
            "the training data cannot be verified (the checkpoint or this run has neither a "
            "TensorDataset nor a data_fingerprint)"
        )
    else:
        for key, what in (("dataset", "dataset's tensors"), ("given", "data_fingerprint")):
            if saved_data.get(key) != current_data.get(key):
                blockers.append(f"the {what} differ from the checkpointed run's")
    return blockers


def load_checkpoint(
    path: str | os.PathLike,
    model: nn.Module,
    optimizer: DPOptimizer,
    data_loader=None,
    *,
    data_fingerprint: str | None = None,
) -> dict | None:
    """Restore a run written by :func:`save_checkpoint`; returns its ``extra``.

    Build the model, optimizer and loader with the same ``make_private`` settings first, then
    load on every rank (each rank reads ``path``, so it must be visible to all of them; rank 0
    reads the ledger and sends it to the others). Afterwards ``optimizer.get_epsilon`` already
    counts every step of the ledger (module docstring). The noise stream continues where the
    checkpoint stopped only if the lost steps can be replayed exactly (same seed, sampling
    position and data fingerprint); otherwise it is re-keyed, the lost steps are charged in
    addition and a :class:`ResumeWarning` says why.

    Args:
        path, model, optimizer, data_loader: as given to :func:`save_checkpoint`.
        data_fingerprint: the string the checkpointed run passed to :func:`save_checkpoint`
            for data the library cannot hash (module docstring).

    Raises:
        CheckpointError: the file is missing, truncated, corrupt, of another format version (or
            lacks a field of this one), of another model, or of other privacy settings (the
            message names the field); or the privacy ledger does not hold the lines the
            checkpoint counted (shorter, or its line at the checkpoint's mark has another
            SHA-256), or was tampered with after them (a broken chain, a step recorded twice:
            :meth:`PrivacyLedger.records`); privacy could be under-counted.
    """
    engine = _engine(optimizer)
    path = Path(path)
    current_data = data_fingerprint_of(data_loader, data_fingerprint)
    state = _read_checkpoint(path)
    _check_fingerprint(path, state["fingerprint"], _fingerprint(engine))
    saved = state["engine"]
    records = None
    if engine.rank == 0:
        lock_ledger(path)  # before reading: no other process may append from now on
        try:
            records = _counted_lines(path, saved)
        except CheckpointError as err:
            records = err  # every rank raises it (the others wait for rank 0's ledger)
    records = distributed.broadcast_object(records, engine.process_group)
    if isinstance(records, CheckpointError):
        raise records
    mine = state["ranks"][engine.rank]
    saved_sampler = mine["sampler"] if data_loader is not None else None
    # Every rank decides on its own data; one blocker on any rank re-keys them all (the ranks
    # must agree on the noise key).
    blockers = _replay_blockers(
        saved["seed"], saved_sampler, _saved_data(path, state), current_data
    )
    blockers = sorted({b for rank in _gather(blockers, engine) for b in rank})
    # The engine first: it refuses post-processor states that are not its own before anything
    # else is overwritten.
    try:
        engine.load_state_dict(saved)
    except ValueError as err:
        raise CheckpointError(f"checkpoint {path}: {err}") from err
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(mine["rng"])
    if mine["cuda_rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(mine["cuda_rng"])
    if saved_sampler is not None:
        _sampler(data_loader).load_state_dict(saved_sampler)
    if saved["seed"] is not None and blockers:
        # Other data (or an unknown position) under the same noise would publish the
        # noise-free difference of the two steps: re-key, so no noise is ever reused.
        engine.rekey_noise(len(records))
    counted = {(r["step"], r["seed_id"]) for r in records[: saved["ledger_lines"]]}
    lost = 0
    for record in records[saved["ledger_lines"] :]:
        pair = (record["step"], record["seed_id"])
        if pair not in counted:
            # At the mechanism the step ran with (its line says; a lost line: this run's),
            # not this run's: a fingerprint edited to a larger noise multiplier would
            # under-charge it (tests/test_checkpoint_tampering.py).
            engine.accountant.step(
                noise_multiplier=record.get("sigma", engine.noise_multiplier),
                sample_rate=record.get("q", engine.sample_rate),
            )
            counted.add(pair)
            lost += 1
    # With a new seed (secure mode, re-keyed) no pair can match: every step counts again.
    ledger = None
    if engine.rank == 0:
        ledger = _open_ledger(engine, path)
        ledger.repair()
    engine.set_ledger(ledger, counted)
    if blockers and lost:
        warnings.warn(
            f"checkpoint {path}: the {lost} step(s) run after it cannot be replayed for free "
            f"({'; '.join(blockers)}): the noise is re-keyed and they are charged in addition",
            ResumeWarning,
            stacklevel=2,
        )
    _barrier(engine)
    return state["extra"]
