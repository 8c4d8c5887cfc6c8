"""The native engine against a hostile or careless user (issue 11; privacy invariants 1, 2, 6,
7, 8 and 9 of PRIVACY.md): every way a model can feed a covered layer is either exact (equal to a
float64 per-example reference, and one example moves the noise-free sum by at most C) or refused
with a clear error; nothing untracked is ever updated; the noise seed is secret unless asked
for."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from torch import nn
from torch.nn.functional import cross_entropy, linear
from torch.utils.data import DataLoader, TensorDataset

from rmt_kernels.dp import make_private
from rmt_kernels.dp.capture import LayoutError
from tests.helpers import assert_gaussian_noise

pytest.importorskip("opacus")

C = 0.7
VOCAB, D = 13, 8


class Net(nn.Module):
    """Embedding (+ broadcast position embedding) -> Linear -> LayerNorm -> pooled head, fed in
    the layout named by ``layout``: "flattened:<layer>" feeds that layer (B*T, ...) rows,
    "seq_first:<layer>" a (T, B, ...) tensor; "<...>:lin_bias" is the Linear with only its bias
    trainable."""

    def __init__(self, layout: str = "batch_first", seq: int = 5) -> None:
        super().__init__()
        self.layout = layout
        self.emb = nn.Embedding(VOCAB, D)
        self.pos = nn.Embedding(seq, D)
        self.lin = nn.Linear(D, D)
        self.ln = nn.LayerNorm(D)
        self.head = nn.Linear(D, 2)
        if layout.endswith(":lin_bias"):
            self.lin.weight.requires_grad_(False)
        if layout == "tied":
            self.out = nn.Linear(D, VOCAB, bias=False)
            self.out.weight = self.emb.weight
        if layout == "seq_first_input":
            self.head.requires_grad_(False)  # only the model's output can show the mixing
        if layout == "batchnorm":
            self.bn = nn.BatchNorm1d(D).requires_grad_(False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.layout == "seq_first_input":  # the caller passes ids as (T, B)
            h = self.ln(torch.tanh(self.lin(self.emb(ids))))
            return self.head(h.mean(0))
        h = self._feed("emb", self.emb, ids)
        positions = self.pos(torch.arange(ids.shape[1])[None])  # (1, T, D): shared by the batch
        # "broadcast_misuse": row 0 of the per-example copy serves every example.
        h = h + (positions[0] if self.layout == "broadcast_misuse" else positions)
        h = torch.tanh(self._feed("lin", self.lin, h))
        if self.layout == "batchnorm":
            h = self.bn(h.transpose(1, 2)).transpose(1, 2)
        pooled = self._feed("ln", self.ln, h).mean(1)
        if self.layout == "direct":
            pooled = pooled + linear(pooled, self.lin.weight)  # lin's weight outside lin
        logits = self.head(pooled)
        if self.layout == "tied":
            logits = logits + self.out(pooled)[:, :2]
        return logits

    def _feed(self, name: str, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        mode, _, target = self.layout.partition(":")
        if target.split("_")[0] != name:
            return layer(x)
        B, T = x.shape[:2]
        if mode == "flattened":
            return layer(x.reshape(B * T, *x.shape[2:])).reshape(B, T, -1)
        return layer(x.transpose(0, 1)).transpose(0, 1)  # seq_first


def _data(B: int, T: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (B, T), generator=gen)
    labels = torch.randint(0, 2, (B,), generator=gen)
    return ids, labels


def _private(model, ids, labels, **kw):
    loader = DataLoader(TensorDataset(ids, labels), batch_size=len(ids))
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
    kw = {"noise_multiplier": 0.0, **kw}
    return make_private(
        model,
        opt,
        loader,
        target_delta=1e-5,
        max_grad_norm=C,
        poisson_sampling=False,
        loss_reduction="sum",
        **kw,
    )


def _engine_sum(base: nn.Module, ids, labels, keep, *, transpose=False) -> dict[str, torch.Tensor]:
    """The engine's noise-free clipped sum over the examples in ``keep``."""
    model = copy.deepcopy(base)
    x, y = ids[keep], labels[keep]
    model, opt, _ = _private(model, x, y)
    cross_entropy(model(x.T if transpose else x), y, reduction="sum").backward()
    opt.step()
    batch = opt.engine.expected_batch_size
    return {n: p.grad.double() * batch for n, p in model.named_parameters() if p.requires_grad}


