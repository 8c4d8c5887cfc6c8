"""Checkpoint and resume of a private run, and the privacy ledger that keeps a crash from
under-counting epsilon.

File format (``FORMAT_VERSION``): ``MAGIC``, the version (uint32), the payload length (uint64)
and the payload's SHA-256, then the payload (``torch.save`` of a dict: fingerprint, model and
optimizer state, engine step counter, noise seed, accountant history, each rank's sampler
position and global RNG states (dropout), the caller's ``extra``). A short, flipped or foreign
file is refused, naming the file. Written
atomically: a temporary file in the same folder, fsync, ``os.replace``, fsync of the folder, so
a crash leaves the previous checkpoint or the new one, never half of one.

Secure mode. The noise seed and the sampler's generator state are never written. A resumed run
draws a fresh seed from the OS; that is safe because the noise key is (seed, step, parameter):
with a new seed no key of the crashed run is reused, and the steps it lost are counted (below).

The privacy ledger (``<checkpoint>.ledger``, rank 0 writes it). Before the data of logical step
k touches the model (its first forward, or the noise-only step of an empty batch) one line
``{"step": k, "seed_id": ...}`` is appended and fsynced; ``seed_id`` names the noise stream
(a hash of the seed, or a random id in secure mode), never the seed. Every ledger line therefore
stands for a step whose data may have entered a computation, whether or not it finished. The
checkpoint records how many lines the ledger had when it was written; at that moment every line
was already counted by the accountant (finished steps when they finished, a crashed run's steps
at its resume). On :func:`load_checkpoint` the (step, seed_id) pairs after that mark that are new
are counted at once, so ``get_epsilon`` right after loading already covers every step that
touched data. The resumed run then skips counting a step whose (step, seed_id) pair is in the
ledger: with the same seed and the same sampler position it draws the same batch and the same
noise, so it releases the same mechanism output again, which costs nothing; an uninterrupted run
and a crashed-and-resumed one end at the same epsilon. A resume that cannot replay (secure
mode's fresh seed, or a data loader whose position was not restored, for which the seed is
re-keyed so that no noise is reused on other data) counts the lost steps in addition. The replay
argument assumes the recomputation is deterministic (same code and hardware path), which the
fingerprint (model, privacy and denoise settings, world size, the noise stream's version) checks
as far as it can.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import struct
from pathlib import Path

import torch
from torch import nn

from rmt_kernels import dp_ops
from rmt_kernels.dp import distributed
from rmt_kernels.dp.engine import seed_id_of
from rmt_kernels.dp.optimizer import DPOptimizer

FORMAT_VERSION = 1
MAGIC = b"RMTDPCK\n"
_HEADER = struct.Struct("<8sIQ32s")


class CheckpointError(ValueError):
    """A checkpoint that must not be loaded: corrupt, truncated, or of another model or run."""


def ledger_path(path: str | os.PathLike) -> Path:
    """Where the privacy ledger of the checkpoint at ``path`` lives."""
    return Path(f"{os.fspath(path)}.ledger")


class PrivacyLedger:
    """Append-only record of the logical steps whose data was used (module docstring)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)

    def entries(self) -> list[tuple[int, str]]:
        """The complete lines, in order. A torn last line (a crash inside the write, before
        the fsync returned, so before the step's data was used) is ignored."""
        if not self.path.exists():
            return []
        text = self.path.read_bytes().decode()
        lines = text.split("\n")[:-1]  # the part after the last newline is torn or empty
        out = []
        for number, line in enumerate(lines, 1):
            try:
                record = json.loads(line)
                out.append((int(record["step"]), str(record["seed_id"])))
            except (ValueError, KeyError, TypeError) as err:
                raise CheckpointError(
                    f"privacy ledger {self.path}: line {number} is not a ledger record"
                ) from err
        return out

    def repair(self) -> None:
        """Cut a torn last line, so that the next append starts a line of its own."""
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        end = data.rfind(b"\n") + 1
        if end != len(data):
            with open(self.path, "r+b") as f:
                f.truncate(end)
                f.flush()
                os.fsync(f.fileno())

    def append(self, step: int, seed_id: str) -> None:
        """Record step ``step`` of stream ``seed_id``; returns once the line is on disk."""
        line = json.dumps({"step": step, "seed_id": seed_id}) + "\n"
        with open(self.path, "a") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())


