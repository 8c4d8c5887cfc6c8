"""The native DP-SGD engine (rmt_kernels.dp) on tiny RoBERTa and BERT models."""

from __future__ import annotations

import math

import pytest
import torch
from scipy.stats import chi2
from torch.utils.data import DataLoader, TensorDataset

from rmt_kernels.dp import make_private
from tests.dp_models import clipped_sum, padded_batch, per_example_grads, tiny_model
from tests.helpers import assert_gaussian_noise

pytest.importorskip("transformers")
pytest.importorskip("opacus")

# Fixed noise seeds make these tests reproducible; the warning that such a run is not private
# is tested in tests/test_dp_adversarial.py.
pytestmark = pytest.mark.filterwarnings("ignore:make_private. seed=:UserWarning")

C = 0.5


def _private(model, batch, *, noise=0.0, lr=0.1, **kw):
    ids, mask, labels = batch
    loader = DataLoader(TensorDataset(ids, mask, labels), batch_size=len(ids))
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    return make_private(
        model,
        opt,
        loader,
        target_delta=1e-5,
        max_grad_norm=C,
        noise_multiplier=noise,
        poisson_sampling=False,
        seed=1234,
        **kw,
    )


def _backward(model, batch):
    ids, mask, labels = batch
    model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()


@pytest.mark.parametrize(
    ("kind", "attn"), [("roberta", "sdpa"), ("roberta", "eager"), ("bert", "sdpa")]
)
def test_one_step_equals_per_example_clipped_sgd(kind, attn):
    batch = padded_batch()
    reference = tiny_model(kind, attn)
    expected = clipped_sum(per_example_grads(reference, *batch), C)
    model, opt, _ = _private(tiny_model(kind, attn), batch)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    _backward(model, batch)
    opt.step()
    for n, p in model.named_parameters():
        grad = expected[n] / len(batch[0])
        torch.testing.assert_close(p.grad.double(), grad, rtol=1e-4, atol=1e-6, msg=n)
        torch.testing.assert_close(
            p.detach().double(), before[n].double() - 0.1 * grad, rtol=1e-4, atol=1e-6
        )


def test_accumulated_physical_batches_equal_one_logical_batch():
    batch = padded_batch(batch=8)
    model, opt, _ = _private(tiny_model(), batch)
    halves = [tuple(t[:4] for t in batch), tuple(t[4:] for t in batch)]
    for half in halves:
        _backward(model, half)
    opt.step()
    expected = clipped_sum(per_example_grads(tiny_model(), *batch), C)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad.double(), expected[n] / 8, rtol=1e-4, atol=1e-6, msg=n)


def _noise(model_grads, clean):
    return {n: g.double() - clean[n] for n, g in model_grads.items()}


@pytest.mark.parametrize("physical_batches", [1, 2])
def test_noise_has_std_sigma_c_once_per_step(physical_batches):
    # Each coordinate of the averaged gradient gets N(0, (sigma C / B)^2), once per logical
    # step however many physical batches made it. Pooled over all parameters (~21,500
    # coordinates), a std off by 5% fails and a correct one fails below 1e-6
    # (tests.helpers.assert_gaussian_noise); each parameter alone (~40, some of 32 coordinates)
    # must hold its chi-square(n) sum of squares inside the two-sided 1e-8 interval (below 1e-6
    # in all), which a parameter left without noise, or given it twice, fails.
    sigma, batch = 2.0, padded_batch(batch=8)
    clean = {n: g / 8 for n, g in clipped_sum(per_example_grads(tiny_model(), *batch), C).items()}
    model, opt, _ = _private(tiny_model(), batch, noise=sigma)
    for part in torch.arange(8).chunk(physical_batches):
        _backward(model, tuple(t[part] for t in batch))
    opt.step()
    std = sigma * C / 8
    noises = _noise({n: p.grad for n, p in model.named_parameters()}, clean)
    assert_gaussian_noise(torch.cat([t.flatten() for t in noises.values()]), std)
    for n, noise in noises.items():
        k, ratio = noise.numel(), (noise.square().sum() / std**2).item()
        assert chi2.ppf(1e-8 / 2, k) < ratio < chi2.isf(1e-8 / 2, k), (n, k, ratio)


