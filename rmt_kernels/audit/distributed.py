"""The white-box audit on several processes (torch.distributed, gloo on the CPU).

:func:`white_box_audit_distributed` starts ``world_size`` processes (``torch.multiprocessing``,
spawn), joins them in one gloo group and runs :func:`~rmt_kernels.audit.whitebox.white_box_audit`
on every rank for each job: every rank holds the whole dataset and Poisson-samples its shard,
the native engine all-reduces the clipped sums and rank 0 alone adds the noise
(rmt_kernels/dp/distributed.py). The canary scores come from the released ``p.grad``, which is
the same on every rank (checked), and rank 0 computes the bound; its results come back.

Under ``torchrun`` (a process group already initialized) call ``white_box_audit`` on every rank
directly.

A planted bug for a test or a benchmark: ``plant`` is a picklable callable (a module-level
function) that takes the rank and returns a context manager, entered around that job's run in
every process (a monkeypatch made in the parent would not reach the spawned processes).
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from pathlib import Path

import torch

from rmt_kernels.audit.whitebox import white_box_audit
from rmt_kernels.audit.whitebox_config import WhiteBoxConfig
from rmt_kernels.audit.whitebox_scores import WhiteBoxResult

__all__ = ["white_box_audit_distributed"]

Plant = Callable[[int], AbstractContextManager]


def _worker(
    rank: int,
    world_size: int,
    port: int,
    jobs: list[tuple[WhiteBoxConfig, Plant | None]],
    out: str,
) -> None:
    import torch.distributed as dist

    # Two processes on a shared CPU: one thread each, as the distributed tests run them.
    torch.set_num_threads(1)
    # The rendezvous store is the parent's (it picked a free port: no race for one here).
    store = dist.TCPStore("127.0.0.1", port, world_size, is_master=False)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size)
    try:
        results = []
        for cfg, plant in jobs:
            with plant(rank) if plant is not None else contextlib.nullcontext():
                results.append(white_box_audit(cfg))
        if rank == 0:
            torch.save(results, Path(out) / "results.pt")
        # Every rank is done with the group (and rank 0's file is closed) past this point.
        dist.barrier()
    except BaseException:
        dist.destroy_process_group()
        raise
    # Leave without running gloo's C++ teardown: now and then it aborts the process
    # (std::terminate, "terminate called without an active exception", SIGABRT) even after the
    # barrier (one CI run lost rank 1 so). The work is done and saved; the OS closes the
    # sockets, and a peer still in its barrier has its last message already.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def white_box_audit_distributed(
    configs: Sequence[WhiteBoxConfig],
    *,
    world_size: int = 2,
    plants: Sequence[Plant | None] | None = None,
) -> list[WhiteBoxResult]:
    """White-box audits on ``world_size`` gloo processes, one per config, in one process group.

    Args:
        configs: the runs (each a :class:`WhiteBoxConfig`), run one after the other.
        world_size: the number of processes (>= 2).
        plants: per config, None or a planted bug (module docstring); None: none at all.

    Returns:
        Rank 0's :class:`WhiteBoxResult` of each config, in order (the accountant's epsilon is
        the same on every rank: it sees the global sample rate).

    Raises:
        ValueError: ``world_size`` < 2, an empty or non-config ``configs``, or ``plants`` of
            another length.
        RuntimeError: a process failed (its error is chained), e.g. the scores differed across
            ranks.
    """
    import torch.distributed as dist
    import torch.multiprocessing as mp

    if not (isinstance(world_size, int) and not isinstance(world_size, bool) and world_size >= 2):
        raise ValueError(f"world_size must be an int >= 2, got {world_size!r}")
    configs = list(configs)
    if not configs or not all(isinstance(c, WhiteBoxConfig) for c in configs):
        raise ValueError(f"configs must be a non-empty sequence of WhiteBoxConfig, got {configs!r}")
    plants = [None] * len(configs) if plants is None else list(plants)
    if len(plants) != len(configs):
        raise ValueError(
            f"plants must have one entry per config ({len(configs)}), got {len(plants)}"
        )
    # The rendezvous store lives here, on a port the OS picks, while the processes run.
    store = dist.TCPStore("127.0.0.1", 0, world_size, is_master=True, wait_for_workers=False)
    with tempfile.TemporaryDirectory(prefix="rmt-audit-") as tmp:
        try:
            mp.start_processes(
                _worker,
                args=(world_size, store.port, list(zip(configs, plants, strict=True)), tmp),
                nprocs=world_size,
                join=True,
                start_method="spawn",
            )
        except mp.ProcessRaisedException as err:
            raise RuntimeError(f"white-box audit on {world_size} processes failed") from err
        return torch.load(Path(tmp) / "results.pt", weights_only=False)
