"""MPF prompt fusion: write per-layer prompt tokens into every (image, class) sequence (DESIGN.md §3).

``out`` equals ``seq`` except, for every image ``b`` and class ``c``,
``out[b, c, start:start+n_c] = ctx`` and
``out[b, c, start+n_c:start+n_c+n_s] = sigmoid(gate)[:, None] · cond[b]``.

The output (and in backward the gradient of ``seq``) is the only (B, C)-sized tensor either path
creates: the learned tokens are written by broadcasting, never expanded and concatenated. ``seq`` may
itself be a broadcast view (for example class-name embeddings expanded over the images with stride 0).
The Triton path lives in ``mugcp.kernels.fuse_prompts_triton`` and is imported on first use.
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
    """Plain PyTorch: one copy of ``seq`` and two broadcast slice writes; a matching hand-written backward."""
    return _FusePromptsReference.apply(seq, ctx, cond, gate, start)


class _FusePromptsReference(torch.autograd.Function):
    """Autograd through the slice writes would be right too, but its backward clones each prompt slice
    of the gradient (a B·C·n·D copy) before reducing it; this backward reduces the strided slices in
    place, so the only (B, C)-sized tensors are ``out`` and, when ``seq`` needs one, its gradient."""

    @staticmethod
    def forward(ctx_, seq, ctx, cond, gate, start):
        n_ctx, n_cond = ctx.shape[0], cond.shape[1]
        out = seq.clone(memory_format=torch.contiguous_format)
        out[:, :, start : start + n_ctx] = ctx
        weight = torch.sigmoid(_at_least_fp32(gate))
        out[:, :, start + n_ctx : start + n_ctx + n_cond] = (weight[:, None] * _at_least_fp32(cond))[:, None]
        ctx_.save_for_backward(cond, gate)
        ctx_.n_ctx, ctx_.start, ctx_.ctx_dtype = n_ctx, start, ctx.dtype
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx_, d_out):
        cond, gate = ctx_.saved_tensors
        n_ctx, start = ctx_.n_ctx, ctx_.start
        cond_start, cond_end = start + n_ctx, start + n_ctx + cond.shape[1]
        d_seq = None
        if ctx_.needs_input_grad[0]:
            d_seq = d_out.clone(memory_format=torch.contiguous_format)
            d_seq[:, :, start:cond_end] = 0
        accumulate = torch.promote_types(d_out.dtype, torch.float32)
        d_ctx = d_out[:, :, start:cond_start].sum(dim=(0, 1), dtype=accumulate)
        d_cond_unscaled = d_out[:, :, cond_start:cond_end].sum(dim=1, dtype=accumulate)
        weight = torch.sigmoid(_at_least_fp32(gate))
        d_cond = weight[:, None] * d_cond_unscaled
        d_gate = (d_cond_unscaled * _at_least_fp32(cond)).sum(dim=(0, 2)) * weight * (1 - weight)
        return d_seq, d_ctx.to(ctx_.ctx_dtype), d_cond.to(cond.dtype), d_gate.to(gate.dtype), None


def _at_least_fp32(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to(torch.promote_types(tensor.dtype, torch.float32))


def fuse_prompts_expand_concat(
    seq: torch.Tensor, ctx: torch.Tensor, cond: torch.Tensor, gate: torch.Tensor, start: int
) -> torch.Tensor:
    """The naive formulation — expand the prompt tokens to every sequence and concatenate. Not used
    by the library: it is the independent definition tests check against and the baseline the
    benchmarks compare with (it creates (B, C)-sized copies of every prompt token and their gradients)."""
    batch, n_classes = seq.shape[:2]
    n_ctx, n_cond = ctx.shape[0], cond.shape[1]
    weighted = torch.sigmoid(gate)[:, None] * cond
    return torch.cat(
        [
            seq[:, :, :start],
            ctx.to(seq.dtype).expand(batch, n_classes, n_ctx, ctx.shape[1]),
            weighted.to(seq.dtype)[:, None].expand(batch, n_classes, n_cond, cond.shape[2]),
            seq[:, :, start + n_ctx + n_cond :],
        ],
        dim=2,
    )


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
