"""The bucketed text path of ``ClipBackbone.encode_text`` (DESIGN.md §4, issue 9).

Four exact cuts, for every method that encodes class texts:

- **Length buckets.** Sequences are grouped by EOT position and every group runs cut to its own
  length, so a short class name no longer pays for the batch's longest one. Neighbouring lengths
  are merged when a separate pass would cost more than the padding it saves (``text_groups``).
- **EOT-only last block.** Only the EOT row of the final block reaches the features, so that block
  computes queries, attention output, out-projection, MLP and residual at the EOT rows alone; keys
  and values still cover every position.
- **Shared prefix.** Positions every class shares (``[SOS, context]``; CoCoOp's and MuGCP's per-image
  prompts) run once per image, and the class-specific positions attend to their keys and values.
- **Budgeted chunks.** Each group is split into chunks by a memory budget (``text_memory_mb`` on the
  backbone, config ``train.text_memory_mb``; by default a sixth of the memory free at first use).
  With gradients, chunks whose graphs would not fit in the budget run under
  ``torch.utils.checkpoint`` and are recomputed in backward; the gradients are the same.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from mugcp.backbones.blocks import (
    Adapter,
    DeepPrompts,
    LayerAdapters,
    TextEmbeddings,
    insert_prompts,
    layer_adapter,
    project,
)
from mugcp.kernels.attention import attention

# A separate pass per group costs a fixed time (per-op dispatch, allocation and one read of the
# weights in every block, forward and backward) on top of its time per token. Measured on the 2-core
# CPU here (text tower of ViT-B, width 512, fp32, forward+backward, n sequences of 12 positions;
# `python benchmarks/text_scaling.py --calibrate`): 55-66 ms + 0.83-0.87 ms per token in two runs, so a
# pass is worth 64-80 tokens, and merging two lengths pays when the padding it adds is fewer than that.
GROUP_OVERHEAD_TOKENS = 64

# Memory per token, in units of (width × element size), measured with the torch profiler's allocation
# events (same calibration): a block keeps ~9.5 per token for backward (its input, LayerNorm outputs,
# q/k/v, attention output and statistics, MLP hidden before and after GELU); a forward without graph
# peaks at ~16 per token (the MLP hidden and the block's temporaries).
GRAPH_WIDTHS_PER_TOKEN_LAYER = 10
FORWARD_WIDTHS_PER_TOKEN = 16


def text_groups(eot: torch.Tensor, copies: int = 1,
                overhead_tokens: float = GROUP_OVERHEAD_TOKENS) -> list[tuple[torch.Tensor, int]]:
    """Rows of ``tokens`` grouped by EOT position: ``[(rows, length), ...]``, every row in one group.

    Neighbouring EOT positions share a group (cut to its longest) when that is cheaper in the cost
    model ``overhead_tokens + copies · rows · length`` per group: an exact dynamic programme over the
    sorted distinct lengths (at most the context length of them).
    """
    eot = eot.reshape(-1)
    lengths, counts = torch.unique(eot + 1, return_counts=True)  # sorted ascending
    lengths, counts = lengths.tolist(), counts.tolist()
    best = [0.0] + [float("inf")] * len(lengths)  # best[k]: cost of grouping the first k lengths
    start_of = [0] * (len(lengths) + 1)
    for end in range(1, len(lengths) + 1):
        rows = 0
        for start in range(end, 0, -1):
            rows += counts[start - 1]
            cost = best[start - 1] + overhead_tokens + copies * rows * lengths[end - 1]
            if cost < best[end]:
                best[end], start_of[end] = cost, start - 1
    bounds, end = [], len(lengths)
    while end:
        bounds.append((start_of[end], end))
        end = start_of[end]
    groups = []
    for start, end in reversed(bounds):
        low, high = lengths[start], lengths[end - 1]
        rows = torch.nonzero((eot + 1 >= low) & (eot + 1 <= high)).flatten()
        groups.append((rows, high))
    return groups


def free_memory_bytes(device: torch.device) -> int:
    """Memory free for new allocations now: CUDA's free memory, else the OS's MemAvailable."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:  # pragma: no cover - neither /proc nor psutil: assume a small machine
        return 4 * 2**30


def text_memory_budget_bytes(clip: nn.Module) -> int:
    """The text path's memory budget: ``clip.text_memory_mb`` or, when it is None, a sixth of the memory
    free when first asked (then fixed, so the chunking does not change from step to step). A sixth leaves
    the rest of the step (image tower, optimiser, the allocator's slack) and other processes room."""
    if clip.text_memory_mb is not None:
        return int(float(clip.text_memory_mb) * 2**20)
    if clip.auto_text_memory_bytes is None:
        clip.auto_text_memory_bytes = free_memory_bytes(clip.device) // 6
    return clip.auto_text_memory_bytes


