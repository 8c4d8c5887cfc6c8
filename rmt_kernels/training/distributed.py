"""torchrun for a training command: whether several processes run, joining and leaving their
group.

Every rank runs the whole loop on its shard of the data (the DP engine all-reduces the noisy
sums); rank 0 alone evaluates, logs, saves and checkpoints.
"""

from __future__ import annotations

import os

import torch


def distributed_env() -> bool:
    """Whether torchrun (or a launcher like it) started several processes."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_distributed(device: torch.device) -> tuple[int, torch.device]:
    """Join torchrun's process group (gloo on CPUs, nccl on GPUs); this rank and its device."""
    import torch.distributed as dist

    if not distributed_env():
        return 0, device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), device


def leave_distributed() -> None:
    """Destroy the process group ``init_distributed`` joined (nothing in a single process)."""
    if distributed_env():
        import torch.distributed as dist

        dist.destroy_process_group()