def test_noise_streams_differ_across_steps_and_parameters_and_repeat_by_seed():
    batch = padded_batch()
    grads = []
    for _ in range(2):
        model, opt, _ = _private(tiny_model(), batch, noise=1.0, lr=0.0)
        step_grads = []
        for _ in range(2):
            _backward(model, batch)
            opt.step()
            step_grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
            opt.zero_grad()
        grads.append(step_grads)
    # Same seed, same steps: identical noise (lr = 0 keeps the clean part equal too).
    for n in grads[0][0]:
        assert torch.equal(grads[0][0][n], grads[1][0][n])
    # Two steps of the same batch: the clean part is equal, the noise is not.
    w = "roberta.encoder.layer.0.attention.self.query.weight"
    diff = grads[0][0][w] - grads[0][1][w]
    assert diff.std() > 0.5 * math.sqrt(2) * C / len(batch[0])
    # Two parameters of one shape at one step: uncorrelated noise.
    q = grads[0][0][w].flatten() - grads[0][0][w].flatten().mean()
    k = grads[0][0][w.replace("query", "key")].flatten()
    k = k - k.mean()
    r = (q @ k / (q.norm() * k.norm())).item()
    assert abs(r) < 6 / math.sqrt(q.numel())


def test_sensitivity_removing_one_example_moves_the_sum_by_at_most_c():
    # Adversarial: one example with a huge gradient (a very large embedding row makes it so).
    # Both sides: the sum moves by exactly example 2's clipped gradient, min(C, |g_2|) in norm
    # by the float64 per-example reference (a bug that clips it to less, or to nothing, fails).
    for adversarial in (False, True):
        batch = padded_batch(batch=6, seed=3)
        model = tiny_model()
        if adversarial:
            with torch.no_grad():
                model.roberta.embeddings.word_embeddings.weight[batch[0][2, 0]] *= 1e4
        g_2 = per_example_grads(model, *batch)[2]
        expected = min(C, math.sqrt(sum(t.square().sum().item() for t in g_2.values())))
        sums = []
        for keep in (torch.arange(6), torch.tensor([0, 1, 3, 4, 5])):
            m, opt, _ = _private(model, tuple(t[keep] for t in batch))
            _backward(m, tuple(t[keep] for t in batch))
            m_engine = opt.engine
            opt.step()
            sums.append(
                {n: p.grad.double() * m_engine.expected_batch_size for n, p in m.named_parameters()}
            )
            m_engine.detach()
            with torch.no_grad():  # undo the step so the second run starts from the same model
                for p in m.parameters():
                    p.add_(0.1 * p.grad)
        moved = math.sqrt(sum((sums[0][n] - sums[1][n]).square().sum().item() for n in sums[0]))
        assert moved <= C * (1 + 1e-4)
        assert moved == pytest.approx(expected, rel=1e-4), (adversarial, moved, expected)


