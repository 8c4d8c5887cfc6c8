"""``python -m bench``: run every benchmark side by side and print the comparison tables.

Results go to bench/out/ (JSON from pytest-benchmark) and the rendered tables to
bench/results/<device>.md, which is committed when the numbers are worth keeping.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pytest

from bench.report import render

HERE = Path(__file__).resolve().parent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("-k", default=None, help="only benchmarks matching this expression")
    parser.add_argument(
        "--results", default=None, help="markdown file for the tables (default: bench/results/)"
    )
    args = parser.parse_args(argv)

    out_dir = HERE / "out"
    out_dir.mkdir(exist_ok=True)
    json_path = out_dir / "benchmarks.json"
    pytest_args = [
        str(HERE),
        "-q",
        "-p",
        "no:cacheprovider",
        "-o",
        "python_files=bench_*.py",
        "--benchmark-only",
        "--benchmark-disable-gc",
        f"--benchmark-json={json_path}",
        "--benchmark-columns=median,iqr,rounds",
    ]
    if args.k:
        pytest_args += ["-k", args.k]
    code = pytest.main(pytest_args)
    if code != 0:
        return int(code)
    report = render(json_path)
    print("\n" + report)
    import torch

    device = "gpu" if torch.cuda.is_available() else "cpu"
    results = Path(args.results) if args.results else HERE / "results" / f"{device}.md"
    results.parent.mkdir(parents=True, exist_ok=True)
    results.write_text(report)
    print(f"tables written to {results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
