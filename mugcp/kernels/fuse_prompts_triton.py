"""Triton implementation of :func:`mugcp.kernels.fuse_prompts` (imported only when asked for).

Design. The grid is (image b, chunk of classes, tile of D). A program builds the prompt rows of
image ``b`` once — ``ctx`` and ``sigmoid(gate)·cond[b]`` for its D tile — and reuses them for every
class of its chunk, so the learned tokens are read once per program rather than once per sequence.
The non-prompt rows are streamed from ``seq`` to ``out`` tile by tile (prompt rows are never read
from ``seq``). ``seq`` may be a view expanded over the images (stride 0), which is how class-name
embeddings arrive.

The backward mirrors it: each program streams its sequences' gradient once, writing ``d_seq`` with
the prompt rows zeroed (only when ``seq`` needs a gradient) and summing the prompt rows over its
classes in fp32 registers. Those per-chunk sums (B × chunks × (n_c+n_s) × D, tiny next to the
sequences) are reduced in the launcher: over chunks and images for ``d_ctx``, over chunks for
``d_cond``, and through the sigmoid for ``d_gate``. Chunks are sized so the grid has about
``TARGET_PROGRAMS`` programs, enough to fill a large GPU.

``ctx``, ``cond`` and ``gate`` enter the kernels in fp32 (they are tiny), so there is one kernel
variant per ``seq`` dtype and the prompt values are computed in fp32 as in the reference.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

TARGET_PROGRAMS = 1024
MAX_PROMPT_TOKENS = 128
# Rows of a sequence streamed per step; text sequences (after truncation) are a few steps long.
ROWS_PER_STEP = 16


@triton.jit
def _prompt_rows(ctx_ptr, cond_ptr, gate_ptr, batch, offs_p, offs_d, dim, n_ctx, n_cond, stride_cond_b,
                 stride_cond_n):
    """The prompt tokens of one image for one D tile, in fp32: ctx rows, then sigmoid(gate)·cond rows."""
    d_valid = offs_d < dim
    is_ctx = offs_p < n_ctx
    cond_index = offs_p - n_ctx
    is_cond = (offs_p >= n_ctx) & (cond_index < n_cond)
    ctx_rows = tl.load(ctx_ptr + offs_p[:, None] * dim + offs_d[None, :],
                       mask=is_ctx[:, None] & d_valid[None, :], other=0.0).to(tl.float32)
    cond_rows = tl.load(cond_ptr + batch * stride_cond_b + cond_index[:, None] * stride_cond_n + offs_d[None, :],
                        mask=is_cond[:, None] & d_valid[None, :], other=0.0).to(tl.float32)
    gate = tl.load(gate_ptr + cond_index, mask=is_cond, other=0.0).to(tl.float32)
    return tl.where(is_ctx[:, None], ctx_rows, tl.sigmoid(gate)[:, None] * cond_rows)


@triton.jit
def _fuse_prompts_forward_kernel(
    seq_ptr, ctx_ptr, cond_ptr, gate_ptr, out_ptr,
    stride_seq_b, stride_seq_c, stride_seq_l,
    stride_cond_b, stride_cond_n,
    n_classes, length, dim, start, n_ctx, n_cond, classes_per_program,
    BLOCK_L: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr,
):
    batch = tl.program_id(0).to(tl.int64)
    first_class = tl.program_id(1).to(tl.int64) * classes_per_program
    offs_d = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_l = tl.arange(0, BLOCK_L)
    offs_p = tl.arange(0, BLOCK_P)
    d_valid = offs_d < dim
    n_prompt = n_ctx + n_cond
    prompt_mask = (offs_p < n_prompt)[:, None] & d_valid[None, :]

    prompt = _prompt_rows(ctx_ptr, cond_ptr, gate_ptr, batch, offs_p, offs_d, dim, n_ctx, n_cond,
                          stride_cond_b, stride_cond_n).to(out_ptr.dtype.element_ty)

    last_class = tl.minimum(first_class + classes_per_program, n_classes)
    for cls in range(first_class, last_class):
        sequence = batch * n_classes + cls
        seq_row0 = seq_ptr + batch * stride_seq_b + cls * stride_seq_c
        out_row0 = out_ptr + sequence * length * dim
        for row_start in range(0, length, BLOCK_L):
            rows = row_start + offs_l
            copied = (rows < length) & ((rows < start) | (rows >= start + n_prompt))
            mask = copied[:, None] & d_valid[None, :]
            tokens = tl.load(seq_row0 + rows[:, None] * stride_seq_l + offs_d[None, :], mask=mask)
            tl.store(out_row0 + rows[:, None] * dim + offs_d[None, :], tokens.to(out_ptr.dtype.element_ty),
                     mask=mask)
        tl.store(out_row0 + (start + offs_p)[:, None] * dim + offs_d[None, :], prompt, mask=prompt_mask)


@triton.jit
def _fuse_prompts_backward_kernel(
    d_out_ptr, d_seq_ptr, prompt_sums_ptr,
    stride_dout_b, stride_dout_c, stride_dout_l,
    n_classes, length, dim, start, n_ctx, n_cond, classes_per_program, n_chunks,
    BLOCK_L: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr, WRITE_D_SEQ: tl.constexpr,
):
    batch = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    first_class = chunk.to(tl.int64) * classes_per_program
    offs_d = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_l = tl.arange(0, BLOCK_L)
    offs_p = tl.arange(0, BLOCK_P)
    d_valid = offs_d < dim
    n_prompt = n_ctx + n_cond
    prompt_mask = (offs_p < n_prompt)[:, None] & d_valid[None, :]

    prompt_sum = tl.zeros([BLOCK_P, BLOCK_D], tl.float32)
    last_class = tl.minimum(first_class + classes_per_program, n_classes)
    for cls in range(first_class, last_class):
        d_out_row0 = d_out_ptr + batch * stride_dout_b + cls * stride_dout_c
        prompt_sum += tl.load(d_out_row0 + (start + offs_p)[:, None] * stride_dout_l + offs_d[None, :],
                              mask=prompt_mask, other=0.0).to(tl.float32)
        if WRITE_D_SEQ:
            d_seq_row0 = d_seq_ptr + (batch * n_classes + cls) * length * dim
            for row_start in range(0, length, BLOCK_L):
                rows = row_start + offs_l
                in_prompt = (rows >= start) & (rows < start + n_prompt)
                mask = (rows < length)[:, None] & d_valid[None, :]
                grad = tl.load(d_out_row0 + rows[:, None] * stride_dout_l + offs_d[None, :],
                               mask=mask & ~in_prompt[:, None], other=0.0)
                tl.store(d_seq_row0 + rows[:, None] * dim + offs_d[None, :],
                         grad.to(d_seq_ptr.dtype.element_ty), mask=mask)

    # prompt_sums is (B, n_chunks, n_prompt, D), fp32.
    sums_row0 = prompt_sums_ptr + (batch * n_chunks + chunk) * n_prompt * dim
    tl.store(sums_row0 + offs_p[:, None] * dim + offs_d[None, :], prompt_sum, mask=prompt_mask)


@dataclass(frozen=True)
class LaunchConfig:
    """Compile-time shape of one launch and the runtime split of classes over programs."""

    BLOCK_L: int
    BLOCK_P: int
    BLOCK_D: int
    num_warps: int
    classes_per_program: int
    n_chunks: int

    def constexprs(self) -> dict[str, int]:
        return {"BLOCK_L": self.BLOCK_L, "BLOCK_P": self.BLOCK_P, "BLOCK_D": self.BLOCK_D}


def launch_config(batch: int, n_classes: int, length: int, dim: int, n_prompt: int) -> LaunchConfig:
    """The configuration the launcher uses for these sizes (fixed by rule, no autotuning).

    The compile-time blocks take few values — ``BLOCK_P`` in 8..128 and ``BLOCK_D`` in 16..128 with
    ``BLOCK_P·BLOCK_D ≤ 4096`` (the fp32 prompt accumulator's register budget) — so every variant
    can be compiled ahead of time (see ``mugcp.kernels.aot``).
    """
    if not 1 <= n_prompt <= MAX_PROMPT_TOKENS:
        raise ValueError(
            f"fuse_prompts (triton): {n_prompt} prompt tokens is outside 1..{MAX_PROMPT_TOKENS}, the most the "
            "kernel keeps in registers; use backend='reference'."
        )
    block_p = max(8, triton.next_power_of_2(n_prompt))
    block_d = max(16, min(triton.next_power_of_2(dim), 128, 4096 // block_p))
    d_tiles = triton.cdiv(dim, block_d)
    wanted_chunks = min(n_classes, triton.cdiv(TARGET_PROGRAMS, batch * d_tiles))
    classes_per_program = triton.cdiv(n_classes, wanted_chunks)
    n_chunks = triton.cdiv(n_classes, classes_per_program)
    return LaunchConfig(ROWS_PER_STEP, block_p, block_d, 4, classes_per_program, n_chunks)


def _kernel_operand(tensor: torch.Tensor) -> torch.Tensor:
    # Leading dims may have any strides (stride 0 included); features must be unit-stride.
    return tensor if tensor.stride(-1) == 1 else tensor.contiguous()


def _grid(batch: int, dim: int, config: LaunchConfig) -> tuple[int, int, int]:
    return batch, config.n_chunks, triton.cdiv(dim, config.BLOCK_D)


def forward_launch(seq, ctx, cond, gate, start):
    """(grid, positional args, config, out) of one forward launch; ``mugcp.kernels.aot`` uses it too."""
    batch, n_classes, length, dim = seq.shape
    n_ctx, n_cond = ctx.shape[0], cond.shape[1]
    config = launch_config(batch, n_classes, length, dim, n_ctx + n_cond)
    out = torch.empty(seq.shape, dtype=seq.dtype, device=seq.device)
    args = (
        seq, ctx, cond, gate, out,
        seq.stride(0), seq.stride(1), seq.stride(2),
        cond.stride(0), cond.stride(1),
        n_classes, length, dim, start, n_ctx, n_cond, config.classes_per_program,
    )
    return _grid(batch, dim, config), args, config, out


def backward_launch(d_out, seq_shape, seq_dtype, n_ctx, n_cond, start, write_d_seq: bool):
    batch, n_classes, length, dim = seq_shape
    config = launch_config(batch, n_classes, length, dim, n_ctx + n_cond)
    d_seq = torch.empty(seq_shape, dtype=seq_dtype, device=d_out.device) if write_d_seq else None
    prompt_sums = torch.empty((batch, config.n_chunks, n_ctx + n_cond, dim), dtype=torch.float32,
                              device=d_out.device)
    args = (
        # Without a d_seq the kernel never touches that pointer (WRITE_D_SEQ=False); any tensor will do.
        d_out, d_seq if write_d_seq else prompt_sums, prompt_sums,
        d_out.stride(0), d_out.stride(1), d_out.stride(2),
        n_classes, length, dim, start, n_ctx, n_cond, config.classes_per_program, config.n_chunks,
    )
    return _grid(batch, dim, config), args, config, d_seq, prompt_sums


class FusePromptsFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx_, seq, ctx, cond, gate, start):
        ctx_dtype, cond_dtype, gate_dtype = ctx.dtype, cond.dtype, gate.dtype
        seq = _kernel_operand(seq)
        # The learned tokens are tiny: taking them in fp32 keeps one kernel variant per seq dtype and
        # computes sigmoid(gate)·cond in fp32, as the reference does.
        ctx, cond, gate = (t.float().contiguous() for t in (ctx, cond, gate))
        grid, args, config, out = forward_launch(seq, ctx, cond, gate, start)
        _fuse_prompts_forward_kernel[grid](*args, **config.constexprs(), num_warps=config.num_warps)
        ctx_.save_for_backward(cond, gate)
        ctx_.n_ctx, ctx_.start = ctx.shape[0], start
        ctx_.param_dtypes = (ctx_dtype, cond_dtype, gate_dtype)
        ctx_.seq_shape, ctx_.seq_dtype = seq.shape, seq.dtype
        return out

    @staticmethod
    def backward(ctx_, d_out):
        cond, gate = ctx_.saved_tensors
        n_ctx, n_cond = ctx_.n_ctx, cond.shape[1]
        ctx_dtype, cond_dtype, gate_dtype = ctx_.param_dtypes
        write_d_seq = ctx_.needs_input_grad[0]
        grid, args, config, d_seq, prompt_sums = backward_launch(
            _kernel_operand(d_out), ctx_.seq_shape, ctx_.seq_dtype, n_ctx, n_cond, ctx_.start, write_d_seq)
        _fuse_prompts_backward_kernel[grid](*args, **config.constexprs(), WRITE_D_SEQ=write_d_seq,
                                            num_warps=config.num_warps)
        per_image = prompt_sums.sum(dim=1)  # (B, n_c + n_s, D): summed over classes
        d_ctx = per_image[:, :n_ctx].sum(dim=0)
        d_cond_unscaled = per_image[:, n_ctx:]
        weight = torch.sigmoid(gate)
        d_cond = weight[:, None] * d_cond_unscaled
        d_gate = (d_cond_unscaled * cond).sum(dim=(0, 2)) * weight * (1 - weight)
        return d_seq, d_ctx.to(ctx_dtype), d_cond.to(cond_dtype), d_gate.to(gate_dtype), None


SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def fuse_prompts_triton(seq, ctx, cond, gate, start: int):
    if seq.dtype not in SUPPORTED_DTYPES:
        raise ValueError(
            f"fuse_prompts (triton): seq dtype {seq.dtype} is not supported; use one of "
            f"{', '.join(str(d) for d in SUPPORTED_DTYPES)} or backend='reference'"
        )
    return FusePromptsFunction.apply(seq, ctx, cond, gate, start)
