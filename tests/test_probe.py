"""rmt-glue probe: the signal-to-threshold numbers on planted spectra (where the answer is known
exactly), the BBP threshold against what the package's kappa-1 shrinker keeps, the clean
clipped gradient against the DP engine's at zero noise, the noise grid against the accountant,
and the command end to end on a tiny BERT (it says NOT PRIVATE everywhere it writes)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from rmt_kernels.glue.probe import NOT_PRIVATE
from rmt_kernels.glue.probe_gradient import clean_clipped_gradient, probed_matrices
from rmt_kernels.glue.probe_spectra import (
    Spectrum,
    detection_threshold,
    noise_grid,
    probe_matrices,
    probe_spectra,
    spectra,
)
from rmt_kernels.shrinkage import bulk_edge, shrink_singular_values
from tests import test_glue_cli

# The tiny GLUE folder and BERT of test_glue_cli (a module-scoped fixture), and its CLI runner.
tiny = test_glue_cli.tiny
run = test_glue_cli.run


def with_values(values: list[float], m: int, n: int, seed: int = 0) -> torch.Tensor:
    """An m x n float64 matrix whose singular values are exactly ``values`` (to rounding)."""
    gen = torch.Generator().manual_seed(seed)
    k = len(values)
    u = torch.linalg.qr(torch.randn(m, k, generator=gen, dtype=torch.float64))[0]
    v = torch.linalg.qr(torch.randn(n, k, generator=gen, dtype=torch.float64))[0]
    return (u * torch.tensor(values, dtype=torch.float64)) @ v.T


# ------------------------------------------------------------------------------------------
# Planted spectra: counts, shares and ratios exact
# ------------------------------------------------------------------------------------------

S = 0.01  # per-entry noise std
M, N = 96, 64
# Written out, not taken from the module under test: s (m n)^(1/4) = 0.0885..., and the bulk edge
# s (sqrt(m) + sqrt(n)) = 0.1780..., about 2 T.
T = S * (M * N) ** 0.25
EDGE = S * (math.sqrt(M) + math.sqrt(N))


def test_threshold_and_edge_formulas():
    assert detection_threshold(M, N, S) == pytest.approx(T, rel=1e-15)
    assert bulk_edge(M, N, S) == pytest.approx(EDGE, rel=1e-15)
    # The components between T and the edge are the ones a probe that used the edge would miss.
    assert 1.9 < EDGE / T < 2.1


@pytest.mark.parametrize("transpose", [False, True])
def test_planted_spectrum_counts_and_energy_are_exact(transpose):
    # Three values above T (two of them below the bulk edge: BBP, not the edge, decides), three
    # below, one just either side of T.
    ratios = [3.0, 1.5, 1.02, 0.98, 0.5, 0.1]
    matrix = with_values([r * T for r in ratios], M, N)
    result = probe_matrices({"w": matrix.T if transpose else matrix}, S)
    row = result["per_matrix"][0]
    assert row["shape"] == ([N, M] if transpose else [M, N])
    assert row["kept_rank"] == 3
    energy = [r * r for r in ratios]
    assert row["energy_above"] == pytest.approx(sum(energy[:3]) / sum(energy), rel=1e-12)
    assert row["top_to_threshold"] == pytest.approx(ratios[:3], rel=1e-12)
    assert row["top_to_edge"] == pytest.approx([r * T / EDGE for r in ratios[:3]], rel=1e-12)
    assert row["threshold"] == pytest.approx(T, rel=1e-15)
    assert row["norm"] == pytest.approx(T * math.sqrt(sum(energy)), rel=1e-12)
    assert result["energy_above"] == pytest.approx(row["energy_above"], rel=1e-15)
    assert (result["matrices_above"], result["matrices"]) == (1, 1)


def test_totals_over_matrices_weigh_by_energy():
    t2 = S * (200 * 50) ** 0.25
    matrices = {
        "a": with_values([2.0 * T, 0.5 * T], M, N, seed=1),  # one above
        "b": with_values([4.0 * t2, 1.5 * t2, 0.9 * t2], 200, 50, seed=2),  # two above
        "c": with_values([0.99 * T, 0.3 * T], M, N, seed=3),  # none above
        "zero": torch.zeros(40, 40),  # no energy: share 0, not NaN
    }
    result = probe_matrices(matrices, S, top=2)
    rows = {r["name"]: r for r in result["per_matrix"]}
    assert [rows[k]["kept_rank"] for k in "abc"] == [2 - 1, 2, 0]
    assert rows["zero"]["kept_rank"] == 0 and rows["zero"]["energy_above"] == 0.0
    above = (2 * T) ** 2 + (4 * t2) ** 2 + (1.5 * t2) ** 2
    total = above + (0.5 * T) ** 2 + (0.9 * t2) ** 2 + (0.99 * T) ** 2 + (0.3 * T) ** 2
    assert result["energy_above"] == pytest.approx(above / total, rel=1e-12)
    assert (result["matrices_above"], result["matrices"]) == (2, 4)
    assert result["norm"] == pytest.approx(math.sqrt(total), rel=1e-12)
    # Median of the top ratios 2, 4, 0.99 and 0 (the zero matrix).
    assert result["median_top_to_threshold"] == pytest.approx((0.99 + 2.0) / 2, rel=1e-12)
    assert rows["b"]["top_to_threshold"] == pytest.approx([4.0, 1.5], rel=1e-12)


def test_noise_level_moves_the_threshold_linearly():
    # The same matrix at twice the noise: everything between T and 2T drops below.
    matrix = with_values([3.0 * T, 1.5 * T, 1.02 * T], M, N)
    spec = spectra({"w": matrix})
    assert probe_spectra(spec, S)["per_matrix"][0]["kept_rank"] == 3
    assert probe_spectra(spec, 2 * S)["per_matrix"][0]["kept_rank"] == 1
    assert probe_spectra(spec, 3.01 * S)["per_matrix"][0]["kept_rank"] == 0


def test_the_threshold_is_what_kappa1_shrinkage_keeps_on_a_noisy_draw():
    # Square n x n, s = 1: T = sqrt(n) = 32, edge = 2 sqrt(n) = 64. A spike at x T (x > 1) puts
    # the noisy top singular value at sqrt(n) (x + 1/x) (BBP): 1.7 T -> 73.2, 2.5 T -> 92.8;
    # the spike itself is below the edge at 1.7 T (54.4 < 64) and still shows. Count the noisy
    # values above edge + 2 (kappa 1 + 2/64): the bulk's top fluctuates by about
    # 0.5 (2 / sqrt(n))^(1/3) = 0.2 per Tracy-Widom unit, so 2 is 10 units (tail
    # exp(-2/3 10^1.5) ~ 7e-10), and an outlier's Gaussian fluctuation has a std of order s = 1,
    # so 73.2 - 66 = 7.2 is about 7 sigma (~1e-12).
    n = 1024
    root_n = math.sqrt(n)
    clean = with_values([2.5 * root_n, 1.7 * root_n], n, n, seed=4)
    gen = torch.Generator().manual_seed(5)
    noisy = clean + torch.randn(n, n, generator=gen, dtype=torch.float64)
    values = torch.linalg.svdvals(noisy.float()).double()
    kappa = 1 + 2 / bulk_edge(n, n, 1.0)
    kept = int((shrink_singular_values(values, n, n, 1.0, "hard", kappa) > 0).sum())
    result = probe_matrices({"w": clean}, 1.0)
    assert kept == result["per_matrix"][0]["kept_rank"] == 2
    # The edge alone would have counted one.
    assert int((torch.linalg.svdvals(clean) > bulk_edge(n, n, 1.0)).sum()) == 1


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: probe_matrices({"w": torch.ones(4, 4)}, 0.0), "noise_std must be a finite"),
        (lambda: probe_matrices({"w": torch.ones(4, 4)}, float("nan")), "noise_std"),
        (lambda: probe_matrices({"w": torch.ones(4, 4)}, -1.0), "noise_std"),
        (lambda: probe_matrices({"w": torch.ones(4, 4)}, 1.0, top=0), "top must be"),
        (lambda: probe_matrices({}, 1.0), "no matrices"),
        (lambda: probe_matrices({"v": torch.ones(4)}, 1.0), r"matrices\['v'\] must be .*2-D"),
        (lambda: probe_matrices({"e": torch.ones(0, 3)}, 1.0), r"matrices\['e'\]"),
        (
            lambda: probe_matrices({"x": torch.tensor([[1.0, math.inf]])}, 1.0),
            r"matrices\['x'\] has non-finite",
        ),
    ],
)
def test_bad_inputs_name_the_argument(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_spectrum_energy():
    spec = Spectrum("w", (3, 2), torch.tensor([3.0, 4.0], dtype=torch.float64))
    assert spec.energy == 25.0


# ------------------------------------------------------------------------------------------
# The noise grid: s = z C / B with z from the accountant
# ------------------------------------------------------------------------------------------


def test_noise_grid_matches_the_runs_it_describes():
    # SST-2 (67,349 examples, delta 1/n^1.1): the README's 100-step experiment at B 512 used
    # z = 0.453, the B 2048 run z = 0.6094 (PRV accountant, epsilon 8).
    n = 67349
    grid = noise_grid([512, 2048], [8.0], [100], examples=n, delta=1 / n**1.1, max_grad_norm=1.0)
    assert [g.batch_size for g in grid] == [512, 2048]
    assert grid[0].noise_multiplier == pytest.approx(0.453, abs=5e-4)
    assert grid[1].noise_multiplier == pytest.approx(0.6094, abs=5e-4)
    for g in grid:
        assert g.noise_std == pytest.approx(g.noise_multiplier / g.batch_size, rel=1e-15)
        assert g.sample_rate == g.batch_size / n


def test_noise_grid_scales_with_clip_norm_and_refuses_bad_settings():
    kw = {"examples": 1000, "delta": 1e-5, "accountant": "rdp"}
    one = noise_grid([100], [3.0], [50], max_grad_norm=1.0, **kw)[0]
    half = noise_grid([100], [3.0], [50], max_grad_norm=0.5, **kw)[0]
    assert half.noise_std == pytest.approx(one.noise_std / 2, rel=1e-12)
    with pytest.raises(ValueError, match=r"--batch-sizes: 1001 is outside \[1, 1000\]"):
        noise_grid([1001], [3.0], [50], max_grad_norm=1.0, **kw)
    with pytest.raises(ValueError, match="--epsilons must be finite and > 0"):
        noise_grid([100], [math.inf], [50], max_grad_norm=1.0, **kw)
    with pytest.raises(ValueError, match="--accounting-steps must be >= 1"):
        noise_grid([100], [3.0], [0], max_grad_norm=1.0, **kw)


# ------------------------------------------------------------------------------------------
# The clean clipped gradient against the DP engine's at zero noise
# ------------------------------------------------------------------------------------------


def _tiny_bert_and_data(tiny, examples: int):
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizer

    from rmt_kernels.glue.data import encode, load_split
    from rmt_kernels.glue.pooling import use_mean_pooling
    from rmt_kernels.glue.tasks import get_task

    task = get_task("sst2")
    config = BertConfig.from_pretrained(
        tiny["config"], num_labels=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0
    )
    torch.manual_seed(0)
    model = use_mean_pooling(BertForSequenceClassification(config))
    tokenizer = BertTokenizer.from_pretrained(tiny["config"])
    data = encode(load_split(task, "train", str(tiny["glue"])), tokenizer, 32, False)
    return model, task, data, list(range(examples))


def test_clean_gradient_is_the_engines_clipped_mean_at_zero_noise(tiny):
    from rmt_kernels.dp import make_private
    from rmt_kernels.glue.model import forward, loss_fn
    from rmt_kernels.training.loop import ExampleIndices

    model, task, data, idx = _tiny_bert_and_data(tiny, 16)
    names = probed_matrices(model)
    # 2 layers x (query, key, value, attention output, intermediate, output); the 2 x 32
    # classifier is below min_dim and the mean pooler has no weight.
    assert len(names) == 12 and all(".encoder.layer." in n for n in names)
    unclipped = clean_clipped_gradient(model, data, idx, task, 1e9, names)
    assert unclipped.clipped_fraction == 0.0
    # C at the median per-example norm: about half the examples are clipped.
    c = unclipped.median_example_norm
    clean = clean_clipped_gradient(model, data, idx, task, c, names)
    assert 0.3 <= clean.clipped_fraction <= 0.7
    assert model.training  # the mode it was in comes back

    # The engine's book-keeping clipping (no per-example gradients) with noise multiplier 0 over
    # one logical batch of the same 16 examples: p.grad after the step is its clipped mean.
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    loader = torch.utils.data.DataLoader(ExampleIndices(16), batch_size=16)
    with pytest.warns(UserWarning):
        dp_model, dp_opt, _ = make_private(
            model, optimizer, loader, target_delta=1e-5, max_grad_norm=c,
            noise_multiplier=0.0, poisson_sampling=False, seed=0,
        )  # fmt: skip
    batch = data.batch(idx)
    loss_fn(forward(dp_model, batch, "cpu"), batch["labels"], task).backward()
    dp_opt.step()
    params = dict(model.named_parameters())
    for name in names:
        reference = params[name].grad.double()
        err = (clean.matrices[name] - reference).norm() / reference.norm()
        assert err < 1e-4, (name, float(err))
    # Without clipping the difference is visible: the test can tell.
    name = names[0]
    off = (unclipped.matrices[name] - params[name].grad.double()).norm()
    assert off / params[name].grad.double().norm() > 1e-2


def test_clean_gradient_refuses_bad_arguments(tiny):
    model, task, data, idx = _tiny_bert_and_data(tiny, 4)
    names = probed_matrices(model)
    with pytest.raises(ValueError, match="max_grad_norm must be a finite number > 0"):
        clean_clipped_gradient(model, data, idx, task, 0.0, names)
    with pytest.raises(ValueError, match="no examples"):
        clean_clipped_gradient(model, data, [], task, 1.0, names)
    with pytest.raises(ValueError, match="example index 99 is outside the 24 examples"):
        clean_clipped_gradient(model, data, [0, 99], task, 1.0, names)
    with pytest.raises(ValueError, match="not trainable parameters of the model: \\['nope'\\]"):
        clean_clipped_gradient(model, data, idx, task, 1.0, ["nope"])


# ------------------------------------------------------------------------------------------
# The command, end to end
# ------------------------------------------------------------------------------------------


def test_probe_command_end_to_end(tiny, tmp_path, capsys):
    out = tmp_path / "probe"
    code = run(
        "probe", "--task", "sst2", "--data-dir", tiny["glue"], "--init", "random",
        "--config", tiny["config"], "--pooling", "mean", "--examples", 12,
        "--snapshots", 0, 3, "--run-batch-size", 8, "--run-steps", 4, "--lr", 1e-2,
        "--accountant", "rdp", "--batch-sizes", 4, 8, "--epsilons", 3, 8,
        "--accounting-steps", 10, "--output-dir", out, "--save-gradients", "--quiet",
    )  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    assert printed.startswith(NOT_PRIVATE) and "NOT PRIVATE" in printed.splitlines()[-1]
    report = json.loads((out / "probe.json").read_text())
    assert report["private"] is False and report["warning"] == NOT_PRIVATE
    assert (out / "probe.md").read_text().startswith(f"**{NOT_PRIVATE}**")
    assert report["plots"] == ["phase-10steps.png"]
    assert (out / "phase-10steps.png").read_bytes()[:4] == b"\x89PNG"
    assert [s["step"] for s in report["snapshots"]] == [0, 3]
    assert len(report["grid"]) == 4 and len(report["matrices"]) == 12
    # Each grid point's s is z C / B, and the numbers are probe_spectra's on the saved gradients.
    gradients = torch.load(out / "gradients.pt")
    assert sorted(gradients) == [0, 3]
    assert not torch.equal(gradients[0][report["matrices"][0]], gradients[3][report["matrices"][0]])
    for snap in report["snapshots"]:
        spec = spectra({k: v.double() for k, v in gradients[snap["step"]].items()})
        assert snap["clean_norm"] == pytest.approx(math.sqrt(sum(s.energy for s in spec)), 1e-5)
        for g, result in zip(report["grid"], snap["settings"], strict=True):
            assert g["noise_std"] == pytest.approx(g["noise_multiplier"] / g["batch_size"])
            again = probe_spectra(spec, g["noise_std"])
            assert result["matrices_above"] == again["matrices_above"]
            assert result["energy_above"] == pytest.approx(again["energy_above"], abs=1e-4)


def test_probe_help_says_not_private(capsys):
    assert run("probe", "--help") == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "NOT PRIVATE" in text and "held-out split" in text


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--snapshots", "5"], "--snapshots 5 is past the run's --run-steps 4"),
        (["--examples", "100"], "--examples 100 is above the 24 training examples"),
        (["--batch-sizes", "30"], "--batch-sizes: 30 is outside [1, 24]"),
        (["--run-physical-batch-size", "3"], "--physical-batch-size 3 must divide"),
        (["--output-dir", "/proc/probe"], "--output-dir /proc/probe cannot be created"),
    ],
)
def test_probe_errors_exit_2_with_the_flag(tiny, tmp_path, capsys, extra, message):
    code = run(
        "probe", "--task", "sst2", "--data-dir", tiny["glue"], "--init", "random",
        "--config", tiny["config"], "--run-batch-size", 8, "--run-steps", 4, "--accountant",
        "rdp", "--batch-sizes", 8, "--examples", 4, "--output-dir", tmp_path / "p", "--quiet",
        *extra,
    )  # fmt: skip
    assert code == 2
    err = capsys.readouterr().err
    assert message in err, err
