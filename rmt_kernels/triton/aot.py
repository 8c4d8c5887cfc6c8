"""Ahead-of-time builds of the Triton kernels for NVIDIA GPUs, on a machine without one.

The Triton interpreter (``TRITON_INTERPRET=1``, how the CPU tests run the kernels) accepts code
that the compiler refuses, so passing tests say nothing about the GPU. This module closes the gap:

1. :func:`capture_launches` records every kernel launch that the launchers make (kernel, argument
   types and values, constexprs, launch options) while they run, interpreted, on CPU tensors;
2. :func:`compile_launches` builds each distinct configuration with Triton's own compiler and the
   ``ptxas`` bundled in the triton wheel, for the chosen compute capabilities, in a separate
   process (the kernels must be real ``JITFunction`` objects there, not interpreted ones), and
   returns per build: success or the compiler's message, shared memory, and optionally
   registers and spills (``ptxas -v``) and float64 instruction counts.

The specialisation (argument types, ``tt.divisibility`` attributes, integer arguments equal to 1
turned into constants) is computed by the same Triton code that a real launch on a GPU runs, so a
build here is the build a GPU would make for that launch.

``python -m rmt_kernels.triton.aot`` is the worker: JSON request on stdin, JSON results on stdout.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import torch

# Compute capabilities built by default: A100 (sm_80) and H100/H200 (sm_90).
DEFAULT_ARCHS = (80, 90)
# Blackwell (sm_100) is built too where the wheel's ptxas supports it (see supported_archs).
OPTIONAL_ARCHS = (100,)


@dataclasses.dataclass(frozen=True)
class Launch:
    """One kernel launch as the launcher made it: the kernel by module and name, and each argument
    reduced to what the compiler's specialisation depends on (a tensor's dtype and 16-byte
    alignment; scalars by value)."""

    module: str
    kernel: str
    args: tuple
    kwargs: tuple  # sorted (name, value) pairs: constexprs and launch options (num_warps, ...)

    def to_json(self) -> dict:
        return {
            "module": self.module,
            "kernel": self.kernel,
            "args": list(self.args),
            "kwargs": [list(kv) for kv in self.kwargs],
        }

    @property
    def name(self) -> str:
        return f"{self.module.rsplit('.', 1)[-1]}.{self.kernel}"

    def constexprs(self) -> dict[str, Any]:
        return dict(self.kwargs)


def _describe(value: Any) -> Any:
    """A launch argument as a hashable, JSON-able value."""
    if isinstance(value, torch.Tensor):
        return ("tensor", str(value.dtype).removeprefix("torch."), value.data_ptr() % 16 == 0)
    if isinstance(value, torch.dtype):
        raise TypeError(f"aot: a torch.dtype launch argument is not supported: {value}")
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    # tl.constexpr and tl.dtype values: their repr is stable and the worker only needs equality.
    if hasattr(value, "value"):
        return _describe(value.value)
    raise TypeError(f"aot: cannot record a launch argument of type {type(value).__name__}")


@contextlib.contextmanager
def capture_launches(execute: bool = True) -> Iterator[list[Launch]]:
    """Record every Triton kernel launch made inside the block.

    Both launch paths are intercepted: ``InterpretedFunction.run`` (``TRITON_INTERPRET=1``) and
    ``JITFunction.run`` (a GPU). With ``execute`` (default) each launch still runs after being
    recorded, so a launcher that reads its kernels' results (denoise's rank decision) takes the
    branches it would take for real.
    """
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    launches: list[Launch] = []
    saved = {cls: cls.run for cls in (InterpretedFunction, JITFunction)}

    def wrap(original):
        def run(self, *args, grid, warmup, **kwargs):
            if not warmup:
                launches.append(
                    Launch(
                        module=self.fn.__module__,
                        kernel=self.fn.__name__,
                        args=tuple(_describe(a) for a in args),
                        kwargs=tuple(sorted((k, _describe(v)) for k, v in kwargs.items())),
                    )
                )
            if execute:
                return original(self, *args, grid=grid, warmup=warmup, **kwargs)
            return None

        return run

    for cls, original in saved.items():
        cls.run = wrap(original)
    try:
        yield launches
    finally:
        for cls, original in saved.items():
            cls.run = original


def supported_archs() -> tuple[tuple[int, ...], dict[int, str]]:
    """(archs to build, {arch: why skipped}): the defaults, plus each optional arch whose ptxas
    is in the triton wheel and runs."""
    from triton.backends.nvidia.compiler import get_ptxas

    archs, skipped = list(DEFAULT_ARCHS), {}
    for arch in OPTIONAL_ARCHS:
        try:
            tool = get_ptxas(arch)
            out = subprocess.run([tool.path, "--version"], capture_output=True, text=True)
            if out.returncode != 0:
                raise RuntimeError(out.stderr.strip())
            archs.append(arch)
        except Exception as e:  # any failure means "not buildable here"
            skipped[arch] = f"no working ptxas for sm_{arch} in the triton wheel: {e}"
    return tuple(archs), skipped


def compile_launches(
    launches: list[Launch],
    archs: tuple[int, ...] = DEFAULT_ARCHS,
    *,
    coarse_archs: tuple[int, ...] = (),
    jobs: int | None = None,
    stats: bool = False,
    timeout: float = 900.0,
) -> dict:
    """Build every distinct configuration among ``launches`` for each arch in ``archs``.

    For the archs also in ``coarse_archs``, one build per kernel, declared constexpr values,
    pointer types and launch options (integer specialisations, i.e. i32/i64 and 16-divisibility of
    sizes and strides, are built for the other archs only): the time goes to the arch that counts.

    Runs in a fresh interpreter (``python -m rmt_kernels.triton.aot``) without
    ``TRITON_INTERPRET``, ``jobs`` processes in parallel (default: the CPU count). Returns
    ``{"builds": [...], "launch_keys": [[key per arch] per launch], "seconds": wall time}``, each
    build a dict with ``key``, ``kernel``, ``arch``, ``signature``, ``constexprs``, ``ok``,
    ``error`` (the compiler's message), ``seconds``, ``shared`` and, with ``stats``, ``n_regs``,
    ``n_spill_bytes`` (stores + loads), ``f64`` (float64 instructions in the PTX) and
    ``f64_fast_path`` (the fewest float64 instructions on any path from entry to exit) and
    ``instructions_fast_path`` (all PTX instructions on that path, a loop body once).
    """
    request = {
        "launches": [launch.to_json() for launch in launches],
        "archs": list(archs),
        "jobs": jobs or os.cpu_count() or 1,
        "stats": stats,
        "coarse_archs": list(coarse_archs),
    }
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "rmt_kernels.triton.aot"],
        input=json.dumps(request),
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"aot worker failed (exit {proc.returncode}):\n{proc.stderr[-8000:]}")
    result = json.loads(proc.stdout)
    result["seconds"] = time.perf_counter() - start
    return result


# ------------------------------------------------------------------------------------------------
# Worker side (a process without TRITON_INTERPRET: the kernels are JITFunction objects).
# ------------------------------------------------------------------------------------------------

_DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
    "int64": torch.int64,
    "int32": torch.int32,
    "int16": torch.int16,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "bool": torch.bool,
}


class _TensorStandIn:
    """What Triton's specialisation reads of a tensor argument: its dtype and its address."""

    def __init__(self, dtype: str, aligned: bool):
        self.dtype = _DTYPES[dtype]
        self._ptr = 0 if aligned else 4

    def data_ptr(self) -> int:
        return self._ptr


def _materialize(value: Any) -> Any:
    if isinstance(value, list) and len(value) == 3 and value[0] == "tensor":
        return _TensorStandIn(value[1], value[2])
    return value


def _specialize(launch: dict, arch: int):
    """(JITFunction, ASTSource, options, target, key) exactly as JITFunction.run would build them
    for this launch on a device of compute capability ``arch``."""
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.compiler.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    fn = getattr(importlib.import_module(launch["module"]), launch["kernel"])
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    args = [_materialize(a) for a in launch["args"]]
    kwargs = {k: _materialize(v) for k, v in launch["kwargs"]}
    # As JITFunction.run does before binding.
    kwargs["debug"] = kwargs.get("debug", fn.debug) or knobs.runtime.debug
    kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(
        backend, kwargs, bound, specialization, options
    )
    src = ASTSource(fn, signature, constexprs, attrs)
    key = json.dumps(
        [
            launch["module"],
            launch["kernel"],
            arch,
            signature,
            sorted((str(k), repr(v)) for k, v in constexprs.items()),
            sorted((str(k), repr(v)) for k, v in attrs.items()),
            sorted((k, repr(v)) for k, v in options.__dict__.items()),
        ]
    )
    named = {fn.arg_names[k[0]]: v for k, v in constexprs.items() if len(k) == 1}
    coarse = json.dumps(
        [
            launch["module"],
            launch["kernel"],
            arch,
            {k: v for k, v in signature.items() if v.startswith("*")},
            sorted((fn.arg_names[i], repr(constexprs[(i,)])) for i in fn.constexprs),
            sorted((k, repr(v)) for k, v in options.__dict__.items()),
        ]
    )
    return fn, src, options, target, (key, coarse), signature, named


_F64 = re.compile(r"^\s*(@!?%\w+\s+)?[a-z][\w.]*\.f64\b")
_LABEL = re.compile(r"^\s*(\$?[\w$]+):\s*$")
_BRANCH = re.compile(r"^\s*(@!?%\w+\s+)?bra(\.uni)?\s+(\$?[\w$]+);")


def f64_counts(ptx: str) -> tuple[int, int, int]:
    """(float64 instructions in ``ptx``, the fewest of them on any entry-to-exit path, all
    instructions on that path).

    The second number is what a block pays when it takes no rare branch: the PTX is split into
    basic blocks at labels and branches, and a shortest path (weights: float64 instructions per
    block, then instructions) runs from the entry block to a block that returns. The third counts
    a loop body once.
    """
    import heapq

    body = ptx[ptx.index("{", ptx.index(".entry")) + 1 :]

    def block(label=None):
        return {"label": label, "f64": 0, "n": 0, "succ": [], "falls": True, "ret": False}

    blocks: list[dict] = [block()]
    for line in body.splitlines():
        line = line.split("//")[0]
        if not line.strip() or line.strip() in ("{", "}") or line.strip().startswith("."):
            continue
        if m := _LABEL.match(line):
            blocks.append(block(m.group(1)))
            continue
        cur = blocks[-1]
        cur["n"] += 1
        if _F64.match(line):
            cur["f64"] += 1
        if m := _BRANCH.match(line):
            cur["succ"].append(m.group(3))
            if m.group(1) is None:  # unconditional: no fall-through
                cur["falls"] = False
            blocks.append(block())
        elif re.match(r"^\s*(@!?%\w+\s+)?(ret|exit|trap)\b", line):
            cur["ret"] = True
            if not re.match(r"^\s*@", line):
                cur["falls"] = False
            blocks.append(block())
    total = sum(b["f64"] for b in blocks)
    index = {b["label"]: i for i, b in enumerate(blocks) if b["label"]}
    start = (blocks[0]["f64"], blocks[0]["n"])
    dist = {0: start}
    heap = [(start, 0)]
    while heap:
        d, i = heapq.heappop(heap)
        if d > dist.get(i, (float("inf"), 0)):
            continue
        b = blocks[i]
        if b["ret"] or (b["falls"] and i + 1 == len(blocks)):
            return total, d[0], d[1]
        nxt = [index[s] for s in b["succ"] if s in index]
        if b["falls"] and i + 1 < len(blocks):
            nxt.append(i + 1)
        for j in nxt:
            nd = (d[0] + blocks[j]["f64"], d[1] + blocks[j]["n"])
            if nd < dist.get(j, (float("inf"), 0)):
                dist[j] = nd
                heapq.heappush(heap, (nd, j))
    return total, total, sum(b["n"] for b in blocks)


def _ptxas_stats(ptx: str, arch: int) -> dict:
    """Registers per thread and spill bytes, from ``ptxas -v`` (the wheel's ptxas)."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        cmd = [
            get_ptxas(arch).path,
            "-v",
            f"--gpu-name={sm_arch_from_capability(arch)}",
            src,
            "-o",
            os.path.join(tmp, "k.cubin"),
        ]
        log = subprocess.run(cmd, capture_output=True, text=True, check=True).stderr
    regs = re.search(r"Used (\d+) registers", log)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    return {
        "n_regs": int(regs.group(1)) if regs else None,
        "n_spill_bytes": int(spill.group(1)) + int(spill.group(2)) if spill else None,
    }


def _build(job: tuple[dict, int, bool, bool]) -> dict:
    launch, arch, stats, coarse = job
    import triton

    start = time.perf_counter()
    try:
        _fn, src, options, target, keys, signature, named = _specialize(launch, arch)
    except Exception as e:  # reported as a failed build with the message
        return {"key": None, "ok": False, "error": f"specialisation failed: {e!r}"}
    out = {
        "key": keys[1 if coarse else 0],
        "kernel": f"{launch['module'].rsplit('.', 1)[-1]}.{launch['kernel']}",
        "arch": arch,
        "signature": {k: v for k, v in signature.items() if v != "constexpr"},
        "constexprs": {k: repr(v) for k, v in named.items()},
        "num_warps": options.num_warps,
        "num_stages": options.num_stages,
    }
    # MLIR prints its diagnostics to file descriptor 2 and raises "PassManager::run failed": keep
    # them for the message.
    with tempfile.TemporaryFile(mode="w+") as err:
        saved = os.dup(2)
        os.dup2(err.fileno(), 2)
        try:
            compiled = triton.compile(src, target=target, options=options.__dict__)
            failure = None
        except Exception as e:  # the compiler's message is the result
            failure = f"{type(e).__name__}: {e}"
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        if failure is not None:
            err.seek(0)
            diagnostics = err.read()[-6000:]
            return {**out, "ok": False, "error": f"{failure}\n{diagnostics}".strip()}
    out.update(ok=True, error=None, shared=compiled.metadata.shared)
    if stats:
        ptx = compiled.asm["ptx"]
        out.update(_ptxas_stats(ptx, arch))
        out["f64"], out["f64_fast_path"], out["instructions_fast_path"] = f64_counts(ptx)
    out["seconds"] = time.perf_counter() - start
    return out


def _specialize_key(launch: dict, arch: int, coarse: bool) -> str | None:
    try:
        return _specialize(launch, arch)[4][1 if coarse else 0]
    except Exception:  # the build reports the error
        return None


def _worker_main() -> None:
    request = json.load(sys.stdin)
    launches, archs = request["launches"], request["archs"]
    # One build per distinct specialisation: the launchers repeat configurations.
    coarse = set(request.get("coarse_archs", ()))
    keys = [
        [_specialize_key(launch, arch, arch in coarse) for arch in archs] for launch in launches
    ]
    todo: dict[str, tuple[dict, int, bool, bool]] = {}
    failed_keys = []
    for launch, per_arch in zip(launches, keys, strict=True):
        for arch, key in zip(archs, per_arch, strict=True):
            if key is None:
                failed_keys.append((launch, arch, request["stats"], arch in coarse))
            else:
                todo.setdefault(key, (launch, arch, request["stats"], arch in coarse))
    jobs = list(todo.values()) + failed_keys
    # fork: the children inherit the imports; the environment has no TRITON_INTERPRET.
    import multiprocessing

    with ProcessPoolExecutor(
        max_workers=max(1, min(request["jobs"], len(jobs))),
        mp_context=multiprocessing.get_context("fork"),
    ) as pool:
        builds = list(pool.map(_build, jobs, chunksize=1))
    json.dump({"builds": builds, "launch_keys": keys}, sys.stdout)


if __name__ == "__main__":
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise SystemExit("rmt_kernels.triton.aot: unset TRITON_INTERPRET to build kernels")
    _worker_main()