def test_denoise_is_post_processing_of_the_noisy_gradient(monkeypatch):
    # The denoiser (rmt_kernels/dp/stages/denoiser.py) calls the op through rmt_kernels.ops.
    import rmt_kernels.ops as ops_module

    seen = {"grads": []}
    real = ops_module.denoise_many
    real_warm = getattr(ops_module, "denoise_warm", None)

    def spy(grads, sigma, **options):
        seen["grads"] += [g.clone() for g in grads]
        seen["sigma"] = sigma
        seen["options"] = options
        return real(grads, sigma, **options)

    def spy_warm(grad, sigma, basis=None, **options):  # the warm-started path, one matrix
        seen["grads"].append(grad.clone())
        seen["sigma"] = sigma
        seen["options"] = options
        return real_warm(grad, sigma, basis, **options)

    batch = padded_batch(batch=8)
    plain, plain_opt, _ = _private(tiny_model(), batch, noise=1.0, lr=0.0)
    _backward(plain, batch)
    plain_opt.step()
    monkeypatch.setattr(ops_module, "denoise_many", spy)
    if real_warm is not None:
        monkeypatch.setattr(ops_module, "denoise_warm", spy_warm)
    model, opt, _ = _private(tiny_model(), batch, noise=1.0, lr=0.0, denoise={"kappa": 0.5})
    _backward(model, batch)
    opt.step()
    linear_weights = [
        p.grad
        for n, p in plain.named_parameters()
        if n.endswith("weight") and p.dim() == 2 and "embeddings" not in n and min(p.shape) >= 32
    ]
    # It saw exactly the noisy averaged gradients plain DP-SGD produced, and the public sigma.
    assert len(seen["grads"]) == len(linear_weights)
    for a, b in zip(seen["grads"], linear_weights, strict=True):
        assert torch.equal(a, b)
    assert seen["sigma"] == pytest.approx(1.0 * C / 8)
    assert seen["options"]["kappa"] == 0.5
    # Parameters it does not touch are plain DP-SGD's: 1-D ones, embeddings, and the 2 x 32
    # classifier head (smaller than min_dim = 32, where the bulk edge means nothing).
    untouched = 0
    for (n, p), (_, q) in zip(model.named_parameters(), plain.named_parameters(), strict=True):
        if p.dim() == 1 or "embeddings" in n or min(p.shape) < 32:
            assert torch.equal(p.grad, q.grad), n
            untouched += p.dim() == 2 and "embeddings" not in n
    assert untouched == 1  # the head


def test_denoise_stats_report_kept_rank_and_norm_ratio():
    batch = padded_batch(batch=8)
    model, opt, _ = _private(
        tiny_model(), batch, noise=1.0, lr=0.0, denoise={"kappa": 0.5, "min_dim": 1}
    )
    engine = opt.engine
    _backward(model, batch)
    opt.step()
    assert engine.take_denoise_stats() == {}  # only when asked: it costs an SVD per matrix
    engine.record_denoise_stats = True
    _backward(model, batch)
    noisy = {}
    # The denoiser (rmt_kernels/dp/stages/denoiser.py) calls the op through rmt_kernels.ops.
    import rmt_kernels.ops as ops_module

    real = ops_module.denoise_many
    real_warm = getattr(ops_module, "denoise_warm", None)

    def spy(grads, sigma, **options):
        out = real(grads, sigma, **options)
        for g, d in zip(grads, out, strict=True):
            noisy[id(d)] = (g.clone(), d)
        return out

    def spy_warm(grad, sigma, basis=None, **options):  # the warm-started path, one matrix
        out = real_warm(grad, sigma, basis, **options)
        noisy[id(out[0])] = (grad.clone(), out[0])
        return out

    ops_module.denoise_many, saved = spy, ops_module.denoise_many
    if real_warm is not None:
        ops_module.denoise_warm = spy_warm
    try:
        opt.step()
    finally:
        ops_module.denoise_many = saved
        if real_warm is not None:
            ops_module.denoise_warm = real_warm
    stats = engine.take_denoise_stats()
    assert engine.take_denoise_stats() == {}
    names = set(engine.denoiser.keys)
    assert set(stats) == names and "classifier.out_proj.weight" in names
    for (g, d), (name, s) in zip(noisy.values(), stats.items(), strict=True):
        values = torch.linalg.svdvals(d.double())
        assert s["rank"] == int((values > 1e-5 * values.max()).sum()), name
        assert s["norm_ratio"] == pytest.approx(float(d.norm() / g.norm()), rel=1e-5), name
        assert 0 <= s["norm_ratio"] <= 1.5


