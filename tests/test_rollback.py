"""A run rolled back in the same process never reuses its secret noise, and pays for every step.

Found by the red team (issue 24 round): ``load_checkpoint`` on the running optimizer of a
secret-seed run (the default) kept the engine's seed, so the steps after the checkpoint ran again
with the same (seed, step) noise on other batches: the difference of two releases of one step was
the noise-free difference of the two batches' clipped sums (to 3e-5), and 8 steps that used data
were charged as 5.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from rmt_kernels.dp import load_checkpoint, make_private, save_checkpoint

N, D, SIGMA, C = 64, 16, 100.0, 1.0


def _run(secure_mode: bool, tmp_path):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(N, D, generator=g), torch.randn(N, 1, generator=g)
    model = nn.Sequential(nn.Linear(D, 1, bias=False))
    model, opt, loader = make_private(
        model,
        torch.optim.SGD(model.parameters(), lr=0.0),  # the model never moves
        DataLoader(TensorDataset(x, y), batch_size=8),
        noise_multiplier=SIGMA,
        max_grad_norm=C,
        target_delta=1e-5,
        loss_reduction="sum",
        secure_mode=secure_mode,
        verify_layout=False,
    )
    batches = iter(loader)
    released: dict[tuple[str, int], torch.Tensor] = {}

    def steps(n: int, tag: str) -> None:
        for _ in range(n):
            xb, yb = next(batches)
            k = opt.engine.steps
            if len(xb):
                ((model(xb) - yb) ** 2).sum().backward()
            opt.step()
            released[(tag, k)] = model[0].weight.grad.detach().clone()
            opt.zero_grad()

    path = tmp_path / "ckpt.pt"
    steps(2, "first")
    save_checkpoint(path, model, opt, loader)
    steps(3, "first")  # steps 2, 3, 4
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        load_checkpoint(path, model, opt)  # the rollback, on the live optimizer, no loader
    steps(3, "again")  # steps 2, 3, 4 again, on other batches
    return released, opt


@pytest.mark.parametrize("secure_mode", [False, True])
def test_a_rollback_draws_fresh_noise_and_charges_every_step(secure_mode, tmp_path):
    released, opt = _run(secure_mode, tmp_path)
    for k in (2, 3, 4):
        gap = (released[("first", k)] - released[("again", k)]).norm().item()
        # Fresh noise: the gap is the norm of a difference of two independent N(0, (sigma C)^2)
        # vectors of D entries (divided by nothing: loss_reduction "sum", expected batch 8 ->
        # the released gradient is the sum / 8): about sigma C sqrt(2 D) / 8 = 70.7. Reused
        # noise leaves only the clipped sums' difference, at most 16 C / 8 = 2. The chi
        # distribution with 16 degrees of freedom is below 1/7 of its mean with probability
        # far under 1e-9, so 10 separates the two cases safely.
        assert gap > 10.0, (k, gap)
    # 2 + 3 + 3 steps used data: all are charged.
    # (Opacus's history merges consecutive equal steps into (sigma, q, count) entries.)
    assert sum(count for _, _, count in opt.engine.accountant.history) == 8
