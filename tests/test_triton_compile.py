"""Every Triton kernel the launchers launch, built for sm_80 and sm_90 (and sm_100 where the
wheel's ptxas supports it) with Triton's own compiler, on a machine without a GPU.

The interpreter (TRITON_INTERPRET=1, how the other tests run the kernels here) accepts code that
the compiler refuses: a module global read inside a kernel made every private step on a GPU raise
while all tests passed. So the launches are not listed by hand: every CUDA implementation of an
rmt op runs here on CPU tensors, over each dtype and each branch its launchers can choose, with
the launches recorded (rmt_kernels.triton.aot.capture_launches); each distinct configuration is
then compiled. A kernel, op or boolean constexpr that the drivers below do not reach fails a
test, and a build that fails shows the compiler's message.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import pkgutil
import time

import pytest
import torch

pytestmark = pytest.mark.triton
triton = pytest.importorskip("triton")

import rmt_kernels  # noqa: E402
import rmt_kernels.triton  # noqa: E402
from rmt_kernels.shrinkage import SHRINKERS  # noqa: E402
from rmt_kernels.triton import aot, device, rmsnorm_device  # noqa: E402
from rmt_kernels.triton.denoise import denoise_triton, denoise_warm_triton  # noqa: E402
from rmt_kernels.triton.reconstruct import SHRINKER_CODES  # noqa: E402

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# (noise_std, seed, offset): noise off; on with 32-bit seed and offset; on with seed and offset
# past 2^32 (Triton types them i64: another build).
NOISE = ((0.0, 0, 0), (1.0, 5, 3), (0.5, 2**40 + 3, 2**33 + 7))
# The largest seed and offset: still i64 (not u64), and offset 2^62 is 16-divisible.
NOISE_EXTREME = (1.0, 2**63 - 1, 2**62)


def _ops_with_cuda_kernels() -> set[str]:
    names = [n for n in torch._C._dispatch_get_all_op_names() if n.startswith("rmt::")]
    return {n[5:] for n in names if torch._C._dispatch_has_kernel_for_dispatch_key(n, "CUDA")}


def _planted(b: int, p: int, q: int, dtype: torch.dtype) -> torch.Tensor:
    """Rank-2 signal far above the noise edge plus noise, so denoise reconstructs."""
    gen = torch.Generator().manual_seed(b * 1000 + p * 10 + q)
    u, v = torch.randn(b, p, 2, generator=gen), torch.randn(b, q, 2, generator=gen)
    return (20.0 * u @ v.mT + 0.1 * torch.randn(b, p, q, generator=gen)).to(dtype)


def _drive_device_ops(dtype: torch.dtype, noise: tuple[float, int, int]) -> set[str]:
    """Run every DP op's device implementation once per route; returns the ops run."""
    std, seed, offset = noise
    gen = torch.Generator().manual_seed(0)
    scale = torch.rand(3, generator=gen) + 0.5

    def rnd(*shape):
        return torch.randn(*shape, generator=gen).to(dtype)

    # Linear: odd sizes (no 16-divisibility) with every noise variant; model-like sizes
    # (multiples of 16) and 2-D input (T = 1, a specialised constant) with noise off and on (the
    # i64 seed/offset builds are covered once: each noisy Linear build is ~3 s of compiler time).
    shapes = ((3, 5, 40, 24), (3, 16, 64, 48), (3, None, 40, 24))
    for b_, t, d_in, d_out in shapes if seed < 2**31 else shapes[:1]:
        lead = (b_,) if t is None else (b_, t)
        x, dy = rnd(*lead, d_in), rnd(*lead, d_out)
        device.linear_clipped_noisy_sum_device(x, dy, scale, std, seed, offset)
    # Norms: the Gram route (one tile pair; several pairs at T > 32), the per-example route, T = 1.
    for t, d_in, d_out in ((5, 40, 24), (40, 128, 128), (40, 24, 16), (1, 8, 8)):
        device.linear_sq_norms_device(rnd(3, t, d_in), rnd(3, t, d_out))
    for ids_dtype in (torch.int64, torch.int32):
        for t in (5, 40):
            ids = torch.randint(0, 50, (3, t), generator=gen, dtype=ids_dtype)
            device.embedding_sq_norms_device(ids, rnd(3, t, 24))
            device.embedding_clipped_noisy_sum_device(
                ids, rnd(3, t, 24), scale, 50, std, seed, offset
            )
    dy = rnd(3, 5, 24)
    device.bias_sq_norms_device(dy)
    device.bias_clipped_noisy_sum_device(dy, scale, std, seed, offset)
    x = rnd(3, 5, 24)
    device.layernorm_sq_norms_device(x, dy, 1e-5)
    device.layernorm_clipped_noisy_sum_device(x, dy, scale, 1e-5, std, seed, offset)
    rmsnorm_device.rmsnorm_sq_norms_device(x, dy, 1e-5)
    rmsnorm_device.rmsnorm_clipped_noisy_sum_device(x, dy, scale, 1e-5, std, seed, offset)
    # The noise alone: 1 element (N = 1 is a specialised constant), a 16-multiple, an odd count.
    for n in (1, 4096, 1001):
        device.add_gaussian_noise_device(rnd(n), std, seed, offset)
        device.add_gaussian_noise_device(rnd(n), *NOISE_EXTREME)
    return {
        "linear_clipped_noisy_sum",
        "linear_sq_norms",
        "embedding_sq_norms",
        "embedding_clipped_noisy_sum",
        "bias_sq_norms",
        "bias_clipped_noisy_sum",
        "layernorm_sq_norms",
        "layernorm_clipped_noisy_sum",
        "rmsnorm_sq_norms",
        "rmsnorm_clipped_noisy_sum",
        "add_gaussian_noise",
    }


