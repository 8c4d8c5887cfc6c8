"""DP-SGD across processes (torch.distributed) without DistributedDataParallel.

DDP's reducer hooks the parameters' gradient accumulation, but the engine turns parameter
gradients off during forward and builds ``p.grad`` itself from layer inputs and output gradients,
so the reducer would see nothing. Instead every rank folds its local physical batches into
clipped sums and :func:`all_reduce_sums` adds them across ranks in a few flat buckets (one
collective per ~25 MB, as DDP's buckets) before the engine denoises them.

Noise placement. Rank 0 alone adds the whole Gaussian noise of std ``sigma * C`` (fused into its
last physical batch, as in one process); the other ranks add none. So the noise enters the global
sum exactly once, no noise stream is drawn on two ranks, and the all-reduced sum is exactly the
one-process mechanism with the same seed (which a test checks). With independent shares of std
``sigma * C / sqrt(W)`` per rank, each rank would know its own share: the noise protecting another
rank's examples from it would be only ``sigma * C * sqrt((W - 1) / W)``.

Sampling (:class:`PoissonSampler`): every example of the dataset is in the logical batch with
probability ``sample_rate`` (the GLOBAL rate the accountant sees): the dataset is split into
``world_size`` shards and each rank Poisson-samples its shard from its own keyed stream (a
128-bit key from the OS unless the run is explicitly public).
Unlike Opacus's ``DistributedUniformWithReplacementSampler`` it yields empty local batches too:
skipping one would put the ranks out of step (each logical step is one collective) and reveal
that the batch was empty.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Iterator

import numpy as np
import torch
from torch import nn

from rmt_kernels.dp.drawn_batches import DrawnBatches

# Bytes per all-reduce bucket: DDP's default bucket_cap_mb (large enough to amortise the
# collective's latency, small enough to bound the flat copy's extra memory).
BUCKET_BYTES = 25 << 20


def world(process_group=None) -> tuple[int, int]:
    """``(rank, world_size)`` in ``process_group``; ``(0, 1)`` outside torch.distributed."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        if process_group is not None:
            raise ValueError("process_group given but torch.distributed is not initialized")
        return 0, 1
    return dist.get_rank(process_group), dist.get_world_size(process_group)


def broadcast_object(value, process_group=None):
    """Rank 0's ``value`` (any picklable object) on every rank."""
    import torch.distributed as dist

    if world(process_group)[1] == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=_global_rank0(process_group), group=process_group)
    return box[0]


def broadcast_int(value: int, process_group=None) -> int:
    """Rank 0's ``value`` on every rank (the noise seed: the ranks must agree on it)."""
    return int(broadcast_object(value, process_group))


def _global_rank0(process_group) -> int:
    import torch.distributed as dist

    return dist.get_global_rank(process_group, 0) if process_group is not None else 0


def broadcast_parameters(model: nn.Module, process_group=None) -> None:
    """Copy rank 0's parameters and buffers to every rank, so all start from the same model."""
    import torch.distributed as dist

    if world(process_group)[1] == 1:
        return
    src = _global_rank0(process_group)
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            dist.broadcast(t.data, src=src, group=process_group)


def all_reduce_sums(
    tensors: list[torch.Tensor], process_group=None, bucket_bytes: int = BUCKET_BYTES
) -> list[torch.Tensor]:
    """Sum each tensor across ranks; the results, in order (float32, same shapes).

    Tensors are flattened into buckets of at most ``bucket_bytes`` (a larger tensor is a bucket
    of its own), one ``all_reduce(SUM)`` per bucket. Every rank must pass tensors of the same
    shapes in the same order (the engine's parameter order), zeros for a rank with no examples.
    """
    import torch.distributed as dist

    if world(process_group)[1] == 1:
        return tensors
    out: list[torch.Tensor | None] = [None] * len(tensors)
    bucket: list[int] = []
    size = 0

    def flush() -> None:
        flat = torch.cat([tensors[i].reshape(-1) for i in bucket])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=process_group)
        for i, part in zip(bucket, flat.split([tensors[i].numel() for i in bucket]), strict=True):
            out[i] = part.view_as(tensors[i])

    for i, t in enumerate(tensors):
        nbytes = t.numel() * t.element_size()
        if bucket and size + nbytes > bucket_bytes:
            flush()
            bucket, size = [], 0
        bucket.append(i)
        size += nbytes
    if bucket:
        flush()
    return out  # type: ignore[return-value]


# Bits of an OS-drawn sampling key. numpy's Philox4x64 takes a 128-bit key and uses all of it
# (torch's CPU generator, mt19937, keeps only the low 32 bits of its seed: a secret drawn for
# it would have 32 bits of entropy, and batch membership would be recoverable by search).
SAMPLING_KEY_BITS = 128


