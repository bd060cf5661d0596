"""MaPLe: deep text prompts whose linear images are the vision prompts (Khattak et al., CVPR 2023)."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from mugcp.config import ConfigError
from mugcp.config_schema import integer, number, option, text
from mugcp.methods.deep_prompts import (
    PromptStack,
    check_depth,
    encode_prompted_image,
    encode_prompted_text,
    text_context_init,
    text_context_option,
)
from mugcp.methods.dept import DEPT_OPTIONS, DecoupledPromptLearner, take_dept
from mugcp.methods.prompt_text import ClassPrompts
from mugcp.methods.registry import register_method
from mugcp.methods.released import Mapping, ReleasedNames, consecutive, indexed, require


def released_maple(state: dict) -> Mapping:
    """Released MaPLe: ``ctx`` + ``proj`` (layer 0's coupling), then per deeper layer a ``compound_prompts_text``
    and its ``compound_prompt_projections`` (our ``text_prompts.layers.j`` and ``coupling.j``)."""
    require(state, ["prompt_learner.ctx", "prompt_learner.proj.weight", "prompt_learner.proj.bias"])
    mapping = Mapping()
    ctx = mapping.take(state, "prompt_learner.ctx", "text_prompts.layers.0")
    for kind in ("weight", "bias"):
        mapping.take(state, f"prompt_learner.proj.{kind}", f"coupling.0.{kind}")
    deeper = consecutive(indexed(state, r"prompt_learner\.compound_prompts_text\.(\d+)"), 0, "compound_prompts_text")
    for index, key in enumerate(deeper):
        mapping.take(state, key, f"text_prompts.layers.{index + 1}")
        for kind in ("weight", "bias"):
            released = f"prompt_learner.compound_prompt_projections.{index}.{kind}"
            if released not in state:
                raise ConfigError(f"missing ['{released}'] (one projection per compound prompt)")
            mapping.take(state, released, f"coupling.{index + 1}.{kind}")
    mapping.options = {"n_ctx": ctx.shape[0], "depth": 1 + len(deeper)}
    take_dept(state, mapping)
    return mapping


@register_method(
    "maple",
    options={
        "n_ctx": text_context_option(2),
        "depth": option(9, integer(1), "prompted layers from layer 0 in both encoders (at most the encoder's layers)"),
        "ctx_init": option("a photo of a", text(),
                           "text whose first n_ctx token embeddings start layer 0; its other words stay fixed"),
        "init_std": option(0.02, number(0), "standard deviation of the Gaussian prompts"),
        **DEPT_OPTIONS,
    },
    paper="Khattak et al., MaPLe: Multi-modal Prompt Learning (CVPR 2023)",
    conditions_on="nothing (text prompts; vision prompts are coupled from them)",
    config="configs/methods/maple.yaml",
    released=ReleasedNames(lambda state, embed_dim: released_maple(state), dropped=("token_prefix", "token_suffix"),
                           frozen_prefixes=("image_encoder.", "text_encoder.", "logit_scale"), whole_model=True),
)
class MaPLe(DecoupledPromptLearner):
    """Text prompts ``P_j`` at layers ``0 .. depth-1`` (``P_0`` from ``ctx_init``); the vision prompt of
    layer ``j`` is ``F_j(P_j)`` with one linear coupling ``F_j: text_width -> vision_width`` per layer,
    so both encoders are steered by the same learned tokens. As in the released code, the class texts
    keep the ``ctx_init`` words beyond ``n_ctx`` ("a photo of a", ``n_ctx=2``: ``[ctx, ctx, "of", "a",
    class, "."]``) and ``F_0(P_0)`` enters the image encoder before ``ln_pre``."""

    def __init__(self, clip, classnames, options, **kwargs):
        super().__init__(clip, classnames, options, **kwargs)
        depth = options["depth"]
        check_depth(clip, depth, "text", "depth")
        check_depth(clip, depth, "vision", "depth")
        if depth < 1:
            raise ConfigError("method option 'depth' must be at least 1 for MaPLe (the prompts start at layer 0).")
        first, self.prompt_prefix = text_context_init(clip, options["n_ctx"], options["ctx_init"], options["init_std"])
        self.text_prompts = PromptStack(depth, options["n_ctx"], clip.text_width, first, options["init_std"])
        self.coupling = nn.ModuleList(nn.Linear(clip.text_width, clip.vision_width) for _ in range(depth))
        # The released code builds the deeper couplings as copies of one freshly initialised layer, so
        # they all start equal (the layer-0 coupling is initialised on its own).
        for layer in range(2, depth):
            self.coupling[layer].load_state_dict(self.coupling[1].state_dict())
        self.init_dept(classnames)
        self.set_classnames(classnames)

    def build_class_inputs(self) -> None:
        self.prompts = ClassPrompts(self.clip, self.classnames, self.text_prompts.n_ctx, prefix=self.prompt_prefix)
        self.prompts.to(self.clip.device)

    def vision_prompts(self, text_prompts: list[torch.Tensor]) -> list[torch.Tensor]:
        return [couple(prompt) for couple, prompt in zip(self.coupling, text_prompts)]

    def compute_text_features(self) -> torch.Tensor:
        return encode_prompted_text(self.clip, self.prompts, self.text_prompts())

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        return encode_prompted_image(self.clip, images, self.vision_prompts(self.text_prompts()))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        image_features = self.encode_images(images)
        return self.fused_logits(image_features, self.logits(image_features, self.text_features()))

    def training_features(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Raw image features ``(B, E)``, raw class text features ``(C, E)`` and the logits."""
        image_features, text_features = self.encode_images(images), self.compute_text_features()
        return image_features, text_features, self.logits(image_features, F.normalize(text_features, dim=-1))

