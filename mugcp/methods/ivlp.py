"""IVLP: independent deep prompts in the text and the image encoder (the baseline of MaPLe, CVPR 2023)."""
from __future__ import annotations

import torch

from mugcp.config import ConfigError
from mugcp.config_schema import integer, number, option, text
from mugcp.methods.base import PromptLearner
from mugcp.methods.deep_prompts import (
    PromptStack,
    check_depth,
    encode_prompted_image,
    encode_prompted_text,
    text_context_init,
    text_context_option,
)
from mugcp.methods.prompt_text import ClassPrompts
from mugcp.methods.registry import register_method
from mugcp.methods.released import Mapping, ReleasedNames, consecutive, indexed, require

IVLP_OPTIONS = {
    "n_ctx_text": text_context_option(4),
    "n_ctx_vision": option(4, integer(1), "learned vision tokens per prompted layer"),
    "text_depth": option(9, integer(0), "prompted text layers from layer 0 (0: none; at most the encoder's)"),
    "vision_depth": option(9, integer(0), "prompted vision layers from layer 0 (0: none; at most the encoder's)"),
    "ctx_init": option("a photo of a", text(), "text whose first n_ctx_text token embeddings start text layer 0"),
    "init_std": option(0.02, number(0), "standard deviation of the Gaussian prompts"),
}


def released_ivlp(state: dict) -> Mapping:
    """Released IVLP (and PromptSRC): ``prompt_learner.ctx`` plus each deeper layer's ``VPT_shallow`` in both
    encoders; the first vision prompt is ``image_encoder.VPT`` (absent at vision depth 0)."""
    require(state, ["prompt_learner.ctx"])
    mapping = Mapping()
    ctx = mapping.take(state, "prompt_learner.ctx", "text_prompts.layers.0")
    text = consecutive(indexed(state, r"text_encoder\.transformer\.resblocks\.(\d+)\.VPT_shallow"), 1,
                       "text VPT_shallow prompts")
    for layer, key in enumerate(text, start=1):
        mapping.take(state, key, f"text_prompts.layers.{layer}")
    mapping.options = {"n_ctx_text": ctx.shape[0], "text_depth": 1 + len(text), "vision_depth": 0}
    vision = indexed(state, r"image_encoder\.transformer\.resblocks\.(\d+)\.VPT_shallow")
    if "image_encoder.VPT" in state:
        first = mapping.take(state, "image_encoder.VPT", "vision_prompts.layers.0")
        for layer, key in enumerate(consecutive(vision, 1, "vision VPT_shallow prompts"), start=1):
            mapping.take(state, key, f"vision_prompts.layers.{layer}")
        mapping.options.update({"n_ctx_vision": first.shape[0], "vision_depth": 1 + len(vision)})
    elif vision:
        raise ConfigError("has deep vision prompts (image_encoder.transformer.resblocks.N.VPT_shallow) but no "
                          "first-layer image_encoder.VPT")
    return mapping


@register_method(
    "ivlp",
    options=IVLP_OPTIONS,
    paper="Khattak et al., MaPLe: Multi-modal Prompt Learning (CVPR 2023), independent V-L prompting baseline",
    conditions_on="nothing (separate learned prompts in both encoders)",
    config="configs/methods/ivlp.yaml",
    released=ReleasedNames(lambda state, embed_dim: released_ivlp(state), dropped=("token_prefix", "token_suffix"),
                           frozen_prefixes=("image_encoder.", "text_encoder.", "logit_scale"), whole_model=True),
)
class IVLP(PromptLearner):
    """Text prompts at layers ``0 .. text_depth-1`` (layer 0 from ``ctx_init``, see ``text_context_init``),
    vision prompts at layers ``0 .. vision_depth-1`` (Gaussian; layer 0's enter before ``ln_pre``),
    with no link between the two."""

    def __init__(self, clip, classnames, options, **kwargs):
        super().__init__(clip, classnames, options, **kwargs)
        check_depth(clip, options["text_depth"], "text", "text_depth")
        check_depth(clip, options["vision_depth"], "vision", "vision_depth")
        n_text = options["n_ctx_text"] if options["text_depth"] else 0
        first, self.prompt_prefix = (text_context_init(clip, n_text, options["ctx_init"], options["init_std"])
                                     if n_text else (None, ""))
        self.text_prompts = PromptStack(options["text_depth"], n_text, clip.text_width, first, options["init_std"])
        self.vision_prompts = PromptStack(options["vision_depth"], options["n_ctx_vision"], clip.vision_width,
                                          std=options["init_std"])
        self.set_classnames(classnames)

    def build_class_inputs(self) -> None:
        self.prompts = ClassPrompts(self.clip, self.classnames,
                                    self.text_prompts.n_ctx if len(self.text_prompts) else 0, prefix=self.prompt_prefix)
        self.prompts.to(self.clip.device)

    def compute_text_features(self) -> torch.Tensor:
        return encode_prompted_text(self.clip, self.prompts, self.text_prompts())

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        return encode_prompted_image(self.clip, images, self.vision_prompts())

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.logits(self.encode_images(images), self.text_features())
