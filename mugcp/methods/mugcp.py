"""MuGCP: multi-modal mutual-guidance conditional prompt learning (arXiv 2507.08410), as DESIGN.md §2.

Per image: SCP pools the image's semantic features (MLLM answer or a stand-in) into n_s tokens S⁰;
the vision encoder runs first, and at every prompted layer j < J AMG lets the visual tokens and S^j
guide each other, giving the visual conditional prompts VCP^j and S^{j+1}; MPF writes
``[F^j(ctx_t^j) ; σ(g_v^j)⊙VCP^j]`` after the visual tokens. Layer 0 works on the tokens before
``ln_pre`` and its prompts are normalised by ``ln_pre`` with them: the paper follows MaPLe, and this is
where MaPLe's released code puts its first vision prompts (``ClipBackbone`` does the placement). The text encoder
then runs over B×C sequences with ``[ctx_t^j ; σ(g_t^j)⊙S^j]`` at layer j (``mugcp.kernels.fuse_prompts``).

Its semantic inputs (which source a run uses, captions encoded once by the frozen CLIP text encoder)
are in :mod:`mugcp.methods.mugcp_semantics`; its layers (attention pooling, AMG) in
:mod:`mugcp.methods.mugcp_modules`.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

import mugcp.kernels as kernels
from mugcp.backbones import ClipBackbone
from mugcp.config import ConfigError
from mugcp.config_schema import boolean, choice, integer, number, option, text
from mugcp.methods.base import PromptLearner
from mugcp.methods.deep_prompts import text_context_init, text_context_option
from mugcp.methods.mugcp_modules import AttentionPooling, MutualGuidance
from mugcp.methods.mugcp_semantics import SEMANTIC_FEATURES, SEMANTIC_SOURCES
from mugcp.methods.prompt_text import ClassPrompts, template_text_features
from mugcp.methods.registry import register_method

OPTIONS = {
    # prompts (DESIGN §2: J, n_c, n_s)
    "depth": option(9, integer(1), "J: prompted layers in both encoders (at most the encoder's layers)"),
    "n_ctx": text_context_option(2),
    "n_semantic": option(4, integer(1), "n_s: semantic tokens (SCP / VCP) per prompted layer"),
    "ctx_init": option("a photo of a", text(), "text whose first n_ctx token embeddings start the layer-0 context"),
    "init_std": option(0.02, number(0), "standard deviation of the Gaussian prompts and queries"),
    "prompt_gate_init": option(0.0, number(), "g_t, g_v before the sigmoid (0: sigma = 0.5)"),
    # SCP
    "semantic_source": option("mllm", choice(*SEMANTIC_SOURCES),
                              "mllm | clip (frozen CLIP image tokens) | none (learned); set from semantic.source"),
    "semantic_features": option("caption", choice(*SEMANTIC_FEATURES),
                                "caption (frozen CLIP text token outputs) | hidden (MLLM hidden states)"),
    "semantic_dim": option(None, integer(1, nullable=True, null_means="the CLIP text width for captions"),
                           "d_m: width of the semantic features (required for hidden states)"),
    "pool_dim": option(256, integer(1), "width of SCP's attention pooling (a multiple of pool_heads)"),
    "pool_heads": option(8, integer(1), "heads of SCP's attention pooling"),
    "pool_normalize_input": option(True, boolean(), "layer-norm the semantic features before pooling"),
    # AMG
    "amg_dim": option(256, integer(1), "width of AMG's shared affinity and values (a multiple of amg_heads)"),
    "amg_heads": option(8, integer(1), "h: AMG heads"),
    "amg_gate_init": option(0.0, number(), "gamma_v, gamma_s before the tanh: 0 leaves X and S unchanged at the start"),
    "amg_normalize_values": option(False, boolean(), "values from LN(X), LN(S) instead of X, S"),
    # cost
    "max_text_sequences": option(0, integer(0), "(image, class) sequences per text-encoder call; 0: no limit"),
    # loss (DESIGN §2.5): consistency with the frozen CLIP, off by default
    "text_consistency_weight": option(0.0, number(0), "weight of the text-feature consistency with frozen CLIP"),
    "image_consistency_weight": option(0.0, number(0), "weight of the image-feature consistency with frozen CLIP"),
    "logit_consistency_weight": option(0.0, number(0), "weight of the logit consistency with frozen CLIP"),
    "consistency_template": option("a photo of a {}.", text(), "frozen CLIP's class template ({}: the class)"),
}


def check_mugcp_options(options: dict) -> None:
    """Widths that split into heads, and a consistency template with a place for the class name."""
    for dim, heads in (("pool_dim", "pool_heads"), ("amg_dim", "amg_heads")):
        if options[dim] % options[heads]:
            raise ConfigError(f"method.{dim}={options[dim]} is not a multiple of method.{heads}={options[heads]}: "
                              "the width is split evenly over the heads.")
    if "{}" not in options["consistency_template"]:
        template = options["consistency_template"]
        raise ConfigError(f"method.consistency_template={template!r} needs a '{{}}' for the class name.")


@register_method(
    "mugcp",
    options=OPTIONS,
    check=check_mugcp_options,
    paper="Multi-modal Mutual-Guidance Conditional Prompt Learning for Vision-Language Models (arXiv 2507.08410)",
    conditions_on="each image's MLLM semantics (SCP) and visual tokens (AMG/VCP), in every prompted layer",
    config="configs/methods/mugcp.yaml",
)
class MuGCP(PromptLearner):
    """``forward(images, semantic=None, semantic_mask=None) -> logits (B, C)``.

    ``semantic`` ``(B, T, d_m)`` padded, ``semantic_mask`` ``(B, T)`` bool (True = real token, None =
    all real); needed with ``semantic_source=mllm`` and refused otherwise. Every prompt is shared by
    all classes, so checkpoints load with any class names.
    """

    conditional = True
    batch_inputs = ("semantic", "semantic_mask")

    def __init__(self, clip: ClipBackbone, classnames, options, **kwargs):
        super().__init__(clip, classnames, options, **kwargs)
        self._check_options(options)
        self.depth = options["depth"]
        self.n_ctx = options["n_ctx"]
        self.n_semantic = options["n_semantic"]
        self.semantic_source = options["semantic_source"]
        text_width, vision_width = clip.text_width, clip.vision_width
        std = options["init_std"]

        context = torch.randn(self.depth, self.n_ctx, text_width) * std
        # Layer-0 context as MaPLe's; the class texts keep only placeholders (DESIGN §2.3), no leftover init words.
        context[0] = text_context_init(clip, self.n_ctx, options["ctx_init"], std)[0]
        self.text_context = nn.Parameter(context)  # ctx_t^j
        self.coupling = nn.ModuleList(nn.Linear(text_width, vision_width) for _ in range(self.depth))  # F^j
        gates = torch.full((self.depth, self.n_semantic), float(options["prompt_gate_init"]))
        self.text_gates = nn.Parameter(gates.clone())  # g_t^j
        self.vision_gates = nn.Parameter(gates.clone())  # g_v^j
        self.guidance = nn.ModuleList(
            MutualGuidance(
                vision_width, text_width, options["amg_dim"], options["amg_heads"],
                update_semantic=layer < self.depth - 1, gate_init=options["amg_gate_init"],
                normalize_values=options["amg_normalize_values"],
            )
            for layer in range(self.depth)
        )
        if self.semantic_source == "none":
            self.semantic_tokens = nn.Parameter(torch.randn(self.n_semantic, text_width) * std)
        else:
            self.semantic_dim = (vision_width if self.semantic_source == "clip"
                                 else self._mllm_feature_dim(options, text_width))
            self.pooling = AttentionPooling(
                self.semantic_dim, text_width, self.n_semantic, options["pool_dim"], options["pool_heads"],
                normalize_input=options["pool_normalize_input"], std=std,
            )
        self._frozen_text_features: Optional[torch.Tensor] = None
        self.set_classnames(classnames)

    # ----------------------------------------------------------------- construction
    def _check_options(self, options: dict) -> None:
        # Types and ranges are checked by the registry (OPTIONS); the depth also needs the backbone.
        layers = min(self.clip.text_layers, self.clip.vision_layers)
        if not 1 <= options["depth"] <= layers:
            raise ConfigError(
                f"method 'mugcp' option 'depth' is {options['depth']}; "
                f"{self.clip.name} takes 1 to {layers} prompted layers."
            )

    def _mllm_feature_dim(self, options: dict, text_width: int) -> int:
        given = options["semantic_dim"]
        if options["semantic_features"] == "caption":
            if given is not None and given != text_width:
                raise ConfigError(
                    f"method 'mugcp': semantic_features=caption gives caption token features of the CLIP text width "
                    f"{text_width}, but semantic_dim={given} (the MLLM hidden size?). Leave semantic_dim unset for "
                    "captions, or set semantic_features=hidden to pool the MLLM hidden states."
                )
            return text_width
        if given is None:
            raise ConfigError(
                "method 'mugcp': semantic_features=hidden needs semantic_dim (the MLLM hidden size d_m, "
                "e.g. SemanticCache(path).dim); pass create_model(..., semantic_dim=d_m)."
            )
        return int(given)

    def build_class_inputs(self) -> None:
        # Placeholder tokens hold the n_c + n_s prompt positions 1 .. 1+n_c+n_s of every class text.
        self.class_prompts = ClassPrompts(self.clip, self.classnames, self.n_ctx + self.n_semantic)
        self.class_prompts.to(self.clip.device)
        self._frozen_text_features = None

    # ----------------------------------------------------------------- SCP
    def initial_semantic(
        self, batch: int, semantic: Optional[torch.Tensor], semantic_mask: Optional[torch.Tensor],
        frozen_tokens: Optional[torch.Tensor]
    ) -> torch.Tensor:
        """S⁰ ``(B, n_s, d_t)`` from the configured source."""
        if self.semantic_source != "mllm" and semantic is not None:
            raise ValueError(
                f"mugcp was built with semantic_source={self.semantic_source!r} but got semantic features; "
                "build it with semantic_source='mllm' to use them, or stop passing them."
            )
        if self.semantic_source == "none":
            return self.semantic_tokens.expand(batch, -1, -1)
        if self.semantic_source == "clip":
            return self.pooling(frozen_tokens.to(self.text_context.dtype))
        if semantic is None:
            raise ValueError(
                "mugcp with semantic_source='mllm' needs each image's semantic features: forward(images, "
                "semantic=(B, T, d_m), semantic_mask=(B, T)); the training CLI attaches them from semantic.cache. "
                "Without an MLLM cache use semantic_source='clip' (frozen CLIP image tokens, an ablation) or 'none'."
            )
        if semantic.dim() != 3 or semantic.shape[0] != batch or semantic.shape[2] != self.semantic_dim:
            raise ValueError(
                f"mugcp: semantic features have shape {tuple(semantic.shape)}, "
                f"expected ({batch}, T, {self.semantic_dim}) for {batch} images (semantic_dim={self.semantic_dim}, "
                f"semantic_features={self.options['semantic_features']!r})."
            )
        if semantic_mask is not None and (semantic_mask.dtype != torch.bool
                                          or tuple(semantic_mask.shape) != tuple(semantic.shape[:2])):
            raise ValueError(
                f"mugcp: semantic_mask must be a bool tensor of shape {tuple(semantic.shape[:2])} (True = real token), "
                f"got {semantic_mask.dtype} {tuple(semantic_mask.shape)}."
            )
        device = self.text_context.device
        semantic = semantic.to(device=device, dtype=self.text_context.dtype)
        semantic_mask = None if semantic_mask is None else semantic_mask.to(device)
        return self.pooling(semantic, semantic_mask)

    # ----------------------------------------------------------------- encoders
    def _vision_hook(self, semantic_layers: list[torch.Tensor]):
        """AMG + MPF at vision layers j < J; appends S^{j+1} to ``semantic_layers`` as it goes."""
        prompt_count = self.n_ctx + self.n_semantic

        def hook(layer: int, x: torch.Tensor) -> torch.Tensor:
            if layer >= self.depth:
                return x
            visual = x if layer == 0 else x[:, :-prompt_count]
            dtype = self.text_context.dtype
            visual, visual_prompts, next_semantic = self.guidance[layer](
                visual.to(dtype), semantic_layers[layer], backend=self.kernels
            )
            if next_semantic is not None:
                semantic_layers.append(next_semantic)
            context = self.coupling[layer](self.text_context[layer]).expand(x.shape[0], -1, -1)
            conditional = torch.sigmoid(self.vision_gates[layer])[:, None] * visual_prompts
            return torch.cat([visual.to(x.dtype), context.to(x.dtype), conditional.to(x.dtype)], dim=1)

        return hook

    def _text_hook(self, semantic_layers: list[torch.Tensor], batch: int):
        def hook(layer: int, x: torch.Tensor) -> torch.Tensor:
            # Layer 0's prompts are written into the embeddings, where they get positional embeddings.
            if layer == 0 or layer >= self.depth:
                return x
            # The backbone may pass any subset of the classes (a length bucket or a chunk of one),
            # always as ``[image, class]`` rows.
            length, width = x.shape[1:]
            fused = kernels.fuse_prompts(
                x.view(batch, x.shape[0] // batch, length, width), self.text_context[layer].to(x.dtype),
                semantic_layers[layer].to(x.dtype), self.text_gates[layer], start=1, backend=self.kernels,
            )
            return fused.view(x.shape[0], length, width)

        return hook

    def encode_text(self, semantic_layers: list[torch.Tensor]) -> torch.Tensor:
        """Text features ``(B, C, E)`` of every (image, class) pair, given S⁰ .. S^{J-1}."""
        prompts = self.class_prompts
        tokens = prompts.tokens
        # Every position after the last EOT is invisible to the EOT features (causal mask).
        length = prompts.length
        placeholders = prompts.prefix.new_zeros(tokens.shape[0], self.n_ctx + self.n_semantic, prompts.prefix.shape[-1])
        class_embeddings = torch.cat([prompts.prefix, placeholders, prompts.suffix], dim=1)[:, :length]
        batch, classes = semantic_layers[0].shape[0], tokens.shape[0]
        limit = self.options["max_text_sequences"]
        per_call = classes if not limit else max(1, limit // batch)
        hook = self._text_hook(semantic_layers, batch)
        features = []
        for first in range(0, classes, per_call):
            chunk = class_embeddings[first : first + per_call]

            def build(rows: torch.Tensor, cut: int, chunk: torch.Tensor = chunk) -> torch.Tensor:
                """Layer-0 sequences ``(B·len(rows), cut, width)`` of these classes, built per bucket/chunk
                so that no B×C tensor outlives its chunk's pass."""
                part = chunk[rows, :cut] if rows.numel() != chunk.shape[0] or cut != chunk.shape[1] else chunk
                fused = kernels.fuse_prompts(
                    part.unsqueeze(0).expand(batch, -1, -1, -1), self.text_context[0].to(part.dtype),
                    semantic_layers[0].to(part.dtype), self.text_gates[0], start=1, backend=self.kernels,
                )
                return fused.view(batch * part.shape[0], cut, -1)

            # [SOS, ctx_t, S] are per image and shared by every class: the backbone runs them once per image.
            encoded = self.clip.encode_text(
                tokens[first : first + chunk.shape[0]], deep_prompts=hook, embeddings=build,
                shared_prefix=1 + self.n_ctx + self.n_semantic,
                length=length,
            )
            features.append(encoded.view(batch, chunk.shape[0], -1))
        return torch.cat(features, dim=1)

    def encode(
        self,
        images: torch.Tensor,
        semantic: Optional[torch.Tensor] = None,
        semantic_mask: Optional[torch.Tensor] = None,
        frozen_image: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """(image features ``(B, E)``, text features ``(B, C, E)``, frozen CLIP image features or None).

        The frozen image pass runs only when needed: for the ``clip`` source or when ``frozen_image``.
        """
        frozen_features = frozen_tokens = None
        if self.semantic_source == "clip" or frozen_image:
            with torch.no_grad():
                frozen_features, tokens = self.clip.encode_image(images, return_tokens=True)
                if self.semantic_source == "clip":
                    frozen_tokens = self.clip.model.visual.ln_post(tokens)
        semantic_layers = [self.initial_semantic(images.shape[0], semantic, semantic_mask, frozen_tokens)]
        image_features = self.clip.encode_image(images, deep_prompts=self._vision_hook(semantic_layers))
        text_features = self.encode_text(semantic_layers)
        return image_features, text_features, frozen_features

    def forward(self, images: torch.Tensor, semantic: Optional[torch.Tensor] = None,
                semantic_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        image_features, text_features, _ = self.encode(images, semantic, semantic_mask)
        return self.logits(image_features, text_features)

    # ----------------------------------------------------------------- loss
    def frozen_text_features(self) -> torch.Tensor:
        """Normalised zero-shot text features ``(C, E)`` of ``consistency_template``, once per class set."""
        if self._frozen_text_features is None:
            template = self.options["consistency_template"]
            self._frozen_text_features = template_text_features(self.clip, [template], self.classnames)
        return self._frozen_text_features

    def training_step(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """Cross-entropy plus the consistency terms whose weight is non-zero (frozen features only then)."""
        text_weight = self.options["text_consistency_weight"]
        image_weight = self.options["image_consistency_weight"]
        logit_weight = self.options["logit_consistency_weight"]
        image_features, text_features, frozen_image = self.encode(
            batch["images"], batch.get("semantic"), batch.get("semantic_mask"),
            frozen_image=bool(image_weight or logit_weight)
        )
        logits = self.logits(image_features, text_features)
        loss = F.cross_entropy(logits, batch["labels"])
        terms = {"ce": float(loss.detach())}
        frozen_text = self.frozen_text_features() if (text_weight or logit_weight) else None
        if text_weight:
            prompted = F.normalize(text_features, dim=-1)
            term = F.l1_loss(prompted, frozen_text.to(prompted.dtype).expand_as(prompted))
            loss = loss + text_weight * term
            terms["text_consistency"] = float(term.detach())
        if image_weight:
            prompted = F.normalize(image_features, dim=-1)
            term = F.l1_loss(prompted, F.normalize(frozen_image, dim=-1).to(prompted.dtype))
            loss = loss + image_weight * term
            terms["image_consistency"] = float(term.detach())
        if logit_weight:
            zero_shot = self.logits(frozen_image, frozen_text)
            term = F.kl_div(
                F.log_softmax(logits, dim=-1), F.log_softmax(zero_shot, dim=-1), reduction="batchmean", log_target=True
            )
            loss = loss + logit_weight * term
            terms["logit_consistency"] = float(term.detach())
        return loss, logits, terms
