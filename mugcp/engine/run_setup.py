"""Pieces shared by the train and evaluate commands: the run folder, the model, semantic features."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import torch

from mugcp.backbones import load_clip
from mugcp.config import ConfigError
from mugcp.methods import create_model, get_method

log = logging.getLogger("mugcp")


def open_run_folder(output: Path, resume: bool, overwrite: bool = False) -> logging.Handler:
    """Create the run folder and send the ``mugcp`` log there (``log.txt``) as well as to the console."""
    if output.exists() and not resume and not overwrite and any((output / name).exists() for name in ("checkpoint", "metrics.json")):
        raise ConfigError(
            f"output folder {output} already holds a run. Pass --resume to continue it, --overwrite to replace it, "
            "or choose another --output."
        )
    output.mkdir(parents=True, exist_ok=True)
    logger = logging.getLogger("mugcp")
    logger.setLevel(logging.INFO)
    logger.propagate = False  # the console handler below already prints; avoid doubled lines via the root logger
    if not any(isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler) for h in logger.handlers):
        console = logging.StreamHandler()
        console.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(console)
    handler = logging.FileHandler(output / "log.txt", mode="a" if resume else "w", encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    logger.addHandler(handler)
    return handler


@dataclass
class SemanticContext:
    """Which semantic features a run uses and where they come from.

    ``source`` is None for methods that take no semantic input, else ``mllm`` | ``clip`` | ``none``.
    """

    source: Optional[str] = None
    cache: Any = None
    dim: Optional[int] = None

    def train_features(self, items: Sequence) -> Optional[Mapping]:
        return self.cache if self.source == "mllm" else None

    eval_features = train_features


def resolve_semantics(cfg: dict, dataset=None) -> SemanticContext:
    """Resolve ``semantic.source`` (auto | mllm | clip | none) for methods that take semantic input."""
    spec = get_method(cfg["method"]["name"])
    if "semantic" not in getattr(spec.cls, "batch_inputs", ()):
        return SemanticContext()
    source, cache_path = cfg["semantic"]["source"], cfg["semantic"]["cache"]
    if source not in ("auto", "mllm", "clip", "none"):
        raise ConfigError(f"semantic.source must be auto, mllm, clip or none; got '{source}'.")
    cache = None
    if source in ("auto", "mllm") and cache_path:
        if not Path(cache_path).exists():
            if source == "mllm":
                raise ConfigError(
                    f"semantic.cache {cache_path} does not exist. Extract it first: "
                    "python -m mugcp.extract --config YOUR_CONFIG --mllm MODEL --out " + str(cache_path)
                )
        else:
            from mugcp.semantics import SemanticCache

            cache = SemanticCache(cache_path)
    if source == "mllm" and cache is None:
        raise ConfigError("semantic.source=mllm needs semantic.cache=PATH (made by python -m mugcp.extract).")
    if source == "auto":
        if cache is None:
            log.warning(
                "semantic.source=auto: no semantic cache (semantic.cache=%s); using the frozen CLIP image tokens in place of "
                "MLLM features (source 'clip', an ablation). Extract MLLM features with python -m mugcp.extract.",
                cache_path,
            )
            source = "clip"
        else:
            source = "mllm"
    return SemanticContext(source=source, cache=cache, dim=cache.dim if cache is not None else None)


def method_options(cfg: dict, semantic: SemanticContext) -> dict:
    options = {k: v for k, v in cfg["method"].items() if k != "name"}
    if semantic.source is not None:
        options["semantic_source"] = semantic.source
        if semantic.dim is not None:
            options["semantic_dim"] = semantic.dim
    return options


def build_run_model(cfg: dict, classnames: Sequence[str], device: torch.device, semantic: SemanticContext, dataset_name: Optional[str] = None):
    model_cfg = cfg["model"]
    clip = load_clip(model_cfg["backbone"], pretrained=model_cfg["pretrained"], device=device, attention=model_cfg["attention"])
    return create_model(
        cfg["method"]["name"], classnames, backbone=clip, attention=model_cfg["attention"], kernels=model_cfg["kernels"],
        dataset=dataset_name, **method_options(cfg, semantic),
    )