def _drive_denoise(dtype: torch.dtype) -> set[str]:
    """rmt::denoise's and rmt::denoise_warm's CUDA implementations (rmt_kernels.triton.register):
    every shrinker with and without the norm correction, wide and tall (batched), the fixed-rank
    and fixed-niter paths, a warm start."""
    wide, tall = _planted(1, 24, 40, dtype)[0], _planted(2, 40, 24, dtype)
    for shrinker in SHRINKERS:
        for norm in ("none", "preserve"):
            denoise_triton(wide, 0.01, shrinker=shrinker, norm=norm)
    denoise_triton(tall, 0.01, shrinker="frobenius")
    denoise_triton(tall, 0.01, shrinker="hard", norm="debiased")
    denoise_triton(wide, 0.01, rank=2)
    denoise_triton(wide, 0.01, niter=1)
    _, basis, _ = denoise_warm_triton(tall, 0.01, torch.empty(2, 40, 0))
    denoise_warm_triton(tall, 0.01, basis)
    return {"denoise", "denoise_warm"}


@pytest.fixture(scope="module")
def captured():
    """(launches, ops driven, seconds): every launch made by every CUDA implementation."""
    start = time.perf_counter()
    driven: set[str] = set()
    with aot.capture_launches() as launches:
        for dtype in DTYPES:
            for noise in NOISE:
                driven |= _drive_device_ops(dtype, noise)
            driven |= _drive_denoise(dtype)
    return launches, driven, time.perf_counter() - start


@pytest.fixture(scope="module")
def builds(captured):
    launches = captured[0]
    archs, skipped = aot.supported_archs()
    # sm_90 (the H200 of bench/gpu/run.sh): every specialisation the launches make; the other
    # archs: every kernel x constexpr x dtype configuration (the integer specialisations are
    # arch-independent front-end work, and building them thrice would triple the time).
    result = aot.compile_launches(launches, archs, coarse_archs=tuple(a for a in archs if a != 90))
    result["archs"], result["skipped"] = archs, skipped
    n = len(result["builds"])
    print(
        f"\n{len(launches)} launches -> {n} builds for sm_{archs}; capture "
        f"{captured[2]:.1f} s, builds {result['seconds']:.1f} s; skipped: {skipped or 'none'}"
    )
    return result


