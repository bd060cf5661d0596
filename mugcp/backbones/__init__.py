"""Frozen CLIP backbones that take prompt tokens (see ``ClipBackbone``)."""
from __future__ import annotations

import logging
from typing import Optional

import torch

from mugcp.backbones.clip import OPENAI_MEAN, OPENAI_STD, ClipBackbone
from mugcp.backbones.weights import PretrainedLoadError, build_open_clip_model, normalize_model_name

log = logging.getLogger(__name__)

__all__ = ["ClipBackbone", "PretrainedLoadError", "load_clip", "normalize_model_name", "get_tokenizer",
           "quick_gelu_setting", "OPENAI_MEAN", "OPENAI_STD"]


def quick_gelu_setting(value) -> Optional[bool]:
    """``model.quick_gelu`` as ``load_clip`` takes it: ``auto`` → None, ``true`` / ``false`` → bool."""
    if value is None or value == "auto":
        return None
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    from mugcp.config import ConfigError

    raise ConfigError(f"model.quick_gelu must be auto, true or false, got {value!r}.")


def get_tokenizer(name: str):
    import open_clip

    return open_clip.get_tokenizer(normalize_model_name(name))


def load_clip(
    name: str,
    pretrained: Optional[str] = None,
    device: str | torch.device = "cpu",
    attention: str = "sdpa",
    quick_gelu: Optional[bool] = None,
) -> ClipBackbone:
    """Build a frozen, prompt-ready CLIP.

    ``pretrained``: ``None``/``"none"`` (random weights, real architecture), an open_clip tag
    (``"openai"``), a local weights file, a Hugging Face CLIP folder, or ``"auto"`` (the ``openai``
    weights when they can be loaded, otherwise random weights with a warning; check
    ``backbone.pretrained``, which is ``None`` whenever the weights are random).
    ``quick_gelu``: ``None`` (auto: TorchScript archives, ``-quickgelu`` names, open_clip tags and
    Hugging Face configs trained with QuickGELU get it), ``True`` or ``False``; the choice is logged.
    """
    name = normalize_model_name(name)
    if pretrained == "auto":
        try:
            model, loaded = build_open_clip_model(name, "openai", quick_gelu)
        except PretrainedLoadError as err:
            log.warning(
                "!!! pretrained=auto: could not load the 'openai' weights for %s (%s). Using RANDOM weights: "
                "accuracies from this run say nothing about CLIP. !!!",
                name,
                err,
            )
            model, loaded = build_open_clip_model(name, None, quick_gelu)
    else:
        model, loaded = build_open_clip_model(name, pretrained, quick_gelu)
    backbone = ClipBackbone(model, name, loaded, get_tokenizer(name), attention_backend=attention)
    return backbone.to(device)
