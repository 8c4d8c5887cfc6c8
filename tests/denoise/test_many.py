"""denoise_many: a model's worth of mixed-shape matrices, grouped into batched launches."""

import pytest
import torch

import rmt_kernels
from rmt_kernels.reference import denoise_exact
from tests.helpers import planted, rel_err


def _model_like():
    shapes = [(48, 48), (96, 48), (48, 96), (48, 48), (96, 48), (48, 48), (2, 48)]
    return [planted(m, n, min(2, m), seed=i)[0] for i, (m, n) in enumerate(shapes)]


def test_matches_per_matrix_results_in_order():
    grads = _model_like()
    outs = rmt_kernels.denoise_many(grads, 0.1)
    assert len(outs) == len(grads)
    for g, out in zip(grads, outs, strict=True):
        assert out.shape == g.shape
        assert rel_err(out, denoise_exact(g, 0.1)) < 0.02


@pytest.mark.parametrize("device_type", ["cpu", "cuda"])
def test_groups_equal_shapes_into_one_call_on_devices(monkeypatch, device_type):
    # Pretend the matrices live on `device_type` by grouping on a fake device attribute: the
    # spy records what denoise_many would launch.
    calls = []

    def spy(grad, sigma, **kw):
        calls.append(tuple(grad.shape))
        return torch.zeros_like(grad)

    class OnDevice(torch.Tensor):
        @property
        def device(self):
            return torch.device(device_type)

    grads = [g.as_subclass(OnDevice) for g in _model_like()]
    monkeypatch.setattr(rmt_kernels.ops, "denoise", spy)
    rmt_kernels.denoise_many(grads, 0.1)
    if device_type == "cpu":
        assert len(calls) == len(grads)
    else:
        assert sorted(calls) == sorted([(3, 48, 48), (2, 96, 48), (48, 96), (2, 48)])


def test_per_matrix_sigmas_and_options():
    grads = _model_like()[:3]
    sigmas = [0.1, 0.2, 0.1]
    outs = rmt_kernels.denoise_many(grads, sigmas, shrinker="hard", rank=1)
    for g, s, out in zip(grads, sigmas, outs, strict=True):
        assert rel_err(out, denoise_exact(g, s, shrinker="hard", rank=1)) < 0.02


def test_bad_input():
    with pytest.raises(ValueError, match="sigmas"):
        rmt_kernels.denoise_many(_model_like(), [0.1, 0.2])
    with pytest.raises(ValueError, match=r"grads\[1\] must be a 2-D matrix"):
        rmt_kernels.denoise_many([torch.ones(3, 3), torch.ones(2, 3, 3)], 0.1)
    assert rmt_kernels.denoise_many([], 0.1) == []