def _launched_kernels() -> dict[str, object]:
    """Every @triton.jit kernel in rmt_kernels/triton that no other kernel calls (the ones a
    launcher must launch), by "module.name"."""
    jitted, sources = {}, {}
    for info in pkgutil.iter_modules(rmt_kernels.triton.__path__):
        module = importlib.import_module(f"rmt_kernels.triton.{info.name}")
        for name, obj in vars(module).items():
            if getattr(getattr(obj, "fn", None), "__module__", None) != module.__name__:
                continue
            if isinstance(obj, (triton.runtime.Autotuner, triton.runtime.Heuristics)):
                raise AssertionError(
                    f"{info.name}.{name} is autotuned: extend aot.capture_launches to record "
                    "each of its configs"
                )
            if isinstance(obj, triton.runtime.KernelInterface):
                jitted[f"{info.name}.{name}"] = obj
                sources[f"{info.name}.{name}"] = inspect.getsource(obj.fn)
    called = {
        key
        for key in jitted
        for other, src in sources.items()
        if other != key and f"{key.split('.')[1]}(" in src
    }
    return {k: v for k, v in jitted.items() if k not in called}


def test_every_op_with_a_cuda_kernel_is_driven(captured):
    assert _ops_with_cuda_kernels() <= captured[1], "add a driver for the new op above"


def test_every_kernel_is_launched(captured):
    launched = {launch.name for launch in captured[0]}
    missing = set(_launched_kernels()) - launched
    assert not missing, f"kernels no driver launches: {sorted(missing)}"


def test_every_branch_of_the_launchers_is_reached(captured):
    seen: dict[tuple[str, str], set] = {}
    for launch in captured[0]:
        for key, value in launch.kwargs:
            seen.setdefault((launch.name, key), set()).add(value)
    for (kernel, key), values in seen.items():
        if all(isinstance(v, bool) for v in values):  # a boolean constexpr: both branches
            assert values == {True, False}, f"{kernel}: {key} only ever {values}"
    assert seen[("reconstruct._shrink_reconstruct_kernel", "SHRINKER")] == set(
        SHRINKER_CODES.values()
    )
    # Every dtype reaches the kernels that take the caller's tensors.
    for kernel in ("linear._linear_clipped_noisy_sum_kernel", "sketch._gaussian_sketch_kernel"):
        dtypes = {a[1] for launch in captured[0] if launch.name == kernel for a in launch.args[:1]}
        assert dtypes == {"float32", "bfloat16", "float16"}, (kernel, dtypes)


def test_sm_100_is_built_with_the_pinned_triton():
    """The README says `make test` builds for sm_100 too: aot.supported_archs() drops it on any
    failure to run its ptxas, so that must fail here rather than pass with a printed line. The
    one documented exception: a triton wheel that ships no Blackwell ptxas at all (no
    ``knobs.nvidia.ptxas_blackwell``; the pinned triton 3.6.0 has one)."""
    nvidia = getattr(getattr(triton, "knobs", None), "nvidia", None)
    knobs = [] if nvidia is None else [vars(c) for c in type(nvidia).__mro__]
    if not any("ptxas_blackwell" in k for k in knobs):
        pytest.skip(f"triton {triton.__version__} ships no ptxas for sm_100 (ptxas-blackwell)")
    archs, skipped = aot.supported_archs()
    assert 100 in archs, f"sm_100 not built: {skipped.get(100)}"


def test_every_launch_compiles(builds):
    failed = [b for b in builds["builds"] if not b["ok"]]
    messages = "\n\n".join(
        f"--- {b.get('kernel')} sm_{b.get('arch')} {b.get('signature')} {b.get('constexprs')}\n"
        f"{b['error']}"
        for b in failed[:5]
    )
    assert not failed, f"{len(failed)} of {len(builds['builds'])} builds failed:\n{messages}"
    assert set(builds["archs"]) >= {80, 90}
    built = {(b["kernel"], b["arch"]) for b in builds["builds"]}
    for kernel in _launched_kernels():
        for arch in builds["archs"]:
            assert (kernel, arch) in built


