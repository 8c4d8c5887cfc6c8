"""The white-box audit's training run: the canary model trained through the public API only
(``make_private``: Poisson sampling, fused noise, optional accumulation and denoising, then
``optimizer.step()``), and the released gradient ``p.grad`` read at every canary's entry after
each step. Shared by the plain audit (whitebox.py) and the resume audit (resume.py).
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from rmt_kernels.audit.canaries import AuditNet, canary_layout
from rmt_kernels.audit.whitebox_config import WhiteBoxConfig

__all__ = [
    "endless_batches",
    "forward_backward",
    "private_canary_run",
    "release_at_canaries",
    "score_unit",
]


def private_canary_run(cfg: WhiteBoxConfig, dataset: torch.utils.data.Dataset):
    """A fresh model (weights 0), SGD and loader through ``make_private`` for ``dataset``."""
    from rmt_kernels.dp import make_private

    batch = max(1, round(cfg.sample_rate * len(dataset)))
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch, generator=torch.Generator().manual_seed(cfg.seed + 1)
    )
    model = AuditNet(cfg.side)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr)
    with warnings.catch_warnings():
        # A public noise seed makes the run reproducible; the scores never use it, so the
        # audit is of the same mechanism as a run with a secret seed.
        warnings.filterwarnings("ignore", message="make_private: seed=", category=UserWarning)
        return make_private(
            model,
            optimizer,
            loader,
            target_delta=cfg.delta,
            max_grad_norm=cfg.max_grad_norm,
            noise_multiplier=cfg.noise_multiplier,
            denoise=cfg.denoise,
            seed=cfg.seed,
            accountant=cfg.accountant,
            loss_reduction="sum",
            verify_layout=False,
        )


def score_unit(cfg: WhiteBoxConfig, loader: torch.utils.data.DataLoader) -> float:
    """Units of C / expected batch: an IN canary adds ~1 per step it is sampled."""
    return cfg.max_grad_norm / max(1, round(len(loader.dataset) / len(loader)))


def forward_backward(
    cfg: WhiteBoxConfig, model: nn.Module, batch, signs: torch.Tensor, step: int
) -> None:
    """The physical batches of logical step ``step`` (canary gradients signed by ``signs``)."""
    x, ids, z, wl, we, wn, cid = batch
    is_canary = cid >= 0
    # This step's sign of each canary's gradient.
    factor = torch.ones(cid.shape[0])
    factor[is_canary] = signs[step, cid[is_canary]]
    f3 = factor[:, None, None]
    parts = (x, ids, z, wl * f3, we * factor[:, None], wn * f3)
    for xs, ids_s, zs, wls, wes, wns in zip(
        *(t.tensor_split(cfg.physical_batches) for t in parts), strict=True
    ):
        if xs.shape[0]:
            lin, emb, norm = model(xs, ids_s, zs)
            (-((lin * wls).sum() + (emb * wes).sum() + (norm * wns).sum())).backward()


def release_at_canaries(
    cfg: WhiteBoxConfig, model: nn.Module, optimizer: torch.optim.Optimizer
) -> torch.Tensor:
    """``optimizer.step()``; the released gradient at each canary's entry (float64, (m,))."""
    optimizer.step()
    released = canary_layout(cfg).entries({name: p.grad for name, p in model.named_parameters()})
    optimizer.zero_grad()
    return released


def endless_batches(loader: torch.utils.data.DataLoader):
    """The loader's batches, epoch after epoch."""
    while True:
        yield from loader
