"""Checkpoint and resume of a private run, and the privacy ledger that keeps a crash from
under-counting epsilon.

File format (``FORMAT_VERSION``): ``MAGIC``, the version (uint32), the payload length (uint64)
and the payload's SHA-256, then the payload (``torch.save`` of a dict: fingerprint, model and
optimizer state, the engine's ``state_dict()`` (step counter, noise seed when public, stream id,
accountant history, post-processor states: the denoiser's warm-start bases, one float32
(m, k) tensor per denoised matrix, so that a resumed run denoises bit-identically) with the
ledger's length, the id of the data fingerprint's sidecar, each rank's sampler position and
global RNG states (dropout), the caller's ``extra``). A checkpoint written before
post-processors kept state has no ``post_processors`` entry and loads as before; one written
before warm starts has an empty denoiser state and loads too, its next step starting cold. A
post-processor state that its post-processor refuses (a basis of the wrong shape) refuses the
checkpoint before the model is touched. A short, flipped or foreign file is refused, naming
the file. Written atomically: a temporary file
in the same folder, fsync, ``os.replace``, fsync of the folder, so a crash leaves the previous
checkpoint or the new one, never half of one.

A secret noise seed (the default: drawn from the OS) is never written, nor a secret sampling
key (drawn from the OS unless the loader's generator keys a run with a public seed): the
sampler's entry holds its position, and its key only when the caller chose it. Only a seed the
caller gave (``make_private(seed=N)``: reproducible, not private) is written. A resumed run
with a secret seed draws a fresh one from the OS; that is safe because the noise key is (seed,
step, parameter): with a new seed no key of the crashed run is reused, and the steps it lost
are counted (below). A resumed secret sampler continues its position with a fresh key: fresh,
independent batches, and the lost steps are charged.

The privacy ledger (``<checkpoint>.ledger``, rank 0 writes it). Before the data of logical step
k touches the model (its first forward, or the noise-only step of an empty batch) one line
``{"step": k, "seed_id": ...}`` is appended and fsynced; ``seed_id`` names the noise stream
(a hash of the seed, or a random id in secure mode), never the seed, with the step's noise
multiplier and sampling rate (``sigma``, ``q``: public). Every ledger line therefore
stands for a step whose data may have entered a computation, whether or not it finished. The
checkpoint records how many lines the ledger had when it was written; at that moment every line
was already counted by the accountant (finished steps when they finished, a crashed run's steps
at its resume). On :func:`load_checkpoint` the (step, seed_id) pairs after that mark that are new
are counted at once, so ``get_epsilon`` right after loading already covers every step that
touched data. The resumed run then skips counting a step whose (step, seed_id) pair is in the
ledger: with the same seed and the same sampler position it draws the same batch and the same
noise, so it releases the same mechanism output again, which costs nothing; an uninterrupted run
and a crashed-and-resumed one end at the same epsilon. A resume that cannot replay (secure
mode's fresh seed, a secret sampling key, or a data loader whose position was not restored,
for which the seed is re-keyed so that no noise is reused on other data) counts the lost
steps in addition.

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

One process at a time: the first to attach, save or load the ledger takes an exclusive lock
(``flock`` on ``<checkpoint>.ledger.lock`` and on the ledger itself, so deleting the ``.lock``
file does not release it) held until it ends, and another process (a restarted
job whose old process still lives, a second resume of the same checkpoint) is refused with a
:class:`CheckpointError`: two processes sharing a ledger would each take the other's lines for
replayed steps of their own and under-count.

Tamper evidence. Each ledger line carries ``prev``, the SHA-256 of the line before it; the
marker ``<checkpoint>.ledger.head`` holds the number of lines and the last one's SHA-256 and is
replaced (atomically) before each line is appended; each checkpoint records the SHA-256 of the
last line it counted (``ledger_head``). A resume therefore refuses, naming the line: a counted
line edited or replaced (the checkpoint's SHA-256 or the chain), a line edited, inserted or
removed inside the ledger (the chain), the last line edited (the marker), a step recorded twice
(no run writes one twice: a duplicated line, or one replaced by a counted one, would skip
charging a step), chained lines without their marker. It charges, with a
:class:`LedgerWarning`: lines the marker counts but the file lacks (the crashed steps' records
deleted, or a crash between the marker and the line) and a torn last line (a crash inside the
write, or a truncation: its data may have been used), each as one step that is never replayed;
they are written back as ``lost`` lines, so a later resume of the same checkpoint charges them
again. A ledger and checkpoint written before the chain resume as before, with a warning. What
nothing here can see: someone who rewrites the ledger, its marker and the checkpoint together
(the hashes are unkeyed), or deletes all three; the storage is trusted not to be edited so.

A checkpoint and its data sidecar are both written and synced under temporary names before
either is renamed into place, so a write that fails (a full disk) leaves the previous pair intact.

A run killed before its first checkpoint left a ledger and no checkpoint: :func:`attach_ledger`
with ``charge_existing=True`` starts it over in its place, counting every recorded step (with the
noise multiplier and sampling rate the ledger line records) and re-keying the noise.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import secrets
import struct
import warnings
from pathlib import Path

import torch
from torch import nn

from rmt_kernels import ops
from rmt_kernels.dp import distributed
from rmt_kernels.dp.optimizer import DPOptimizer

FORMAT_VERSION = 1
MAGIC = b"RMTDPCK\n"
_HEADER = struct.Struct("<8sIQ32s")


class CheckpointError(ValueError):
    """A checkpoint that must not be loaded: corrupt, truncated, or of another model or run."""


class ResumeWarning(UserWarning):
    """A resume that could not replay the lost steps for free: the noise was re-keyed and the
    lost steps were charged to the accountant (the message says why and how many)."""


def ledger_path(path: str | os.PathLike) -> Path:
    """Where the privacy ledger of the checkpoint at ``path`` lives."""
    return Path(f"{os.fspath(path)}.ledger")


def data_path(path: str | os.PathLike) -> Path:
    """Where the data fingerprint of the checkpoint at ``path`` lives (module docstring: it is
    derived from the training data, so it is kept out of the checkpoint)."""
    return Path(f"{os.fspath(path)}.data")


class LedgerWarning(UserWarning):
    """A privacy ledger read with a caveat: lines written before it was tamper-evident (their
    edits cannot be seen), or steps whose record was torn or is missing (each charged)."""


# The chain's start: the "prev" of a ledger's first line.
GENESIS = hashlib.sha256(b"").hexdigest()


def marker_path(path: str | os.PathLike) -> Path:
    """Where the marker of the ledger at ``path`` lives (``<ledger>.head``: how many lines were
    appended and the SHA-256 of the last, written before each append)."""
    return Path(f"{os.fspath(path)}.head")


def _lost(number: int, fragment: bytes = b"") -> dict:
    """The record of line ``number``, whose step used data but whose line is torn or missing:
    charged as one step, never taken for a replay (its stream id is no engine's)."""
    found = re.search(rb'"step":\s*(\d+)', fragment)
    return {"step": int(found.group(1)) if found else -1, "seed_id": f"lost:{number}", "lost": True}


class PrivacyLedger:
    """Append-only, hash-chained record of the logical steps whose data was used (module
    docstring).

    Each line carries ``prev``, the SHA-256 of the line before it (``GENESIS`` for the first),
    so that a line edited, inserted or removed breaks the chain at the line after it. The marker
    (:func:`marker_path`) holds the number of lines and the SHA-256 of the last; it is replaced
    (atomically) *before* each line is appended, so a ledger never has fewer lines than its
    marker unless lines were removed: the missing ones are charged. The last counted line's
    SHA-256 is recorded by each checkpoint (``ledger_head``), which fixes every line it counted.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        # (noise multiplier, sample rate) written with each line, so that steps of a run killed
        # before its first checkpoint are charged with the mechanism they really ran.
        self.mechanism: tuple[float, float] | None = None
        # After a scan: each line's SHA-256 (None for a torn or missing one), the number of
        # leading lines without a chain field (written before the chain existed), the lines to
        # write at repair, and (lines, SHA-256 of the last) once the file is whole.
        self._hashes: list[str | None] = []
        self._unchained = 0
        self._tip: tuple[int, str] | None = None

    @property
    def marker(self) -> Path:
        """The marker file of this ledger (:func:`marker_path`)."""
        return marker_path(self.path)

    def _fail(self, what: str) -> CheckpointError:
        return CheckpointError(
            f"privacy ledger {self.path}: {what}; the privacy spent cannot be established"
        )

    def _read_marker(self) -> tuple[int, str] | None:
        try:
            text = self.marker.read_text()
        except FileNotFoundError:
            return None
        try:
            marker = json.loads(text)
            return int(marker["lines"]), str(marker["last"])
        except (ValueError, KeyError, TypeError) as err:
            raise self._fail(f"its marker {self.marker} is not a ledger marker") from err

    def _parse(self, number: int, raw: bytes) -> dict:
        try:
            record = json.loads(raw)
            entry = {"step": int(record["step"]), "seed_id": str(record["seed_id"])}
            if "sigma" in record:
                entry["sigma"], entry["q"] = float(record["sigma"]), float(record["q"])
            if record.get("lost"):
                entry["lost"] = True
            if "prev" in record:
                entry["prev"] = str(record["prev"])
            return entry
        except (ValueError, KeyError, TypeError) as err:
            raise self._fail(f"line {number} is not a ledger record") from err

    def records(self) -> list[dict]:
        """Every step the ledger stands for, in order, verified: dicts with ``step``,
        ``seed_id``, ``sigma`` and ``q`` when the line records them, ``lost`` for a step whose
        line is torn (a crash inside the write, or a truncation) or missing (the marker counts
        more lines than the file holds): such a step is charged, never replayed (a
        :class:`LedgerWarning` says so).

        Raises:
            CheckpointError: a line that is not a record, a broken chain (naming the line), an
                unchained line after chained ones, a step recorded twice (lines duplicated), a
                line that is not the one the marker says was appended, or chained lines
                without their marker.
        """
        data = self.path.read_bytes() if self.path.exists() else b""
        *complete, tail = data.split(b"\n")
        out, hashes, previous, unchained = [], [], GENESIS, 0
        seen: dict[tuple[int, str], int] = {}

        def add(number: int, raw: bytes) -> None:
            nonlocal previous, unchained
            entry = self._parse(number, raw)
            prev = entry.pop("prev", None)
            if prev is None and len(out) > unchained:
                raise self._fail(
                    f"line {number} has no chain field but follows chained lines: it was "
                    "inserted or edited"
                )
            if prev is not None and prev != previous:
                raise self._fail(
                    f"line {number} does not follow the line before it (its chain field is not "
                    f"that line's SHA-256): line {number} or the one before was edited, inserted "
                    "or removed"
                )
            pair = (entry["step"], entry["seed_id"])
            if pair in seen:
                raise self._fail(
                    f"lines {seen[pair]} and {number} both record step {pair[0]} of stream "
                    f"{pair[1]} (no run writes a step twice): a line was duplicated or replaced"
                )
            seen[pair] = number
            unchained += prev is None
            previous = hashlib.sha256(raw + b"\n").hexdigest()
            out.append(entry)
            hashes.append(previous)

        for number, raw in enumerate(complete, 1):
            add(number, raw)
        if tail:
            number = len(out) + 1
            try:  # a whole record that lost only its newline is still its step's record
                add(number, tail)
            except CheckpointError:
                warnings.warn(
                    f"privacy ledger {self.path}: line {number} is torn (a crash inside its "
                    "write, or a truncation): charged as one step",
                    LedgerWarning,
                    stacklevel=2,
                )
                out.append(_lost(number, tail))
                hashes.append(None)
        marker = self._read_marker()
        if marker is None and sum(h is not None for h in hashes) > unchained:
            raise self._fail(
                f"its marker {self.marker} is missing (it is written before every chained "
                "line): lines after the last may have been removed"
            )
        if marker is not None:
            count, last = marker
            if count <= len(out) and count and hashes[count - 1] not in (None, last):
                raise self._fail(
                    f"line {count} is not the line appended as line {count} (its SHA-256 "
                    f"differs from the one in {self.marker.name}): it was edited or replaced"
                )
            if count > len(out):
                warnings.warn(
                    f"privacy ledger {self.path}: {count - len(out)} line(s) after line "
                    f"{len(out)} are missing (the marker counts {count}): each charged as a step",
                    LedgerWarning,
                    stacklevel=2,
                )
                for number in range(len(out) + 1, count + 1):
                    out.append(_lost(number))
                    hashes.append(None)
        if unchained:
            warnings.warn(
                f"privacy ledger {self.path}: lines 1-{unchained} were written before the "
                "ledger was hash-chained; an edit to them cannot be detected",
                LedgerWarning,
                stacklevel=2,
            )
        self._hashes, self._unchained = hashes, unchained
        return out

    def entries(self) -> list[tuple[int, str]]:
        """The ``(step, seed_id)`` pairs of :meth:`records`, in order."""
        return [(r["step"], r["seed_id"]) for r in self.records()]

    def digest(self, lines: int) -> str | None:
        """SHA-256 of line ``lines`` as last read (``GENESIS`` for 0; None: torn or missing);
        with the chain it fixes every line up to it. Call after :meth:`records`."""
        return GENESIS if lines == 0 else self._hashes[lines - 1]

    def unchained(self) -> int:
        """How many leading lines have no chain field (as last read by :meth:`records`)."""
        return self._unchained

    def repair(self) -> None:
        """Make the file whole: a torn last line and the lines the marker counts but the file
        lacks become ``lost`` lines (charged by every resume that reads them, so a later
        resume of the same checkpoint charges them again), a whole last line gets its newline,
        and the marker is written. Raises as :meth:`records`."""
        records = self.records()
        data = self.path.read_bytes() if self.path.exists() else b""
        keep = data.rfind(b"\n") + 1
        whole = [h for h in self._hashes if h is not None]  # the lost lines are the last ones
        count, last = len(whole), whole[-1] if whole else GENESIS
        tail_whole = len(data) > keep and count > data.count(b"\n")
        cut, suffix = (len(data), b"\n") if tail_whole else (keep, b"")
        for record in records[count:]:
            raw = json.dumps({**record, "prev": last}).encode() + b"\n"
            suffix += raw
            count, last = count + 1, hashlib.sha256(raw).hexdigest()
        # The marker first: a crash before the lines are written leaves them counted as missing.
        self._write_marker(count, last)
        if cut < len(data) or suffix:
            with open(self.path, "ab") as f:
                f.truncate(cut)
                f.write(suffix)
                f.flush()
                os.fsync(f.fileno())
        self._tip = (count, last)

    def _write_marker(self, lines: int, last: str) -> None:
        tmp = self.marker.with_name(f".{self.marker.name}.tmp-{os.getpid()}")
        try:
            with open(tmp, "w") as f:
                f.write(json.dumps({"lines": lines, "last": last}))
                f.flush()
                os.fsync(f.fileno())
            _commit(tmp, self.marker)
        finally:
            tmp.unlink(missing_ok=True)

    def append(self, step: int, seed_id: str) -> None:
        """Record step ``step`` of stream ``seed_id``; returns once the line is on disk (the
        marker counts it before it is written)."""
        if self._tip is None:
            self.repair()
        count, last = self._tip
        record: dict = {"step": step, "seed_id": seed_id}
        if self.mechanism is not None:
            record["sigma"], record["q"] = self.mechanism
        record["prev"] = last
        raw = (json.dumps(record) + "\n").encode()
        digest = hashlib.sha256(raw).hexdigest()
        self._write_marker(count + 1, digest)
        with open(self.path, "ab") as f:
            f.write(raw)
            f.flush()
            os.fsync(f.fileno())
        self._tip = (count + 1, digest)


# The ledgers this process holds the lock of: resolved lock path -> the open, locked files (kept
# open, and so locked, until the process ends).
_HELD_LOCKS: dict[Path, _LedgerLock] = {}


class _LedgerLock:
    """The open files whose ``flock`` is a ledger's lock: ``<checkpoint>.ledger.lock`` (holding
    the pid, for the refusal's message) and the ledger itself."""

    def __init__(self, *handles) -> None:
        self.handles = handles

    def close(self) -> None:
        for handle in self.handles:
            handle.close()


def _flock(handle) -> bool:
    """Take ``handle``'s exclusive flock without waiting; False if another process holds it."""
    import fcntl

    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False
    return True


def lock_ledger(path: str | os.PathLike) -> None:
    """Take the exclusive lock of the ledger of the checkpoint at ``path`` for the rest of this
    process's life (a no-op if this process holds it): ``flock`` on ``<checkpoint>.ledger.lock``
    and on the ledger file itself (created empty if missing).

    Two processes on one ledger (a restarted job whose old process still lives, two resumes of
    one checkpoint) would each count the other's lines as replayed steps of their own and
    under-count epsilon (15 steps used data, 11 charged): the second one is refused. The lock
    on the ledger is what holds when the ``.lock`` file is deleted under a running process (a
    cleanup of ``*.lock``): the ledger is only ever appended to or truncated in place, never
    replaced, so its lock lasts as long as the file; deleting the ledger itself leaves its
    marker counting lines the file lacks, which a resume charges.

    Raises:
        CheckpointError: another process holds the lock.
    """
    lock = Path(f"{ledger_path(path)}.lock").resolve()
    if lock in _HELD_LOCKS:
        return
    lock.parent.mkdir(parents=True, exist_ok=True)
    handle = open(lock, "a+")  # noqa: SIM115 (held open: the lock lives as long as the file)
    ledger = None
    if _flock(handle):
        ledger = open(ledger_path(path), "ab")  # noqa: SIM115 (held open, as above)
        if _flock(ledger):
            handle.truncate(0)
            handle.write(str(os.getpid()))
            handle.flush()
            _HELD_LOCKS[lock] = _LedgerLock(handle, ledger)
            return
        holder = "unknown: its lock file was deleted"
    else:
        handle.seek(0)
        holder = handle.read().strip() or "unknown"
    handle.close()
    if ledger is not None:
        ledger.close()
    raise CheckpointError(
        f"privacy ledger {ledger_path(path)} is in use by another process (pid {holder}): "
        "two runs on one ledger would under-count the privacy spent; stop the other run "
        "first (or checkpoint elsewhere)"
    )


def _open_ledger(engine, path: str | os.PathLike) -> PrivacyLedger:
    lock_ledger(path)
    ledger = PrivacyLedger(ledger_path(path))
    ledger.mechanism = (engine.noise_multiplier, engine.sample_rate)
    return ledger


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
    # A line without its mechanism (torn, missing, or written before lines recorded it) is
    # charged with the costliest one in sight: the smallest noise multiplier and the largest
    # sampling rate of the ledger and this run (epsilon falls with the first, grows with the
    # second, so the pair costs at least what the lost step did, if it ran one of them).
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


def dataset_fingerprint(dataset) -> str | None:
    """SHA-256 (hex) of what a dataset holds, or None when it cannot be verified.

    Covered: ``torch.utils.data.TensorDataset`` (every tensor's dtype, shape and bytes) and a
    ``Subset`` of a covered dataset (its indices too). Anything else (a dataset that reads files,
    tokenizes or transforms on the fly) returns None: pass ``data_fingerprint`` to
    :func:`save_checkpoint` / :func:`load_checkpoint` for it.
    """
    from torch.utils.data import Subset, TensorDataset

    digest = hashlib.sha256()
    if isinstance(dataset, Subset):
        inner = dataset_fingerprint(dataset.dataset)
        if inner is None:
            return None
        digest.update(f"subset:{inner}:".encode())
        digest.update(json.dumps([int(i) for i in dataset.indices]).encode())
        return digest.hexdigest()
    if not isinstance(dataset, TensorDataset):
        return None
    digest.update(b"tensors:")
    for t in dataset.tensors:
        t = t.detach().cpu().contiguous()
        digest.update(f"{t.dtype}:{list(t.shape)}:".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _data_fingerprint(data_loader, given: str | None) -> dict | None:
    """The data part of a checkpoint's fingerprint (None: nothing could be verified)."""
    if given is not None and not (isinstance(given, str) and given):
        raise TypeError(f"data_fingerprint must be a non-empty str or None, got {given!r}")
    dataset = None if data_loader is None else dataset_fingerprint(data_loader.dataset)
    if given is None and dataset is None:
        return None
    return {"given": given, "dataset": dataset}


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
    data = _data_fingerprint(data_loader, data_fingerprint)
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
        buffer = io.BytesIO()
        torch.save(payload, buffer)
        sidecar = io.BytesIO()
        torch.save({"data_id": data_id, "data": data}, sidecar)
        # Both files are written and synced under temporary names before either is renamed: a
        # write that fails (a full disk) leaves the previous checkpoint and its sidecar as they
        # were. The sidecar is renamed first: a crash between the two renames leaves the old
        # checkpoint with a sidecar of another id, which is unverifiable (re-key and charge),
        # never a mismatch taken for a match.
        written = []
        try:
            for target, content in ((data_path(path), sidecar), (Path(path), buffer)):
                written.append((_write_temporary(target, content.getvalue()), target))
            for tmp, target in written:
                _commit(tmp, target)
        finally:
            for tmp, _ in written:
                tmp.unlink(missing_ok=True)
    _barrier(engine)


def _ledger_mark(ledger: PrivacyLedger) -> dict:
    """What a checkpoint records of its ledger: how many lines it counted and the SHA-256 of the
    last (through the chain, every counted line is fixed by it)."""
    lines = len(ledger.records())
    return {"ledger_lines": lines, "ledger_head": ledger.digest(lines)}


def _counted_lines(path: Path, saved: dict) -> list[tuple[int, str]]:
    """The ledger's (step, seed id) pairs, verified against the checkpoint's mark (rank 0).

    Raises:
        CheckpointError: the ledger is shorter than the checkpoint counted, its line at the mark
            is not the one the checkpoint counted, a line after the mark lacks its chain field,
            or :meth:`PrivacyLedger.records` refuses it.
    """
    ledger = PrivacyLedger(ledger_path(path))
    entries = ledger.entries()
    lines, head = saved["ledger_lines"], saved.get("ledger_head")
    if len(entries) < lines:
        raise CheckpointError(
            f"privacy ledger {ledger.path} has {len(entries)} records, the checkpoint "
            f"{path} counted {lines}: it was truncated or replaced, and the "
            "privacy spent cannot be established"
        )
    if head is None:
        warnings.warn(
            f"checkpoint {path} was written before the privacy ledger was hash-chained: only "
            "its count of ledger lines is checked",
            LedgerWarning,
            stacklevel=3,
        )
        return entries
    if ledger.digest(lines) != head:
        raise ledger._fail(
            f"line {lines} is not the line the checkpoint {path} counted last (another "
            "SHA-256): the counted lines were edited or replaced"
        )
    if ledger.unchained() > lines:
        raise ledger._fail(
            f"line {lines + 1} has no chain field, yet the checkpoint {path} was written with a "
            "chained ledger: it was inserted or edited"
        )
    return entries


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


def _write_temporary(path: Path, payload: bytes) -> Path:
    """``payload`` with its header in a synced temporary sibling of ``path``; returns its path.
    On an error (a full disk) the temporary file is removed and ``path`` is untouched."""
    header = _HEADER.pack(MAGIC, FORMAT_VERSION, len(payload), hashlib.sha256(payload).digest())
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(header)
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def _commit(tmp: Path, path: Path) -> None:
    """Rename the synced ``tmp`` onto ``path`` and make the rename durable."""
    os.replace(tmp, path)
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


def _saved_data(path: Path, state: dict) -> dict | None:
    """The data fingerprint of the checkpoint ``state`` read from ``path`` (None: unknown)."""
    try:
        sidecar = _read(data_path(path))
    except CheckpointError:
        return None
    if state.get("data_id") is None or sidecar.get("data_id") != state["data_id"]:
        return None
    return sidecar.get("data")


def checkpoint_extra(path: str | os.PathLike) -> dict | None:
    """The ``extra`` of the checkpoint at ``path`` and its step count, without loading it into
    a model: ``{"steps": ..., "extra": ...}`` (e.g. to check a resume's options before
    building anything).

    Raises:
        CheckpointError: the file is missing, truncated, corrupt or of another format version.
    """
    state = _read(Path(path))
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
        CheckpointError: the file is missing, truncated, corrupt, of another format version, of
            another model, or of other privacy settings (the message names the field); or the
            privacy ledger does not hold the lines the checkpoint counted (shorter, or its line
            at the checkpoint's mark has another SHA-256), or was tampered with after them (a
            broken chain, a step recorded twice: :meth:`PrivacyLedger.records`); privacy could
            be under-counted.
    """
    engine = _engine(optimizer)
    path = Path(path)
    current_data = _data_fingerprint(data_loader, data_fingerprint)
    state = _read(path)
    _check_fingerprint(path, state["fingerprint"], _fingerprint(engine))
    saved = state["engine"]
    entries = None
    if engine.rank == 0:
        lock_ledger(path)  # before reading: no other process may append from now on
        try:
            entries = _counted_lines(path, saved)
        except CheckpointError as err:
            entries = err  # every rank raises it (the others wait for rank 0's ledger)
    entries = distributed.broadcast_object(entries, engine.process_group)
    if isinstance(entries, CheckpointError):
        raise entries
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
        engine.rekey_noise(len(entries))
    counted = set(entries[: saved["ledger_lines"]])
    lost = 0
    for pair in entries[saved["ledger_lines"] :]:
        if pair not in counted:
            engine.accountant.step(
                noise_multiplier=engine.noise_multiplier, sample_rate=engine.sample_rate
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
