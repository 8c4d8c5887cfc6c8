"""DP-SGD under torch.distributed: 2 processes on the gloo backend against 1 process.

One 2-rank run (tests/dp_workers.py, ``dist_worker``) makes every result; the tests compare them
with the same steps in this process. Rank r starts from another random init, so equal results
also show that make_private broadcasts rank 0's parameters.

Noise statistics. The noise on the averaged gradient has per-coordinate std s = sigma C / B. Over
all N coordinates of the model, sum(noise^2) / s^2 ~ chi^2(N); the test accepts it between the
chi^2(N) quantiles at 1e-7 and 1 - 1e-7, so a correct engine fails with probability 2e-7 < 1e-6.
Noise added on both ranks would double the variance, far outside (the relative half-width of the
band is about 5.3 sqrt(2 / N) = 5% at N ~ 25,000).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import scipy.stats
import torch

from tests import dp_workers
from tests.dp_models import tiny_model

pytest.importorskip("transformers")
pytest.importorskip("opacus")

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 240  # a hang (a rank waiting on a collective forever) fails instead of blocking CI


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_env() -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    env.setdefault("TRITON_INTERPRET", "1")
    return env


def run_group(cmd: list[str]) -> subprocess.CompletedProcess:
    """Run ``cmd`` (cwd ROOT, worker_env) in a session of its own; on a time-out kill the whole
    group, so the ranks a launcher started are not left behind."""
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=worker_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("dist")
    port = free_port()
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.dp_workers",
                "dist",
                json.dumps({"rank": r, "world": 2, "port": port, "out": str(out)}),
            ],
            cwd=ROOT,
            env=worker_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for r in range(2)
    ]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=TIMEOUT_S)[0].decode())
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, log in zip(procs, logs, strict=True):
        assert p.returncode == 0, log[-3000:]
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(2)]


def one_process(noise: float, lr: float):
    """The same first step in one process, on the whole batch."""
    torch.set_num_threads(1)
    model, opt, _ = dp_workers.private(tiny_model(seed=0), noise=noise, lr=lr)
    dp_workers.backward(model, dp_workers.batch_of(0, None))
    opt.step()
    return dp_workers.grads(model), dp_workers.params(model)


def test_two_half_batches_equal_one_process_on_the_whole_batch(ranks):
    grads, params = one_process(noise=0.0, lr=0.1)
    for result in ranks:
        for n in params:
            torch.testing.assert_close(result["clean_grads"][n], grads[n], rtol=1e-5, atol=1e-7)
            torch.testing.assert_close(result["clean_params"][n], params[n], rtol=1e-5, atol=1e-7)


def test_noise_enters_once_and_is_the_one_process_noise(ranks):
    # Rank 0 alone adds the noise, keyed by the agreed seed: the all-reduced gradient is the
    # one-process mechanism's with the same seed (up to float32 rounding of the sum).
    grads, _ = one_process(noise=2.0, lr=0.0)
    for result in ranks:
        for n in grads:
            torch.testing.assert_close(result["noisy_grads"][n], grads[n], rtol=1e-5, atol=1e-6)
    noise = torch.cat(
        [
            (ranks[0]["noisy_grads"][n] - ranks[0]["clean_grads"][n]).double().flatten()
            for n in grads
        ]
    )
    s = 2.0 * dp_workers.C / dp_workers.BATCH
    stat = (noise.square().sum() / s**2).item()
    lo, hi = scipy.stats.chi2.ppf([1e-7, 1 - 1e-7], noise.numel())
    assert lo < stat < hi, (stat / noise.numel(), lo / noise.numel(), hi / noise.numel())


def test_parameters_identical_across_ranks_with_denoising_and_an_empty_local_batch(ranks):
    start = dp_workers.params(tiny_model(seed=0))
    a, b = ranks[0]["denoised_params"], ranks[1]["denoised_params"]
    for n in a:
        assert torch.equal(a[n], b[n]), n
    assert any(not torch.equal(a[n], start[n]) for n in a)  # the steps did move the model
    assert ranks[0]["allreduce_seconds"] > 0


def test_epsilon_equal_on_both_ranks_and_to_the_global_sample_rate(ranks):
    from opacus.accountants import RDPAccountant

    accountant = RDPAccountant()
    accountant.history = [(1.0, dp_workers.BATCH / dp_workers.DATASET, 3)]
    expected = accountant.get_epsilon(delta=dp_workers.DELTA)
    assert ranks[0]["epsilon"] == ranks[1]["epsilon"]
    assert ranks[0]["epsilon"] == pytest.approx(expected, rel=1e-12)


def test_poisson_sampler_shards_cover_the_dataset_and_resume_exactly():
    from rmt_kernels.dp import PoissonSampler

    def sampler(rank):
        g = torch.Generator().manual_seed(rank)
        return PoissonSampler(
            num_samples=50, sample_rate=0.3, steps=8, rank=rank, world_size=2, generator=g
        )

    shards = [sampler(r)._shard() for r in range(2)]
    assert sorted(torch.cat(shards).tolist()) == list(range(50))
    # Empty batches are yielded, not skipped (the ranks stay in step).
    tiny = PoissonSampler(num_samples=3, sample_rate=0.01, generator=torch.Generator())
    assert len(list(tiny)) == 100
    # Interrupted after 3 batches, restored into a fresh sampler: the same continuation.
    whole = list(sampler(1))
    s = sampler(1)
    it = iter(s)
    head = [next(it) for _ in range(3)]
    state = s.state_dict()
    # Another key, overwritten by the state's (a public sampler's state holds its key).
    resumed = PoissonSampler(
        num_samples=50, sample_rate=0.3, steps=8, rank=1, world_size=2, key=999
    )
    resumed.load_state_dict(state)
    assert head + list(resumed) == whole
    # The epoch after: as an uninterrupted sampler's second epoch.
    reference = sampler(1)
    list(reference)
    assert list(resumed) == list(reference)
    with pytest.raises(ValueError, match="rank"):
        sampler(0).load_state_dict(state)
