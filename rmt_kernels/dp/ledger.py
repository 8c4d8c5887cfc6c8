"""The privacy ledger: the record, kept beside a checkpoint, of every logical step whose data may
have entered a computation, so that a crash never under-counts epsilon; and its lock.

The ledger (``<checkpoint>.ledger``, rank 0 writes it). Before the data of logical step k touches
the model (its first forward, or the noise-only step of an empty batch) one line
``{"step": k, "seed_id": ..., "sigma": ..., "q": ..., "prev": ...}`` is appended and fsynced;
``seed_id`` names the noise stream (a hash of the seed, or a random id in secure mode), never
the seed; ``sigma`` and ``q`` are the step's noise multiplier and sampling rate (public). Every
line therefore stands for a step whose data may have entered a computation, whether or not it
finished. How a resume counts the lines (replayed for free, or charged) is the resume policy's
(rmt_kernels/dp/checkpoint.py).

Tamper evidence. Each line carries ``prev``, the SHA-256 of the line before it (``GENESIS`` for
the first); the marker ``<checkpoint>.ledger.head`` holds the number of lines and the last one's
SHA-256 and is replaced (atomically) before each line is appended; each checkpoint records the
SHA-256 of the last line it counted. Reading a ledger therefore refuses, naming the line: a line
edited, inserted or removed (the chain), the last line edited (the marker), a step recorded twice
(no run writes one twice: a duplicated line, or one replaced by a counted one, would skip
charging a step), a line without its chain field or its mechanism, chained lines without their
marker. It charges, with a :class:`LedgerWarning`: lines the marker counts but the file lacks
(the crashed steps' records deleted, or a crash between the marker and the line) and a torn last
line (a crash inside the write, or a truncation: its data may have been used), each as one step
that is never replayed; :meth:`PrivacyLedger.repair` writes them back as ``lost`` lines, so a
later resume of the same checkpoint charges them again. What nothing here can see: someone who
rewrites the ledger, its marker and the checkpoint together (the hashes are unkeyed), or deletes
all three; the storage is trusted not to be edited so.

One process at a time (:func:`lock_ledger`): two processes sharing a ledger would each take the
other's lines for replayed steps of their own and under-count.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from rmt_kernels.atomic_file import write_atomically
from rmt_kernels.dp.checkpoint_file import CheckpointError

__all__ = [
    "GENESIS",
    "LedgerWarning",
    "PrivacyLedger",
    "check_charged",
    "ledger_path",
    "lock_ledger",
    "marker_path",
    "open_ledger",
]

# The chain's start: the "prev" of a ledger's first line.
GENESIS = hashlib.sha256(b"").hexdigest()


class LedgerWarning(UserWarning):
    """A privacy ledger read with a caveat: steps whose record was torn or is missing (each
    charged)."""


def ledger_path(path: str | os.PathLike) -> Path:
    """Where the privacy ledger of the checkpoint at ``path`` lives."""
    return Path(f"{os.fspath(path)}.ledger")


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

    Args:
        path: the ledger file (:func:`ledger_path` of a checkpoint).
        mechanism: the (noise multiplier, sampling rate) written with each appended line, so
            that the steps of a run killed before its first checkpoint are charged with the
            mechanism they really ran; None for a ledger that is only read.
    """

    def __init__(
        self, path: str | os.PathLike, mechanism: tuple[float, float] | None = None
    ) -> None:
        self.path = Path(path)
        self.mechanism = mechanism
        # After a scan: each line's SHA-256 (None for a torn or missing one); once the file is
        # whole, (lines, SHA-256 of the last).
        self._hashes: list[str | None] = []
        self._tip: tuple[int, str] | None = None

    @property
    def marker(self) -> Path:
        """The marker file of this ledger (:func:`marker_path`)."""
        return marker_path(self.path)

    def fail(self, what: str) -> CheckpointError:
        """The error that refuses this ledger because of ``what`` (for the resume's checks)."""
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
            raise self.fail(f"its marker {self.marker} is not a ledger marker") from err

    def _parse(self, number: int, raw: bytes) -> dict:
        """Line ``number``'s record without its chain field, and the chain field."""
        try:
            record = json.loads(raw)
            entry = {"step": int(record["step"]), "seed_id": str(record["seed_id"])}
            if record.get("lost"):
                entry["lost"] = True  # a torn or missing step's placeholder: no mechanism
            else:
                entry["sigma"], entry["q"] = float(record["sigma"]), float(record["q"])
            entry["prev"] = str(record["prev"])
            return entry
        except (ValueError, KeyError, TypeError) as err:
            raise self.fail(
                f"line {number} is not a ledger record (step, seed_id, sigma, q and the chain "
                "field prev; a ledger written before the chain is not read)"
            ) from err

    def records(self) -> list[dict]:
        """Every step the ledger stands for, in order, verified: dicts with ``step``,
        ``seed_id``, ``sigma`` and ``q``, or ``lost`` (and no mechanism) for a step whose line
        is torn (a crash inside the write, or a truncation) or missing (the marker counts more
        lines than the file holds): such a step is charged, never replayed (a
        :class:`LedgerWarning` says so).

        Raises:
            CheckpointError: a line that is not a record, a broken chain (naming the line), a
                step recorded twice (lines duplicated), a line that is not the one the marker
                says was appended, or chained lines without their marker.
        """
        data = self.path.read_bytes() if self.path.exists() else b""
        *complete, tail = data.split(b"\n")
        out, hashes, previous = [], [], GENESIS
        seen: dict[tuple[int, str], int] = {}

        def add(number: int, raw: bytes) -> None:
            nonlocal previous
            entry = self._parse(number, raw)
            if entry.pop("prev") != previous:
                raise self.fail(
                    f"line {number} does not follow the line before it (its chain field is not "
                    f"that line's SHA-256): line {number} or the one before was edited, inserted "
                    "or removed"
                )
            pair = (entry["step"], entry["seed_id"])
            if pair in seen:
                raise self.fail(
                    f"lines {seen[pair]} and {number} both record step {pair[0]} of stream "
                    f"{pair[1]} (no run writes a step twice): a line was duplicated or replaced"
                )
            seen[pair] = number
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
        if marker is None and any(h is not None for h in hashes):
            raise self.fail(
                f"its marker {self.marker} is missing (it is written before every line): lines "
                "after the last may have been removed"
            )
        if marker is not None:
            count, last = marker
            if count <= len(out) and count and hashes[count - 1] not in (None, last):
                raise self.fail(
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
        self._hashes = hashes
        return out

    def entries(self) -> list[tuple[int, str]]:
        """The ``(step, seed_id)`` pairs of :meth:`records`, in order."""
        return [(r["step"], r["seed_id"]) for r in self.records()]

    def digest(self, lines: int) -> str | None:
        """SHA-256 of line ``lines`` as last read (``GENESIS`` for 0; None: torn or missing);
        with the chain it fixes every line up to it. Call after :meth:`records`."""
        return GENESIS if lines == 0 else self._hashes[lines - 1]

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
        write_atomically((self.marker, json.dumps({"lines": lines, "last": last}).encode()))

    def append(self, step: int, seed_id: str) -> None:
        """Record step ``step`` of stream ``seed_id``; returns once the line is on disk (the
        marker counts it before it is written).

        Raises:
            RuntimeError: the ledger was opened without a mechanism (read-only).
        """
        if self.mechanism is None:
            raise RuntimeError(
                f"PrivacyLedger {self.path}: opened without a mechanism (read-only); give "
                "mechanism=(noise multiplier, sampling rate) to append"
            )
        if self._tip is None:
            self.repair()
        count, last = self._tip
        sigma, q = self.mechanism
        record = {"step": step, "seed_id": seed_id, "sigma": sigma, "q": q, "prev": last}
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


def open_ledger(path: str | os.PathLike, mechanism: tuple[float, float]) -> PrivacyLedger:
    """The ledger of the checkpoint at ``path``, locked by this process (:func:`lock_ledger`),
    appending lines with ``mechanism`` (noise multiplier, sampling rate).

    Raises:
        CheckpointError: another process holds the lock.
    """
    lock_ledger(path)
    return PrivacyLedger(ledger_path(path), mechanism)


def check_charged(path: Path, accountant: Mapping[str, Any], counted: list[dict]) -> None:
    """Refuse the checkpoint at ``path`` whose accountant (its state: ``history`` of
    ``(noise multiplier, sampling rate, steps)``) has not charged every record of ``counted``
    (the :meth:`PrivacyLedger.records` up to its mark) at that record's mechanism, a ``lost``
    record (no mechanism recorded) at any. Why: the resume adds only the lines after the mark,
    so an accountant edited in the file (emptied, its noise raised, its rate lowered) would
    under-report epsilon (tests/test_checkpoint_tampering.py). An honest checkpoint charged
    each line exactly once: every step is recorded, then accounted, and a resume charges each
    line it does not count.

    Raises:
        CheckpointError: naming the mechanism charged too few times.
    """
    charged: Counter = Counter()
    for sigma, rate, steps in accountant.get("history") or ():
        charged[(float(sigma), float(rate))] += int(steps)
    needed = Counter((r["sigma"], r["q"]) for r in counted if not r.get("lost"))
    for (sigma, rate), count in needed.items():
        if charged[(sigma, rate)] < count:
            raise CheckpointError(
                f"checkpoint {path}: its accountant charged {charged[(sigma, rate)]} step(s) at "
                f"noise multiplier {sigma} and sampling rate {rate}, the privacy ledger counted "
                f"{count}: the accountant's history was edited, and the privacy spent would be "
                "under-reported"
            )
    lost = len(counted) - sum(needed.values())
    if sum(charged.values()) - sum(needed.values()) < lost:
        raise CheckpointError(
            f"checkpoint {path}: its accountant charged {sum(charged.values())} step(s), the "
            f"privacy ledger counted {len(counted)}: the accountant's history was edited, and "
            "the privacy spent would be under-reported"
        )
