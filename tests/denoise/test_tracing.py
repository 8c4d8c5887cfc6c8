"""The denoise ops as torch sees them: the fake impl, tracing with torch.compile and export
(torch.library.opcheck of every op: tests/test_opcheck.py)."""

import pytest
import torch

import rmt_kernels
from tests.helpers import planted


def test_fake_impl_gives_shape_and_dtype():
    grad = torch.empty(3, 40, 70, dtype=torch.bfloat16, device="meta")
    out = torch.ops.rmt.denoise(grad, 0.1)
    assert out.shape == grad.shape and out.dtype == grad.dtype and out.is_contiguous()


def test_compiled_function_calls_the_op():
    def step(g: torch.Tensor) -> torch.Tensor:
        return 0.5 * torch.ops.rmt.denoise(g * 2.0, 0.2, shrinker="operator")

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    grad = planted(48, 64, 2)[0]
    torch.testing.assert_close(compiled(grad), step(grad))


def test_export_keeps_the_op():
    class Denoise(torch.nn.Module):
        def forward(self, g):
            return rmt_kernels.denoise(g, 0.1, rank=2)

    program = torch.export.export(Denoise(), (torch.randn(16, 24),))
    assert "rmt.denoise" in str(program.graph)


def test_compiled_function_calls_denoise_warm():
    # The new basis's width is data-dependent: traced as an unbacked size.
    torch._dynamo.reset()

    def step(g: torch.Tensor, basis: torch.Tensor):
        out, new_basis, passes = torch.ops.rmt.denoise_warm(g, 0.2, basis)
        return 0.5 * out, new_basis, passes

    grad, basis = planted(48, 64, 2)[0], torch.randn(48, 4)
    with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True):
        compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
        got = compiled(grad, basis)
    for a, b in zip(got, step(grad, basis), strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("op", [torch.ops.rmt.denoise, torch.ops.rmt.denoise_warm])
def test_denoise_options_are_the_schemas(op):
    # The Python layers below the public wrappers read the options through DenoiseOpOptions:
    # its fields, their order (denoise_warm's options are positional) and defaults are the
    # schema's, and the public wrapper's keyword defaults are the same.
    import dataclasses
    import inspect

    from rmt_kernels.op_options import DenoiseOpOptions

    schema = [a for a in op.default._schema.arguments if a.name not in ("grad", "sigma", "basis")]
    fields = dataclasses.fields(DenoiseOpOptions)
    assert [(f.name, f.default) for f in fields] == [(a.name, a.default_value) for a in schema]
    wrapper = inspect.signature(getattr(rmt_kernels, op.__name__.split(".")[-1])).parameters
    assert all(wrapper[f.name].default == f.default for f in fields)


def test_denoise_warm_fake_reads_positional_options():
    # The schema of denoise_warm takes its options positionally: the fake checks them in order.
    grad = torch.empty(20, 30, device="meta")
    basis = torch.empty(20, 2, device="meta")
    with pytest.raises(ValueError, match="shrinker"):
        torch.ops.rmt.denoise_warm(grad, 0.1, basis, "sideways")
    with pytest.raises(ValueError, match="rank"):
        torch.ops.rmt.denoise_warm(grad, 0.1, basis, "hard", 1.0, 21)
