"""Deep prompts: learned tokens written into the first ``depth`` layers of a CLIP encoder.

Shared by IVLP, MaPLe and PromptSRC (and usable by any method that prompts several layers). The API:

- ``text_context_init(clip, n_ctx, init, std)``: the layer-0 text prompt ``(n_ctx, text_width)`` and the
  class-text prefix it implies (the released code keeps unused init words as fixed tokens).
- ``check_depth(clip, depth, tower, option)``: a clear error for a depth the encoder cannot take.
- ``PromptStack(depth, n_ctx, width, first=None, std=0.02)``: one ``(n_ctx, width)`` parameter per
  prompted layer; calling it returns the list of per-layer prompts.
- ``encode_prompted_text(clip, class_prompts, text_prompts)`` and
  ``encode_prompted_image(clip, images, vision_prompts)``: the frozen encoders run with those prompts.

Prompts are passed to ``ClipBackbone`` as per-layer tensors, never written into CLIP's modules, so
the frozen weights stay bit-identical.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import torch
import torch.nn as nn

from mugcp.backbones import ClipBackbone
from mugcp.config import ConfigError
from mugcp.config_schema import Option, integer, option
from mugcp.methods.prompt_text import MAX_TEXT_CONTEXT, ClassPrompts, placeholder_prefix

# The released MaPLe / IVLP / PromptSRC code initialises the context from ``ctx_init`` only up to this
# many context tokens (its ``n_ctx <= 4`` test); beyond it the context is random and ``ctx_init`` unused.
INIT_TEXT_MAX_CONTEXT = 4


def text_context_option(default: int) -> Option:
    """The ``n_ctx`` of a deep-prompt method's text prompts (MaPLe, IVLP, PromptSRC, MuGCP): kept as given, as the
    released code keeps it; ``ctx_init`` starts layer 0 only when ``n_ctx <= 4`` (else it is unused)."""
    return option(default, integer(1, MAX_TEXT_CONTEXT), "learned text tokens per prompted layer; "
                  f"ctx_init starts layer 0 only when this is <= {INIT_TEXT_MAX_CONTEXT}")


def text_context_init(clip: ClipBackbone, n_ctx: int, init: str = "", std: float = 0.02) -> tuple[torch.Tensor, str]:
    """Layer-0 text prompt ``(n_ctx, width)`` and the class-text prefix, as the released MaPLe / IVLP /
    PromptSRC code builds them.

    Unlike CoOp's ``init_context``, ``n_ctx`` is kept. With ``init`` and ``n_ctx <= 4`` the vectors are
    the first ``n_ctx`` token embeddings of ``init`` and the prefix is ``init`` itself, so its tokens
    beyond ``n_ctx`` stay in every class text as fixed words (``n_ctx=2``, ``"a photo of a"``: the
    context starts as "a photo" and "of a" stays). Otherwise (no ``init``, or ``n_ctx > 4``, where the
    released code ignores ``init``) Gaussian vectors with ``std`` and ``n_ctx`` placeholder words.
    """
    if n_ctx < 1:
        raise ValueError(f"n_ctx must be at least 1, got {n_ctx}.")
    if not init or n_ctx > INIT_TEXT_MAX_CONTEXT:
        return torch.randn(n_ctx, clip.text_width) * std, placeholder_prefix(n_ctx)
    prefix = init.replace("_", " ")
    ids = clip.tokenize([prefix])[0]
    tokens = int(ids.argmax()) - 1  # tokens between SOS and EOT
    if tokens < n_ctx:
        raise ConfigError(
            f"ctx_init '{init}' has {tokens} tokens, fewer than n_ctx={n_ctx}: the released code would start the "
            f"context from end-of-text and padding embeddings. Use n_ctx <= {tokens}, a longer ctx_init, or "
            "ctx_init=''."
        )
    with torch.no_grad():
        vectors = clip.embed_tokens(ids[None])[0, 1 : 1 + n_ctx].float().cpu()
    return vectors, prefix


def check_depth(clip: ClipBackbone, depth: int, tower: str, option: str) -> None:
    """Raise a ConfigError naming ``option`` when ``depth`` does not fit the ``tower`` ("text"/"vision")."""
    layers = clip.text_layers if tower == "text" else clip.vision_layers
    if not 0 <= depth <= layers:
        raise ConfigError(
            f"method option '{option}' is {depth}, but the {tower} encoder of {clip.name} has {layers} layers; "
            f"use a depth between 0 and {layers}."
        )


class PromptStack(nn.Module):
    """Learned prompt tokens for layers ``0 .. depth-1`` of one encoder (parameters ``layers.{j}``).

    ``first`` (``(n_ctx, width)``) initialises layer 0, e.g. from ``text_context_init``; every other
    layer starts Gaussian with ``std``. ``depth`` 0 is allowed and means "no prompts".
    """

    def __init__(self, depth: int, n_ctx: int, width: int, first: Optional[torch.Tensor] = None, std: float = 0.02):
        super().__init__()
        if depth and n_ctx < 1:
            raise ValueError(f"a prompt stack of depth {depth} needs n_ctx >= 1, got {n_ctx}.")
        tensors = [torch.randn(n_ctx, width) * std for _ in range(depth)]
        if first is not None and depth:
            if tuple(first.shape) != (n_ctx, width):
                raise ValueError(f"initial prompt has shape {tuple(first.shape)}, expected {(n_ctx, width)}.")
            tensors[0] = first.detach().clone().float()
        self.layers = nn.ParameterList([nn.Parameter(t) for t in tensors])
        self.n_ctx = n_ctx

    def __len__(self) -> int:
        return len(self.layers)

    def forward(self) -> list[torch.Tensor]:
        return list(self.layers)


def encode_prompted_text(clip: ClipBackbone, class_prompts: ClassPrompts,
                         text_prompts: Sequence[torch.Tensor]) -> torch.Tensor:
    """Text features ``(C, E)`` with ``text_prompts[j]`` at layer ``j``.

    The layer-0 prompt goes in as word embeddings (it gets positional embeddings like a word, as in
    CoOp); deeper prompts replace the context positions of that layer's input, without positions.
    ``class_prompts`` must hold ``len(text_prompts[0])`` context slots at the front (position "end").
    """
    if not text_prompts:
        return clip.encode_text(class_prompts.tokens)
    deeper: list[Optional[torch.Tensor]] = [None, *text_prompts[1:]]
    embeddings = class_prompts.assemble(text_prompts[0])
    return clip.encode_text(
        class_prompts.tokens, deep_prompts=deeper if len(deeper) > 1 else None, embeddings=embeddings,
        shared_prefix=class_prompts.shared_prefix,
    )


def encode_prompted_image(clip: ClipBackbone, images: torch.Tensor,
                          vision_prompts: Sequence[torch.Tensor]) -> torch.Tensor:
    """Image features ``(B, E)``: ``vision_prompts[0]`` is appended after the patch tokens before ``ln_pre``,
    ``vision_prompts[j]`` replaces them at layer ``j``; later layers keep whatever the tokens became."""
    return clip.encode_image(images, deep_prompts=list(vision_prompts) if len(vision_prompts) else None)
