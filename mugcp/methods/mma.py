"""MMA: residual adapters on the higher layers of both encoders, linked by a shared projection
(Yang et al., CVPR 2024)."""
from __future__ import annotations

from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F

from mugcp.config import ConfigError
from mugcp.config_schema import integer, number, option, text
from mugcp.methods.base import PromptLearner
from mugcp.methods.registry import register_method
from mugcp.methods.released import Mapping, ReleasedNames, indexed


class ScaleGradient(torch.autograd.Function):
    """The identity forward; the gradient multiplied by ``factor`` backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, factor: float) -> torch.Tensor:
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad * ctx.factor, None


def scale_gradient(x: torch.Tensor, factor: float) -> torch.Tensor:
    return ScaleGradient.apply(x, factor)


class Projections(nn.Module):
    """One modality's adapter of one layer: ``down`` (width -> dim, then ReLU) and ``up`` (dim -> width)."""

    def __init__(self, width: int, dim: int):
        super().__init__()
        self.down = nn.Linear(width, dim)
        self.up = nn.Linear(dim, width)


def kaiming_fan_out(module: nn.Module) -> None:
    """The released initialisation of every adapter Linear: He-normal over fan-out (ReLU gain), zero bias."""
    for layer in module.modules():
        if isinstance(layer, nn.Linear):
            nn.init.kaiming_normal_(layer.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(layer.bias)


def released_mma(state: dict, embed_dim: int) -> Mapping:
    """Released MMA (``AdapterLearner``): ``{text,visual}_adapter.{i}.down.0`` / ``.up`` and ``shared_adapter.{i}.0``
    for the 1-based layers ``i``; ours are ``{text,visual,shared}_adapter.{i-1}`` (0-based blocks)."""
    layers = sorted(indexed(state, r"shared_adapter\.(\d+)\.0\.weight"))
    if not layers:
        raise ConfigError("missing shared_adapter.<layer>.0.weight (one shared projection per adapted layer)")
    if layers != list(range(layers[0], layers[-1] + 1)) or layers[0] < 1:
        raise ConfigError(f"shared adapters exist for layers {layers}; expected consecutive layers from 1 on")
    mapping = Mapping()
    for layer in layers:
        block = layer - 1
        for kind in ("weight", "bias"):
            for tower in ("text", "visual"):
                for released, ours in (("down.0", "down"), ("up", "up")):
                    key = f"{tower}_adapter.{layer}.{released}.{kind}"
                    if key not in state:
                        raise ConfigError(f"missing ['{key}'] (every adapted layer has a text and a visual adapter)")
                    mapping.take(state, key, f"{tower}_adapter.{block}.{ours}.{kind}")
            mapping.take(state, f"shared_adapter.{layer}.0.{kind}", f"shared_adapter.{block}.{kind}")
    dim = state[f"shared_adapter.{layers[0]}.0.weight"].shape[0]
    mapping.options = {"layers_from": layers[0], "layers_to": layers[-1], "adapter_dim": dim}
    return mapping


@register_method(
    "mma",
    options={
        "layers_from": option(5, integer(1), "first block with adapters, 1-based as the released ADAPTER_START"),
        "layers_to": option(12, integer(1), "last block with adapters, 1-based and inclusive (at most the layers)"),
        "adapter_dim": option(32, integer(1), "width of each adapter's down-projection and the shared projection"),
        "scale": option(0.001, number(0.0, low_open=True), "the adapters' output scale (their gradients get 1/scale)"),
        "template": option("a photo of a {}.", text(), "the fixed hand-written prompt of every class"),
    },
    paper="Yang et al., MMA: Multi-Modal Adapter for Vision-Language Models (CVPR 2024)",
    conditions_on="nothing (adapters on both encoders, a fixed hand-written prompt)",
    config="configs/methods/mma.yaml",
    released=ReleasedNames(released_mma, dropped=("token_embedding", "tokenized_prompts")),
)
class MMA(PromptLearner):
    """Adapters beside the blocks ``layers_from .. layers_to`` (1-based, inclusive, as the released
    ``ADAPTER_START`` / ``ADAPTER_END`` count; 5..12 is the last 8 blocks of ViT-B) of both towers.

    At each such block ``j``, with ``h = ln_1(x)`` the block's own normalised input over every token, the
    block's output gets ``+ scale · up_m(ReLU(shared_j(ReLU(down_m(h)))))`` for the tower ``m`` (the shared
    ``adapter_dim × adapter_dim`` projection and its ReLU are one module per layer, used by both towers).
    The class texts are the fixed ``template``; the loss is cross-entropy.

    Gradients: the released code wraps the branch in gradient-scale layers (identity forward), ×``scale``
    on its input and ×1/``scale`` on its output. The backbone's residual stream therefore gets the true
    gradient of the scaled branch, while every adapter parameter gets its true gradient ×1/``scale``
    (×1000): the optimiser steps the adapters as if the branch were not scaled. ``ScaleGradient`` does the same.
    """

    def __init__(self, clip, classnames, options, **kwargs):
        super().__init__(clip, classnames, options, **kwargs)
        first, last, dim = options["layers_from"], options["layers_to"], options["adapter_dim"]
        depth = min(clip.text_layers, clip.vision_layers)
        if not 1 <= first <= last <= depth:
            raise ConfigError(f"method options layers_from={first}, layers_to={last} must satisfy "
                              f"1 <= layers_from <= layers_to <= {depth} (the blocks of {clip.name}, counted from 1).")
        if "{}" not in options["template"]:
            raise ConfigError(f"method option 'template' ('{options['template']}') has no '{{}}' where the class "
                              "name goes.")
        if options["scale"] <= 0:
            raise ConfigError(f"method option 'scale' must be positive, got {options['scale']}.")
        self.blocks = list(range(first - 1, last))
        self.text_adapter = nn.ModuleDict({str(b): Projections(clip.text_width, dim) for b in self.blocks})
        self.visual_adapter = nn.ModuleDict({str(b): Projections(clip.vision_width, dim) for b in self.blocks})
        self.shared_adapter = nn.ModuleDict({str(b): nn.Linear(dim, dim) for b in self.blocks})
        for module in (self.text_adapter, self.visual_adapter, self.shared_adapter):
            kaiming_fan_out(module)
        self.set_classnames(classnames)

    def build_class_inputs(self) -> None:
        texts = [self.options["template"].format(name) for name in self.classnames]
        self.class_tokens = self.clip.tokenize(texts)

    def branch(self, own: Projections, shared: nn.Linear, h: torch.Tensor) -> torch.Tensor:
        scale, dtype = float(self.options["scale"]), h.dtype
        h = scale_gradient(h, scale).to(own.down.weight.dtype)
        y = own.up(F.relu(shared(F.relu(own.down(h))))) * scale
        return scale_gradient(y, 1.0 / scale).to(dtype)

    def layer_adapters(self, tower: nn.ModuleDict, layers: int) -> list:
        adapters = [None] * layers
        for block in self.blocks:
            adapters[block] = partial(self.branch, tower[str(block)], self.shared_adapter[str(block)])
        return adapters

    def compute_text_features(self) -> torch.Tensor:
        adapters = self.layer_adapters(self.text_adapter, self.clip.text_layers)
        return self.clip.encode_text(self.class_tokens, adapters=adapters)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        adapters = self.layer_adapters(self.visual_adapter, self.clip.vision_layers)
        return self.clip.encode_image(images, adapters=adapters)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.logits(self.encode_images(images), self.text_features())

