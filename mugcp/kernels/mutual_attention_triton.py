"""Triton implementation of :func:`mugcp.kernels.mutual_attention` (imported only when asked for).

Design. One program per (batch, head). Everything about ``b`` (``Nb`` ≤ 64 tokens) stays in
registers while the program walks over ``a`` in tiles of ``BLOCK_NA`` rows, in a single pass:

* the row softmax (over ``Nb``) is complete inside each tile, so ``oa`` rows and their
  log-sum-exp are written straight away;
* the column softmax (over all ``Na``) is an online softmax, exactly flash attention with ``b`` as
  the queries and ``a`` as the keys: a running column maximum and sum, and an ``ob`` accumulator
  rescaled whenever the maximum grows. ``ob`` and the column log-sum-exp are written at the end.

The affinity never reaches global memory; only the two log-sum-exps are saved for backward. A
single pass (rather than one loop for column statistics and a second for outputs) reads ``a`` and
``va`` once, at the price of one rescale of a (Nb, Dv) accumulator per tile.

The backward is one program per (batch, head) too: it recomputes each tile's affinity, rebuilds both
softmaxes from the saved log-sum-exps, writes ``d_a`` and ``d_va`` tile by tile, and accumulates
``d_b`` and ``d_vb`` (sums over ``Na``) in registers. Per program the parallelism is the number of
(batch, head) pairs, 384 at the ViT-B/16 shape, which fills a GPU; a split over ``Na`` would need a
cross-program reduction of the column statistics.

Head and value dims are padded to powers of two by masked loads (no copies). Dots accumulate in
fp32 whatever the input dtype; fp32 inputs use 3xTF32 dots (tensor cores, error near fp32's, where
plain TF32 would miss the 1e-4 tolerance against the reference). Block sizes follow a fixed rule
(``launch_config``), not autotuning, so every configuration can be compiled ahead of time.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .backend import interpreter_enabled

MAX_TOKENS_B = 64
MAX_HEAD_DIM = 128


@triton.jit
def _load_tile(pointers, mask, UPCAST_TILES: tl.constexpr):
    tile = tl.load(pointers, mask=mask, other=0.0)
    if UPCAST_TILES:
        tile = tile.to(tl.float32)
    return tile


@triton.jit
def _mutual_attention_forward_kernel(
    a_ptr, b_ptr, va_ptr, vb_ptr,
    oa_ptr, ob_ptr, lse_row_ptr, lse_col_ptr,
    stride_a_bt, stride_a_h, stride_a_n,
    stride_b_bt, stride_b_h, stride_b_n,
    stride_va_bt, stride_va_h, stride_va_n,
    stride_vb_bt, stride_vb_h, stride_vb_n,
    num_heads, n_a, n_b, head_dim, value_dim, scale,
    BLOCK_NA: tl.constexpr, BLOCK_NB: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, UPCAST_TILES: tl.constexpr,
):
    pid = tl.program_id(0)
    batch = (pid // num_heads).to(tl.int64)
    head = (pid % num_heads).to(tl.int64)
    a_ptr += batch * stride_a_bt + head * stride_a_h
    b_ptr += batch * stride_b_bt + head * stride_b_h
    va_ptr += batch * stride_va_bt + head * stride_va_h
    vb_ptr += batch * stride_vb_bt + head * stride_vb_h
    # Outputs are contiguous (Bt·H, N, Dv) and (Bt·H, N).
    oa_ptr += pid.to(tl.int64) * n_a * value_dim
    ob_ptr += pid.to(tl.int64) * n_b * value_dim
    lse_row_ptr += pid.to(tl.int64) * n_a
    lse_col_ptr += pid.to(tl.int64) * n_b

    offs_na = tl.arange(0, BLOCK_NA)
    offs_nb = tl.arange(0, BLOCK_NB)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    col_valid = offs_nb < n_b
    d_valid = offs_d < head_dim
    dv_valid = offs_dv < value_dim

    b = _load_tile(b_ptr + offs_nb[:, None] * stride_b_n + offs_d[None, :],
                   col_valid[:, None] & d_valid[None, :], UPCAST_TILES)
    vb = _load_tile(vb_ptr + offs_nb[:, None] * stride_vb_n + offs_dv[None, :],
                    col_valid[:, None] & dv_valid[None, :], UPCAST_TILES)

    col_max = tl.full([BLOCK_NB], float("-inf"), tl.float32)
    col_sum = tl.zeros([BLOCK_NB], tl.float32)
    ob_acc = tl.zeros([BLOCK_NB, BLOCK_DV], tl.float32)

    for row_start in range(0, n_a, BLOCK_NA):
        rows = row_start + offs_na
        row_valid = rows < n_a
        a = _load_tile(a_ptr + rows[:, None] * stride_a_n + offs_d[None, :],
                       row_valid[:, None] & d_valid[None, :], UPCAST_TILES)
        va = _load_tile(va_ptr + rows[:, None] * stride_va_n + offs_dv[None, :],
                        row_valid[:, None] & dv_valid[None, :], UPCAST_TILES)
        affinity = tl.dot(a, tl.trans(b), input_precision=INPUT_PRECISION) * scale

        # Rows: the whole softmax over Nb is in this tile.
        row_scores = tl.where(col_valid[None, :], affinity, float("-inf"))
        row_max = tl.max(row_scores, axis=1)
        row_probs = tl.exp(row_scores - row_max[:, None])
        row_sum = tl.sum(row_probs, axis=1)
        oa = tl.dot(row_probs.to(vb.dtype), vb, input_precision=INPUT_PRECISION) / row_sum[:, None]
        tl.store(oa_ptr + rows[:, None] * value_dim + offs_dv[None, :], oa.to(oa_ptr.dtype.element_ty),
                 mask=row_valid[:, None] & dv_valid[None, :])
        tl.store(lse_row_ptr + rows, row_max + tl.log(row_sum), mask=row_valid)

        # Columns: online softmax over the tiles of a.
        col_scores = tl.where(row_valid[:, None], affinity, float("-inf"))
        new_max = tl.maximum(col_max, tl.max(col_scores, axis=0))
        rescale = tl.exp(col_max - new_max)
        col_probs = tl.exp(col_scores - new_max[None, :])
        col_sum = col_sum * rescale + tl.sum(col_probs, axis=0)
        ob_acc = ob_acc * rescale[:, None] + tl.dot(
            tl.trans(col_probs).to(va.dtype), va, input_precision=INPUT_PRECISION)
        col_max = new_max

    ob = ob_acc / col_sum[:, None]
    tl.store(ob_ptr + offs_nb[:, None] * value_dim + offs_dv[None, :], ob.to(ob_ptr.dtype.element_ty),
             mask=col_valid[:, None] & dv_valid[None, :])
    tl.store(lse_col_ptr + offs_nb, col_max + tl.log(col_sum), mask=col_valid)


@triton.jit
def _mutual_attention_backward_kernel(
    a_ptr, b_ptr, va_ptr, vb_ptr, ob_ptr, d_oa_ptr, d_ob_ptr, lse_row_ptr, lse_col_ptr,
    d_a_ptr, d_b_ptr, d_va_ptr, d_vb_ptr,
    stride_a_bt, stride_a_h, stride_a_n,
    stride_b_bt, stride_b_h, stride_b_n,
    stride_va_bt, stride_va_h, stride_va_n,
    stride_vb_bt, stride_vb_h, stride_vb_n,
    stride_doa_bt, stride_doa_h, stride_doa_n,
    stride_dob_bt, stride_dob_h, stride_dob_n,
    num_heads, n_a, n_b, head_dim, value_dim, scale,
    BLOCK_NA: tl.constexpr, BLOCK_NB: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, UPCAST_TILES: tl.constexpr,
):
    pid = tl.program_id(0)
    batch = (pid // num_heads).to(tl.int64)
    head = (pid % num_heads).to(tl.int64)
    a_ptr += batch * stride_a_bt + head * stride_a_h
    b_ptr += batch * stride_b_bt + head * stride_b_h
    va_ptr += batch * stride_va_bt + head * stride_va_h
    vb_ptr += batch * stride_vb_bt + head * stride_vb_h
    d_oa_ptr += batch * stride_doa_bt + head * stride_doa_h
    d_ob_ptr += batch * stride_dob_bt + head * stride_dob_h
    # ob, the log-sum-exps and all gradients are contiguous.
    ob_ptr += pid.to(tl.int64) * n_b * value_dim
    lse_row_ptr += pid.to(tl.int64) * n_a
    lse_col_ptr += pid.to(tl.int64) * n_b
    d_a_ptr += pid.to(tl.int64) * n_a * head_dim
    d_b_ptr += pid.to(tl.int64) * n_b * head_dim
    d_va_ptr += pid.to(tl.int64) * n_a * value_dim
    d_vb_ptr += pid.to(tl.int64) * n_b * value_dim

    offs_na = tl.arange(0, BLOCK_NA)
    offs_nb = tl.arange(0, BLOCK_NB)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    col_valid = offs_nb < n_b
    d_valid = offs_d < head_dim
    dv_valid = offs_dv < value_dim
    b_mask = col_valid[:, None] & d_valid[None, :]
    vb_mask = col_valid[:, None] & dv_valid[None, :]

    b = _load_tile(b_ptr + offs_nb[:, None] * stride_b_n + offs_d[None, :], b_mask, UPCAST_TILES)
    vb = _load_tile(vb_ptr + offs_nb[:, None] * stride_vb_n + offs_dv[None, :], vb_mask, UPCAST_TILES)
    d_ob = _load_tile(d_ob_ptr + offs_nb[:, None] * stride_dob_n + offs_dv[None, :], vb_mask, UPCAST_TILES)
    ob = _load_tile(ob_ptr + offs_nb[:, None] * value_dim + offs_dv[None, :], vb_mask, UPCAST_TILES)
    lse_col = tl.load(lse_col_ptr + offs_nb, mask=col_valid, other=0.0)
    # Σ_k P_col[k, j]·dP_col[k, j] equals ob_j · d_ob_j, so it needs no pass over Na.
    col_delta = tl.sum(ob.to(tl.float32) * d_ob.to(tl.float32), axis=1)

    d_b_acc = tl.zeros([BLOCK_NB, BLOCK_D], tl.float32)
    d_vb_acc = tl.zeros([BLOCK_NB, BLOCK_DV], tl.float32)

    for row_start in range(0, n_a, BLOCK_NA):
        rows = row_start + offs_na
        row_valid = rows < n_a
        a_mask = row_valid[:, None] & d_valid[None, :]
        va_mask = row_valid[:, None] & dv_valid[None, :]
        a = _load_tile(a_ptr + rows[:, None] * stride_a_n + offs_d[None, :], a_mask, UPCAST_TILES)
        va = _load_tile(va_ptr + rows[:, None] * stride_va_n + offs_dv[None, :], va_mask, UPCAST_TILES)
        d_oa = _load_tile(d_oa_ptr + rows[:, None] * stride_doa_n + offs_dv[None, :], va_mask, UPCAST_TILES)
        lse_row = tl.load(lse_row_ptr + rows, mask=row_valid, other=0.0)

        affinity = tl.dot(a, tl.trans(b), input_precision=INPUT_PRECISION) * scale
        both_valid = row_valid[:, None] & col_valid[None, :]
        row_probs = tl.where(both_valid, tl.exp(affinity - lse_row[:, None]), 0.0)
        col_probs = tl.where(both_valid, tl.exp(affinity - lse_col[None, :]), 0.0)

        d_vb_acc += tl.dot(tl.trans(row_probs).to(d_oa.dtype), d_oa, input_precision=INPUT_PRECISION)
        d_va = tl.dot(col_probs.to(d_ob.dtype), d_ob, input_precision=INPUT_PRECISION)
        tl.store(d_va_ptr + rows[:, None] * value_dim + offs_dv[None, :], d_va.to(d_va_ptr.dtype.element_ty),
                 mask=va_mask)

        d_row_probs = tl.dot(d_oa, tl.trans(vb), input_precision=INPUT_PRECISION)
        d_col_probs = tl.dot(va, tl.trans(d_ob), input_precision=INPUT_PRECISION)
        row_delta = tl.sum(row_probs * d_row_probs, axis=1)
        d_affinity = (row_probs * (d_row_probs - row_delta[:, None])
                      + col_probs * (d_col_probs - col_delta[None, :])) * scale

        d_a = tl.dot(d_affinity.to(b.dtype), b, input_precision=INPUT_PRECISION)
        tl.store(d_a_ptr + rows[:, None] * head_dim + offs_d[None, :], d_a.to(d_a_ptr.dtype.element_ty),
                 mask=a_mask)
        d_b_acc += tl.dot(tl.trans(d_affinity).to(a.dtype), a, input_precision=INPUT_PRECISION)

    tl.store(d_b_ptr + offs_nb[:, None] * head_dim + offs_d[None, :], d_b_acc.to(d_b_ptr.dtype.element_ty),
             mask=b_mask)
    tl.store(d_vb_ptr + offs_nb[:, None] * value_dim + offs_dv[None, :], d_vb_acc.to(d_vb_ptr.dtype.element_ty),
             mask=vb_mask)


@dataclass(frozen=True)
class LaunchConfig:
    """Compile-time shape of one launch: the block sizes and the warp and pipeline counts."""

    BLOCK_NA: int
    BLOCK_NB: int
    BLOCK_D: int
    BLOCK_DV: int
    INPUT_PRECISION: str
    UPCAST_TILES: bool
    num_warps: int
    num_stages: int

    def constexprs(self) -> dict[str, object]:
        return {
            "BLOCK_NA": self.BLOCK_NA,
            "BLOCK_NB": self.BLOCK_NB,
            "BLOCK_D": self.BLOCK_D,
            "BLOCK_DV": self.BLOCK_DV,
            "INPUT_PRECISION": self.INPUT_PRECISION,
            "UPCAST_TILES": self.UPCAST_TILES,
        }


def _padded(size: int, minimum: int) -> int:
    return max(minimum, triton.next_power_of_2(size))


def launch_config(
    n_b: int, head_dim: int, value_dim: int, dtype: torch.dtype, interpreted: bool | None = None
) -> LaunchConfig:
    """The one configuration the launcher uses for these sizes (fixed by rule, no autotuning).

    ``interpreted`` (default: whether ``TRITON_INTERPRET=1``) selects the interpreter's variant.
    """
    if not 1 <= n_b <= MAX_TOKENS_B:
        raise ValueError(
            f"mutual_attention (triton): Nb={n_b} is outside 1..{MAX_TOKENS_B}; the kernel keeps all of b in "
            "registers. Use backend='reference' for more b tokens."
        )
    for name, size in (("head dim D", head_dim), ("value dim Dv", value_dim)):
        if size > MAX_HEAD_DIM:
            raise ValueError(
                f"mutual_attention (triton): {name}={size} exceeds {MAX_HEAD_DIM}; use backend='reference'."
            )
    # tl.dot needs blocks of at least 16; feature dims below 32 are rare enough that padding them to
    # 32 is worth having one configuration fewer to build and check ahead of time.
    block_nb, block_d, block_dv = _padded(n_b, 16), _padded(head_dim, 32), _padded(value_dim, 32)
    # The backward holds four (BLOCK_NA, D)-sized tiles and two (Nb, D) accumulators: halve the row
    # tile when both the head dim and b are wide, to stay clear of register spills.
    block_na = 32 if block_nb * max(block_d, block_dv) >= 64 * 128 else 64
    num_warps = 8 if max(block_d, block_dv) >= 128 else 4
    # The Triton interpreter computes bf16 dots on the raw bit patterns (triton-lang/triton#11584,
    # "not supported yet"), so interpreted bf16 runs load tiles as fp32. Compiled kernels never do.
    if interpreted is None:
        interpreted = interpreter_enabled()
    upcast = dtype == torch.bfloat16 and interpreted
    precision = "tf32x3" if dtype == torch.float32 else "tf32"
    return LaunchConfig(block_na, block_nb, block_d, block_dv, precision, upcast, num_warps, num_stages=2)


SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _kernel_operand(tensor: torch.Tensor) -> torch.Tensor:
    # Kernels take any strides for the three leading dims but need unit stride along features.
    return tensor if tensor.stride(-1) == 1 else tensor.contiguous()


def _leading_strides(tensor: torch.Tensor) -> tuple[int, int, int]:
    return tensor.stride(0), tensor.stride(1), tensor.stride(2)


def forward_launch(a, b, va, vb, scale, interpreted=None):
    """(grid, positional args, config, outputs) of one forward launch; ``mugcp.kernels.aot`` uses it too."""
    bt, heads, n_a, head_dim = a.shape
    n_b, value_dim = b.shape[2], va.shape[3]
    config = launch_config(n_b, head_dim, value_dim, a.dtype, interpreted)
    oa = torch.empty((bt, heads, n_a, value_dim), dtype=a.dtype, device=a.device)
    ob = torch.empty((bt, heads, n_b, value_dim), dtype=a.dtype, device=a.device)
    lse_row = torch.empty((bt, heads, n_a), dtype=torch.float32, device=a.device)
    lse_col = torch.empty((bt, heads, n_b), dtype=torch.float32, device=a.device)
    args = (
        a, b, va, vb, oa, ob, lse_row, lse_col,
        *_leading_strides(a), *_leading_strides(b), *_leading_strides(va), *_leading_strides(vb),
        heads, n_a, n_b, head_dim, value_dim, scale,
    )
    return (bt * heads,), args, config, (oa, ob, lse_row, lse_col)


def backward_launch(a, b, va, vb, ob, d_oa, d_ob, lse_row, lse_col, scale, interpreted=None):
    bt, heads, n_a, head_dim = a.shape
    n_b, value_dim = b.shape[2], va.shape[3]
    config = launch_config(n_b, head_dim, value_dim, a.dtype, interpreted)
    grads = tuple(torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in (a, b, va, vb))
    args = (
        a, b, va, vb, ob, d_oa, d_ob, lse_row, lse_col, *grads,
        *_leading_strides(a), *_leading_strides(b), *_leading_strides(va), *_leading_strides(vb),
        *_leading_strides(d_oa), *_leading_strides(d_ob),
        heads, n_a, n_b, head_dim, value_dim, scale,
    )
    return (bt * heads,), args, config, grads


def _launch(kernel, grid, args, config: LaunchConfig) -> None:
    kernel[grid](*args, **config.constexprs(), num_warps=config.num_warps, num_stages=config.num_stages)


class MutualAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b, va, vb, scale):
        a, b, va, vb = (_kernel_operand(t) for t in (a, b, va, vb))
        grid, args, config, (oa, ob, lse_row, lse_col) = forward_launch(a, b, va, vb, scale)
        _launch(_mutual_attention_forward_kernel, grid, args, config)
        ctx.save_for_backward(a, b, va, vb, ob, lse_row, lse_col)
        ctx.scale = scale
        return oa, ob

    @staticmethod
    def backward(ctx, d_oa, d_ob):
        a, b, va, vb, ob, lse_row, lse_col = ctx.saved_tensors
        d_oa, d_ob = _kernel_operand(d_oa.to(a.dtype)), _kernel_operand(d_ob.to(a.dtype))
        grid, args, config, grads = backward_launch(a, b, va, vb, ob, d_oa, d_ob, lse_row, lse_col, ctx.scale)
        _launch(_mutual_attention_backward_kernel, grid, args, config)
        return (*grads, None)


def mutual_attention_triton(a, b, va, vb, scale: float):
    if a.dtype not in SUPPORTED_DTYPES:
        raise ValueError(
            f"mutual_attention (triton): dtype {a.dtype} is not supported; use one of "
            f"{', '.join(str(d) for d in SUPPORTED_DTYPES)} or backend='reference'"
        )
    return MutualAttentionFunction.apply(a, b, va, vb, scale)
