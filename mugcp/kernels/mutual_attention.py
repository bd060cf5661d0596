"""AMG mutual attention: one affinity between two token sets, softmaxed both ways (DESIGN.md §3).

With ``A = a·bᵀ·scale`` per (batch, head):

* ``oa = softmax(A, dim=-1) · vb`` — every ``a`` token attends over the ``Nb`` tokens of ``b``;
* ``ob = softmax(A, dim=-2)ᵀ · va`` — every ``b`` token attends over the ``Na`` tokens of ``a``.

``Nb`` (semantic tokens) is small and ``Na`` (visual tokens) large, so ``A`` is a tall, thin matrix.
The Triton path lives in ``mugcp.kernels.mutual_attention_triton`` and is imported on first use.
"""
from __future__ import annotations

import torch

from .backend import resolve


def mutual_attention(
    a: torch.Tensor,
    b: torch.Tensor,
    va: torch.Tensor,
    vb: torch.Tensor,
    scale: float | None = None,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Both attention directions of one shared affinity.

    a: (Bt, H, Na, D), b: (Bt, H, Nb, D), va: (Bt, H, Na, Dv), vb: (Bt, H, Nb, Dv).
    Returns ``(oa, ob)`` of shapes (Bt, H, Na, Dv) and (Bt, H, Nb, Dv). ``scale`` defaults to
    ``D ** -0.5``; ``backend`` is ``"reference"``, ``"triton"`` or ``None`` (the global choice).
    """
    check_mutual_attention_inputs(a, b, va, vb)
    scale = a.shape[-1] ** -0.5 if scale is None else float(scale)
    if resolve(backend, a, b, va, vb) == "triton":
        from .mutual_attention_triton import mutual_attention_triton

        return mutual_attention_triton(a, b, va, vb, scale)
    return mutual_attention_reference(a, b, va, vb, scale)


def mutual_attention_reference(
    a: torch.Tensor, b: torch.Tensor, va: torch.Tensor, vb: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain PyTorch. The only intermediates are (Na, Nb)-sized: the affinity and its two softmaxes."""
    # Scaling the small operand avoids a scaled copy of the large one.
    affinity = torch.matmul(a, (b * scale).transpose(-1, -2))
    oa = torch.matmul(torch.softmax(affinity, dim=-1), vb)
    ob = torch.matmul(torch.softmax(affinity, dim=-2).transpose(-1, -2), va)
    return oa, ob


def mutual_attention_weights(
    a: torch.Tensor, b: torch.Tensor, scale: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The two attention matrices of the reference path, for inspection (neither backend materialises them):
    ``(softmax(A, dim=-1), softmax(A, dim=-2))``, each (Bt, H, Na, Nb)."""
    scale = a.shape[-1] ** -0.5 if scale is None else float(scale)
    affinity = torch.matmul(a, (b * scale).transpose(-1, -2))
    return torch.softmax(affinity, dim=-1), torch.softmax(affinity, dim=-2)


def check_mutual_attention_inputs(a: torch.Tensor, b: torch.Tensor, va: torch.Tensor, vb: torch.Tensor) -> None:
    named = {"a": a, "b": b, "va": va, "vb": vb}
    for name, tensor in named.items():
        if not isinstance(tensor, torch.Tensor) or tensor.dim() != 4:
            shape = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
            raise ValueError(f"mutual_attention: {name} must be a 4-D tensor (Bt, H, N, D), got {shape}")
    bt, heads, n_a, dim = a.shape
    n_b = b.shape[2]
    value_dim = va.shape[3]
    expected = {
        "b": (bt, heads, n_b, dim),
        "va": (bt, heads, n_a, value_dim),
        "vb": (bt, heads, n_b, value_dim),
    }
    for name, shape in expected.items():
        if tuple(named[name].shape) != shape:
            raise ValueError(
                f"mutual_attention: {name} has shape {tuple(named[name].shape)}, expected {shape} "
                f"given a {tuple(a.shape)}, b {tuple(b.shape)} and va {tuple(va.shape)}"
            )
    if n_a == 0 or n_b == 0:
        raise ValueError(f"mutual_attention: both token sets need at least one token, got Na={n_a}, Nb={n_b}")
    if len({t.dtype for t in named.values()}) != 1 or len({t.device for t in named.values()}) != 1:
        found = ", ".join(f"{n}: {t.dtype} on {t.device}" for n, t in named.items())
        raise ValueError(f"mutual_attention: a, b, va, vb must share one dtype and device, got {found}")