def test_accountant_matches_opacus():
    from opacus.accountants import PRVAccountant

    batch = padded_batch(batch=4)
    dataset = TensorDataset(*(t.repeat(25, 1) if t.dim() == 2 else t.repeat(25) for t in batch))
    loader = DataLoader(dataset, batch_size=4)
    model = tiny_model()
    model, opt, loader = make_private(
        model,
        torch.optim.SGD(model.parameters(), lr=0.0),
        loader,
        target_delta=1e-5,
        max_grad_norm=C,
        noise_multiplier=1.1,
        seed=0,
    )
    for steps, (ids, mask, labels) in enumerate(loader, start=1):
        if len(ids):
            model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        opt.step()
        opt.zero_grad()
        if steps == 3:
            break
    reference = PRVAccountant()
    for _ in range(3):
        reference.step(noise_multiplier=1.1, sample_rate=4 / 100)
    assert opt.get_epsilon(1e-5) == pytest.approx(reference.get_epsilon(delta=1e-5), rel=1e-6)


def test_target_epsilon_calibrates_the_noise():
    from opacus.accountants.utils import get_noise_multiplier

    batch = padded_batch(batch=4)
    loader = DataLoader(TensorDataset(*batch), batch_size=2)
    model = tiny_model()
    _, opt, _ = make_private(
        model,
        torch.optim.SGD(model.parameters(), lr=0.1),
        loader,
        target_delta=1e-5,
        max_grad_norm=C,
        target_epsilon=3.0,
        epochs=2,
        accountant="rdp",
    )
    expected = get_noise_multiplier(
        target_epsilon=3.0, target_delta=1e-5, sample_rate=0.5, epochs=2, accountant="rdp"
    )
    assert opt.engine.noise_multiplier == pytest.approx(expected)


def _loader():
    return DataLoader(TensorDataset(*padded_batch(batch=4)), batch_size=2)


@pytest.mark.parametrize(
    ("kwargs", "error", "words"),
    [
        ({"noise_multiplier": 1.0, "max_grad_norm": 0.0}, ValueError, "max_grad_norm"),
        ({"noise_multiplier": 1.0, "max_grad_norm": float("nan")}, ValueError, "max_grad_norm"),
        ({"target_epsilon": 1.0, "max_grad_norm": 1.0}, ValueError, "epochs"),
        (
            {"noise_multiplier": 1.0, "target_epsilon": 1.0, "max_grad_norm": 1.0, "epochs": 1},
            ValueError,
            "exactly one",
        ),
        ({"max_grad_norm": 1.0}, ValueError, "exactly one"),
        ({"noise_multiplier": -1.0, "max_grad_norm": 1.0}, ValueError, "noise_multiplier"),
        (
            {"noise_multiplier": 1.0, "max_grad_norm": 1.0, "target_delta": 0.0},
            ValueError,
            "target_delta",
        ),
        (
            {"noise_multiplier": 1.0, "max_grad_norm": 1.0, "accountant": "moments"},
            ValueError,
            "accountant",
        ),
        (
            {"noise_multiplier": 1.0, "max_grad_norm": 1.0, "denoise": {"kapa": 1.0}},
            ValueError,
            "kapa",
        ),
        (
            {"noise_multiplier": 1.0, "max_grad_norm": 1.0, "denoise": {"shrinker": "soft"}},
            ValueError,
            "shrinker",
        ),
        (
            {"noise_multiplier": 1.0, "max_grad_norm": 1.0, "denoise": {"min_dim": 0}},
            ValueError,
            "min_dim",
        ),
    ],
)
def test_bad_arguments(kwargs, error, words):
    model = tiny_model()
    kwargs = {"target_delta": 1e-5, **kwargs}
    with pytest.raises(error, match=words):
        make_private(model, torch.optim.SGD(model.parameters(), lr=0.1), _loader(), **kwargs)


