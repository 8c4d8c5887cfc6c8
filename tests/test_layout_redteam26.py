"""The layout verification after its split into LayoutVerifier / BatchReplay
(rmt_kernels/dp/layout_verification.py), against inputs at its seams: a layer that first runs
at a batch of one (which the verification skips: one row cannot mix), then mixes at a larger
batch."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from rmt_kernels.dp.capture import LayoutError
from tests.test_dp_layout_adversarial import _ce, _first_draw_skips, _private


class _CentringDrop(nn.Module):
    """lin1 -> (LayerDrop p 0.5, torch's RNG) a block that centres its input over the batch ->
    head. The centring mixes examples; at a batch of one it is zero."""

    def __init__(self) -> None:
        super().__init__()
        self.lin1, self.mid, self.head = nn.Linear(8, 16), nn.Linear(16, 16), nn.Linear(16, 2)

    def forward(self, x):
        h = torch.tanh(self.lin1(x))
        if bool(torch.rand(()) > 0.5):
            h = h + torch.tanh(self.mid(h - h.mean(0)))
        return self.head(h)


def test_a_mixing_layer_first_run_at_a_batch_of_one_is_refused_at_its_first_larger_batch():
    skip = next(s for s in range(100) if _first_draw_skips(s))
    keep = next(s for s in range(100) if not _first_draw_skips(s))
    torch.manual_seed(0)
    x, y = torch.randn(16, 8), torch.randint(0, 2, (16,))
    private, opt, _ = _private(_CentringDrop(), x, y)
    torch.manual_seed(skip)
    _ce(private, x, y).backward()  # verified at 16 rows, the block skipped
    opt.step()
    torch.manual_seed(keep)
    _ce(private, x[:1], y[:1]).backward()  # the block runs on one row: nothing to verify
    opt.step()
    engine = opt.engine
    assert "mid" not in engine.layout.verified_layers
    torch.manual_seed(keep)
    with pytest.raises(LayoutError, match="not one example per row"):
        _ce(private, x, y)


class _BatchContext(nn.Module):
    """lin -> head, with a batch-wide context added to lin's output through a door that carries
    no gradient: lin run again under no_grad on the batch mean, lin's output detached and
    averaged, or lin's weight detached and used on the batch mean."""

    def __init__(self, door: str) -> None:
        super().__init__()
        self.door = door
        self.lin, self.head = nn.Linear(8, 16), nn.Linear(16, 2)

    def forward(self, x):
        h = self.lin(x)
        if self.door == "no_grad re-run":
            with torch.no_grad():
                context = self.lin(x.mean(0, keepdim=True).expand_as(x))
        elif self.door == "detached output":
            context = h.detach().mean(0, keepdim=True)
        else:
            context = nn.functional.linear(x.mean(0, keepdim=True), self.lin.weight.detach())
        return self.head(torch.tanh(h + context))


@pytest.mark.parametrize("door", ["no_grad re-run", "detached output", "detached weight"])
def test_a_batch_context_through_a_door_without_gradient_is_refused(door):
    # Each makes every example's gradient depend on the others' data (the context moves the
    # point where tanh is differentiated), with no gradient flowing between rows.
    torch.manual_seed(0)
    x, y = torch.randn(8, 8), torch.randint(0, 2, (8,))
    private, opt, _ = _private(_BatchContext(door), x, y)
    with pytest.raises(LayoutError, match=r"gradients disabled|not one example per row"):
        _ce(private, x, y).backward()
        opt.step()
    if door != "no_grad re-run":  # the guard: the verification is what refuses these
        private, opt, _ = _private(_BatchContext(door), x, y, verify_layout=False)
        _ce(private, x, y).backward()
        opt.step()
