"""IVLP: independent deep prompts in the text and the image encoder (the baseline of MaPLe, CVPR 2023)."""
from __future__ import annotations

import torch

from mugcp.methods.base import PromptLearner
from mugcp.methods.deep_prompts import PromptStack, check_depth, encode_prompted_image, encode_prompted_text, text_context_init
from mugcp.methods.prompt_text import ClassPrompts
from mugcp.methods.registry import register_method

IVLP_DEFAULTS = {
    "n_ctx_text": 4,
    "n_ctx_vision": 4,
    "text_depth": 9,
    "vision_depth": 9,
    "ctx_init": "a photo of a",
    "init_std": 0.02,
}


@register_method(
    "ivlp",
    defaults=IVLP_DEFAULTS,
    paper="Khattak et al., MaPLe: Multi-modal Prompt Learning (CVPR 2023), independent V-L prompting baseline",
    conditions_on="nothing (separate learned prompts in both encoders)",
    config="configs/methods/ivlp.yaml",
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
        first, self.prompt_prefix = text_context_init(clip, n_text, options["ctx_init"], options["init_std"]) if n_text else (None, "")
        self.text_prompts = PromptStack(options["text_depth"], n_text, clip.text_width, first, options["init_std"])
        self.vision_prompts = PromptStack(options["vision_depth"], options["n_ctx_vision"], clip.vision_width, std=options["init_std"])
        self.set_classnames(classnames)

    def build_class_inputs(self) -> None:
        self.prompts = ClassPrompts(self.clip, self.classnames, self.text_prompts.n_ctx if len(self.text_prompts) else 0, prefix=self.prompt_prefix)
        self.prompts.to(self.clip.device)

    def compute_text_features(self) -> torch.Tensor:
        return encode_prompted_text(self.clip, self.prompts, self.text_prompts())

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        return encode_prompted_image(self.clip, images, self.vision_prompts())

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.logits(self.encode_images(images), self.text_features())