def _reference_sum(base: nn.Module, ids, labels, keep) -> dict[str, torch.Tensor]:
    """sum_b min(1, C / ||g_b||) g_b with g_b from one float64 forward/backward per example."""
    model = copy.deepcopy(base).double()
    total: dict[str, torch.Tensor] = {}
    for b in keep.tolist():
        model.zero_grad(set_to_none=True)
        cross_entropy(model(ids[b : b + 1]), labels[b : b + 1], reduction="sum").backward()
        g = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        norm = math.sqrt(sum(float(t.square().sum()) for t in g.values()))
        factor = min(1.0, C / norm) if norm > 0 else 1.0
        for n, t in g.items():
            total[n] = total.get(n, 0) + factor * t
    return total


def _distance(a: dict, b: dict) -> float:
    return math.sqrt(sum(float((a[n] - b[n]).square().sum()) for n in a))


@pytest.mark.parametrize("layout", ["batch_first", "broadcast", "tied"])
def test_exact_layouts_match_the_float64_reference_and_one_example_moves_at_most_c(layout):
    # "broadcast": the position embedding's (1, T) input is shared by the batch ("batch_first"
    # has it too: every model here does); both are the same model, run with two seeds.
    B, T = 5, 4
    torch.manual_seed(1 if layout == "broadcast" else 0)
    base = Net(layout)
    ids, labels = _data(B, T, seed=3)
    with torch.no_grad():  # one adversarial example with a huge gradient
        base.emb.weight[ids[2, 0]] *= 1e3
    everyone = torch.arange(B)
    full = _engine_sum(base, ids, labels, everyone)
    reference = _reference_sum(base, ids, labels, everyone)
    for n in reference:
        torch.testing.assert_close(full[n], reference[n], rtol=1e-4, atol=1e-6, msg=n)
    for k in range(B):
        keep = torch.tensor([b for b in range(B) if b != k])
        # float32 sums of terms up to C each: a few ulps of slack.
        assert _distance(full, _engine_sum(base, ids, labels, keep)) <= C * (1 + 1e-4)


LAYERS = ["emb", "lin", "lin_bias", "ln"]  # Embedding, Linear, bias alone, LayerNorm


@pytest.mark.parametrize(
    ("layout", "B", "T", "words"),
    [
        # Shape check at every forward (no verification needed).
        *[
            (f"flattened:{t}", 4, 5, rf"layer '{t[:3]}'.*shape \[20.*not the batch size 4")
            for t in LAYERS
        ],
        *[
            (f"seq_first:{t}", 4, 5, rf"layer '{t[:3]}'.*shape \[5, 4.*not the batch size 4")
            for t in LAYERS
        ],
        # T == B passes any shape check: the one-time verification catches them.
        *[(f"seq_first:{t}", 5, 5, rf"layer '{t[:3]}' is not one example per row") for t in LAYERS],
        ("seq_first_input", 5, 5, r"output tensor 0 of the model"),
        ("broadcast_misuse", 4, 5, r"not one example per row"),
        ("batchnorm", 4, 5, r"not one example per row"),
    ],
)
def test_layouts_that_are_not_one_example_per_row_are_refused(layout, B, T, words):
    # Before the checks these were clipped per row: one example moved the sum by up to 2.7 C.
    torch.manual_seed(0)
    model = Net(layout, seq=T)
    ids, labels = _data(B, T)
    model, _, _ = _private(model, ids, labels)
    x = ids.T if layout == "seq_first_input" else ids
    with pytest.raises(LayoutError, match=words):
        model(x)


@pytest.mark.parametrize("layout", ["flattened:lin", "seq_first:emb"])
def test_shape_check_holds_without_the_verification(layout):
    model, _, _ = _private(Net(layout), *_data(4, 5), verify_layout=False)
    with pytest.raises(LayoutError, match="leading dimension is not the batch size"):
        model(_data(4, 5)[0])


