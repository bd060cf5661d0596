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
    With ``mllm``, ``kind`` says whether the model reads the cache's MLLM hidden states (``hidden``) or
    its answer texts encoded by the frozen CLIP text encoder (``caption``, encoded once per run).
    """

    source: Optional[str] = None
    cache: Any = None
    kind: str = "caption"
    clip: Any = None

    @property
    def dim(self) -> Optional[int]:
        return self.cache.dim if self.source == "mllm" and self.kind == "hidden" else None

    def features_for(self, items: Sequence) -> Optional[Mapping]:
        """A key → (T, d) mapping covering ``items`` (missing keys are reported by the data loader)."""
        if self.source != "mllm":
            return None
        if self.kind == "hidden":
            return self.cache
        from mugcp.methods.mugcp import CaptionFeatures

        keys = sorted({item.key for item in items if item.key in self.cache})
        return CaptionFeatures.from_texts(self.clip, self.cache, keys=keys)

    train_features = eval_features = features_for


def resolve_semantics(cfg: dict, dataset=None) -> SemanticContext:
    """Resolve ``semantic.source`` (auto | mllm | clip | none) for methods that take semantic input."""
    spec = get_method(cfg["method"]["name"])
    if "semantic" not in getattr(spec.cls, "batch_inputs", ()):
        return SemanticContext()
    from mugcp.methods.mugcp import resolve_semantic_source

    cache_path = cfg["semantic"]["cache"]
    cache = None
    if cache_path:
        if Path(cache_path).exists():
            from mugcp.semantics import SemanticCache

            cache = SemanticCache(cache_path)
        elif cfg["semantic"]["source"] == "mllm":
            raise ConfigError(
                f"semantic.cache {cache_path} does not exist. Extract it first: "
                f"python -m mugcp.extract --config YOUR_CONFIG --mllm MODEL --out {cache_path}"
            )
    source, warning = resolve_semantic_source(cfg["semantic"], cache)
    if warning:
        log.warning(warning)
    kind = cfg["method"].get("semantic_features", spec.defaults.get("semantic_features", "caption"))
    return SemanticContext(source=source, cache=cache if source == "mllm" else None, kind=kind)


def method_options(cfg: dict, semantic: SemanticContext) -> dict:
    options = {k: v for k, v in cfg["method"].items() if k != "name"}
    if semantic.source is not None:
        options["semantic_source"] = semantic.source
        if semantic.dim is not None:
            options["semantic_dim"] = semantic.dim
    return options


def configure_text_path(clip, bucketing, memory_mb) -> None:
    """Apply ``model.text_bucketing`` and ``train.text_memory_mb`` to the backbone, refusing bad values."""
    if not isinstance(bucketing, bool):
        raise ConfigError(f"model.text_bucketing must be true or false, got {bucketing!r}.")
    if memory_mb == "auto" or memory_mb is None:
        memory_mb = None
    elif isinstance(memory_mb, bool) or not isinstance(memory_mb, (int, float)) or not memory_mb > 0:
        raise ConfigError(
            f"train.text_memory_mb must be 'auto' or a positive number of MiB (e.g. 4096), got {memory_mb!r}."
        )
    clip.text_bucketing = bucketing
    clip.text_memory_mb = memory_mb


def build_run_model(cfg: dict, classnames: Sequence[str], device: torch.device, semantic: SemanticContext, dataset_name: Optional[str] = None):
    model_cfg = cfg["model"]
    clip = load_clip(model_cfg["backbone"], pretrained=model_cfg["pretrained"], device=device, attention=model_cfg["attention"])
    configure_text_path(clip, model_cfg["text_bucketing"], cfg["train"]["text_memory_mb"])
    semantic.clip = clip
    return create_model(
        cfg["method"]["name"], classnames, backbone=clip, attention=model_cfg["attention"], kernels=model_cfg["kernels"],
        dataset=dataset_name, **method_options(cfg, semantic),
    )
