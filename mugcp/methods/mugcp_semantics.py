"""MuGCP's semantic inputs, for the data path and the commands: which source a run uses, and captions.

``resolve_semantic_source`` maps the config's ``semantic.source`` to the method's; ``encode_captions``
and ``CaptionFeatures`` turn MLLM answer texts into token outputs of the frozen CLIP text encoder,
computed once per caption (DESIGN.md §2, SCP ``caption`` features).
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, Optional

import torch
import torch.nn as nn

from mugcp.backbones import ClipBackbone
from mugcp.config import ConfigError

SEMANTIC_SOURCES = ("mllm", "clip", "none")
SEMANTIC_FEATURES = ("caption", "hidden")


def resolve_semantic_source(cfg_semantic: Mapping, cache: Any = None) -> tuple[str, Optional[str]]:
    """Map the config's ``semantic.source`` (auto | mllm | clip | none) to a method source.

    Returns ``(source, warning)``: ``auto`` becomes ``mllm`` when a cache is given and otherwise
    ``clip`` with a warning to log (the result is an ablation, not MuGCP as published).
    """
    source = cfg_semantic.get("source", "auto")
    if source not in ("auto",) + SEMANTIC_SOURCES:
        raise ConfigError(f"semantic.source must be auto, mllm, clip or none; got {source!r}.")
    if source == "mllm" and cache is None:
        raise ConfigError(
            "semantic.source=mllm needs a semantic cache: set semantic.cache=PATH (made by python -m mugcp.extract), "
            "or use semantic.source=clip / none."
        )
    if source != "auto":
        return source, None
    if cache is not None:
        return "mllm", None
    return "clip", (
        f"semantic.source=auto found no semantic cache (semantic.cache={cfg_semantic.get('cache')!r}): MuGCP runs with "
        "the frozen CLIP image tokens in place of MLLM features (source 'clip', an ablation). Extract MLLM features "
        "with python -m mugcp.extract and set semantic.cache to use them."
    )


def encode_captions(clip: ClipBackbone, texts: Sequence[str], chunk: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Token outputs of the frozen CLIP text encoder for caption strings.

    Returns ``(features (N, T, d_t) float, mask (N, T) bool)``, zero-padded to the longest caption
    (SOS .. EOT; captions longer than CLIP's context are cut by its tokenizer).
    """
    rows: list[torch.Tensor] = []
    with torch.no_grad():
        for first in range(0, len(texts), chunk):
            tokens = clip.tokenize([str(text) for text in texts[first : first + chunk]])
            _, outputs = clip.encode_text(tokens, return_tokens=True)
            lengths = tokens.argmax(dim=-1) + 1
            rows.extend(outputs[row, : int(n)].float() for row, n in enumerate(lengths))
    if not rows:
        return torch.zeros(0, 0, clip.text_width), torch.zeros(0, 0, dtype=torch.bool)
    features = nn.utils.rnn.pad_sequence(rows, batch_first=True)
    lengths = torch.tensor([row.shape[0] for row in rows], device=features.device)
    mask = torch.arange(features.shape[1], device=features.device)[None] < lengths[:, None]
    return features, mask


class CaptionFeatures(Mapping):
    """Caption features per key, computed once and kept in memory: ``features[key] -> (T, d_t)`` fp16.

    Built from any source with ``text(key)`` (e.g. ``SemanticCache``) by :meth:`from_texts`; it holds
    only CPU tensors, so it pickles into DataLoader workers. ``dim`` is the CLIP text width.
    """

    def __init__(self, features: dict[str, torch.Tensor], dim: int):
        self._features = features
        self.dim = dim

    @classmethod
    def from_texts(cls, clip: ClipBackbone, source: Any, keys: Optional[Iterable[str]] = None,
                   chunk: int = 64) -> CaptionFeatures:
        """Encode ``source.text(key)`` for ``keys`` (default: all of ``source.keys()``)."""
        keys = list(source.keys() if keys is None else keys)
        features: dict[str, torch.Tensor] = {}
        for first in range(0, len(keys), chunk):
            part = keys[first : first + chunk]
            padded, mask = encode_captions(clip, [source.text(key) for key in part], chunk=chunk)
            for row, key in enumerate(part):
                features[key] = padded[row, mask[row]].to("cpu", torch.float16)
        return cls(features, clip.text_width)

    def __getitem__(self, key: str) -> torch.Tensor:
        try:
            return self._features[key]
        except KeyError:
            raise KeyError(
                f"no caption features for {key!r} ({len(self)} keys encoded); include it in the keys passed to "
                "CaptionFeatures.from_texts."
            ) from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._features)

    def __len__(self) -> int:
        return len(self._features)
