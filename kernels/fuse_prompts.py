"""MPF prompt fusion: write per-layer prompt tokens into every (image, class) sequence (DESIGN.md §3).

``out`` equals ``seq`` except, for every image ``b`` and class ``c``,
``out[b, c, start:start+n_c] = ctx`` and
``out[b, c, start+n_c:start+n_c+n_s] = sigmoid(gate)[:, None] · cond[b]``.

The output is the only (B, C)-sized tensor either path creates: the learned tokens are written by
broadcasting, never expanded and concatenated. ``seq`` may itself be a broadcast view (for example
class-name embeddings expanded over the images with stride 0).
The Triton path lives in ``kernels.fuse_prompts_triton`` and is imported on first use.
"""
from __future__ import annotations

import torch

from .backend import resolve


def fuse_prompts(
    seq: torch.Tensor,
    ctx: torch.Tensor,
    cond: torch.Tensor,
    gate: torch.Tensor,
    start: int,
    backend: str | None = None,
) -> torch.Tensor:
    """seq (B, C, L, D), ctx (n_c, D), cond (B, n_s, D), gate (n_s,) pre-sigmoid -> out (B, C, L, D).

    ``backend`` is ``"reference"``, ``"triton"`` or ``None`` (the global choice).
    """
    check_fuse_prompts_inputs(seq, ctx, cond, gate, start)
    if resolve(backend, seq, ctx, cond, gate) == "triton":
        from .fuse_prompts_triton import fuse_prompts_triton

        return fuse_prompts_triton(seq, ctx, cond, gate, int(start))
    return fuse_prompts_reference(seq, ctx, cond, gate, int(start))


def fuse_prompts_reference(
    seq: torch.Tensor, ctx: torch.Tensor, cond: torch.Tensor, gate: torch.Tensor, start: int
) -> torch.Tensor:
    """Plain PyTorch: one copy of ``seq``, then two broadcast slice writes.

    Autograd through the slice writes gives exactly the gradients DESIGN asks for: ``seq`` gets the
    output gradient with the prompt positions zeroed, ``ctx`` its sum over all B·C sequences and
    ``cond`` its sum over the C classes.
    """
    n_ctx, n_cond = ctx.shape[0], cond.shape[1]
    out = seq.clone(memory_format=torch.contiguous_format)
    out[:, :, start : start + n_ctx] = ctx
    out[:, :, start + n_ctx : start + n_ctx + n_cond] = (torch.sigmoid(gate)[:, None] * cond)[:, None]
    return out


def check_fuse_prompts_inputs(
    seq: torch.Tensor, ctx: torch.Tensor, cond: torch.Tensor, gate: torch.Tensor, start: int
) -> None:
    named = {"seq": (seq, 4, "(B, C, L, D)"), "ctx": (ctx, 2, "(n_c, D)"), "cond": (cond, 3, "(B, n_s, D)"),
             "gate": (gate, 1, "(n_s,)")}
    for name, (tensor, dims, layout) in named.items():
        if not isinstance(tensor, torch.Tensor) or tensor.dim() != dims:
            shape = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
            raise ValueError(f"fuse_prompts: {name} must be a {dims}-D tensor {layout}, got {shape}")
    batch, _, length, dim = seq.shape
    n_ctx, n_cond = ctx.shape[0], cond.shape[1]
    if ctx.shape[1] != dim or tuple(cond.shape) != (batch, n_cond, dim) or gate.shape[0] != n_cond:
        raise ValueError(
            f"fuse_prompts: shapes do not fit seq {tuple(seq.shape)}: expected ctx (n_c, {dim}), "
            f"cond ({batch}, n_s, {dim}) and gate (n_s,), got ctx {tuple(ctx.shape)}, "
            f"cond {tuple(cond.shape)}, gate {tuple(gate.shape)}"
        )
    if int(start) != start or start < 0 or start + n_ctx + n_cond > length:
        raise ValueError(
            f"fuse_prompts: prompt positions start={start} .. {start}+{n_ctx}+{n_cond} do not fit in a "
            f"sequence of length {length}"
        )
    if len({t.device for t in (seq, ctx, cond, gate)}) != 1:
        raise ValueError(
            f"fuse_prompts: seq, ctx, cond, gate must be on one device, got {seq.device}, {ctx.device}, "
            f"{cond.device}, {gate.device}"
        )
    for name, (tensor, _, _) in named.items():
        if not tensor.is_floating_point():
            raise ValueError(f"fuse_prompts: {name} must be a floating-point tensor, got {tensor.dtype}")
