"""CoOp: learnable context vectors in place of a hand-written template (Zhou et al., IJCV 2022)."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from mugcp.config import ConfigError
from mugcp.config_schema import boolean, choice, integer, number, option, text
from mugcp.methods.dept import DEPT_FROZEN, DEPT_OPTIONS, DecoupledPromptLearner, take_dept
from mugcp.methods.prompt_text import MAX_TEXT_CONTEXT, ClassPrompts, check_context_words, init_context
from mugcp.methods.registry import register_method
from mugcp.methods.released import Mapping, ReleasedNames, require


def released_coop(state: dict) -> Mapping:
    """Released CoOp: ``ctx`` (n_ctx, width), or (classes, n_ctx, width) when class-specific."""
    require(state, ["ctx"])
    mapping = Mapping()
    ctx = mapping.take(state, "ctx", "ctx")
    mapping.options = {"n_ctx": ctx.shape[-2], "class_specific": ctx.dim() == 3}
    take_dept(state, mapping)
    return mapping


COOP_OPTIONS = {
    "n_ctx": option(16, integer(1, MAX_TEXT_CONTEXT), "learned context tokens; with ctx_init, its word count"),
    "ctx_init": option("", text(), "text whose word embeddings start the context; '' starts it Gaussian"),
    "class_specific": option(False, boolean(), "one context per class (the checkpoint then fits only these classes)"),
    "class_token_position": option("end", choice("end", "middle", "front"), "where the class name sits in the prompt"),
    "init_std": option(0.02, number(0), "standard deviation of a Gaussian initial context"),
}


@register_method(
    "coop",
    options={**COOP_OPTIONS, **DEPT_OPTIONS},
    check=check_context_words,
    paper="Zhou et al., Learning to Prompt for Vision-Language Models (IJCV 2022)",
    conditions_on="nothing (one learned context per dataset)",
    config="configs/methods/coop.yaml",
    released=ReleasedNames(lambda state, embed_dim: released_coop(state), dropped=("token_prefix", "token_suffix"),
                           frozen_prefixes=DEPT_FROZEN),
)
class CoOp(DecoupledPromptLearner):
    """``ctx_init`` text sets the initial vectors and ``n_ctx`` (its word count, as the released code
    counts; see ``init_context``); ``class_specific`` learns one context per class (then the checkpoint
    is tied to the number of classes; unlike the released code, which silently learns one shared
    context when ``ctx_init`` is set, every class then starts from the ``ctx_init`` words)."""

    def __init__(self, clip, classnames, options, **kwargs):
        super().__init__(clip, classnames, options, **kwargs)
        rows = len(classnames) if options["class_specific"] else 1
        vectors, self.prompt_prefix = init_context(clip, options["n_ctx"], options["ctx_init"],
                                                   options["init_std"], rows)
        self.n_ctx = vectors.shape[1]
        self.ctx = nn.Parameter(vectors if options["class_specific"] else vectors[0])
        self.init_dept(classnames)
        self.set_classnames(classnames)

    def build_class_inputs(self) -> None:
        if self.options["class_specific"] and self.ctx.shape[0] != len(self.classnames):
            raise ConfigError(
                f"this CoOp has class-specific context for {self.ctx.shape[0]} classes, "
                f"got {len(self.classnames)} class names; "
                "class-specific prompts do not transfer to other classes (train with class_specific=false)."
            )
        self.prompts = ClassPrompts(self.clip, self.classnames, self.n_ctx, self.options["class_token_position"],
                                    self.prompt_prefix)
        self.prompts.to(self.clip.device)

    def compute_text_features(self) -> torch.Tensor:
        # Class-specific context differs per class: then only SOS is shared.
        shared = 1 if self.options["class_specific"] else self.prompts.shared_prefix
        return self.clip.encode_text(self.prompts.tokens, embeddings=self.prompts.assemble(self.ctx),
                                     shared_prefix=shared)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        return self.clip.encode_image(images)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        image_features = self.encode_images(images)
        return self.fused_logits(image_features, self.logits(image_features, self.text_features()))

    def training_features(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Raw image features ``(B, E)``, raw class text features ``(C, E)`` and the logits."""
        image_features, text_features = self.encode_images(images), self.compute_text_features()
        return image_features, text_features, self.logits(image_features, F.normalize(text_features, dim=-1))