def test_the_noise_path_costs_no_float64_in_the_common_case(captured):
    # The untruncated tail (one draw in 2^20) computes in float64; a block-level branch keeps it
    # off the path that a block without a tail draw takes. Before it, every element paid a
    # float64 log (80 float64 instructions per thread on the noise kernel's fast path).
    kernels = {"dp_noise._add_noise_kernel", "linear._linear_clipped_noisy_sum_kernel"}
    noisy = {}
    for launch in captured[0]:
        if launch.name in kernels and dict(launch.kwargs).get("ADD_NOISE", True):
            noisy.setdefault(launch.name, launch)
    assert set(noisy) == kernels
    result = aot.compile_launches(list(noisy.values()), (90,), stats=True)
    for build in result["builds"]:
        assert build["ok"], build["error"]
        assert build["f64"] > 0, "the tail path must still be there"
        assert build["f64_fast_path"] == 0, build
        assert build["n_spill_bytes"] == 0, build


# ------------------------------------------------------------------------------------------------
# The global-constexpr bug: a module global read inside a kernel must be a tl.constexpr instance.
# ------------------------------------------------------------------------------------------------


def _globals_read_by_kernels() -> list[tuple[str, str, object]]:
    """(kernel, global name, value) for every module-level name a @triton.jit function reads."""
    out = []
    for info in pkgutil.iter_modules(rmt_kernels.triton.__path__):
        module = importlib.import_module(f"rmt_kernels.triton.{info.name}")
        for name, obj in vars(module).items():
            if not isinstance(obj, triton.runtime.KernelInterface):
                continue
            if obj.fn.__module__ != module.__name__:
                continue
            tree = ast.parse(inspect.getsource(obj.fn))
            local = {a.arg for a in ast.walk(tree) if isinstance(a, ast.arg)}
            local |= {
                node.id
                for node in ast.walk(tree)
                if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store)
            }
            for node in ast.walk(tree):
                if (
                    isinstance(node, ast.Name)
                    and isinstance(node.ctx, ast.Load)
                    and node.id not in local
                    and node.id in vars(module)
                ):
                    out.append((f"{info.name}.{name}", node.id, vars(module)[node.id]))
    return out


def test_kernels_read_only_globals_the_compiler_accepts():
    import types

    allowed = (triton.language.constexpr, triton.runtime.KernelInterface, types.ModuleType)
    bad = [(k, n) for k, n, v in _globals_read_by_kernels() if not isinstance(v, allowed)]
    assert not bad, f"globals the Triton compiler refuses (use tl.constexpr(value)): {bad}"
    # The noise kernels read TAIL_BITS: the check sees it.
    assert any(n == "TAIL_BITS" for _, n, _ in _globals_read_by_kernels())


def test_a_plain_int_global_does_not_compile(tmp_path, monkeypatch):
    # The bug itself: `NAME: tl.constexpr = 2048` is an annotated plain int, which the
    # interpreter reads and the compiler refuses. If Triton ever accepts it, this test says so.
    src = (
        "import triton\nimport triton.language as tl\n"
        "PLAIN: tl.constexpr = 2048\nWRAPPED = tl.constexpr(2048)\n"
        "@triton.jit\ndef bad_kernel(out):\n    tl.store(out, PLAIN)\n"
        "@triton.jit\ndef good_kernel(out):\n    tl.store(out, WRAPPED)\n"
    )
    (tmp_path / "global_constexpr_probe.py").write_text(src)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    result = aot.compile_launches(
        [
            aot.Launch("global_constexpr_probe", name, (("tensor", "int32", True),), ())
            for name in ("bad_kernel", "good_kernel")
        ],
        (90,),
        jobs=1,
    )
    bad, good = result["builds"]
    assert good["ok"], good["error"]
    assert not bad["ok"] and "Cannot access global variable PLAIN" in bad["error"]