def test_unsupported_trainable_layer_is_named():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Conv1d(1, 1, 3))
    with pytest.raises(TypeError, match=r"module '1' \(Conv1d\)"):
        make_private(
            model,
            torch.optim.SGD(model.parameters(), lr=0.1),
            _loader(),
            target_delta=1e-5,
            max_grad_norm=1.0,
            noise_multiplier=1.0,
        )
    model[1].requires_grad_(False)  # freezing it is the user's choice
    make_private(
        model,
        torch.optim.SGD(model[0].parameters(), lr=0.1),
        _loader(),
        target_delta=1e-5,
        max_grad_norm=1.0,
        noise_multiplier=1.0,
    )


def test_secure_mode_never_shows_the_seed():
    model = tiny_model()
    _, opt, _ = make_private(
        model,
        torch.optim.SGD(model.parameters(), lr=0.1),
        _loader(),
        target_delta=1e-5,
        max_grad_norm=1.0,
        noise_multiplier=1.0,
        secure_mode=True,
    )
    assert opt.noise_seed_is_secret
    shown = repr(opt) + repr(opt.engine) + repr(opt.engine.noise_key)
    assert str(opt.engine.noise_key.seed) not in shown


@pytest.mark.parametrize("denoise", [None, {"kappa": 0.5, "norm": "preserve"}])
def test_tiny_model_learns_a_separable_task_privately(denoise):
    # Label = whether token 5 appears; a 2-layer model learns it in a few private steps.
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    n = 512
    ids = torch.randint(6, 60, (n, 8), generator=gen)
    labels = torch.randint(0, 2, (n,), generator=gen)
    ids[labels == 1, 0] = 5
    mask = torch.ones_like(ids)
    loader = DataLoader(TensorDataset(ids, mask, labels), batch_size=128)
    model = tiny_model()
    model, opt, loader = make_private(
        model,
        torch.optim.Adam(model.parameters(), lr=3e-3),
        loader,
        target_delta=1e-5,
        max_grad_norm=1.0,
        noise_multiplier=0.5,
        seed=0,
        denoise=denoise,
    )
    for _ in range(6):
        for b_ids, b_mask, b_labels in loader:
            if len(b_ids) == 0:
                continue
            model(input_ids=b_ids, attention_mask=b_mask, labels=b_labels).loss.backward()
            opt.step()
            opt.zero_grad()
    with torch.no_grad():
        accuracy = (
            (model(input_ids=ids, attention_mask=mask).logits.argmax(-1) == labels).float().mean()
        )
    assert accuracy > 0.9