def rank_seed(base: int, rank: int) -> int:
    """A 128-bit sampling key for ``rank`` from a shared ``base``: distinct ranks get
    independent sampling streams even when every rank was given the same base."""
    digest = hashlib.sha256(f"rmt-sampler:{base}:{rank}".encode()).digest()
    return int.from_bytes(digest[:16], "little")


def key_from_generator(generator: torch.Generator) -> int:
    """A 128-bit sampling key drawn from a caller's ``generator`` (a public, reproducible key:
    the generator's own seed determines it)."""
    words = torch.randint(0, 2**32, (4,), generator=generator, dtype=torch.int64).tolist()
    return sum(int(w) << (32 * i) for i, w in enumerate(words))


def poisson_batches_per_epoch(sample_rate: float) -> int:
    """Batches in one epoch of Poisson sampling at ``sample_rate``: ``int(1 / sample_rate)``, as
    Opacus's sampler counts them (92 for a loader of 93, since 1 / (1 / 93) < 93 in floating
    point). Every count of a Poisson epoch (the sampler's, the drop-in's calibration, the
    Trainer's plan) comes from here, so they cannot disagree."""
    return int(1 / sample_rate)


class PoissonSampler(torch.utils.data.Sampler):
    """Poisson sampling of logical batches, one shard of the dataset per rank, resumable.

    Each ``__iter__`` is an epoch of ``steps`` batches (default ``1 / sample_rate``); batch b of
    an epoch holds each index of this rank's shard independently with probability
    ``sample_rate``, and may be empty.

    The uniforms of a batch are a pure function of (key, rank, epoch, position): numpy's
    Philox4x64 keyed by the 128-bit ``key`` with the counter (0, rank, position, epoch), so no
    two batches share a counter and a resume needs no generator state. A secret key (the
    default: drawn from the OS) is never in :meth:`state_dict` nor in a pickle; a resumed secret
    sampler continues the position with a fresh key, so it cannot redraw the batches drawn
    before (``restores_batches(state)`` is False for its state).

    Args:
        num_samples: dataset size (all ranks together).
        sample_rate: probability that an example is in a logical batch (the global rate).
        steps: batches per epoch (default :func:`poisson_batches_per_epoch`, as Opacus).
        rank, world_size: this rank's shard is ``indices[rank::world_size]`` of a permutation
            (the identity for one process) fixed by ``shuffle_seed + epoch``, the same on every
            rank.
        key: a public sampling key in [0, 2^128) (reproducible batches; written in
            :meth:`state_dict`), or None.
        generator: a caller's torch generator to draw a public key from (e.g. the data
            loader's, for a reproducible run), or None.
        shuffle_seed: the public seed of the shard permutation.

    With neither ``key`` nor ``generator``, the key is drawn from the OS (secret).
    """

    def __init__(
        self,
        *,
        num_samples: int,
        sample_rate: float,
        steps: int | None = None,
        rank: int = 0,
        world_size: int = 1,
        key: int | None = None,
        generator: torch.Generator | None = None,
        shuffle_seed: int = 0,
    ) -> None:
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        if not 0 < sample_rate <= 1:
            raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size = {world_size}), got {rank}")
        if key is not None and generator is not None:
            raise ValueError("PoissonSampler: give key or generator, not both")
        if generator is not None:
            key = key_from_generator(generator)
        self.num_samples = num_samples
        self.sample_rate = float(sample_rate)
        self.steps = int(steps) if steps is not None else poisson_batches_per_epoch(sample_rate)
        self.rank, self.world_size = rank, world_size
        # Whether the key came from the OS: then nothing that determines it is ever written.
        self.secret = key is None
        self._key = _check_key(key) if key is not None else secrets.randbits(SAMPLING_KEY_BITS)
        self.shuffle_seed = shuffle_seed
        self.epoch = 0
        self.position = 0  # batches of the current epoch handed out so far
        #: The batches handed out and not yet stepped on: the engine checks that each logical
        #: step clips exactly that many rows (rmt_kernels/dp/drawn_batches.py).
        self.drawn = DrawnBatches()

    def __len__(self) -> int:
        return self.steps

    def __getstate__(self) -> dict:
        # A pickle (torch.save of the loader, a deepcopy) must not carry a secret key: the
        # copy gets a fresh one from the OS in __setstate__ (a new, independent stream).
        state = dict(self.__dict__)
        if self.secret:
            state["_key"] = None
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        if self._key is None:
            self._key = secrets.randbits(SAMPLING_KEY_BITS)

    def _shard(self) -> torch.Tensor:
        if self.world_size == 1:
            return torch.arange(self.num_samples)
        shuffle = torch.Generator().manual_seed(self.shuffle_seed + self.epoch)
        order = torch.randperm(self.num_samples, generator=shuffle)
        return order[self.rank :: self.world_size]

    def _mask(self, count: int) -> torch.Tensor:
        """Membership of the current batch: ``count`` uniforms of the batch's own counter."""
        counter = [0, self.rank, self.position, self.epoch]
        uniforms = np.random.Generator(np.random.Philox(key=self._key, counter=counter))
        return torch.from_numpy(uniforms.random(count) < self.sample_rate)

    def __iter__(self) -> Iterator[list[int]]:
        if self.position >= self.steps:
            self.epoch, self.position = self.epoch + 1, 0
        shard = self._shard()
        this_pass = self.drawn.new_pass()
        while self.position < self.steps:
            mask = self._mask(len(shard))
            # Counted before the yield: after the consumer receives batch b, the state is
            # "b + 1 batches drawn", which is what a checkpoint taken after its step must record.
            self.position += 1
            batch = shard[mask].tolist()
            self.drawn.drawn(len(batch), this_pass)
            yield batch
        self.epoch, self.position = self.epoch + 1, 0

    def state_dict(self) -> dict:
        """Position, shard and, for a public sampler only, the key (a checkpoint's data-loader
        entry). A secret sampler's state holds nothing that determines its key."""
        return {
            "epoch": self.epoch,
            "position": self.position,
            "key": None if self.secret else self._key,
            "rank": self.rank,
            "world_size": self.world_size,
        }

    @staticmethod
    def restores_batches(state: dict) -> bool:
        """Whether loading ``state`` makes the sampler redraw the batches the saved one drew
        (only a public key is saved)."""
        return state["key"] is not None

    def load_state_dict(self, state: dict) -> None:
        """Continue from a :meth:`state_dict` (the next ``__iter__`` resumes mid-epoch); a
        public key is adopted, a secret sampler's state keeps this sampler's own key."""
        if (state["rank"], state["world_size"]) != (self.rank, self.world_size):
            raise ValueError(
                f"sampler state of rank {state['rank']}/{state['world_size']} loaded into rank "
                f"{self.rank}/{self.world_size}"
            )
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        if self.restores_batches(state):
            self._key, self.secret = _check_key(state["key"]), False


