"""Multi-head attention for the CLIP transformer blocks, with interchangeable backends.

``attention(q, k, v, causal, backend)`` takes ``(N, H, L, Dh)`` tensors. Backends:
``naive`` (explicit softmax; the readable reference), ``sdpa`` (torch's fused kernel; the default),
``flash_attn`` and ``xformers`` (optional extras, CUDA only). All compute the same function; the
choice is about speed and memory.
"""
from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F

from .errors import KernelError

ATTENTION_BACKENDS = ("naive", "sdpa", "flash_attn", "xformers")


class AttentionBackendError(KernelError, RuntimeError):
    """An unknown attention backend, or one that is not installed or cannot run on these tensors."""


def _naive(q, k, v, causal: bool):
    scores = torch.matmul(q, k.transpose(-1, -2)) * (q.shape[-1] ** -0.5)
    if causal:
        length = q.shape[-2]
        future = torch.ones(length, length, dtype=torch.bool, device=q.device).triu(1)
        scores = scores.masked_fill(future, float("-inf"))
    return torch.matmul(scores.softmax(dim=-1), v)


def _sdpa(q, k, v, causal: bool):
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal)


def _flash_attn(q, k, v, causal: bool):
    from flash_attn import flash_attn_func

    # flash-attn wants (N, L, H, Dh) in half precision.
    dtype = q.dtype if q.dtype in (torch.float16, torch.bfloat16) else torch.bfloat16
    out = flash_attn_func(*(t.transpose(1, 2).to(dtype) for t in (q, k, v)), causal=causal)
    return out.transpose(1, 2).to(q.dtype)


def _xformers(q, k, v, causal: bool):
    import xformers.ops as xops

    bias = xops.LowerTriangularMask() if causal else None
    out = xops.memory_efficient_attention(*(t.transpose(1, 2) for t in (q, k, v)), attn_bias=bias)
    return out.transpose(1, 2)


_IMPLEMENTATIONS = {"naive": _naive, "sdpa": _sdpa, "flash_attn": _flash_attn, "xformers": _xformers}


def check_attention_backend(backend: str, device: torch.device | str | None = None) -> None:
    """Raise a clear error when ``backend`` cannot run on ``device``."""
    if backend not in ATTENTION_BACKENDS:
        raise AttentionBackendError(
            f"unknown attention backend '{backend}'; choose one of {', '.join(ATTENTION_BACKENDS)} "
            "(config key model.attention)."
        )
    if backend in ("flash_attn", "xformers"):
        package = backend
        if importlib.util.find_spec(package) is None:
            raise AttentionBackendError(
                f"attention backend '{backend}' needs the optional package '{package}', which is not installed: "
                "pip install -e '.[gpu]' on a CUDA machine, or set model.attention=sdpa."
            )
        if device is not None and torch.device(device).type != "cuda":
            raise AttentionBackendError(
                f"attention backend '{backend}' runs only on CUDA, but the model is on {device}; "
                "set model.attention=sdpa."
            )


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False, backend: str = "sdpa"):
    """Scaled dot-product attention over ``(N, H, L, Dh)`` tensors, scale ``Dh**-0.5``."""
    implementation = _IMPLEMENTATIONS.get(backend)
    if implementation is None:
        check_attention_backend(backend)
    if backend in ("flash_attn", "xformers"):
        check_attention_backend(backend, q.device)
    return implementation(q, k, v, causal)
