"""The rmt-audit command and the black-box audit (rmt_kernels.audit.cli, .blackbox)."""

import json

import pytest
import torch
from torch import nn

from rmt_kernels.audit.blackbox import black_box_audit, mislabel
from rmt_kernels.audit.cli import main

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


def test_cli_prints_and_writes_json(tmp_path, capsys):
    out = tmp_path / "audit.json"
    rc = main(
        [
            "--canaries",
            "512",
            "--examples",
            "64",
            "--steps",
            "4",
            "--noise-multiplier",
            "4",
            "--json",
            str(out),
            "--no-progress",
        ]
    )
    assert rc == 0
    text = capsys.readouterr().out
    assert "accountant epsilon" in text and "audit lower bound" in text and "consistent" in text
    data = json.loads(out.read_text())
    assert data["mode"] == "white-box" and data["confidence"] == 0.95
    assert 0 <= data["epsilon_lower_bound"] < data["accountant_epsilon"]
    # Sample rate 1: the default bound is the f-DP one on mu-GDP, beside the claimed mu.
    assert data["method"] == "fdp" and "mu-GDP" in text
    assert data["claimed_mu"] == 0.5 and 0 <= data["mu_lower_bound"] < 0.5


def test_cli_method_steinke(tmp_path, capsys):
    out = tmp_path / "audit.json"
    argv = ["--canaries", "256", "--examples", "16", "--steps", "2", "--noise-multiplier", "4"]
    rc = main([*argv, "--method", "steinke", "--json", str(out), "--no-progress"])
    assert rc == 0
    assert "steinke" in capsys.readouterr().out
    data = json.loads(out.read_text())
    assert data["method"] == "steinke" and data["mu_lower_bound"] is None


def test_cli_two_processes(tmp_path, capsys):
    """--processes 2: the audit on 2 gloo processes; at sample rate 1 the released mechanism is
    the one-process one (rank 0's noise key is the one-process key), so the scores, and the
    bound, are those of the same run in this process."""
    argv = ["--canaries", "256", "--examples", "16", "--steps", "2", "--noise-multiplier", "4"]
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    assert main([*argv, "--json", str(one), "--no-progress"]) == 0
    assert main([*argv, "--processes", "2", "--json", str(two), "--no-progress"]) == 0
    assert "2 processes" in capsys.readouterr().out
    a, b = json.loads(one.read_text()), json.loads(two.read_text())
    assert a["processes"] == 1 and b["processes"] == 2
    assert b["epsilon_lower_bound"] == a["epsilon_lower_bound"] < b["accountant_epsilon"]
    assert b["audit"] == a["audit"]


@pytest.mark.parametrize(
    "argv",
    [
        ["--processes", "0"],
        ["--steps", "0"],
        ["--canaries", "x"],
        ["--sample-rate", "2"],
        ["--bogus"],
        ["--noise-multiplier", "-1"],
        ["--delta", "1"],
        ["--method", "gdp"],
    ],
)
def test_cli_bad_arguments_exit_2_one_line(argv, capsys):
    with pytest.raises(SystemExit) as e:
        rc = main([*argv, "--no-progress"])
        raise SystemExit(rc)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("rmt-audit: error:")


def _loss(model, batch):
    x, y = batch
    return nn.functional.cross_entropy(model(x), y, reduction="none")


# The private black-box run: 512 mislabelled canaries (random inputs, 10 classes: each wrong
# label must be memorised) and 256 ordinary random examples in 256 dimensions, 40 full-batch
# steps of Adam through make_private at noise multiplier 32 and C = 1. The claim is Gaussian:
# mu = sqrt(40) / 32 = 0.198, epsilon 1.308 at delta 1e-12.
#
# Sized so that the test can fail. The bound is at most that of all-right guesses; at p_fail
# 1e-7 (over the default guess counts) and delta 1e-12, 256 right guesses of 512 canaries give
# 2.54, twice the claim. (The former set-up, 64 canaries at delta 1e-6, gave a bound of exactly 0
# whatever the guesses: the p-value's 2 m delta term alone is about 2 delta > p_fail.) delta is
# far below p_fail / (2 m) for the same reason.
BB_STEPS, BB_SIGMA, BB_DELTA = 40, 32.0, 1e-12