def test_the_verification_leaves_rng_buffers_and_result_unchanged():
    # Dropout after the first layer: the verification's extra forwards must not change the
    # random stream the user's forward draws from (nor BatchNorm-like buffers).
    torch.manual_seed(0)
    base = Net()
    base.drop = nn.Dropout(0.5)
    base.lin.register_forward_hook(lambda m, i, o: base.drop(o))
    ids, labels = _data(4, 5)
    outs = []
    for verify in (True, False):
        model, _, _ = _private(copy.deepcopy(base), ids, labels, verify_layout=verify)
        torch.manual_seed(5)
        outs.append(model(ids).detach())
    assert torch.equal(outs[0], outs[1])


def test_tied_weights_are_refused_at_make_private():
    # A tied embedding (Net("tied"): emb's weight as the head's) is supported
    # (tests/test_tied_embedding.py); any other sharing, here two Linears, is refused.
    net = Net("tied")
    net.lin2 = nn.Linear(D, D)
    net.lin2.weight = net.lin.weight
    with pytest.raises(ValueError, match=r"'lin.weight' \(Linear\), 'lin2.weight' \(Linear\)"):
        _private(net, *_data(4, 5))


def test_direct_use_of_a_tracked_weight_is_refused_at_backward():
    model, _, _ = _private(Net("direct"), *_data(4, 5))
    ids, labels = _data(4, 5)
    loss = cross_entropy(model(ids), labels, reduction="sum")
    with pytest.raises(RuntimeError, match=r"parameter 'lin.weight' got a gradient through"):
        loss.backward()


def test_a_loss_term_on_the_weights_is_refused():
    model, _, _ = _private(Net(), *_data(4, 5))
    ids, labels = _data(4, 5)
    loss = cross_entropy(model(ids), labels) + 1e-3 * model.head.weight.square().sum()
    with pytest.raises(RuntimeError, match=r"parameter 'head.weight' got a gradient"):
        loss.backward()


# ------------------------------------------------------------------------------------------
# Privacy invariant 8 (PRIVACY.md): nothing the engine did not privatise is updated
# ------------------------------------------------------------------------------------------


def _frozen_lin_model():
    torch.manual_seed(0)
    model = Net()
    model.lin.requires_grad_(False)
    return model