def plan_chunks(
    groups: list[tuple[torch.Tensor, int]], copies: int, bytes_per_token_graph: int, bytes_per_token_forward: int,
    budget: int, with_graph: bool,
) -> list[tuple[torch.Tensor, int, bool]]:
    """Split groups into chunks ``(rows, length, recompute)`` that fit ``budget``.

    Without a graph a chunk's forward working set must fit. With one, every graph is kept when all of
    them fit; otherwise chunks take a quarter of the budget each, the first ones keep their graphs
    while those stay under half of it, and the rest are recomputed in backward (one chunk's graph
    at a time).
    """
    total_tokens = sum(copies * rows.numel() * length for rows, length in groups)
    if with_graph and total_tokens * bytes_per_token_graph <= budget:
        return [(rows, length, False) for rows, length in groups]
    per_token = bytes_per_token_graph if with_graph else bytes_per_token_forward
    chunk_tokens = max(1, (budget // 4 if with_graph else budget) // per_token)
    kept_tokens, keep_limit = 0, (budget // 2) // bytes_per_token_graph
    chunks = []
    for rows, length in groups:
        per_chunk = max(1, chunk_tokens // (copies * length))
        for first in range(0, rows.numel(), per_chunk):
            part = rows[first : first + per_chunk]
            tokens = copies * part.numel() * length
            recompute = with_graph and kept_tokens + tokens > keep_limit
            kept_tokens += 0 if recompute else tokens
            chunks.append((part, length, recompute))
    return chunks


def _rows_of(prompt: torch.Tensor, rows: torch.Tensor, copies: int, total_rows: int) -> torch.Tensor:
    """A list prompt for the sequences of ``rows``: shared prompts as they are, per-sequence ones selected."""
    if prompt.dim() < 3 or prompt.shape[0] == 1:
        return prompt
    if prompt.shape[0] != copies * total_rows:
        raise ValueError(f"a text prompt has {prompt.shape[0]} rows; expected 1 or one per sequence "
                         f"({copies * total_rows}).")
    return prompt.unflatten(0, (copies, total_rows))[:, rows].flatten(0, 1)


def text_block(clip: nn.Module, block, x: torch.Tensor, prefix: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
               eot: Optional[torch.Tensor] = None, adapter: Optional[Adapter] = None) -> torch.Tensor:
    """A causal text block over ``x`` ``(n, S, width)`` that may follow a shared prefix and may keep only the EOT rows.

    ``prefix``: keys and values ``(copies, heads, P, head_dim)`` of ``P`` earlier positions, shared by the
    ``n / copies`` consecutive sequences of each copy (``x`` then holds positions ``P .. P+S-1``);
    queries see the prefix and the causal part of ``x``. ``eot``: ``(n,)``
    positions within ``x``; the block then computes queries, attention output, out-projection, MLP and
    residual at those rows only and returns ``(n, width)`` (keys and values still cover every position).
    Without either it is ``blocks.residual_block``; ``adapter`` as there (at the EOT rows only with ``eot``).
    """
    mha = block.attn
    batch, length, width = x.shape
    heads, head_dim = mha.num_heads, width // mha.num_heads
    weight, bias = mha.in_proj_weight, mha.in_proj_bias
    normed = block.ln_1(x)
    if eot is None:
        qkv = F.linear(normed, weight, bias).view(batch, length, 3, heads, head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        residual = x
    else:
        rows = torch.arange(batch, device=x.device)
        q = F.linear(normed[rows, eot], weight[:width],
                     None if bias is None else bias[:width]).view(batch, heads, 1, head_dim)
        kv = F.linear(normed, weight[width:], None if bias is None else bias[width:])
        k, v = kv.view(batch, length, 2, heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        residual = x[rows, eot]
    offset = 0
    if prefix is not None:
        # (copies, heads, P, head_dim) shared by the batch // copies sequences of each copy: one copy into
        # the joined keys/values, never a per-sequence expansion first.
        offset, copies = prefix[0].shape[2], prefix[0].shape[0]

        def join(shared: torch.Tensor, own: torch.Tensor) -> torch.Tensor:
            group = batch // copies
            return torch.cat([shared.unsqueeze(1).expand(-1, group, -1, -1, -1), own.unflatten(0, (copies, group))],
                             dim=3).flatten(0, 1)

        k, v = join(prefix[0], k), join(prefix[1], v)
    keys = torch.arange(offset + length, device=x.device)
    if eot is None:
        if offset == 0:
            out = attention(q, k, v, causal=True, backend=clip.attention_backend)
        else:  # causal, aligned to the last key: position offset + i sees keys 0 .. offset + i
            visible = keys[None, :] <= torch.arange(offset, offset + length, device=x.device)[:, None]
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=visible)
        out = out.transpose(1, 2).reshape(batch, length, width)
    else:
        if bool((eot == length - 1).all()):  # every EOT is the last position: it sees every key
            out = attention(q, k, v, causal=False, backend=clip.attention_backend)
        else:
            visible = keys[None, :] <= (eot + offset)[:, None]
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=visible[:, None, None, :])
        out = out.reshape(batch, width)
    y = residual + block.ls_1(F.linear(out, mha.out_proj.weight, mha.out_proj.bias))
    y = y + block.ls_2(block.mlp(block.ln_2(y)))
    if adapter is None:
        return y
    return y + adapter(normed if eot is None else normed[torch.arange(batch, device=x.device), eot])


def eot_block(clip: nn.Module, block, x: torch.Tensor, eot: torch.Tensor,
              adapter: Optional[Adapter] = None) -> torch.Tensor:
    """The last text block at the EOT rows only: ``(n, L, width)`` in, ``(n, width)`` out."""
    return text_block(clip, block, x, eot=eot, adapter=adapter)


def _group_embeddings(clip: nn.Module, tokens: torch.Tensor, embeddings: TextEmbeddings, rows: torch.Tensor,
                      length: int) -> torch.Tensor:
    if embeddings is None:
        return clip.embed_tokens(tokens[rows, :length])
    if callable(embeddings):
        return embeddings(rows, length)
    copies = embeddings.shape[0] // tokens.shape[0]
    return embeddings.unflatten(0, (copies, tokens.shape[0]))[:, rows, :length].flatten(0, 1)


def _apply_prompts(clip: nn.Module, prompts: DeepPrompts, layer: int, x: torch.Tensor) -> torch.Tensor:
    if callable(prompts):
        return prompts(layer, x)
    if prompts is not None and layer < len(prompts) and prompts[layer] is not None:
        return insert_prompts(x, prompts[layer], True, 1)
    return x


def prefix_keys_values(
    clip: nn.Module, tokens: torch.Tensor, deep_prompts: DeepPrompts, embeddings: TextEmbeddings, prefix: int,
    adapters: LayerAdapters = None,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Keys and values ``(copies, heads, prefix, head_dim)`` of the shared first ``prefix`` positions at
    every layer, computed once from token row 0 (every row has the same prefix, see ``encode_text``)."""
    x = _group_embeddings(clip, tokens, embeddings, tokens.new_zeros(1), prefix)
    x = x + clip.model.positional_embedding[:prefix].to(x.dtype)
    blocks = clip.model.transformer.resblocks
    states = []
    for layer, block in enumerate(blocks):
        x = _apply_prompts(clip, deep_prompts, layer, x)
        mha = block.attn
        width = x.shape[-1]
        bias = mha.in_proj_bias
        kv = F.linear(block.ln_1(x), mha.in_proj_weight[width:], None if bias is None else bias[width:])
        k, v = kv.view(x.shape[0], prefix, 2, mha.num_heads, width // mha.num_heads).permute(2, 0, 3, 1, 4).unbind(0)
        states.append((k, v))
        if layer < len(blocks) - 1:
            adapter = layer_adapter(adapters, layer)
            x = clip.block(block, x, True) if adapter is None else clip.block(block, x, True, adapter)
    return states


def encode_group(
    clip: nn.Module, tokens: torch.Tensor, deep_prompts: DeepPrompts, embeddings: TextEmbeddings,
    rows: torch.Tensor, length: int, copies: int,
    prefix_states: Optional[list[tuple[torch.Tensor, torch.Tensor]]] = None, adapters: LayerAdapters = None,
) -> torch.Tensor:
    """Projected EOT features ``(copies, len(rows), embed_dim)`` of the token rows ``rows`` cut to ``length``.

    With ``prefix_states`` (``prefix_keys_values``) only the positions after the shared prefix run here,
    attending to the prefix's keys and values; prompts then touch the prefix only and are not applied.
    """
    x = _group_embeddings(clip, tokens, embeddings, rows, length)
    if x.shape[0] != copies * rows.numel():
        raise ValueError(f"text embeddings for {rows.numel()} token rows have {x.shape[0]} sequences; expected "
                         f"{copies * rows.numel()}.")
    blocks = clip.model.transformer.resblocks
    last = len(blocks) - 1
    eot = (tokens[rows].argmax(dim=-1)).repeat(copies)
    checkpointing = clip.activation_checkpointing and torch.is_grad_enabled()
    if prefix_states is None:
        x = x + clip.model.positional_embedding[:length].to(x.dtype)
        prompts = deep_prompts
        if deep_prompts is not None and not callable(deep_prompts):
            prompts = [None if p is None else _rows_of(p, rows, copies, tokens.shape[0]) for p in deep_prompts]
        x = clip.run_blocks(blocks[:last], x, prompts, causal=True, replace_at=1, adapters=adapters)
        x = _apply_prompts(clip, prompts, last, x)
        adapter = layer_adapter(adapters, last)
        if checkpointing:
            x = checkpoint(eot_block, clip, blocks[last], x, eot, adapter, use_reentrant=False)
        else:
            x = eot_block(clip, blocks[last], x, eot, adapter)
    else:
        offset = prefix_states[0][0].shape[2]
        x = x[:, offset:] + clip.model.positional_embedding[offset:length].to(x.dtype)
        for layer, block in enumerate(blocks):
            shared = prefix_states[layer]  # every sequence of copy n attends to copy n's prefix
            at_eot = eot - offset if layer == last else None
            adapter = layer_adapter(adapters, layer)
            if checkpointing:
                x = checkpoint(text_block, clip, block, x, shared, at_eot, adapter, use_reentrant=False)
            else:
                x = text_block(clip, block, x, shared, at_eot, adapter)
    x = project(clip.model.ln_final(x), clip.model.text_projection)
    return x.view(copies, rows.numel(), -1)


def encode_text_bucketed(
    clip: nn.Module, tokens: torch.Tensor, deep_prompts: DeepPrompts, embeddings: TextEmbeddings,
    shared_prefix: int = 0, adapters: LayerAdapters = None,
) -> torch.Tensor:
    """``ClipBackbone.encode_text`` with length buckets, budgeted chunks, an EOT-only last block and, with
    ``shared_prefix``, the shared first positions computed once: features ``(copies · T, embed_dim)`` in
    the order ``[n · T + t]`` of the plain path."""
    total_rows = tokens.shape[0]
    if isinstance(embeddings, torch.Tensor):
        if embeddings.shape[0] % total_rows:
            raise ValueError(f"{embeddings.shape[0]} text sequences are not a multiple of the {total_rows} token rows.")
        copies = embeddings.shape[0] // total_rows
        element = embeddings.element_size()
    else:
        copies = 1 if embeddings is None else None  # a builder's: see below
        element = torch.empty((), dtype=clip.dtype).element_size()
    eot = tokens.argmax(dim=-1)
    width, layers = clip.text_width, clip.text_layers
    with_graph = torch.is_grad_enabled()

    prefix_states = None
    if shared_prefix > 0 and int(eot.min()) >= shared_prefix:  # every EOT lies after the prefix
        if deep_prompts is not None and not callable(deep_prompts):
            for layer, prompt in enumerate(deep_prompts):
                if prompt is not None and (1 + prompt.shape[-2] > shared_prefix
                                           or (prompt.dim() == 3 and prompt.shape[0] > 1)):
                    raise ValueError(
                        f"the text prompt of layer {layer} ({tuple(prompt.shape)}) is not shared by every sequence's "
                        f"first {shared_prefix} positions; pass shared_prefix=0."
                    )
        prefix_states = prefix_keys_values(clip, tokens, deep_prompts, embeddings, shared_prefix, adapters)
        copies = prefix_states[0][0].shape[0]
    elif copies is None:
        # A builder's sequence count per token row shows once it ran: build row 0 alone (small) to see it.
        with torch.no_grad():
            copies = embeddings(eot.new_zeros(1), int(eot[0]) + 1).shape[0]
    offset = 0 if prefix_states is None else shared_prefix

    def run(rows: torch.Tensor, length: int, count: int) -> torch.Tensor:
        return encode_group(clip, tokens, deep_prompts, embeddings, rows, length, count, prefix_states, adapters)

    # Sizes for the memory plan, in tokens: the positions a pass computes, plus the prefix keys and values
    # every sequence's attention keeps (2 widths per prefix position, GRAPH_WIDTHS_PER_TOKEN_LAYER per token).
    prefix_tokens = -(-2 * offset // GRAPH_WIDTHS_PER_TOKEN_LAYER)
    chunks = plan_chunks(
        [(rows, length - offset + prefix_tokens) for rows, length in text_groups(eot, copies)], copies,
        GRAPH_WIDTHS_PER_TOKEN_LAYER * width * layers * element, FORWARD_WIDTHS_PER_TOKEN * width * element,
        text_memory_budget_bytes(clip), with_graph,
    )
    parts, order = [], []
    for rows, _, recompute in chunks:
        length = int(eot[rows].max()) + 1  # a group's length is its longest EOT + 1 (text_groups)
        if recompute:
            parts.append(checkpoint(run, rows, length, copies, use_reentrant=False))
        else:
            parts.append(run(rows, length, copies))
        order.append(rows)
    features = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
    order = torch.cat(order)
    if not torch.equal(order, torch.arange(total_rows, device=order.device)):
        features = features[:, torch.argsort(order)]
    return features.reshape(copies * total_rows, -1)
