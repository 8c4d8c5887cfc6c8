import os

import pytest
import torch

# Triton kernels run on the CPU through the interpreter; it must be chosen before triton imports.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _fixed_seed():
    torch.manual_seed(0)
