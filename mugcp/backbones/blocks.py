"""Block-level primitives of the prompted CLIP towers, shared by the plain and the bucketed text paths.

``ClipBackbone`` (clip.py) and the bucketed text path (text_buckets.py) both build on these: one
residual block with the attention core swapped for ``mugcp.kernels.attention``, writing prompt tokens into a
layer's input, running a stack of blocks with per-layer prompts, and the output projections.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from mugcp.kernels.attention import attention

# A layer hook gets (layer index, token sequence entering that layer) and returns the sequence to use.
LayerHook = Callable[[int, torch.Tensor], torch.Tensor]
DeepPrompts = Optional[Union[Sequence[torch.Tensor], LayerHook]]
# Text embeddings: a tensor (N, L, width), or a builder (token rows, length) -> (n * len(rows), length, width).
TextEmbeddings = Optional[Union[torch.Tensor, Callable[[torch.Tensor, int], torch.Tensor]]]
# One residual block applied to a sequence: (block module, x, causal[, adapter]) -> x.
BlockFn = Callable[..., torch.Tensor]
# A residual adapter beside one block: the block's ``ln_1`` output -> a term added to the block's output.
# It must act on every token on its own (the EOT-only last text block passes just the EOT rows).
Adapter = Callable[[torch.Tensor], torch.Tensor]
# Per-layer adapters: entry j (None: none) runs beside block j; layers past the end have none.
LayerAdapters = Optional[Sequence[Optional[Adapter]]]


def layer_adapter(adapters: LayerAdapters, index: int) -> Optional[Adapter]:
    return adapters[index] if adapters is not None and index < len(adapters) else None


def project(x: torch.Tensor, proj) -> torch.Tensor:
    """open_clip keeps a tower's output projection as a matrix or as an ``nn.Linear``; None means none."""
    if proj is None:
        return x
    return proj(x) if isinstance(proj, nn.Linear) else x @ proj


def insert_prompts(x: torch.Tensor, prompts: torch.Tensor, appended: bool, replace_at: int | None) -> torch.Tensor:
    """Write ``prompts`` ``(…, P, width)`` into the sequence ``x``.

    Text (``replace_at`` set): they overwrite the P placeholder positions from ``replace_at``. Vision:
    the first prompted layer appends them after the patch tokens, later ones replace those last P.
    """
    count = prompts.shape[-2]
    prompts = prompts.to(x.dtype).expand(x.shape[0], count, x.shape[-1])
    if replace_at is not None:
        return torch.cat([x[:, :replace_at], prompts, x[:, replace_at + count:]], dim=1)
    if not appended:
        return torch.cat([x, prompts], dim=1)
    return torch.cat([x[:, :-count], prompts], dim=1)


def residual_block(block: nn.Module, x: torch.Tensor, causal: bool, attention_backend: str,
                   adapter: Optional[Adapter] = None) -> torch.Tensor:
    """open_clip's ResidualAttentionBlock, with the attention core swapped for ``mugcp.kernels.attention``.

    ``adapter`` runs in parallel to the whole block on its ``ln_1`` output (the normalised block input)
    and its result is added to the block's output (MMA's placement)."""
    mha = block.attn
    batch, length, width = x.shape
    heads = mha.num_heads
    normed = block.ln_1(x)
    qkv = F.linear(normed, mha.in_proj_weight, mha.in_proj_bias)
    q, k, v = qkv.view(batch, length, 3, heads, width // heads).permute(2, 0, 3, 1, 4)
    out = attention(q, k, v, causal=causal, backend=attention_backend)
    out = out.transpose(1, 2).reshape(batch, length, width)
    x = x + block.ls_1(F.linear(out, mha.out_proj.weight, mha.out_proj.bias))
    x = x + block.ls_2(block.mlp(block.ln_2(x)))
    return x if adapter is None else x + adapter(normed)


def run_blocks(blocks, x: torch.Tensor, deep_prompts: DeepPrompts, causal: bool, replace_at: int | None,
               block_fn: BlockFn,
               checkpointing: bool = False, appended: bool = False, adapters: LayerAdapters = None) -> torch.Tensor:
    """Run ``blocks`` over ``x``, writing each layer's prompts (a list entry or a hook's result) first.

    ``appended``: vision prompts are already in ``x`` (layer-0 prompts added before ``ln_pre``).
    ``checkpointing``: every block is recomputed in backward instead of keeping its activations.
    ``adapters``: per-layer residual adapters, passed to ``block_fn`` only for layers that have one.
    """
    for index, block in enumerate(blocks):
        if callable(deep_prompts):
            x = deep_prompts(index, x)
        elif deep_prompts is not None and index < len(deep_prompts) and deep_prompts[index] is not None:
            x = insert_prompts(x, deep_prompts[index], appended, replace_at)
            appended = True
        adapter = layer_adapter(adapters, index)
        extra = () if adapter is None else (adapter,)
        if checkpointing:
            x = checkpoint(block_fn, block, x, causal, *extra, use_reentrant=False)
        else:
            x = block_fn(block, x, causal, *extra)
    return x
