"""Triton kernels (CUDA backend of the ops), one file per kernel family.

Each file holds private ``@triton.jit`` kernels and a plain launcher. The launchers work on any
device Triton runs on: CUDA, or the CPU under ``TRITON_INTERPRET=1`` (how CI tests them).
"""
