"""A prompt-ready view of an open_clip CLIP model.

``ClipBackbone`` runs open_clip's own modules (embeddings, residual blocks, norms, projections) with
two additions prompt learning needs: prompt tokens can be written into every layer's input, and the
attention inside each block goes through ``mugcp.kernels.attention`` so the backend is a config choice.
With no prompts it computes exactly ``model.encode_text`` / ``model.encode_image``.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from mugcp.backbones.blocks import (
    Adapter,
    DeepPrompts,
    LayerAdapters,
    LayerHook,
    TextEmbeddings,
    insert_prompts,
    project,
    residual_block,
    run_blocks,
)
from mugcp.backbones.text_buckets import encode_text_bucketed
from mugcp.kernels.attention import check_attention_backend

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


def _skip_first_layer(hook: LayerHook) -> LayerHook:
    """``hook`` for layers 1.. only: its layer-0 call already happened before ``ln_pre``."""
    return lambda index, x: x if index == 0 else hook(index, x)


class ClipBackbone(nn.Module):
    """Frozen CLIP encoders that accept per-layer prompt tokens.

    ``deep_prompts`` is ``None``, a list of tensors (entry ``j`` is used at layer ``j``), or a callable
    ``hook(j, x) -> x`` called with the sequence entering every layer (full control, used by methods
    whose prompts depend on the running visual tokens).

    Text: prompt tokens ``(N, P, width)`` (or broadcastable) replace positions ``1 .. 1+P``; the token
    ids already hold P placeholder tokens there, so the EOT position is unchanged.
    Vision: at the first prompted layer the prompts ``(B, P, width)`` are appended after the patch
    tokens; at later layers they replace those last P positions. The CLS token stays at position 0.
    Layer-0 vision prompts enter *before* ``ln_pre`` (appended to the patch and CLS embeddings, which
    already carry their positions), as the released MaPLe / IVLP / PromptSRC code does, so ``ln_pre``
    normalises them with the image tokens. A hook is likewise called at layer 0 with the sequence
    before ``ln_pre``, and ``ln_pre`` is applied to whatever it returns.
    """

    def __init__(self, model: nn.Module, name: str, pretrained: str | None, tokenizer, attention_backend: str = "sdpa"):
        super().__init__()
        for attr in ("transformer", "token_embedding", "ln_final", "visual"):
            if not hasattr(model, attr):
                raise TypeError(
                    f"model '{name}' is not a CLIP with an open_clip text transformer (missing '{attr}'); "
                    "prompt learning supports open_clip CLIP ViT models such as ViT-B-32, ViT-B-16, ViT-L-14."
                )
        if getattr(model, "text_pool_type", "argmax") != "argmax":
            raise TypeError(f"model '{name}' pools text with '{model.text_pool_type}'; only EOT (argmax) pooling "
                            "is supported.")
        if not hasattr(model.visual, "class_embedding") or not hasattr(model.visual, "conv1"):
            raise TypeError(f"model '{name}' has no ViT image tower; ResNet towers cannot take prompt tokens.")
        self.model = model
        self.name = name
        self.pretrained = pretrained
        self.tokenizer = tokenizer
        self.attention_backend = attention_backend
        self.activation_checkpointing = False
        # Text path (config model.text_bucketing, train.text_memory_mb): length buckets, EOT-only last
        # block and budgeted chunks; False keeps the single pass cut at the batch's last EOT.
        self.text_bucketing = True
        self.text_memory_mb: float | None = None  # None: a sixth of the memory free at first use
        self.auto_text_memory_bytes: int | None = None  # that sixth, fixed once measured
        model.requires_grad_(False)
        model.eval()
        check_attention_backend(attention_backend)

    # ----------------------------------------------------------------- properties
    @property
    def text_width(self) -> int:
        return self.model.token_embedding.weight.shape[1]

    @property
    def vision_width(self) -> int:
        return self.model.visual.class_embedding.shape[0]

    @property
    def embed_dim(self) -> int:
        proj = self.model.text_projection
        return proj.weight.shape[0] if isinstance(proj, nn.Linear) else proj.shape[1]

    @property
    def text_layers(self) -> int:
        return len(self.model.transformer.resblocks)

    @property
    def vision_layers(self) -> int:
        return len(self.model.visual.transformer.resblocks)

    @property
    def image_size(self) -> int:
        size = self.model.visual.image_size
        return size[0] if isinstance(size, (tuple, list)) else int(size)

    @property
    def context_length(self) -> int:
        return self.model.positional_embedding.shape[0]

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.model.logit_scale

    @property
    def dtype(self) -> torch.dtype:
        return self.model.token_embedding.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.model.token_embedding.weight.device

    def train(self, mode: bool = True):
        # The CLIP weights are frozen: dropout/patch-dropout must stay off whatever the caller does.
        super().train(False)
        return self

    # ----------------------------------------------------------------- text
    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        return self.tokenizer(list(texts)).to(self.device)

    def embed_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model.token_embedding(tokens).to(self.dtype)

    def encode_text(
        self,
        tokens: torch.Tensor,
        deep_prompts: DeepPrompts = None,
        embeddings: TextEmbeddings = None,
        normalize: bool = False,
        return_tokens: bool = False,
        shared_prefix: int = 0,
        adapters: LayerAdapters = None,
        length: int | None = None,
    ):
        """Text features ``(N, embed_dim)`` (and, with ``return_tokens``, every position after ``ln_final``,
        ``(N, L', width)`` with ``L'`` the truncated length).

        ``tokens`` ``(T, L)`` give the EOT positions; ``embeddings`` replace the token embeddings, which is
        how learned context enters: a tensor ``(N, L, width)`` (N a multiple of T, sequences ordered
        ``[n * T + t]``) or a callable ``embeddings(rows, length)`` that builds the sequences of the token
        rows ``rows`` cut to ``length`` positions, ``(n * len(rows), length, width)`` ordered
        ``[n * len(rows) + i]``; the callable lets the B×C methods build each chunk inside its own
        (recomputed) pass instead of holding all B×C sequences.

        With ``text_bucketing`` (the default) the sequences are grouped by EOT position and every group
        runs cut to its own length (``text_groups``), split into chunks by the memory budget
        (``text_memory_mb``; recomputed in backward when the graphs would not fit), and the last block
        computes only the EOT rows. Otherwise (and always with ``return_tokens``) every sequence is cut
        after the last EOT of the batch. Both are exact: the causal mask makes later positions invisible
        to every EOT, and only the EOT row of the last block reaches the features.

        ``shared_prefix`` ``P`` is the caller's promise that the first ``P`` positions are the same in every
        sequence of one copy ``n`` (e.g. ``[SOS, context]`` of CoOp, or the per-image prompts of CoCoOp and
        MuGCP, shared by all classes) at layer 0 and after every prompt, and that prompts touch only those
        positions. The bucketed path then runs them once per copy and every sequence attends to their
        keys and values (exact, by the causal mask); hooks are then called with the ``(copies, P, width)``
        prefix only.

        ``adapters``: per-layer residual adapters (see ``blocks.residual_block``); entry ``j`` runs beside block ``j``.
        ``length`` (unbucketed path) is the last EOT position + 1 when the caller knows it as a number
        (``ClassPrompts.length``): ``torch.export`` (ONNX export) traces the token ids and cannot read them.
        """
        if self.text_bucketing and not return_tokens:
            features = encode_text_bucketed(self, tokens, deep_prompts, embeddings, shared_prefix, adapters)
            return F.normalize(features, dim=-1) if normalize else features
        eot = tokens.argmax(dim=-1)
        length = int(eot.max()) + 1 if length is None else length
        if embeddings is None:
            x = self.embed_tokens(tokens[:, :length])
        elif callable(embeddings):
            x = embeddings(torch.arange(tokens.shape[0], device=tokens.device), length)
        else:
            x = embeddings[:, :length]
        if x.shape[0] != eot.shape[0]:
            if x.shape[0] % eot.shape[0]:
                raise ValueError(f"{x.shape[0]} text sequences are not a multiple of the {eot.shape[0]} token rows.")
            eot = eot.repeat(x.shape[0] // eot.shape[0])
        x = x + self.model.positional_embedding[:length].to(x.dtype)
        x = self.run_blocks(self.model.transformer.resblocks, x, deep_prompts, causal=True, replace_at=1,
                            adapters=adapters)
        tokens_out = self.model.ln_final(x)
        x = tokens_out[torch.arange(x.shape[0], device=x.device), eot]
        x = project(x, self.model.text_projection)
        x = F.normalize(x, dim=-1) if normalize else x
        return (x, tokens_out) if return_tokens else x

    # ----------------------------------------------------------------- vision
    def embed_patches(self, images: torch.Tensor) -> torch.Tensor:
        """CLS + patch tokens with their positions, before ``ln_pre``: where layer-0 prompts are appended.

        The same operations as open_clip's ``VisionTransformer._embeds`` up to its final ``ln_pre``.
        """
        visual = self.model.visual
        x = visual.conv1(images.to(self.dtype))
        x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
        cls = visual.class_embedding.view(1, 1, -1).expand(x.shape[0], -1, -1).to(x.dtype)
        x = torch.cat([cls, x], dim=1) + visual.positional_embedding.to(x.dtype)
        return visual.patch_dropout(x)

    def embed_image(self, images: torch.Tensor) -> torch.Tensor:
        """Patch + CLS tokens with positions, after ``ln_pre``: the input of an unprompted vision layer 0."""
        return self.model.visual.ln_pre(self.embed_patches(images))

    def encode_image(
        self,
        images: torch.Tensor,
        deep_prompts: DeepPrompts = None,
        normalize: bool = False,
        return_tokens: bool = False,
        adapters: LayerAdapters = None,
    ):
        """Image features ``(B, embed_dim)`` (and, with ``return_tokens``, the final token sequence);
        ``adapters`` as in ``encode_text``."""
        visual = self.model.visual
        x = self.embed_patches(images)
        appended = False
        if callable(deep_prompts):
            x = deep_prompts(0, x)
            deep_prompts = _skip_first_layer(deep_prompts)
        elif deep_prompts is not None and len(deep_prompts) and deep_prompts[0] is not None:
            x = insert_prompts(x, deep_prompts[0], appended=False, replace_at=None)
            deep_prompts, appended = [None, *deep_prompts[1:]], True
        x = visual.ln_pre(x)
        x = self.run_blocks(visual.transformer.resblocks, x, deep_prompts, causal=False, replace_at=None,
                            appended=appended, adapters=adapters)
        pooled, _ = visual._pool(x)
        pooled = project(pooled, visual.proj)
        pooled = F.normalize(pooled, dim=-1) if normalize else pooled
        return (pooled, x) if return_tokens else pooled

    # ----------------------------------------------------------------- blocks
    def block(self, block: nn.Module, x: torch.Tensor, causal: bool, adapter: Adapter | None = None) -> torch.Tensor:
        """One residual block of either tower with this backbone's attention backend; every full block of
        both towers runs through here (the one place to observe a layer's input)."""
        return residual_block(block, x, causal, self.attention_backend, adapter)

    def run_blocks(self, blocks, x: torch.Tensor, deep_prompts: DeepPrompts, causal: bool, replace_at: int | None,
                   appended: bool = False, adapters: LayerAdapters = None) -> torch.Tensor:
        """``blocks.run_blocks`` with this backbone's block and activation checkpointing."""
        checkpointing = self.activation_checkpointing and torch.is_grad_enabled()
        return run_blocks(blocks, x, deep_prompts, causal, replace_at, self.block, checkpointing, appended, adapters)
