"""MuGCP's learned blocks (DESIGN.md §2): SCP attention pooling and AMG mutual guidance.

Both are plain ``nn.Module``s with no knowledge of CLIP's layers; ``mugcp.methods.mugcp`` wires them
into the encoders. Symbols in comments refer to DESIGN.md §2.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

import mugcp.kernels as kernels
from mugcp.config import ConfigError


def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    batch, tokens, width = x.shape
    return x.view(batch, tokens, heads, width // heads).transpose(1, 2)


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    batch, heads, tokens, head_dim = x.shape
    return x.transpose(1, 2).reshape(batch, tokens, heads * head_dim)


def _check_heads(dim: int, heads: int, option: str) -> None:
    if heads < 1 or dim % heads:
        raise ConfigError(f"method option '{option}' ({dim}) must be a positive multiple of the number of heads "
                          f"({heads}).")


class AttentionPooling(nn.Module):
    """SCP: a padded token sequence ``(B, T, in_dim)`` → ``n_queries`` tokens ``(B, n_queries, out_dim)``.

    ``n_queries`` learned queries attend over the (layer-normed) input tokens with ``heads`` heads of
    total width ``dim``; a linear layer maps the result to ``out_dim`` (the text width, giving S⁰).
    Padding never takes part: padded rows are zeroed before anything else and masked out of the
    softmax, so whatever they hold cannot change the output.
    """

    def __init__(self, in_dim: int, out_dim: int, n_queries: int, dim: int, heads: int, normalize_input: bool = True,
                 std: float = 0.02):
        super().__init__()
        _check_heads(dim, heads, "pool_dim")
        self.in_dim = in_dim
        self.heads = heads
        self.norm = nn.LayerNorm(in_dim) if normalize_input else nn.Identity()
        self.queries = nn.Parameter(torch.randn(n_queries, dim) * std)
        self.key = nn.Linear(in_dim, dim, bias=False)
        self.value = nn.Linear(in_dim, dim, bias=False)
        self.out = nn.Linear(dim, out_dim)

    def forward(self, features: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        batch, tokens, _ = features.shape
        if mask is None:
            mask = torch.ones(batch, tokens, dtype=torch.bool, device=features.device)
        # An image with no real token (an empty answer) pools to zeros rather than NaN.
        empty = ~mask.any(dim=1)
        attend = mask | empty[:, None]
        features = features.masked_fill(~mask[..., None], 0.0)
        x = self.norm(features)
        keys = _split_heads(self.key(x), self.heads)
        values = _split_heads(self.value(x), self.heads)
        queries = _split_heads(self.queries.to(keys.dtype).expand(batch, -1, -1), self.heads)
        pooled = F.scaled_dot_product_attention(queries, keys, values, attn_mask=attend[:, None, None, :])
        pooled = _merge_heads(pooled).masked_fill(empty[:, None, None], 0.0)
        return self.out(pooled)


class MutualGuidance(nn.Module):
    """AMG at one prompted vision layer j: visual tokens X and semantic tokens S^j guide each other.

    Per head, one affinity ``A = (LN(X)·W_a)(LN(S)·W_b)ᵀ/√d_h`` drives both directions through
    ``mugcp.kernels.mutual_attention``:

    - semantic→visual: ``X + tanh(γ_v)·W_ox(softmax_{n_s}(A)·S·W_vs)``;
    - visual→semantic: ``U = softmax_{N_v}(A)ᵀ·X·W_vx``, ``VCP = LN(U·W_ov)`` and, when this layer
      feeds a later one (``update_semantic``), ``S^{j+1} = S + tanh(γ_s)·U·W_os``.

    With the tanh gates at 0 (their default start) X and S pass through unchanged, so an untrained
    model behaves like MaPLe with extra prompt tokens.

    ``recorder``, when set to a callable, is called at every forward with the kernel's inputs and the
    layer's semantic tokens and VCP (keyword tensors); ``mugcp.analysis.amg`` reads the AMG maps this way.
    """

    recorder = None

    def __init__(
        self,
        vision_width: int,
        text_width: int,
        dim: int,
        heads: int,
        update_semantic: bool = True,
        gate_init: float = 0.0,
        normalize_values: bool = False,
    ):
        super().__init__()
        _check_heads(dim, heads, "amg_dim")
        self.heads = heads
        self.normalize_values = normalize_values
        self.norm_visual = nn.LayerNorm(vision_width)
        self.norm_semantic = nn.LayerNorm(text_width)
        self.affinity_visual = nn.Linear(vision_width, dim, bias=False)  # W_a
        self.affinity_semantic = nn.Linear(text_width, dim, bias=False)  # W_b
        self.value_visual = nn.Linear(vision_width, dim, bias=False)  # W_vx
        self.value_semantic = nn.Linear(text_width, dim, bias=False)  # W_vs
        self.out_visual = nn.Linear(dim, vision_width, bias=False)  # W_ox
        self.out_prompt = nn.Linear(dim, vision_width, bias=False)  # W_ov
        self.norm_prompt = nn.LayerNorm(vision_width)
        self.gate_visual = nn.Parameter(torch.full((1,), float(gate_init)))  # γ_v
        # The last prompted layer's S^{j+1} would reach no text layer, so it has no update weights
        # (they could never receive a gradient).
        self.update_semantic = update_semantic
        if update_semantic:
            self.out_semantic = nn.Linear(dim, text_width, bias=False)  # W_os
            self.gate_semantic = nn.Parameter(torch.full((1,), float(gate_init)))  # γ_s

    def forward(self, visual: torch.Tensor, semantic: torch.Tensor, backend: Optional[str] = None):
        """visual ``(B, N_v, d_v)``, semantic ``(B, n_s, d_t)`` → (new visual, VCP ``(B, n_s, d_v)``,
        next semantic ``(B, n_s, d_t)`` or None when this layer does not update it)."""
        visual_normed = self.norm_visual(visual)
        semantic_normed = self.norm_semantic(semantic)
        visual_values = visual_normed if self.normalize_values else visual
        semantic_values = semantic_normed if self.normalize_values else semantic
        queries_visual = _split_heads(self.affinity_visual(visual_normed), self.heads)
        queries_semantic = _split_heads(self.affinity_semantic(semantic_normed), self.heads)
        values_visual = _split_heads(self.value_visual(visual_values), self.heads)
        to_visual, to_semantic = kernels.mutual_attention(
            queries_visual, queries_semantic, values_visual,
            _split_heads(self.value_semantic(semantic_values), self.heads),
            backend=backend,
        )
        to_visual, gathered = _merge_heads(to_visual), _merge_heads(to_semantic)  # gathered is U
        new_visual = visual + torch.tanh(self.gate_visual) * self.out_visual(to_visual)
        visual_prompts = self.norm_prompt(self.out_prompt(gathered))
        next_semantic = None
        if self.update_semantic:
            next_semantic = semantic + torch.tanh(self.gate_semantic) * self.out_semantic(gathered)
        if self.recorder is not None:
            self.recorder(affinity_visual=queries_visual, affinity_semantic=queries_semantic,
                          values_visual=values_visual, gathered_heads=to_semantic, semantic=semantic,
                          visual_prompts=visual_prompts)
        return new_visual, visual_prompts, next_semantic
