"""Mixed precision (issue 27 item 4): a model run under ``torch.autocast`` in bfloat16.

Its parameters stay float32 (the master weights: the noisy sum and the update are float32), its
layers see bfloat16 activations, and the engine clips the gradient those activations define:
example b's gradient is the exact ``sum_t dy_t x_t^T`` (and the LayerNorm, bias and Embedding
analogues) of the tensors the layer saw, clipped per example to C (PRIVACY.md invariant 6: the
norms are certified upper bounds on any float input, bfloat16 included).
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from rmt_kernels.dp import make_private

C = 1.0
VOCAB, DIM, HIDDEN, CLASSES = 50, 16, 32, 4
# CUDA runs in bench/gpu/run.sh (a lent GPU); on the CPU machines it is skipped.
DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=pytest.mark.skipif(
            not torch.cuda.is_available(), reason="needs CUDA (bench/gpu/run.sh)"
        ),
    ),
]


class TinyLM(nn.Module):
    """Embedding -> Linear -> GELU -> LayerNorm -> Linear, pooled over positions."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, DIM)
        self.up = nn.Linear(DIM, HIDDEN)
        self.norm = nn.LayerNorm(HIDDEN)
        self.head = nn.Linear(HIDDEN, CLASSES)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.norm(torch.nn.functional.gelu(self.up(self.emb(ids))))
        return self.head(h).float().mean(1)


def record_layers(model: TinyLM) -> dict[str, dict[str, torch.Tensor]]:
    """Hooks that keep what each layer saw in the training forward: its input and its output's
    gradient (``seen["on"]`` switches them on; the engine's layout check runs inside the same
    call, before the training forward, which overwrites what it left)."""
    seen: dict = {"on": False}

    def keep(name):
        def hook(module, inputs, output):
            if not seen["on"] or not output.requires_grad:
                return
            seen[name] = {"x": inputs[0].detach()}
            output.register_hook(lambda g: seen[name].__setitem__("dy", g.detach()))
            if name == "up":
                # The embedding's output gradient is this layer's input gradient (the engine
                # makes the embedding's output a graph leaf after the hooks here have run).
                inputs[0].register_hook(lambda g: seen["emb"].__setitem__("dy", g.detach()))

        return hook

    for name in ("up", "norm", "head"):
        getattr(model, name).register_forward_hook(keep(name))
    return seen


def per_example_grads(seen, eps: float) -> list[dict[str, torch.Tensor]]:
    """float64 per-example gradients of every parameter, from the recorded tensors."""
    grads = []
    for b in range(seen["up"]["x"].shape[0]):
        g = {}
        for name in ("up", "head"):
            x, dy = seen[name]["x"][b].double(), seen[name]["dy"][b].double()
            g[f"{name}.weight"], g[f"{name}.bias"] = dy.T @ x, dy.sum(0)
        x, dy = seen["norm"]["x"][b].double(), seen["norm"]["dy"][b].double()
        xhat = (x - x.mean(-1, keepdim=True)) / (
            x.var(-1, unbiased=False, keepdim=True) + eps
        ).sqrt()
        g["norm.weight"], g["norm.bias"] = (dy * xhat).sum(0), dy.sum(0)
        ids, dy = seen["ids"][b], seen["emb"]["dy"][b].double()
        zeros = torch.zeros(VOCAB, DIM, dtype=torch.float64, device=dy.device)
        g["emb.weight"] = zeros.index_add_(0, ids, dy)
        grads.append(g)
    return grads


