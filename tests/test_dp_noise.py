"""The counter-based Philox noise: same stream on the C++ CPU kernels and the Triton kernels,
reproducible by key, distributed as N(0, noise_std^2), independent across keys.

Thresholds, derived so that a false failure (a correct generator failing because of the draw) is
rarer than 1e-6 for the whole file. With N i.i.d. N(0, s^2) samples:
  * sample mean: N(0, s^2 / N) exactly, so |mean| / (s / sqrt(N)) > 5.3 has probability
    2 * (1 - Phi(5.3)) = 1.2e-7;
  * sample variance: (N - 1) v / s^2 ~ chi^2(N - 1), mean N - 1, std sqrt(2 (N - 1)); at
    N = 2^20 the chi^2 is normal to well within the 5.3-sigma tail, so |v / s^2 - 1| * sqrt(N / 2)
    > 5.3 has probability ~1.2e-7;
  * Kolmogorov-Smirnov: under the null the p-value is uniform, so p < 1e-7 has probability 1e-7;
  * Pearson correlation of two independent streams: sqrt(N) r -> N(0, 1), so
    |r| > 5.3 / sqrt(N) has probability ~1.2e-7; three pairs are tested.
Six such checks in all: a union bound of 6 * 1.2e-7 = 7.2e-7 < 1e-6. (The tests are deterministic
under their fixed keys; the bound is for a key chosen at random.)
"""

import itertools
import math

import pytest
import scipy.stats
import torch

import rmt_kernels
from rmt_kernels.ops import OFFSET_STRIDE, noise_offset

N = 1 << 20
Z = 5.3
STD = 0.7


def _noise(n, std, seed, offset):
    return rmt_kernels.add_gaussian_noise(torch.zeros(n), std, seed, offset).double()


def test_mean_and_std_match_theory():
    x = _noise(N, STD, seed=1234, offset=noise_offset(7, 3, 10))
    assert abs(x.mean().item()) / (STD / math.sqrt(N)) < Z
    assert abs(x.var().item() / STD**2 - 1.0) * math.sqrt(N / 2) < Z


def test_kolmogorov_smirnov_against_the_normal():
    x = _noise(N, STD, seed=99, offset=2**40)
    assert scipy.stats.kstest(x.numpy() / STD, "norm").pvalue > 1e-7


@pytest.mark.parametrize(
    ("key_a", "key_b"),
    [
        # two offsets (two steps of one parameter), two seeds, two parameters of one step
        ((5, noise_offset(0, 0, 2)), (5, noise_offset(1, 0, 2))),
        ((5, 0), (6, 0)),
        ((5, noise_offset(3, 0, 2)), (5, noise_offset(3, 1, 2))),
    ],
)
def test_streams_of_different_keys_are_uncorrelated(key_a, key_b):
    a, b = _noise(N, 1.0, *key_a), _noise(N, 1.0, *key_b)
    r = torch.corrcoef(torch.stack([a, b]))[0, 1].item()
    assert abs(r) < Z / math.sqrt(N)


def test_same_key_same_noise_and_counters_are_element_indices():
    a = _noise(1000, 1.0, 3, 2**33 + 17)
    assert torch.equal(a, _noise(1000, 1.0, 3, 2**33 + 17))
    # Element k is stream element offset + k: a window of a longer call is a call at offset + 10.
    torch.testing.assert_close(a[10:], _noise(990, 1.0, 3, 2**33 + 27), rtol=0, atol=0)
    assert not torch.equal(a, _noise(1000, 1.0, 4, 2**33 + 17))
    # The noise scales with noise_std and vanishes at 0 (the exact clipped sum).
    torch.testing.assert_close(_noise(1000, 2.5, 3, 2**33 + 17), 2.5 * a, rtol=1e-6, atol=1e-6)
    assert torch.equal(_noise(1000, 0.0, 3, 0), torch.zeros(1000, dtype=torch.float64))


@pytest.mark.triton
@pytest.mark.parametrize(
    ("seed", "offset"),
    [(0, 0), (1, 1), (2**40 + 3, 2**32 - 100), (123456789, 2**62), (2**63 - 1, 5)],
)
def test_cpu_noise_equals_triton_noise(seed, offset):
    # Philox words and uniforms are bit-identical; the normals pass through log / sin / cos of
    # two math libraries (Cephes polynomials vs NumPy under the interpreter): a few float32 ulps.
    from rmt_kernels.triton.dp_noise import add_noise_

    n = 5000  # crosses a 2^32 counter boundary for offset 2^32 - 100
    cpu = rmt_kernels.add_gaussian_noise(torch.zeros(n), 1.0, seed, offset)
    triton_noise = add_noise_(torch.zeros(n), 1.0, seed, offset)
    torch.testing.assert_close(cpu, triton_noise, rtol=0, atol=4e-6)


def test_noise_offset_ranges_never_overlap():
    offsets = sorted(noise_offset(s, p, 3) for s in range(4) for p in range(3))
    assert all(b - a >= OFFSET_STRIDE for a, b in itertools.pairwise(offsets))
    with pytest.raises(ValueError, match="param_index"):
        noise_offset(0, 3, 3)
    with pytest.raises(ValueError, match="int64"):
        noise_offset(2**31, 0, 1)


def test_add_gaussian_noise_checks_its_arguments():
    with pytest.raises(ValueError, match="noise_std"):
        rmt_kernels.add_gaussian_noise(torch.zeros(3), -1.0, 0, 0)
    with pytest.raises(TypeError, match="x must be float32"):
        rmt_kernels.add_gaussian_noise(torch.zeros(3, dtype=torch.long), 1.0, 0, 0)


def test_vectorised_and_portable_philox_loops_draw_the_same_noise(tmp_path):
    # The CPU picks an AVX-512 Philox loop where it can; RMT_KERNELS_PORTABLE_PHILOX=1 forces the
    # portable one. Both must give the same words, hence bit-identical noise; the range crosses a
    # 2^32 quad boundary (the carry into the counter's high word) and starts inside a quad.
    import os
    import subprocess
    import sys

    with open("/proc/cpuinfo") as f:
        if " avx512f" not in f.read():
            pytest.skip("this CPU has no AVX-512: only the portable Philox loop runs here")
    offset, n = 4 * (2**32 - 40) + 1, 4099
    draw = f"rmt_kernels.add_gaussian_noise(torch.zeros({n}), 1.0, 9, {offset})"
    script = f"import sys, torch, rmt_kernels; torch.save({draw}, sys.argv[1])"
    outputs = []
    for portable in ("0", "1"):
        path = tmp_path / f"noise{portable}.pt"
        env = {**os.environ, "RMT_KERNELS_PORTABLE_PHILOX": portable}
        subprocess.run([sys.executable, "-c", script, str(path)], env=env, check=True)
        outputs.append(torch.load(path))
    assert torch.equal(outputs[0], outputs[1])
    assert torch.equal(outputs[0], _noise(n, 1.0, 9, offset).float())
