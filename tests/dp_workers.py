"""Processes the distributed and checkpoint tests start: ``python -m tests.dp_workers KIND JSON``.

``dist``: one rank of a 2-process gloo run (tests/test_dp_distributed.py); ``train``: a short
checkpointed private run that can SIGKILL itself after the forward of a given step
(tests/test_dp_checkpoint.py). Results go to files in the folder the JSON names.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import torch
from torch.utils.data import DataLoader, TensorDataset

from tests.dp_models import padded_batch, tiny_model

C = 0.5
DELTA = 1e-5
DATASET = 64  # examples; with a loader batch of 8 the sample rate is 1/8
BATCH = 8


def dataset_loader(n: int = DATASET, batch: int = BATCH, data_seed: int = 5) -> DataLoader:
    """The whole dataset, loader batch = the global logical batch (sample rate batch / n);
    another ``data_seed`` gives another dataset of the same size."""
    ids, mask, labels = padded_batch(batch=n, seed=data_seed)
    return DataLoader(
        TensorDataset(ids, mask, labels),
        batch_size=batch,
        generator=torch.Generator().manual_seed(11),
    )


def private(
    model, *, noise: float, lr: float = 0.1, denoise=None, n: int = DATASET, data_seed=5, **kw
):
    """make_private over ``dataset_loader`` with the tests' settings."""
    from rmt_kernels.dp import make_private

    loader = dataset_loader(n, data_seed=data_seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    return make_private(
        model,
        opt,
        loader,
        target_delta=DELTA,
        max_grad_norm=C,
        noise_multiplier=noise,
        denoise=denoise,
        # A public seed (reproducible noise), except in secure mode, which draws its own.
        seed=kw.pop("seed", None if kw.get("secure_mode") else 1234),
        accountant="rdp",
        **kw,
    )


def backward(model, batch) -> None:
    ids, mask, labels = batch
    model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()


def batch_of(step: int, rank: int | None):
    """Examples 8 step .. 8 step + 7 of the dataset, or rank r's half of them."""
    start = step * BATCH
    if rank is not None:
        start += rank * BATCH // 2
    end = (step + 1) * BATCH if rank is None else start + BATCH // 2
    return tuple(t[start:end] for t in dataset_loader().dataset.tensors)


def grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def params(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def dist_worker(rank: int, world: int, port: int, out: Path) -> None:
    """The checks of one rank; rank r starts from another init (make_private broadcasts)."""
    import torch.distributed as dist

    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    result = {}
    # (a) noise off, one step on this rank's half of the batch.
    model, opt, _ = private(tiny_model(seed=rank), noise=0.0)
    backward(model, batch_of(0, rank))
    opt.step()
    result["clean_grads"], result["clean_params"] = grads(model), params(model)
    # (b) noise on, same start, lr 0: the gradient is the clean one plus the noise.
    model, opt, _ = private(tiny_model(seed=rank), noise=2.0, lr=0.0)
    backward(model, batch_of(0, rank))
    opt.step()
    result["noisy_grads"] = grads(model)
    # (c) several steps with denoising; at step 1 rank 1's local batch is empty.
    model, opt, _ = private(tiny_model(seed=rank), noise=1.0, denoise={"kappa": 0.5})
    for step in range(3):
        if not (step == 1 and rank == 1):
            backward(model, batch_of(step, rank))
        opt.step()
        opt.zero_grad()
    result["denoised_params"] = params(model)
    result["epsilon"] = opt.get_epsilon(DELTA)
    result["allreduce_seconds"] = opt.engine.allreduce_seconds
    torch.save(result, out / f"rank{rank}.pt")
    dist.destroy_process_group()


def train_run(
    folder: Path, *, steps: int, every: int, resume: bool, kill_at: int | None, secure=False
) -> dict:
    """A checkpointed private run of ``steps`` logical steps over the Poisson loader.

    Checkpoints after every ``every`` steps; with ``kill_at`` the process SIGKILLs itself right
    after the forward of step ``kill_at`` (0-based, so its data has touched the model).
    """
    from rmt_kernels.dp import attach_ledger, load_checkpoint, save_checkpoint

    torch.manual_seed(0)
    model = tiny_model(seed=3)
    kw = {"secure_mode": True} if secure else {}
    model, opt, loader = private(model, noise=1.0, n=32, **kw)
    path = folder / "ckpt.pt"
    report = {}
    if resume:
        load_checkpoint(path, model, opt, loader)
        report["epsilon_after_load"] = opt.get_epsilon(DELTA)
        report["steps_after_load"] = opt.engine.steps
    else:
        attach_ledger(opt, path)
    while opt.engine.steps < steps:
        for ids, mask, labels in loader:
            if len(ids):
                out = model(input_ids=ids, attention_mask=mask, labels=labels)
                if kill_at is not None and opt.engine.steps == kill_at:
                    os.kill(os.getpid(), signal.SIGKILL)
                out.loss.backward()
            opt.step()
            opt.zero_grad()
            if opt.engine.steps % every == 0:
                save_checkpoint(path, model, opt, loader)
            if opt.engine.steps == steps:
                break
    report["epsilon"] = opt.get_epsilon(DELTA)
    report["steps"] = opt.engine.steps
    torch.save(params(model), folder / f"final-{'resumed' if resume else 'fresh'}.pt")
    return report


if __name__ == "__main__":
    torch.set_num_threads(1)
    kind, args = sys.argv[1], json.loads(sys.argv[2])
    if kind == "dist":
        dist_worker(args["rank"], args["world"], args["port"], Path(args["out"]))
    else:
        report = train_run(
            Path(args["folder"]),
            steps=args["steps"],
            every=args["every"],
            resume=args["resume"],
            kill_at=args.get("kill_at"),
            secure=args.get("secure", False),
        )
        print(json.dumps(report))