def test_parameter_unfrozen_after_make_private_is_refused():
    # Gradual unfreezing: the optimizer holds the frozen layer, unfrozen after make_private.
    model = _frozen_lin_model()
    ids, labels = _data(4, 5)
    loader = DataLoader(TensorDataset(ids, labels), batch_size=4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model, opt, _ = make_private(
        model,
        opt,
        loader,
        target_delta=1e-5,
        max_grad_norm=C,
        noise_multiplier=1.0,
        poisson_sampling=False,
    )
    model.lin.requires_grad_(True)
    before = model.lin.weight.detach().clone()
    cross_entropy(model(ids), labels).backward()
    with pytest.raises(RuntimeError, match=r"parameter 'lin.weight' was not trainable"):
        opt.step()
    assert torch.equal(model.lin.weight, before)


def test_parameter_unfrozen_but_outside_the_optimizer_is_refused_too():
    model = _frozen_lin_model()
    ids, labels = _data(4, 5)
    model, opt, _ = _private(model, ids, labels)
    model.lin.bias.requires_grad_(True)
    cross_entropy(model(ids), labels).backward()
    with pytest.raises(RuntimeError, match=r"'lin.bias' was not trainable"):
        opt.step()


@pytest.mark.parametrize("how", ["add_param_group", "append"])
def test_parameter_group_added_to_the_wrapped_optimizer_is_refused(how):
    model = _frozen_lin_model()
    ids, labels = _data(4, 5)
    model, opt, _ = _private(model, ids, labels)
    with pytest.raises(RuntimeError, match="cannot be added"):
        opt.add_param_group({"params": [model.lin.weight]})
    extra = nn.Parameter(torch.zeros(3))
    extra.grad = torch.ones(3)  # a raw gradient from anywhere
    if how == "add_param_group":
        opt.original_optimizer.add_param_group({"params": [extra]})
    else:
        opt.param_groups.append({**opt.param_groups[0], "params": [extra]})
    cross_entropy(model(ids), labels).backward()
    with pytest.raises(RuntimeError, match=r"parameter group 1 .*shape \[3\] not in the model"):
        opt.step()
    assert torch.equal(extra, torch.zeros(3))


def test_parameter_frozen_after_make_private_is_refused():
    model, opt, _ = _private(Net(), *_data(4, 5))
    model.head.bias.requires_grad_(False)
    ids, labels = _data(4, 5)
    cross_entropy(model(ids), labels).backward()
    with pytest.raises(RuntimeError, match=r"'head.bias' was frozen after make_private"):
        opt.step()


# ------------------------------------------------------------------------------------------
# Backward passes, empty batches
# ------------------------------------------------------------------------------------------


def test_two_backward_calls_on_one_forward_sum_exactly():
    torch.manual_seed(0)
    base = Net()
    ids, labels = _data(5, 4)
    model, opt, _ = _private(copy.deepcopy(base), ids, labels)
    logits = model(ids)
    cross_entropy(logits, labels, reduction="sum").backward(retain_graph=True)
    (0.5 * logits.square().sum()).backward()
    opt.step()
    ours = {n: p.grad.double() * 5 for n, p in model.named_parameters()}
    # Reference: each example's gradient of its summed losses, clipped, in float64.
    ref_model = copy.deepcopy(base).double()
    expected: dict[str, torch.Tensor] = {}
    for b in range(5):
        ref_model.zero_grad(set_to_none=True)
        out = ref_model(ids[b : b + 1])
        (
            cross_entropy(out, labels[b : b + 1], reduction="sum") + 0.5 * out.square().sum()
        ).backward()
        g = {n: p.grad for n, p in ref_model.named_parameters()}
        factor = min(1.0, C / math.sqrt(sum(float(t.square().sum()) for t in g.values())))
        for n, t in g.items():
            expected[n] = expected.get(n, 0) + factor * t
    for n in expected:
        torch.testing.assert_close(ours[n], expected[n], rtol=1e-4, atol=1e-6, msg=n)


def test_backward_through_an_already_used_graph_is_refused():
    model, opt, _ = _private(Net(), *_data(4, 5))
    ids, labels = _data(4, 5)
    loss = cross_entropy(model(ids), labels)
    loss.backward(retain_graph=True)
    opt.step()
    opt.zero_grad()
    with pytest.raises(RuntimeError, match="already used"):
        loss.backward()


def test_zero_grad_between_forward_and_backward_keeps_the_batch():
    torch.manual_seed(0)
    base = Net()
    ids, labels = _data(4, 5)
    expected = _engine_sum(base, ids, labels, torch.arange(4))
    model, opt, _ = _private(copy.deepcopy(base), ids, labels)
    loss = cross_entropy(model(ids), labels, reduction="sum")
    opt.zero_grad()
    loss.backward()
    opt.step()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad.double() * 4, expected[n], msg=n)


def test_empty_batch_is_a_step_without_forward_noise_only_and_counted():
    sigma = 2.0
    model, opt, _ = _private(Net(), *_data(4, 5), noise_multiplier=sigma)
    empty = torch.zeros(0, 5, dtype=torch.long)
    with pytest.raises(ValueError, match=r"empty batch.*optimizer.step\(\) alone"):
        model(empty)
    opt.step()  # the documented way: no forward, no backward
    assert opt.engine.steps == 1
    assert sum(n for _, _, n in opt.engine.accountant.history) == 1
    # Each step's ~250 coordinates are fresh N(0, std^2) draws: pooled over 100 noise-only
    # steps (~25,000), a std off by 5% fails and a correct one fails below 1e-6 (the bound's
    # derivation: tests.helpers.assert_gaussian_noise).
    draws = []
    for step in range(100):
        if step:
            opt.zero_grad()
            opt.step()
        draws.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert opt.engine.steps == 100
    assert sum(n for _, _, n in opt.engine.accountant.history) == 100
    assert_gaussian_noise(torch.cat(draws), sigma * C / opt.engine.expected_batch_size)


# ------------------------------------------------------------------------------------------
# make_private's input checks
# ------------------------------------------------------------------------------------------


