"""Zero-shot CLIP: hand-written templates, no training."""
from __future__ import annotations

import torch

from mugcp.config_schema import Spec, option
from mugcp.methods.base import PromptLearner
from mugcp.methods.prompt_text import template_text_features
from mugcp.methods.registry import register_method
from mugcp.methods.templates import resolve_templates


@register_method(
    "zsclip",
    options={"templates": option("auto", Spec("list", item_kind="str"),
                                 "auto (the dataset's template), ensemble, imagenet60, a template or a list")},
    paper="Radford et al., Learning Transferable Visual Models From Natural Language Supervision (ICML 2021)",
    conditions_on="nothing (hand-written templates)",
    config="configs/methods/zsclip.yaml",
)
class ZeroShotCLIP(PromptLearner):
    """``templates``: ``auto`` (the dataset's template, CoOp's ``ZeroshotCLIP``), ``ensemble`` (CoOp's
    ``ZeroshotCLIP2``: 7 ImageNet templates plus the dataset's own), ``imagenet60``, a template or a
    list; several templates' normalised features are averaged."""

    def __init__(self, clip, classnames, options, **kwargs):
        super().__init__(clip, classnames, options, **kwargs)
        self.templates = resolve_templates(options["templates"], self.dataset)
        self.set_classnames(classnames)

    def build_class_inputs(self) -> None:
        self._template_features = template_text_features(self.clip, self.templates, self.classnames)

    def compute_text_features(self) -> torch.Tensor:
        return self._template_features

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.logits(self.clip.encode_image(images), self.text_features())
