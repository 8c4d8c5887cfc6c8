"""Test set-up: Triton kernels are interpreted on the CPU when no GPU is present, and every test
starts from the same seed."""

import os

import torch

if not torch.cuda.is_available():
    # Must be set before triton is first imported anywhere.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest


@pytest.fixture(autouse=True)
def _fixed_seed():
    torch.manual_seed(0)