def _make(model=None, loader=None, **kwargs):
    model = Net() if model is None else model
    loader = loader or DataLoader(TensorDataset(*_data(8, 5)), batch_size=4)
    kwargs = {"target_delta": 1e-5, "max_grad_norm": 1.0, "noise_multiplier": 1.0, **kwargs}
    return make_private(model, torch.optim.SGD(model.parameters(), lr=0.1), loader, **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "error", "words"),
    [
        ({"seed": -1}, ValueError, r"seed must be in \[0, 2\*\*63\)"),
        ({"seed": 2**63}, ValueError, r"seed must be in \[0, 2\*\*63\)"),
        ({"seed": 1.5}, TypeError, "seed must be None or an int"),
        ({"seed": True}, TypeError, "seed must be None or an int"),
        ({"seed": 3, "secure_mode": True}, ValueError, "contradict"),
        ({"noise_multiplier": math.inf}, ValueError, "noise_multiplier must be a finite"),
        ({"noise_multiplier": math.nan}, ValueError, "noise_multiplier must be a finite"),
        (
            {"noise_multiplier": math.nan, "epochs": 1},
            ValueError,
            "noise_multiplier must be a finite",
        ),
        (
            {"noise_multiplier": None, "target_epsilon": math.inf, "epochs": 1},
            ValueError,
            "target_epsilon must be a finite",
        ),
        (
            {"noise_multiplier": None, "target_epsilon": 1.0, "epochs": math.inf},
            ValueError,
            "epochs must be a finite",
        ),
        ({"denoise": {"oversample": 2**63 - 1}}, ValueError, "oversample must be between"),
        ({"denoise": {"seed": 2**63}}, ValueError, r"denoise: seed must be in"),
        ({"denoise": {"niter": 2.0}}, TypeError, "niter must be an int"),
        ({"verify_layout": "yes"}, TypeError, "verify_layout must be a bool"),
    ],
)
def test_make_private_rejects_bad_arguments(kwargs, error, words):
    with pytest.raises(error, match=words):
        _make(**kwargs)


def test_make_private_rejects_float64_models():
    with pytest.raises(TypeError, match=r"parameter 'emb.weight' is torch.float64"):
        _make(Net().double())


@pytest.mark.parametrize(
    ("option", "words"),
    [
        ({"max_norm": 1.0}, "max_norm"),
        ({"sparse": True}, "sparse"),
        ({"scale_grad_by_freq": True}, "scale_grad_by_freq"),
    ],
)
def test_make_private_rejects_embedding_options_it_cannot_follow(option, words):
    model = Net()
    model.emb = nn.Embedding(VOCAB, D, **option)
    with pytest.raises(ValueError, match=rf"module 'emb' \(Embedding\).*{words}"):
        _make(model)


def test_fixed_size_batches_are_accounted_at_batch_size_over_n():
    # 10 examples in batches of 4: 3 batches, but each holds 4/10 of the data, not 1/3.
    loader = DataLoader(TensorDataset(*_data(10, 5)), batch_size=4)
    with pytest.warns(UserWarning, match="not a proven bound"):
        _, opt, _ = _make(loader=loader, poisson_sampling=False)
    assert opt.engine.sample_rate == pytest.approx(0.4)
    assert opt.engine.expected_batch_size == 4


# ------------------------------------------------------------------------------------------
# Privacy invariant 9 (PRIVACY.md): the noise seed
# ------------------------------------------------------------------------------------------


def _one_noisy_step(**kwargs):
    torch.manual_seed(0)  # a public seed, as in every training script
    model, opt, _ = _make(**kwargs)
    opt.step()  # noise only
    return opt, torch.cat([p.grad.flatten() for p in model.parameters()])


def test_noise_seed_comes_from_the_os_by_default():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "not private" warning by default
        opt_a, a = _one_noisy_step()
        opt_b, b = _one_noisy_step()
    assert opt_a.noise_seed_is_secret and opt_b.noise_seed_is_secret
    assert not torch.equal(a, b)


