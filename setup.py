"""Builds the C++ extension ``rmt_kernels._C`` (op schemas and CPU kernels).

Switches (environment variables):
  DEBUG=1    build with -O0 -g and assertions, for gdb and sanitizers.
  USE_CPP=0  skip the extension (the package then has no CPU kernels; for docs builds only).

Install torch first and build without build isolation (``pip install --no-build-isolation -e .``)
so the extension links against the torch that will import it; the Makefile does this.
"""

import glob
import os
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _extensions():
    if os.environ.get("USE_CPP", "1") == "0":
        return [], {}
    from torch.utils.cpp_extension import BuildExtension, CppExtension

    debug = os.environ.get("DEBUG", "0") == "1"
    sources = sorted(
        os.path.relpath(p, ROOT)
        for p in glob.glob(os.path.join(ROOT, "csrc", "**", "*.cpp"), recursive=True)
    )
    flags = ["-O0", "-g"] if debug else ["-O3", "-DNDEBUG"]
    # No errno from math functions: lets sqrt vectorise in the Philox noise loop (philox.cpp);
    # nothing here reads errno.
    flags.append("-fno-math-errno")
    # at::parallel_for is an inline `#pragma omp parallel` in OpenMP builds of torch: without
    # -fopenmp it silently runs on one thread. libgomp resolves to the copy torch has loaded
    # (same soname), so there is one OpenMP runtime in the process.
    link_args = []
    if sys.platform.startswith("linux"):
        flags.append("-fopenmp")
        link_args.append("-fopenmp")
    ext = CppExtension(
        name="rmt_kernels._C",
        sources=sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_compile_args={"cxx": [*flags, "-std=c++17", "-Wall", "-Wno-unused-function"]},
        extra_link_args=link_args,
    )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