def _black_box_run(monkeypatch=None):
    """The black-box audit of the private run above; ``monkeypatch``: plant "no clipping, no
    noise" (clip factors 1, noise std 0) behind the accountant's back."""
    import rmt_kernels.dp.engine as engine_module
    from rmt_kernels.dp import make_private
    from rmt_kernels.dp.engine import PrivateEngine

    if monkeypatch is not None:
        real = engine_module.clip_scales
        monkeypatch.setattr(
            engine_module, "clip_scales", lambda sq, c: torch.ones_like(real(sq, c))
        )
        monkeypatch.setattr(PrivateEngine, "sigma", lambda self: 0.0)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(256, 256, generator=g), torch.randint(0, 10, (256,), generator=g)
    cx, cy = torch.randn(512, 256, generator=g), torch.randint(0, 10, (512,), generator=g)
    canaries = torch.utils.data.TensorDataset(cx, mislabel(cy, 10, 0))

    def train(included):
        ix = torch.stack([included[i][0] for i in range(len(included))])
        iy = torch.stack([included[i][1] for i in range(len(included))])
        data = torch.utils.data.TensorDataset(torch.cat([x, ix]), torch.cat([y, iy]))
        loader = torch.utils.data.DataLoader(
            data, batch_size=len(data), generator=torch.Generator().manual_seed(0)
        )
        model = nn.Sequential(nn.Linear(256, 10))
        opt = torch.optim.Adam(model.parameters(), lr=0.1)
        with pytest.warns(UserWarning, match="seed="):
            model, opt, loader = make_private(
                model,
                opt,
                loader,
                target_delta=BB_DELTA,
                max_grad_norm=1.0,
                noise_multiplier=BB_SIGMA,
                seed=0,
            )
        for _ in range(BB_STEPS):
            bx, by = next(iter(loader))
            if bx.shape[0]:
                nn.functional.cross_entropy(model(bx), by).backward()
            opt.step()
            opt.zero_grad()
        return model, opt.get_epsilon(BB_DELTA)

    return black_box_audit(canaries, train, _loss, p_fail=1e-7, delta=BB_DELTA, seed=0)


def test_black_box_private_run_bound_below_accountant():
    """The private run's bound is below the accountant's epsilon (by the theorem, false
    failure <= p_fail = 1e-7; measured 0.0 against 1.318). The accountant reports the exact
    Gaussian epsilon within its error budget."""
    from rmt_kernels.audit import epsilon_lower_bound, gaussian_epsilon

    res = _black_box_run()
    exact = gaussian_epsilon(BB_STEPS**0.5 / BB_SIGMA, BB_DELTA)
    assert exact <= res.accountant_epsilon <= exact + 0.02
    assert 0 <= res.audit.epsilon < res.accountant_epsilon
    assert res.scores.shape == (512,) and res.included.sum() > 0
    # The test can fail: perfect guesses would give a bound twice the accountant's.
    h = res.audit.hypotheses
    perfect = float(epsilon_lower_bound(512, 256, 256, p_fail=1e-7 / h, delta=BB_DELTA))
    assert perfect > 1.9 * res.accountant_epsilon


def test_black_box_run_without_clipping_or_noise_caught(monkeypatch):
    """The same run with clipping and noise switched off behind the accountant's back (which
    still says 1.318) memorises the included canaries: all 256 guesses right, bound 2.54."""
    res = _black_box_run(monkeypatch)
    assert res.audit.correct == res.audit.guesses >= 256
    assert res.audit.epsilon > 1.9 * res.accountant_epsilon


def test_black_box_memorising_run_is_caught():
    """Without DP, a model fit to the included canaries' wrong labels memorises them (10
    classes, 64 dims, about 128 canaries: linearly separable), so the IN canaries' losses are
    near 0 and the OUT ones mostly large: the OUT guesses are right and the bound is well above 0
    (measured 3.01: all 128 OUT guesses right; the assertion asks for 1.5)."""
    # Inputs without class structure: each wrong label must be memorised, not learnt as a rule.
    g = torch.Generator().manual_seed(1)
    cx, cy = torch.randn(256, 64, generator=g), torch.randint(0, 10, (256,), generator=g)
    canaries = torch.utils.data.TensorDataset(cx, mislabel(cy, 10, 0))

    def train(included):
        loader = torch.utils.data.DataLoader(included, batch_size=len(included))
        model = nn.Linear(64, 10)
        opt = torch.optim.Adam(model.parameters(), lr=0.1)
        for _ in range(300):
            for bx, by in loader:
                opt.zero_grad()
                nn.functional.cross_entropy(model(bx), by).backward()
                opt.step()
        return model, float("inf")

    res = black_box_audit(canaries, train, _loss, p_fail=0.05, delta=0.0, seed=0)
    assert res.audit.epsilon > 1.5


def test_mislabel():
    y = torch.tensor([0, 1, 2, 2, 1, 0])
    z = mislabel(y, 3, 0)
    assert torch.all(z != y) and torch.all((z >= 0) & (z < 3))
    with pytest.raises(ValueError, match="num_classes"):
        mislabel(y, 1, 0)
    with pytest.raises(ValueError, match="labels"):
        mislabel(y, 2, 0)