def attach_ledger(optimizer: DPOptimizer, path: str | os.PathLike) -> None:
    """Start the privacy ledger of a run checkpointed at ``path`` (call before the first step;
    :func:`save_checkpoint` and :func:`load_checkpoint` do it too).

    Raises:
        CheckpointError: the ledger already holds another run's steps (resume that run with
            :func:`load_checkpoint`, or checkpoint elsewhere).
    """
    engine = _engine(optimizer)
    if engine.ledger is not None or engine.rank != 0:
        return
    ledger = PrivacyLedger(ledger_path(path))
    existing = ledger.entries()
    # Another run's records must never be mistaken for this run's (a matching (step, seed id)
    # pair would skip counting a real step): only load_checkpoint may continue a ledger.
    if existing:
        raise CheckpointError(
            f"{ledger.path} already records {len(existing)} private steps of another run: "
            "resume it (load_checkpoint / --resume) or use another checkpoint path"
        )
    ledger.repair()
    engine.ledger = ledger


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
            [f"{layer.name}.{name}" if layer.name else name, list(p.shape), str(p.dtype)]
            for layer, name, p in engine.params
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
            "noise_stream": dp_ops.NOISE_STREAM_VERSION,
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
    """
    engine = _engine(optimizer)
    if engine.capture.pending() or engine._sums:
        raise RuntimeError("save_checkpoint: a logical step is in progress; save after step()")
    attach_ledger(optimizer, path)
    # Per rank: the sampler's position and the global RNGs (dropout draws from them: a resumed
    # run must replay a lost step exactly, see the module docstring).
    local = {
        "sampler": None,
        "rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
    }
    if data_loader is not None and not engine.secure_mode:
        local["sampler"] = _sampler(data_loader).state_dict()
    ranks = _gather(local, engine)
    if engine.rank == 0:
        payload = {
            "format_version": FORMAT_VERSION,
            "fingerprint": _fingerprint(engine),
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "engine": {
                "steps": engine.steps,
                "seed": None if engine.secure_mode else engine._seed,
                "seed_id": engine.seed_id,
                "accountant": engine.accountant.state_dict(),
                "ledger_lines": len(engine.ledger.entries()),
            },
            "ranks": ranks,
            "extra": extra,
        }
        buffer = io.BytesIO()
        torch.save(payload, buffer)
        _write_atomically(Path(path), buffer.getvalue())
    _barrier(engine)


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


def _write_atomically(path: Path, payload: bytes) -> None:
    header = _HEADER.pack(MAGIC, FORMAT_VERSION, len(payload), hashlib.sha256(payload).digest())
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(header)
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    # The rename is durable only once the folder's entry is on disk.
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _read(path: Path) -> dict:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} does not exist") from None
    if len(data) < _HEADER.size:
        raise CheckpointError(f"checkpoint {path} is truncated ({len(data)} bytes)")
    magic, version, length, digest = _HEADER.unpack_from(data)
    if magic != MAGIC:
        raise CheckpointError(f"{path} is not an rmt_kernels checkpoint")
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint {path} has format version {version}; this version reads {FORMAT_VERSION}"
        )
    payload = data[_HEADER.size :]
    if len(payload) != length:
        raise CheckpointError(
            f"checkpoint {path} is truncated or padded: {len(payload)} payload bytes, the "
            f"header says {length}"
        )
    if hashlib.sha256(payload).digest() != digest:
        raise CheckpointError(f"checkpoint {path} is corrupt (SHA-256 mismatch)")
    return torch.load(io.BytesIO(payload), weights_only=True)


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


def _noise_key(seed: int, ledger_lines: int) -> int:
    """A fresh, reproducible seed for a resume that cannot replay the lost steps' batches."""
    digest = hashlib.sha256(f"rmt-rekey:{seed}:{ledger_lines}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 2


def load_checkpoint(
    path: str | os.PathLike, model: nn.Module, optimizer: DPOptimizer, data_loader=None
) -> dict | None:
    """Restore a run written by :func:`save_checkpoint`; returns its ``extra``.

    Build the model, optimizer and loader with the same ``make_private`` settings first, then
    load on every rank (each rank reads ``path``, so it must be visible to all of them; rank 0
    reads the ledger and sends it to the others). Afterwards ``optimizer.get_epsilon`` already
    counts every step of the ledger (module docstring), and the noise stream continues where the
    checkpoint stopped.

    Raises:
        CheckpointError: the file is missing, truncated, corrupt, of another format version, of
            another model, or of other privacy settings (the message names the field); or the
            privacy ledger is shorter than the checkpoint says (privacy could be under-counted).
    """
    engine = _engine(optimizer)
    path = Path(path)
    state = _read(path)
    _check_fingerprint(path, state["fingerprint"], _fingerprint(engine))
    saved = state["engine"]
    entries = None
    if engine.rank == 0:
        entries = PrivacyLedger(ledger_path(path)).entries()
    entries = distributed.broadcast_object(entries, engine.process_group)
    if len(entries) < saved["ledger_lines"]:
        raise CheckpointError(
            f"privacy ledger {ledger_path(path)} has {len(entries)} records, the checkpoint "
            f"{path} counted {saved['ledger_lines']}: it was truncated or replaced, and the "
            "privacy spent cannot be established"
        )
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    engine.accountant.load_state_dict(saved["accountant"])
    engine.steps = int(saved["steps"])
    mine = state["ranks"][engine.rank]
    torch.set_rng_state(mine["rng"])
    if mine["cuda_rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(mine["cuda_rng"])
    engine._recorded_step = -1
    if saved["seed"] is not None:
        engine._seed = int(saved["seed"])
        if data_loader is not None and mine["sampler"] is not None:
            _sampler(data_loader).load_state_dict(mine["sampler"])
        else:
            # Without the sampler's position the lost steps would see other batches under the
            # same noise: re-key the stream so no noise is ever reused on other data.
            engine._seed = _noise_key(engine._seed, len(entries))
        engine.seed_id = seed_id_of(engine._seed)
    counted = set(entries[: saved["ledger_lines"]])
    for pair in entries[saved["ledger_lines"] :]:
        if pair not in counted:
            engine.accountant.step(
                noise_multiplier=engine.noise_multiplier, sample_rate=engine.sample_rate
            )
            counted.add(pair)
    # With a new seed (secure mode, re-keyed) no pair can match: every step counts again.
    engine.counted = counted
    engine.ledger = None
    if engine.rank == 0:
        ledger = PrivacyLedger(ledger_path(path))
        ledger.repair()
        engine.ledger = ledger
    _barrier(engine)
    return state["extra"]
