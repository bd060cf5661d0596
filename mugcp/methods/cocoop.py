"""CoCoOp: a meta-net turns each image feature into a shift of the learned context (Zhou et al., CVPR 2022)."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from mugcp.config import ConfigError
from mugcp.config_schema import integer, option, with_defaults
from mugcp.methods.coop import COOP_OPTIONS
from mugcp.methods.dept import DEPT_FROZEN, DEPT_OPTIONS, DecoupledPromptLearner, take_dept
from mugcp.methods.prompt_text import ClassPrompts, check_context_words, init_context
from mugcp.methods.registry import register_method
from mugcp.methods.released import Mapping, ReleasedNames, require


def released_cocoop(state: dict, embed_dim: int) -> Mapping:
    """Released CoCoOp: ``ctx`` and ``meta_net.linear{1,2}`` (our ``meta_net.{0,2}``); the hidden width tells
    ``meta_reduction``."""
    keys = ["ctx", "meta_net.linear1.weight", "meta_net.linear1.bias", "meta_net.linear2.weight",
            "meta_net.linear2.bias"]
    require(state, keys)
    mapping = Mapping()
    ctx = mapping.take(state, "ctx", "ctx")
    for released, ours in (("linear1", "0"), ("linear2", "2")):
        for kind in ("weight", "bias"):
            mapping.take(state, f"meta_net.{released}.{kind}", f"meta_net.{ours}.{kind}")
    hidden = state["meta_net.linear1.weight"].shape[0]
    reduction = max(1, embed_dim // max(hidden, 1))
    if embed_dim // reduction != hidden:
        raise ConfigError(f"meta_net.linear1 has {hidden} hidden units, which no meta_reduction gives for a "
                          f"{embed_dim}-wide image feature.")
    mapping.options = {"n_ctx": ctx.shape[0], "meta_reduction": reduction}
    take_dept(state, mapping)
    return mapping


@register_method(
    "cocoop",
    options={
        **with_defaults({key: COOP_OPTIONS[key] for key in ("n_ctx", "ctx_init", "init_std")},
                        n_ctx=4, ctx_init="a photo of a"),
        "meta_reduction": option(16, integer(1), "the meta-net's hidden width is the image feature width over this"),
        "max_text_sequences": option(4096, integer(0, nullable=True, null_means="no grouping"),
                                     "evaluation groups images so images x classes stays under this; 0: no grouping"),
        **DEPT_OPTIONS,
    },
    check=check_context_words,
    paper="Zhou et al., Conditional Prompt Learning for Vision-Language Models (CVPR 2022)",
    conditions_on="the image (meta-net on the CLIP image feature)",
    config="configs/methods/cocoop.yaml",
    released=ReleasedNames(lambda state, embed_dim: released_cocoop(state, embed_dim),
                           dropped=("token_prefix", "token_suffix"), frozen_prefixes=DEPT_FROZEN),
)
class CoCoOp(DecoupledPromptLearner):
    """Context ``ctx + meta_net(f_img)`` per image, so every image gets its own C class prompts.

    ``meta_net`` is Linear(E, E/meta_reduction)–ReLU–Linear(·, text_width) on the normalised image
    feature. Without gradients (evaluation), images are encoded in groups of at most
    ``max_text_sequences // C`` so the B×C text batch stays bounded; ``null`` disables the grouping.
    """

    conditional = True

    def __init__(self, clip, classnames, options, **kwargs):
        super().__init__(clip, classnames, options, **kwargs)
        vectors, self.prompt_prefix = init_context(clip, options["n_ctx"], options["ctx_init"], options["init_std"])
        self.n_ctx = vectors.shape[1]
        self.ctx = nn.Parameter(vectors[0])
        hidden = clip.embed_dim // options["meta_reduction"]
        if hidden < 1:
            raise ConfigError(f"method option 'meta_reduction' ({options['meta_reduction']}) leaves no hidden units "
                              f"for a {clip.embed_dim}-wide image feature.")
        self.meta_net = nn.Sequential(nn.Linear(clip.embed_dim, hidden), nn.ReLU(inplace=True),
                                      nn.Linear(hidden, clip.text_width))
        self.init_dept(classnames)
        self.set_classnames(classnames)

    def build_class_inputs(self) -> None:
        self.prompts = ClassPrompts(self.clip, self.classnames, self.n_ctx, prefix=self.prompt_prefix)
        self.prompts.to(self.clip.device)

    def image_contexts(self, image_features: torch.Tensor) -> torch.Tensor:
        """Per-image context ``(B, n_ctx, width)`` from normalised image features ``(B, E)``."""
        return self.ctx.unsqueeze(0) + self.meta_net(image_features).unsqueeze(1)

    def per_image_text_features(self, contexts: torch.Tensor) -> torch.Tensor:
        """Text features ``(B, C, E)`` for per-image contexts ``(B, n_ctx, width)``."""
        classes = len(self.classnames)
        limit = self.options["max_text_sequences"]
        # One group needs no split: then the batch size is never compared to anything (ONNX export keeps it dynamic).
        chunks = [contexts] if torch.is_grad_enabled() or not limit else contexts.split(max(1, limit // classes))
        features = []
        for chunk in chunks:
            if self.clip.text_bucketing:
                def embeddings(rows: torch.Tensor, length: int, chunk: torch.Tensor = chunk) -> torch.Tensor:
                    # built per bucket/chunk inside its own (maybe recomputed) pass: no B×C tensor outlives it
                    return self.prompts.assemble_per_image(chunk, rows, length)
            else:
                embeddings = self.prompts.assemble_per_image(chunk)
            # [SOS, ctx + π(x)] is per image and shared by every class: the backbone runs it once per image.
            encoded = self.clip.encode_text(self.prompts.tokens, embeddings=embeddings, shared_prefix=1 + self.n_ctx,
                                            length=self.prompts.length)
            features.append(encoded.view(chunk.shape[0], classes, -1))
        return torch.cat(features)

    def training_features(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Raw image features ``(B, E)``, raw per-image class text features ``(B, C, E)`` and the logits."""
        raw = self.clip.encode_image(images)
        image_features = F.normalize(raw, dim=-1)
        text_features = self.per_image_text_features(self.image_contexts(image_features))
        return raw, text_features, self.logits(image_features, text_features)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        raw, _, logits = self.training_features(images)
        return self.fused_logits(raw, logits)