def test_clipped_sum_matches_opacus_on_the_same_batch():
    from opacus import PrivacyEngine

    batch = padded_batch(batch=8, seed=5)
    ids, mask, labels = batch
    loader = DataLoader(TensorDataset(ids, mask, labels), batch_size=8)
    reference = tiny_model(seed=2)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.0)
    reference, ref_opt, _ = PrivacyEngine().make_private(
        module=reference,
        optimizer=ref_opt,
        data_loader=loader,
        noise_multiplier=0.0,
        max_grad_norm=C,
        poisson_sampling=False,
    )
    reference(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    ref_opt.step()
    model, opt, _ = _private(tiny_model(seed=2), batch, lr=0.0)
    _backward(model, batch)
    opt.step()
    ours = dict(model.named_parameters())
    for n, p in reference._module.named_parameters():
        torch.testing.assert_close(ours[n].grad, p.grad, rtol=1e-4, atol=1e-7, msg=n)


def test_epsilon_without_noise_is_infinite_not_a_crash():
    batch = padded_batch(batch=4)
    model, opt, _ = _private(tiny_model(), batch, noise=0.0, lr=0.0)
    assert opt.get_epsilon(1e-5) == 0.0  # nothing released yet
    _backward(model, batch)
    opt.step()
    assert opt.get_epsilon(1e-5) == float("inf")


# ------------------------------------------------------------------------------------------
# Stage 5: a gradient must have its parameter's shape
# ------------------------------------------------------------------------------------------


class _TransposingRule:
    """A layer's own rule, except that the weight's clipped sum comes out transposed: what a
    registered rule for GPT-2's Conv1D (a Linear with its weight stored transposed) that forgot
    the transpose would return, computed in its own (contiguous) layout. Same size, other shape:
    a reshape to the parameter's shape would scramble it silently."""

    def __init__(self, rule) -> None:
        self.rule = rule

    def sq_norms(self, *args):
        return self.rule.sq_norms(*args)

    def clipped_noisy_sums(self, *args):
        sums = self.rule.clipped_noisy_sums(*args)
        return {**sums, "weight": sums["weight"].t().contiguous()}


def _transpose_weights(grads, sigma, step):
    return {k: g.t().contiguous() if g.dim() == 2 else g for k, g in grads.items()}


@pytest.mark.parametrize("culprit", ["rule", "post-processor"])
def test_a_gradient_of_the_right_size_but_the_wrong_shape_is_refused(culprit):
    torch.manual_seed(0)
    # The last weight is (3, 4): 12 entries either way. The first is square: its transpose has
    # its shape (the post-processor's passes the check), and its gradient comes first.
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3))
    loader = DataLoader(TensorDataset(torch.randn(8, 4), torch.randint(0, 3, (8,))), batch_size=4)
    post = [_transpose_weights] if culprit == "post-processor" else None
    model, opt, loader = make_private(
        model,
        torch.optim.SGD(model.parameters(), lr=0.1),
        loader,
        target_delta=1e-5,
        max_grad_norm=1.0,
        noise_multiplier=1.0,
        seed=0,
        post_processors=post,
    )
    if culprit == "rule":
        layer = next(layer for layer in opt.engine.layers if layer.name == "2")
        layer.rule = _TransposingRule(layer.rule)
    x, y = next(iter(loader))
    torch.nn.functional.cross_entropy(model(x), y).backward()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(
        RuntimeError, match=r"'2\.weight' has shape \[4, 3\], but the parameter has shape \[3, 4\]"
    ):
        opt.step()
    # Nothing trained on the scrambled gradient, and no gradient of the step written.
    for p, b in zip(model.parameters(), before, strict=True):
        assert torch.equal(p, b) and p.grad is None


@pytest.mark.parametrize(
    ("kwargs", "error", "words"),
    [
        ({"max_grad_norm": "1.0"}, ValueError, "max_grad_norm must be a finite number > 0"),
        ({"noise_multiplier": math.nan}, ValueError, "noise_multiplier must be a finite"),
        ({"seed": -1}, ValueError, r"seed must be in \[0, 2\*\*63\)"),
        ({"seed": 3, "secure_mode": True}, ValueError, "contradict"),
        ({"expected_batch_size": 0}, ValueError, "expected_batch_size must be >= 1"),
        ({"loss_reduction": "none"}, ValueError, "loss_reduction must be 'mean' or 'sum'"),
        ({"verify_layout": 1}, TypeError, "verify_layout must be a bool"),
        ({"denoise": {"kapa": 1.0}}, ValueError, "kapa"),
    ],
)
def test_a_private_engine_built_directly_checks_its_arguments(kwargs, error, words):
    # PrivateEngine is public: its constructor is the one place these are checked (make_private
    # passes them on), so a direct construction refuses them too.
    from opacus.accountants import RDPAccountant

    from rmt_kernels.dp import PrivateEngine

    model = torch.nn.Linear(4, 3)
    arguments = {
        "noise_multiplier": 1.0,
        "max_grad_norm": 1.0,
        "expected_batch_size": 4,
        "sample_rate": 0.5,
        "accountant": RDPAccountant(),
        **kwargs,
    }
    with pytest.raises(error, match=words):
        PrivateEngine(model, **arguments)
    assert not model._forward_pre_hooks and not model._forward_hooks  # nothing left behind
