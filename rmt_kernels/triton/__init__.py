"""Triton kernels (CUDA backend of the ops), one file per kernel family.

Each kernel file holds private ``@triton.jit`` kernels and a plain launcher. The launchers work on
any device Triton runs on: CUDA, or the CPU under ``TRITON_INTERPRET=1`` (how CI tests them).
device.py holds the device implementations of the fused DP ops (torch code around the launchers)
and register.py registers every op's CUDA kernel; neither imports Triton until a kernel runs.
"""
