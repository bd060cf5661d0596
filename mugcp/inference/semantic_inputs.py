"""Per-image MLLM semantics for a trained MuGCP run on new images: from a semantic cache, or an MLLM run now.

Runs whose method needs no semantics get an empty ``SemanticInputs`` (``needed`` is False).
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Optional

import torch

from mugcp.config import ConfigError


class _Answers(dict):
    """key → (caption text, hidden states): what a semantic cache holds, for the images at hand."""

    def text(self, key: str) -> str:
        return self[key][0]


class SemanticInputs:
    """Per-image MLLM semantics for a MuGCP run trained on them: from a cache, or an MLLM run now."""

    def __init__(self, run, learner, cache=None, mllm=None, device: Optional[torch.device] = None):
        options = learner.options
        self.needed = options.get("semantic_source") == "mllm"
        self.kind = options.get("semantic_features", "caption")
        self.dim = options.get("semantic_dim")
        self.run, self.learner = run, learner
        self.cache = self.mllm = None
        if not self.needed:
            if cache is not None or mllm is not None:
                raise ConfigError(
                    f"checkpoint {run.checkpoint} ({run.method}, semantic source "
                    f"{options.get('semantic_source', 'none')!r}) takes no MLLM semantics; "
                    "drop --semantic-cache / --mllm."
                )
            return
        if cache is not None and mllm is not None:
            raise ConfigError("give either --semantic-cache or --mllm, not both.")
        if cache is not None:
            from mugcp.semantics import SemanticCache

            self.cache = cache if isinstance(cache, SemanticCache) else SemanticCache(cache)
            if self.kind == "hidden" and self.cache.dim != self.dim:
                raise ConfigError(
                    f"semantic cache {cache} holds {self.cache.dim}-d hidden states but checkpoint {run.checkpoint} "
                    f"was trained on {self.dim}-d ones; use a cache made with the run's MLLM "
                    f"({self.run_mllm() or 'see its config.yaml'})."
                )
        elif mllm is not None:
            self.mllm = self._load_mllm(mllm, device or torch.device("cpu"))

    # ---- what the run was trained with
    def run_cache_manifest(self) -> Optional[dict]:
        from mugcp.semantics import read_manifest
        from mugcp.semantics.cache_manifest import CacheError

        path = self.run.cfg["semantic"].get("cache")
        try:
            return read_manifest(path) if path and Path(path).is_dir() else None
        except CacheError:
            return None

    def run_mllm(self) -> Optional[str]:
        return (self.run_cache_manifest() or {}).get("mllm")

    def missing_message(self, python: bool = False) -> str:
        mllm = self.run_mllm() or "MODEL"
        if python:
            fix = ("pass semantic_cache=DIR (made by `python -m mugcp.extract --mllm "
                   f"{mllm} --images IMAGE_DIR --out DIR`) or mllm='{mllm}' to mugcp.load_run, then call "
                   "model.predict(...) with image paths (cache keys) or PIL images (MLLM), or call "
                   "model(images, semantic=..., semantic_mask=...).")
        else:
            fix = (f"pass --semantic-cache DIR, made first with `python -m mugcp.extract --mllm {mllm} "
                   "--images IMAGE_DIR --out DIR` (its keys are paths relative to IMAGE_DIR), or --mllm "
                   f"{mllm} to run the MLLM on these images now.")
        return (f"checkpoint {self.run.checkpoint} is MuGCP trained on MLLM answers (semantic_source=mllm, "
                f"semantic_features={self.kind}), so every image needs its MLLM answer: {fix}")

    def _load_mllm(self, name: str, device: torch.device):
        from mugcp.semantics.extraction_setup import resolve_dtype
        from mugcp.semantics.mllm import DEFAULT_PROMPT, MLLM, MLLMError, resolve_model_name

        manifest = self.run_cache_manifest() or {}
        try:
            # Ask what the run's cache asked, so answers look like the ones the prompts were trained on.
            mllm = MLLM(resolve_model_name(name), prompt=manifest.get("prompt", DEFAULT_PROMPT),
                        layer=manifest.get("layer", -1), max_new_tokens=manifest.get("max_new_tokens", 64),
                        dtype=resolve_dtype("auto", device), device=device)
        except MLLMError as err:
            raise ConfigError(str(err)) from None
        if self.kind == "hidden" and mllm.hidden_dim != self.dim:
            raise ConfigError(
                f"--mllm {name} has {mllm.hidden_dim}-d hidden states but checkpoint {self.run.checkpoint} was trained "
                f"on {self.dim}-d ones; use the run's MLLM ({self.run_mllm() or 'see its semantic cache'})."
            )
        return mllm

    # ---- per batch
    def cache_key(self, candidates: Sequence[str]) -> Optional[str]:
        return next((key for key in candidates if key in self.cache), None)

    def answers(self, keys: Sequence[Sequence[str]], images) -> _Answers:
        """Answers for a batch; ``keys[i]`` lists cache-key candidates of image i, ``images()`` opens the PIL images."""
        if self.cache is not None:
            if any(candidates == [""] for candidates in keys):
                raise ConfigError("images without a name cannot be looked up in the semantic cache: pass image "
                                  "paths, or keys=[the cache key of each image] to model.predict.")
            found = [self.cache_key(candidates) for candidates in keys]
            missing = [candidates[0] for candidates, key in zip(keys, found) if key is None]
            if missing:
                raise ConfigError(self.missing_keys_message(missing, len(keys)))
            return _Answers({str(i): (self.cache.text(key), self.cache[key]) for i, key in enumerate(found)})
        if self.mllm is not None:
            return _Answers({str(i): (a.text, a.hidden) for i, a in enumerate(self.mllm.describe(images()))})
        raise ConfigError(self.missing_message(python=True))

    def missing_keys_message(self, missing: Sequence[str], total: int) -> str:
        shown = ", ".join(missing[:10]) + (" ..." if len(missing) > 10 else "")
        return (f"{len(missing)} of {total} images have no entry in semantic cache {self.cache.path}: {shown}. "
                f"Add them with `python -m mugcp.extract --mllm {self.run_mllm() or 'MODEL'} --images IMAGE_DIR --out "
                f"{self.cache.path}` (keys are paths relative to IMAGE_DIR, as predict looks them up).")

    def batch(self, keys: Sequence[Sequence[str]], images) -> dict:
        """``{"semantic": (B, T, d), "semantic_mask": (B, T)}`` for the model, or {} when it needs none."""
        if not self.needed:
            return {}
        from mugcp.data.loader import _pad_semantic

        answers = self.answers(keys, images)
        order = [str(i) for i in range(len(keys))]
        if self.kind == "caption":
            from mugcp.methods.mugcp_semantics import CaptionFeatures

            features = CaptionFeatures.from_texts(self.learner.clip, answers, keys=order)
            rows = [features[key] for key in order]
        else:
            rows = [torch.as_tensor(answers[key][1]) for key in order]
        semantic, mask = _pad_semantic(rows)
        return {"semantic": semantic, "semantic_mask": mask}