def _check_key(key) -> int:
    if not isinstance(key, int) or isinstance(key, bool):
        raise TypeError(f"PoissonSampler: key must be an int, got {type(key).__name__}")
    if not 0 <= key < 2**SAMPLING_KEY_BITS:
        raise ValueError(f"PoissonSampler: key must be in [0, 2**{SAMPLING_KEY_BITS}), got {key}")
    return key


def poisson_loader(
    data_loader: torch.utils.data.DataLoader,
    *,
    sample_rate: float,
    rank: int,
    world_size: int,
    secure_mode: bool = False,
) -> torch.utils.data.DataLoader:
    """A loader over ``data_loader``'s dataset with a :class:`PoissonSampler` (this rank's shard)
    and Opacus's collate that shapes empty batches.

    The sampler's key comes from ``data_loader.generator`` (reproducible runs, public) mixed
    with the rank, or from the OS (128 bits, each rank its own) when there is none or in secure
    mode.
    """
    from opacus.data_loader import dtype_safe, shape_safe, wrap_collate_with_empty
    from torch.utils.data import DataLoader, IterableDataset, default_collate

    dataset = data_loader.dataset
    if isinstance(dataset, IterableDataset):
        raise ValueError("data_loader: Poisson sampling needs a map-style dataset, not iterable")
    public = data_loader.generator is not None and not secure_mode
    base = key_from_generator(data_loader.generator) if public else None
    sampler = PoissonSampler(
        num_samples=len(dataset),
        sample_rate=sample_rate,
        rank=rank,
        world_size=world_size,
        key=rank_seed(base, rank) if public else None,
    )
    first = dataset[0]
    collate = wrap_collate_with_empty(
        collate_fn=data_loader.collate_fn or default_collate,
        sample_empty_shapes=[(0, *shape_safe(x)) for x in first],
        dtypes=[dtype_safe(x) for x in first],
    )
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=collate,
        num_workers=data_loader.num_workers,
        pin_memory=data_loader.pin_memory,
        generator=worker_seed_generator(
            None if base is None else rank_seed(base, world_size + rank)
        ),
    )


def worker_seed_generator(seed: int | None) -> torch.Generator:
    """The generator a Poisson loader draws its worker seeds from at each ``iter()``.

    Without one the DataLoader would draw from the global RNG and shift dropout's stream, so a
    resumed run would not replay exactly. It seeds only the workers' own randomness (e.g. data
    augmentation, which is part of each example's gradient), never which examples form a batch
    nor the noise, so it is no privacy secret; mt19937 keeps the low 32 bits of ``seed``.
    ``seed`` None: one from the OS.
    """
    return torch.Generator().manual_seed((secrets.randbits(64) if seed is None else seed) % 2**64)
