"""torch.library.opcheck on every op of the ``rmt`` library, in one place: the schema, the fake
(meta) impl, autograd registration and tracing agree with the kernel on each op's sample inputs.

A new op in csrc/rmt.cpp fails ``test_every_op_has_samples`` until it gets samples here.
"""

from collections.abc import Callable

import pytest
import torch

import rmt_kernels  # noqa: F401  (registers torch.ops.rmt.*)
from tests.helpers import planted

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (bench/gpu/run.sh)")
NOISE = (0.5, 1, 2)  # noise_std, seed, offset
DENOISE_SHAPES = [(20, 30), (30, 20), (2, 20, 30)]


def _sample(op: str, make_args: Callable[[], tuple], kwargs: dict, what: str = "", marks=()):
    """One opcheck case: ``op``'s positional arguments (made inside the test, under its seed)
    and keyword arguments; its id is 'op-what-key=value-...'."""
    name = "-".join([op, *([what] if what else []), *(f"{k}={v}" for k, v in kwargs.items())])
    return pytest.param(op, make_args, kwargs, id=name, marks=marks)


def _grad(shape: tuple[int, ...]) -> torch.Tensor:
    """A noisy rank-2 matrix (or a batch of them) of ``shape``."""
    return planted(shape[-2], shape[-1], 2, batch=shape[0] if len(shape) == 3 else None)[0]


def _shape(shape: tuple[int, ...]) -> str:
    return "x".join(map(str, shape))


def _denoise_samples():
    for shape in DENOISE_SHAPES:
        for options in [
            {},
            {"shrinker": "hard", "rank": 2, "norm": "debiased"},
            {"kappa": 0.8, "seed": 3},
        ]:
            yield _sample("denoise", lambda s=shape: (_grad(s), 0.1), options, _shape(shape))
    yield _sample("denoise", lambda: (planted(40, 30, 2)[0].bfloat16().t(), 0.1), {}, "bf16-t")
    yield _sample("denoise", lambda: (planted(96, 64, 3)[0].cuda(), 0.1), {}, "cuda", CUDA)


def _denoise_warm_samples():
    for shape in DENOISE_SHAPES:
        for options in [{}, {"rank": 2, "norm": "preserve"}, {"niter": 1}]:
            yield _sample(
                "denoise_warm",
                lambda s=shape: (_grad(s), 0.1, torch.randn(*s[:-1], 3)),
                options,
                _shape(shape),
            )
    yield _sample(
        "denoise_warm",
        lambda: (planted(96, 64, 3)[0].cuda(), 0.1, torch.randn(96, 4, device="cuda")),
        {},
        "cuda",
        CUDA,
    )


def _linear() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x, dy, scale) of a Linear layer: batch 3, sequence 4, 6 in, 5 out."""
    return torch.randn(3, 4, 6), torch.randn(3, 4, 5), torch.rand(3)


def _embedding() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids, dy, scale) of an Embedding of 6 rows of 4: batch 3, sequence 5."""
    return torch.randint(0, 6, (3, 5)), torch.randn(3, 5, 4), torch.rand(3)


def _layernorm() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x, dy, scale) of a LayerNorm over 6: batch 3, sequence 4."""
    return torch.randn(3, 4, 6), torch.randn(3, 4, 6), torch.rand(3)


def _dp_samples():
    """The fused DP ops: per-example norms and clipped noisy sums per layer type, and the noise."""
    yield _sample("linear_sq_norms", lambda: _linear()[:2], {})
    yield _sample("linear_clipped_noisy_sum", lambda: (*_linear(), *NOISE), {})
    yield _sample("bias_sq_norms", lambda: _linear()[1:2], {})
    yield _sample("bias_clipped_noisy_sum", lambda: (*_linear()[1:], *NOISE), {})
    yield _sample("embedding_sq_norms", lambda: _embedding()[:2], {})
    yield _sample("embedding_clipped_noisy_sum", lambda: (*_embedding(), 6, *NOISE), {})
    yield _sample("layernorm_sq_norms", lambda: (*_layernorm()[:2], 1e-5), {})
    yield _sample("layernorm_clipped_noisy_sum", lambda: (*_layernorm(), 1e-5, *NOISE), {})
    yield _sample("rmsnorm_sq_norms", lambda: (*_layernorm()[:2], 1e-5), {})
    yield _sample("rmsnorm_clipped_noisy_sum", lambda: (*_layernorm(), 1e-5, *NOISE), {})
    yield _sample("add_gaussian_noise", lambda: (torch.randn(3, 4, 6), *NOISE), {}, "3d")
    yield _sample("add_gaussian_noise", lambda: (torch.randn(4, 5), 1.0, 2, 3), {}, "2d")


SAMPLES = [*_denoise_samples(), *_denoise_warm_samples(), *_dp_samples()]


@pytest.mark.parametrize(("op", "make_args", "kwargs"), SAMPLES)
def test_opcheck(op, make_args, kwargs):
    torch.library.opcheck(getattr(torch.ops.rmt, op).default, make_args(), kwargs)


def test_every_op_has_samples():
    # Every op the C++ library registered (csrc/rmt.cpp), read from the dispatcher.
    registered = {
        name.split("::", 1)[1]
        for name in torch._C._dispatch_get_all_op_names()
        if name.startswith("rmt::")
    }
    assert registered == {sample.values[0] for sample in SAMPLES}