def clipped(grads: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    total: dict[str, torch.Tensor] = {}
    for g in grads:
        norm = torch.sqrt(sum(t.square().sum() for t in g.values()))
        factor = min(1.0, C / norm.item())
        for n, t in g.items():
            total[n] = total.get(n, 0) + factor * t
    return total


def private_step(
    ids: torch.Tensor,
    targets: torch.Tensor,
    loud: int | None = None,
    keep: torch.Tensor | None = None,
    device: str = "cpu",
):
    """One noise-free private step under bf16 autocast on ``device``: (released gradients,
    recorded layers, the model). ``loud``: an example whose embedding rows are scaled 1e3 (a
    huge gradient); ``keep``: the rows of the batch that take part (the same model either way)."""
    torch.manual_seed(0)
    model = TinyLM().to(device)
    ids, targets = ids.to(device), targets.to(device)
    if loud is not None:
        with torch.no_grad():
            model.emb.weight[ids[loud]] *= 1e3
    if keep is not None:
        ids, targets = ids[keep], targets[keep]
    seen = record_layers(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    loader = DataLoader(TensorDataset(ids, targets), batch_size=len(ids))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the public seed's "NOT private" warning
        model, opt, _ = make_private(
            model,
            opt,
            loader,
            target_delta=1e-5,
            max_grad_norm=C,
            noise_multiplier=0.0,
            poisson_sampling=False,
            loss_reduction="sum",
            seed=0,
        )
    seen["on"], seen["ids"], seen["emb"] = True, ids, {}
    with torch.autocast(device, dtype=torch.bfloat16):
        out = model(ids)
    seen["on"] = False
    torch.nn.functional.cross_entropy(out, targets, reduction="sum").backward()
    opt.step()
    # The optimizer's gradient is the noisy clipped sum over the expected batch size.
    released = {n: p.grad.detach().double() * len(ids) for n, p in model.named_parameters()}
    return released, seen, model


def batch(n: int = 6, length: int = 5, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return (
        torch.randint(0, VOCAB, (n, length), generator=gen),
        torch.randint(0, CLASSES, (n,), generator=gen),
    )


# Length 40 >= LINEAR_BF16_MIN_TOKENS: the head's bf16 x and dy take the per-example bf16 GEMM
# route of linear_clipped_noisy_sum (csrc/cpu/linear_bf16.cpp; tests/test_linear_bf16.py).
LENGTHS = [5, 40]


@pytest.mark.parametrize("length", LENGTHS)
@pytest.mark.parametrize("device", DEVICES)
def test_autocast_clips_the_gradient_of_the_bf16_activations_with_float32_master_weights(
    device, length
):
    ids, targets = batch(length=length)
    released, seen, model = private_step(ids, targets, loud=2, device=device)
    # The test exercises bf16: the first Linear sees the float32 embedding (autocast casts it
    # inside the product), the layers after it see bfloat16 tensors.
    assert seen["up"]["x"].dtype == torch.float32
    assert seen["norm"]["x"].dtype == torch.bfloat16 and seen["head"]["x"].dtype == torch.bfloat16
    assert seen["up"]["dy"].dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert all(p.grad.dtype == torch.float32 for p in model.parameters())
    reference = clipped(per_example_grads(seen, model.norm.eps))
    for name, want in reference.items():
        got = released[name].double()
        err = (got - want).norm() / want.norm()
        assert err < 1e-5, (name, err.item())  # float32 release of a float64 reference


@pytest.mark.parametrize("length", LENGTHS)
@pytest.mark.parametrize("device", DEVICES)
def test_autocast_sensitivity_one_example_moves_the_clipped_sum_by_at_most_c(device, length):
    ids, targets = batch(length=length, seed=1)
    loud = 3
    with_it, _, _ = private_step(ids, targets, loud=loud, device=device)
    keep = torch.arange(len(ids)) != loud
    # The same model (its loud rows scaled as before), the loud example left out of the batch.
    without, _, _ = private_step(ids, targets, loud=loud, keep=keep, device=device)
    moved = torch.sqrt(
        sum((with_it[n].double() - without[n].double()).square().sum() for n in with_it)
    )
    assert 0.5 * C < moved <= C * (1 + 1e-5), moved.item()  # clipped (huge gradient), never above C


@pytest.mark.parametrize("noise_multiplier", [1.0])
def test_autocast_noise_is_float32_on_the_master_weights(noise_multiplier):
    # The noisy gradient lands in float32 (not rounded to bf16 before the update).
    ids, targets = batch()
    torch.manual_seed(0)
    model = TinyLM()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    loader = DataLoader(TensorDataset(ids, targets), batch_size=len(ids))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, opt, _ = make_private(
            model,
            opt,
            loader,
            target_delta=1e-5,
            max_grad_norm=C,
            noise_multiplier=noise_multiplier,
            poisson_sampling=False,
            seed=0,
        )
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(ids)
    torch.nn.functional.cross_entropy(out, targets).backward()
    opt.step()
    g = model.up.weight.grad
    assert g.dtype == torch.float32
    # A bf16-rounded gradient has at most 8 significant bits: its values sit on a coarse grid.
    assert not torch.equal(g, g.bfloat16().float())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_spread_of_a_large_half_precision_batch_is_the_float32_norm_bit_for_bit(dtype):
    # ReleaseGuard's row norms convert a large bf16 / fp16 CPU batch to float32 in chunks (no
    # float32 copy of the whole batch): the same norms as one conversion, every row covered.
    from rmt_kernels.rules.release_guard import _NORM_CHUNK_BYTES, row_norm_bounds

    d = 1000  # chunks of 262 rows: 2 * 131 * 8 rows = 8 chunks, the last one partial
    a = torch.randn(2, 131 * 8, d, generator=torch.Generator().manual_seed(3)).to(dtype)
    assert a.numel() * 4 > 4 * _NORM_CHUNK_BYTES  # the chunked path
    a[1, -1] *= 1e3  # the last row differs from the rest
    n = torch.linalg.vector_norm(a, dim=-1, dtype=torch.float32).double()
    want = ((n * n + d * 2.0**-149) * (1.0 + (d + 4) * 2.0**-24)).sqrt()
    assert torch.equal(row_norm_bounds(a), want)
    strided = a.transpose(0, 1).contiguous().transpose(0, 1)
    assert not strided.is_contiguous() and torch.equal(row_norm_bounds(strided), want)
