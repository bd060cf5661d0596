"""Where the kernel tests run Triton: its interpreter on CPU machines (the default, set in
conftest.py before triton is imported), or the GPU with TRITON_INTERPRET=0 on a CUDA machine."""
import importlib.util
import os

import pytest
import torch

os.environ.setdefault("TRITON_INTERPRET", "1")

INTERPRETED = os.environ["TRITON_INTERPRET"] == "1"
DEVICE = "cpu" if INTERPRETED or not torch.cuda.is_available() else "cuda"
needs_triton = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None or (not INTERPRETED and not torch.cuda.is_available()),
    reason="Triton needs CUDA or TRITON_INTERPRET=1",
)
