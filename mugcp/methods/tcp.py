"""TCP: class-aware text tokens from hand-crafted prompts' features, written into the text encoder
(Yao et al., Textual-based Class-aware Prompt tuning, CVPR 2024)."""

from __future__ import annotations

from collections import OrderedDict
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from open_clip.transformer import QuickGELU

from mugcp.config import ConfigError
from mugcp.config_schema import integer, number, option, text
from mugcp.methods.base import PromptLearner
from mugcp.methods.deep_prompts import text_context_init
from mugcp.methods.prompt_text import template_text_features
from mugcp.methods.registry import register_method
from mugcp.methods.released import Mapping, ReleasedNames, require
from mugcp.methods.templates import TCP_HANDCRAFTED_TEMPLATES, TCP_PROMPT_TEMPLATES, resolve_templates

# The released code hard-codes four context tokens: its learnable templates start with four words that the
# context replaces, and its token generator emits four tokens.
CONTEXT_TOKENS = 4
META_NET_KEYS = ("meta_net.linear1.weight", "meta_net.linear1.bias", "meta_net.linear2.weight", "meta_net.linear2.bias")


def released_tcp(state: dict, embed_dim: int) -> Mapping:
    """Released TCP: ``ctx`` and ``meta_net.linear{1,2}`` under the same names; the hidden width tells
    ``meta_reduction``."""
    require(state, ["ctx", *META_NET_KEYS])
    mapping = Mapping()
    ctx = mapping.take(state, "ctx", "ctx")
    if tuple(ctx.shape[:1]) != (CONTEXT_TOKENS,) or ctx.dim() != 2:
        raise ConfigError(
            f"ctx has shape {tuple(ctx.shape)}; TCP learns {CONTEXT_TOKENS} shared context vectors (4, width)."
        )
    for key in META_NET_KEYS:
        mapping.take(state, key, key)
    hidden = state["meta_net.linear1.weight"].shape[0]
    reduction = max(1, embed_dim // max(hidden, 1))
    if embed_dim // reduction != hidden:
        raise ConfigError(
            f"meta_net.linear1 has {hidden} hidden units, which no meta_reduction gives for a "
            f"{embed_dim}-wide text feature."
        )
    mapping.options = {"meta_reduction": reduction}
    return mapping


@register_method(
    "tcp",
    options={
        "ctx_init": option("", text(), "text whose first 4 token embeddings start the context; '' starts it Gaussian"),
        "init_std": option(0.02, number(0), "standard deviation of a Gaussian initial context"),
        "token_layer": option(8, integer(0), "text layer whose input gets the class-aware tokens (released: 8)"),
        "meta_reduction": option(4, integer(1), "meta_net's hidden width is the feature width divided by this"),
        "consistency_weight": option(8.0, number(0), "weight of 1 - cos(learned, hand-crafted text features)"),
        "handcrafted_template": option("auto", text(), "template of the hand-crafted features; 'auto': released table"),
        "prompt_template": option("auto", text(), "template of the learnable prompt; 'auto': released table"),
    },
    paper="Yao et al., TCP: Textual-based Class-aware Prompt tuning for Visual-Language Model (CVPR 2024)",
    conditions_on="the class (tokens generated from hand-crafted prompts' text features)",
    config="configs/methods/tcp.yaml",
    released=ReleasedNames(released_tcp, dropped=("token_prefix", "token_suffix", "token_midfix")),
)
class TCP(PromptLearner):
    """As the authors' released code:

    - class texts from ``prompt_template`` (``auto``: the released learnable table, e.g. ``"X X X X {}, a
      type of pet."``; ImageNet and UCF101 keep "a photo of a ..."), whose tokens 1-4 are the shared
      context ``ctx`` (Gaussian with ``init_std``, or the first 4 token embeddings of ``ctx_init``);
    - frozen, normalised CLIP features of ``handcrafted_template`` (``auto``: the released hand-crafted
      table) → ``meta_net`` Linear(E, E/``meta_reduction``)–QuickGELU–Linear(·, 4·text width) → 4 tokens
      per class, which replace positions 1-4 of the input of text layer ``token_layer`` (released: 8,
      with weight 1: a full replacement, no norm or scale);
    - loss = CE + ``consistency_weight`` · (1 − mean over classes of cos(learned, hand-crafted features)).

    New classes go through the same trained ``meta_net`` from their own hand-crafted features. Everything
    runs in ``train.precision`` (fp32 on CPU); the released runs are fp16 with Adam eps 1e-3.
    """

    def __init__(self, clip, classnames, options, **kwargs):
        super().__init__(clip, classnames, options, **kwargs)
        if not 0 <= options["token_layer"] < clip.text_layers:
            raise ConfigError(
                f"method option 'token_layer' is {options['token_layer']}, but the text encoder of {clip.name} has "
                f"{clip.text_layers} layers; use a layer between 0 and {clip.text_layers - 1}."
            )
        hidden = clip.embed_dim // options["meta_reduction"]
        if hidden < 1:
            raise ConfigError(
                f"method option 'meta_reduction' ({options['meta_reduction']}) leaves no hidden units for a "
                f"{clip.embed_dim}-wide text feature."
            )
        vectors, _ = text_context_init(clip, CONTEXT_TOKENS, options["ctx_init"], options["init_std"])
        self.ctx = nn.Parameter(vectors)
        self.meta_net = nn.Sequential(
            OrderedDict(
                [
                    ("linear1", nn.Linear(clip.embed_dim, hidden)),
                    ("act", QuickGELU()),
                    ("linear2", nn.Linear(hidden, CONTEXT_TOKENS * clip.text_width)),
                ]
            )
        )
        self.set_classnames(classnames)

    def build_class_inputs(self) -> None:
        templates = resolve_templates(self.options["prompt_template"], self.dataset, TCP_PROMPT_TEMPLATES)
        if len(templates) != 1:
            raise ConfigError(f"method option 'prompt_template' must be one template for TCP, got {len(templates)}.")
        tokens = self.clip.tokenize([templates[0].format(name) for name in self.classnames])
        short = [name for name, row in zip(self.classnames, tokens) if int(row.argmax()) <= CONTEXT_TOKENS]
        if short:
            raise ConfigError(
                f"the TCP prompt '{templates[0]}' gives '{short[0]}' fewer than {CONTEXT_TOKENS + 1} tokens; "
                f"its first {CONTEXT_TOKENS} tokens are the context."
            )
        with torch.no_grad():
            embedding = self.clip.embed_tokens(tokens)
        self.register_buffer("tokens", tokens, persistent=False)
        self.register_buffer("token_prefix", embedding[:, :1], persistent=False)
        self.register_buffer("token_suffix", embedding[:, 1 + CONTEXT_TOKENS :], persistent=False)
        self._handcrafted: Optional[torch.Tensor] = None

    def handcrafted_text_features(self) -> torch.Tensor:
        """Frozen CLIP's normalised features ``(C, E)`` of the hand-crafted prompt, once per class set."""
        if self._handcrafted is None:
            templates = resolve_templates(self.options["handcrafted_template"], self.dataset, TCP_HANDCRAFTED_TEMPLATES)
            self._handcrafted = template_text_features(self.clip, templates, self.classnames)
        return self._handcrafted

    def class_tokens(self) -> torch.Tensor:
        """The class-aware tokens ``(C, 4, text width)`` from the hand-crafted features."""
        features = self.handcrafted_text_features()
        return self.meta_net(features.to(self.meta_net.linear1.weight.dtype)).view(
            features.shape[0], CONTEXT_TOKENS, -1
        )

    def compute_text_features(self) -> torch.Tensor:
        classes = self.tokens.shape[0]
        ctx = self.ctx.to(self.token_prefix.dtype).unsqueeze(0).expand(classes, -1, -1)
        embeddings = torch.cat([self.token_prefix, ctx, self.token_suffix], dim=1)
        layers: list = [None] * self.options["token_layer"] + [self.class_tokens()]
        return self.clip.encode_text(self.tokens, deep_prompts=layers, embeddings=embeddings)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.logits(self.clip.encode_image(images), self.text_features())

    def training_step(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, dict]:
        text_features = self.text_features()
        logits = self.logits(self.clip.encode_image(batch["images"]), text_features)
        ce = F.cross_entropy(logits, batch["labels"])
        handcrafted = self.handcrafted_text_features().to(text_features)
        consistency = 1.0 - F.cosine_similarity(text_features, handcrafted, dim=1, eps=1e-7).mean()
        loss = ce + self.options["consistency_weight"] * consistency
        return loss, logits, {"ce": float(ce.detach()), "consistency": float(consistency.detach())}