def test_explicit_seed_is_reproducible_and_says_the_run_is_not_private():
    with pytest.warns(UserWarning, match="NOT differentially private"):
        opt_a, a = _one_noisy_step(seed=42)
    with pytest.warns(UserWarning, match="NOT differentially private"):
        _, b = _one_noisy_step(seed=42)
    assert not opt_a.noise_seed_is_secret
    assert torch.equal(a, b)


def _first_batch(**kwargs):
    ids, labels = _data(64, 5)
    loader = DataLoader(
        TensorDataset(ids, labels), batch_size=16, generator=torch.Generator().manual_seed(7)
    )
    _, _, loader = _make(loader=loader, poisson_sampling=True, **kwargs)
    return next(iter(loader))[0]


def test_poisson_sampling_is_secret_unless_the_noise_seed_is_public():
    # A loader generator seeded in the script must not key the sampling of a private run: the
    # amplification by sampling assumes nobody knows which examples formed a batch.
    a, b = _first_batch(), _first_batch()
    # Two Poisson draws (rate 1/4 of 64 examples) coincide with probability far below 1e-6.
    assert a.shape != b.shape or not torch.equal(a, b)
    with pytest.warns(UserWarning, match="NOT differentially private"):
        c = _first_batch(seed=1)
    with pytest.warns(UserWarning, match="NOT differentially private"):
        d = _first_batch(seed=1)
    assert torch.equal(c, d)  # a run with a public seed stays reproducible


def test_per_parameter_bounds_are_summed_without_rounding_below_them(monkeypatch):
    # Privacy invariant 6 (PRIVACY.md) across parameters: one bound of 1 and eleven of
    # 0.99 * 2^-24 sum to exactly 1
    # in float32 (each addition rounds the small one away), which would let the example through
    # at C / 1 although its certified squared norm is 1 + 10.9 * 2^-24: the engine must hand
    # clip_scales the per-parameter bounds (summed there in float64).
    import rmt_kernels.dp.engine as engine_module
    from rmt_kernels.rules import LayerRule, get_layer_rule
    from rmt_kernels.rules.registry import _RULES

    model = nn.Sequential(*[nn.Linear(3, 3) for _ in range(6)])
    rule = get_layer_rule(model[0])
    small = 0.99 * 2.0**-24

    def sq_norms(module, x, dy):
        ones = torch.ones(x.shape[0])
        return {"weight": ones if module is model[0] else ones * small, "bias": ones * small}

    monkeypatch.setitem(_RULES, nn.Linear, LayerRule(sq_norms, rule.clipped_noisy_sums))
    seen = []
    real = engine_module.clip_scales
    monkeypatch.setattr(
        engine_module, "clip_scales", lambda q, c: seen.append(real(q, c)) or seen[-1]
    )
    x, y = torch.randn(4, 3), torch.randn(4, 3)
    loader = DataLoader(TensorDataset(x, y), batch_size=4)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    model, opt, _ = make_private(
        model,
        opt,
        loader,
        target_delta=1e-5,
        max_grad_norm=1.0,
        noise_multiplier=0.0,
        poisson_sampling=False,
        verify_layout=False,
    )
    (model(x) - y).square().sum().backward()
    opt.step()
    (scale,) = seen
    assert (scale.double() * math.sqrt(1 + 11 * small) <= 1.0).all()


def test_the_ledger_never_names_a_secret_seed_by_its_hash(tmp_path):
    # The privacy ledger names the noise stream; a hash of a secret 62-bit seed there would let
    # anyone with the ledger test seed guesses offline (and the seed gives away the noise).
    from rmt_kernels.dp import attach_ledger
    from rmt_kernels.dp.noise_key import seed_id_of

    _, opt, _ = _make()
    engine = opt.engine
    assert engine.noise_seed_is_secret
    attach_ledger(opt, tmp_path / "ckpt.pt")
    opt.step()
    ledger = (tmp_path / "ckpt.pt.ledger").read_text()
    assert engine.seed_id in ledger and seed_id_of(engine.noise_key.seed) not in ledger
    engine.rekey_noise(3)  # a resume that cannot replay: still no hash of the (new) seed
    assert engine.seed_id != seed_id_of(engine.noise_key.seed)
    with pytest.warns(UserWarning, match="NOT differentially private"):
        _, public, _ = _make(seed=42)
    assert public.engine.seed_id == seed_id_of(42)  # a public seed: recognised as a replay


