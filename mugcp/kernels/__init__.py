"""Fused ops for prompt learning, each with a PyTorch reference and a Triton path behind one call.

``mugcp.kernels.set_backend("triton")`` (or ``MUGCP_KERNELS=triton``, or ``backend=`` per call) switches
every op; see :mod:`mugcp.kernels.backend`. Importing this package never imports Triton.
"""
from .attention import ATTENTION_BACKENDS, attention
from .backend import BACKENDS, KernelBackendError, get_backend, set_backend, use_backend
from .fuse_prompts import fuse_prompts
from .mutual_attention import mutual_attention

__all__ = [
    "ATTENTION_BACKENDS",
    "BACKENDS",
    "KernelBackendError",
    "attention",
    "fuse_prompts",
    "get_backend",
    "mutual_attention",
    "set_backend",
    "use_backend",
]
