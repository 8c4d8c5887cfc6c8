"""The noise stream of a private run: its seed and the privacy ledger's name for it.

The noise of logical step k on parameter i is keyed by (seed, k, i) (the ops' Philox key; see
:func:`rmt_kernels.ops.noise_offset`). Whoever knows the seed can regenerate the noise and subtract
it, so by default the seed is drawn from the OS and never written anywhere (privacy invariant 9,
PRIVACY.md).

The ledger (rmt_kernels/dp/checkpoint.py) records each logical step under a *stream id*: the hash
of a public seed (a rerun with the same seed is recognised as a replay, which costs nothing), or a
random id for a secret seed (a hash of a secret seed in the ledger would let anyone holding the
ledger test guesses of the seed offline).

A resume that cannot replay the lost steps exactly moves to a new stream (:meth:`NoiseKey.rekey`),
and a rollback of a secret-seeded run draws a fresh secret one (:meth:`NoiseKey.restore`), so no
(seed, step, parameter) key is ever used on two different clipped sums: the difference of two such
releases would be the noise-free difference of the sums.
"""

from __future__ import annotations

import hashlib
import secrets

from rmt_kernels._checks import SEED_LIMIT  # the ops' signed 64-bit noise key: [0, 2^63)
from rmt_kernels.dp import distributed

# All 63 bits the ops' signed 64-bit Philox key can hold (the noise stream uses every key bit:
# 2^63 candidates to search, unlike a torch generator's 2^32).
SEED_BITS = 63


def check_seed(seed: int | None, what: str = "seed") -> None:
    """Refuse anything but None or an int in [0, 2^63) (the ops' signed 64-bit noise key).

    Raises:
        TypeError: ``seed`` is neither None nor an int (a bool is refused).
        ValueError: ``seed`` is outside [0, 2^63).
    """
    if seed is None:
        return
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise TypeError(f"{what} must be None or an int, got {type(seed).__name__}")
    if not 0 <= seed < SEED_LIMIT:
        raise ValueError(
            f"{what} must be in [0, 2**63) (the noise key is a signed 64-bit integer), got {seed}"
        )


def seed_id_of(seed: int) -> str:
    """The privacy ledger's name of the noise stream of a public ``seed`` (a hash; never the
    seed)."""
    return hashlib.sha256(f"rmt-noise-seed:{seed}".encode()).hexdigest()[:16]


def random_stream_id(process_group=None) -> str:
    """The ledger's name of a secret noise stream: random (never derived from the secret seed,
    whose hash would let anyone with the ledger test guesses), the same on every rank."""
    return f"{distributed.broadcast_int(secrets.randbits(SEED_BITS), process_group):016x}"


def derived_seed(seed: int, salt: int) -> int:
    """A fresh, reproducible seed in [0, 2^63) derived from ``seed`` and ``salt`` (re-keying the
    noise on a resume that cannot replay: see :meth:`NoiseKey.rekey`)."""
    digest = hashlib.sha256(f"rmt-rekey:{seed}:{salt}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1  # all 63 bits the noise key takes


class NoiseKey:
    """The seed of a run's noise and its stream id, the same on every rank.

    Args:
        seed: None (the default: drawn from the OS, secret) or an int in [0, 2^63) (public: the
            noise is reproducible and the run NOT private; for experiments).
        secure_mode: the run promises a seed from the OS (contradicts ``seed``); its stream id
            stays random and it is never re-keyed from its old seed.
        process_group: the torch.distributed group whose rank 0's seed every rank adopts.

    Raises:
        TypeError, ValueError: a bad ``seed`` (see :func:`check_seed`), or ``seed`` with
            ``secure_mode``.
    """

    def __init__(self, seed: int | None, *, secure_mode: bool = False, process_group=None) -> None:
        check_seed(seed)
        if secure_mode and seed is not None:
            raise ValueError(
                "seed and secure_mode=True contradict each other: secure mode draws the noise "
                "seed from the OS; pass seed=None"
            )
        self.secure_mode = secure_mode
        #: Whether the seed came from the OS (a secret never written to a log or checkpoint).
        self.secret = seed is None
        self.process_group = process_group
        # Every rank must draw the same noise (only rank 0 adds it, but a resumed or replayed run
        # must agree) and denoise alike: rank 0's seed wins.
        drawn = secrets.randbits(SEED_BITS) if seed is None else seed
        #: The seed of the noise key (seed, step, parameter index). Secret unless given.
        self.seed = distributed.broadcast_int(int(drawn), process_group)
        #: The ledger's name of this stream: derived from a public seed (a rerun with the same
        #: seed is recognised as a replay), random for a secret one (never a replay).
        self.stream_id = (
            random_stream_id(process_group) if secure_mode or self.secret else seed_id_of(self.seed)
        )

    def __repr__(self) -> str:  # never show the seed
        return f"NoiseKey(secret={self.secret}, stream_id={self.stream_id!r})"

    def saved_seed(self) -> int | None:
        """What a checkpoint may hold of the seed: the seed when it is public, else None."""
        return None if self.secret else self.seed

    def restore(self, saved_seed: int | None) -> None:
        """Adopt a checkpoint's seed (a public one, with its stream id), or, for a secret-seeded
        run (``saved_seed`` None), draw a new secret seed and a new random stream id.

        A secret seed is never saved, so no replay is possible. This run's own seed is fresh only
        if it never released a step: an engine rolled back in the same process would redraw its
        old (seed, step) noise on other batches, and the difference of two releases would be the
        noise-free difference of two clipped sums. So a new secret is drawn always (the ledger
        then matches none of the old pairs: every step is charged). Call on every rank.
        """
        if saved_seed is not None:
            self.seed = int(saved_seed)
            self.stream_id = seed_id_of(self.seed)
        else:
            self.seed = distributed.broadcast_int(secrets.randbits(SEED_BITS), self.process_group)
            self.stream_id = random_stream_id(self.process_group)

    def rekey(self, salt: int) -> None:
        """Move to a new stream: a seed derived from the current one and ``salt`` (e.g. the
        privacy ledger's length), and its stream id.

        For a resume that cannot replay the lost steps exactly (other data, unknown sampling
        position) or a restart after a crash before the first checkpoint: with a new seed no
        (seed, step, parameter) noise key of the crashed run is reused on other data. Not in
        secure mode, whose seed is drawn fresh from the OS by every run already (and whose
        stream id must stay random).

        Raises:
            RuntimeError: in secure mode.
        """
        if self.secure_mode:
            raise RuntimeError(
                "PrivateEngine.rekey_noise: a secure-mode run's seed is fresh from the OS already"
            )
        self.seed = derived_seed(self.seed, salt)
        if self.secret:
            # From the old random id, never from the secret seed; the same on every rank.
            digest = hashlib.sha256(f"rmt-rekey:{self.stream_id}:{salt}".encode()).hexdigest()
            self.stream_id = digest[:16]
        else:
            self.stream_id = seed_id_of(self.seed)