# Layout-verification breaks a reviewer found (reproducers of /tmp/rv): each one let one example
# move the noise-free clipped sum by 2.5 C to 10.5 C; each must now be refused.


def _one_step(model, x, y, loss_fn):
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, opt, _ = make_private(
            model,
            opt,
            DataLoader(TensorDataset(x, y), batch_size=len(x)),
            target_delta=1e-5,
            max_grad_norm=C,
            noise_multiplier=0.0,
            poisson_sampling=False,
            loss_reduction="sum",
        )
    loss_fn(model, x, y).backward()
    opt.step()


def _sum_out(m, x, y):
    return m(x).sum()


def _weighted(m, x, y):
    return (m(x).squeeze(1) * y).sum()


class _InPlaceAfter(nn.Module):
    """Mutates the Linear's input in place after the Linear ran (the kept activation changes)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 1, bias=False)

    def forward(self, x):
        h = x * 1.0
        out = self.lin(h)
        with torch.no_grad():
            h.copy_(h.mean(0, keepdim=True).expand_as(h) * 100)
        return out


def test_an_input_modified_in_place_after_the_layer_is_refused():
    torch.manual_seed(0)
    x = torch.randn(6, 4)
    with pytest.raises(RuntimeError, match="modified in place"):
        _one_step(_InPlaceAfter(), x, torch.zeros(6), _sum_out)


class _GradModeBranch(nn.Module):
    """Mixes the examples only when gradients are enabled (the old verification ran no_grad)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 1, bias=False)

    def forward(self, x):
        if torch.is_grad_enabled():
            x = x.mean(0, keepdim=True).expand_as(x) * 100
        return self.lin(x)


def test_mixing_only_in_grad_mode_is_refused():
    torch.manual_seed(0)
    with pytest.raises(LayoutError, match="changing example"):
        _one_step(_GradModeBranch(), torch.randn(6, 4), torch.zeros(6), _sum_out)


class _HookMix(nn.Module):
    """Forward rows untouched; a tensor hook sums the output gradient over dim 0 in backward."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 1, bias=False)

    def forward(self, x):
        out = self.lin(x) * 1.0
        if out.requires_grad:
            out.register_hook(lambda g: g.sum(0, keepdim=True).expand_as(g))
        return out


class _SumInBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h):
        return h.clone()

    @staticmethod
    def backward(ctx, g):
        return g.sum(0, keepdim=True).expand_as(g)


class _FunctionMix(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 1, bias=False)

    def forward(self, x):
        return _SumInBackward.apply(self.lin(x))


@pytest.mark.parametrize("model_cls", [_HookMix, _FunctionMix])
def test_mixing_in_backward_only_is_refused(model_cls):
    torch.manual_seed(0)
    x = torch.randn(6, 4).abs() + 1
    y = torch.tensor([-10.0, 1, 1, 1, 1, 1])
    with pytest.raises(LayoutError, match="in backward"):
        _one_step(model_cls(), x, y, _weighted)


class _InteriorMix(nn.Module):
    """Mixes only the interior rows (the old verification changed rows 0 and B - 1 only)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 1, bias=False)

    def forward(self, x):
        if len(x) > 2:
            mid = x[1:-1].sum(0, keepdim=True).expand_as(x[1:-1])
            x = torch.cat([x[:1], mid, x[-1:]])
        return self.lin(x)


class _MaxScale(nn.Module):
    """Divides by the batch-wide max, which sits in an interior row (copying a partner into
    row 0 or B - 1 never moves it)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 1, bias=False)

    def forward(self, x):
        return self.lin(x / x.abs().amax())


@pytest.mark.parametrize("model_cls", [_InteriorMix, _MaxScale])
def test_interior_rows_and_outlier_statistics_are_refused(model_cls):
    torch.manual_seed(0)
    x = torch.randn(8, 4)
    x[3] *= 50
    with pytest.raises(LayoutError, match="changing example"):
        _one_step(model_cls(), x, torch.ones(8), _weighted)
