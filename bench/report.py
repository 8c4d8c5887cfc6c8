"""Turn pytest-benchmark JSON into the side-by-side tables printed by ``make bench``."""

from __future__ import annotations

import datetime
import json
import platform
from collections import defaultdict
from pathlib import Path

import torch


def machine_description() -> str:
    """Device, versions and date: the header every reported number carries."""
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU: {cpu}"
    return (
        f"{datetime.date.today().isoformat()}, {device}, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}, Python {platform.python_version()}"
    )


def _label(name: str) -> str:
    return name.removeprefix("test_").replace("_", " ")


def tables(results: dict) -> str:
    """One markdown table per benchmark group: median time, ratio to our kernel, quality."""
    groups = defaultdict(list)
    for bench in results["benchmarks"]:
        groups[bench["group"]].append(bench)
    out = []
    for group, benches in groups.items():
        ours = next((b for b in benches if b["name"].startswith("test_ours")), benches[0])
        base = ours["stats"]["median"]
        out.append(f"### {group}\n")
        out.append("| method | median ms | time / ours | rel. error | cosine | rounds |")
        out.append("|---|---:|---:|---:|---:|---:|")
        for b in sorted(benches, key=lambda b: b["stats"]["median"]):
            info = b.get("extra_info", {})
            err = info.get("relative_error")
            cos = info.get("cosine")
            out.append(
                f"| {_label(b['name'])} | {1e3 * b['stats']['median']:.1f} | "
                f"{b['stats']['median'] / base:.2f}x | "
                f"{'' if err is None else f'{err:.4f}'} | {'' if cos is None else f'{cos:.4f}'} | "
                f"{b['stats']['rounds']} |"
            )
        noisy = ours.get("extra_info", {}).get("noisy_relative_error")
        if noisy is not None:
            out.append(f"\nThe noisy input's relative error is {noisy:.3f}.")
        out.append("")
    return "\n".join(out)


def render(json_path: Path) -> str:
    results = json.loads(json_path.read_text())
    return f"Measured {machine_description()}.\n\n{tables(results)}"
