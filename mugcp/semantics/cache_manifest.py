"""The semantic cache's format: its layout, the manifest that says who made it, and its errors.

A semantic cache holds per-image MLLM answers (text + answer-token hidden states) on disk.

Layout of a cache directory::

    manifest.json      who made it: MLLM id/revision, prompt, layer, dtype, dataset, content hash, failures
    index.json         key -> (shard, first row, end row), written by the merge step
    texts.jsonl        one {"key", "text", "tokens"} object per line, written by the merge step
    shards/*.safetensors
                       one fp16 tensor "hidden" (rows, d_m) holding many entries back to back; the
                       header metadata lists each entry (key, rows, text, sha256), so every shard is
                       self-describing and the index can always be rebuilt from the shards alone
    failed-rNNNNN.json images a rank could not read, {key: reason}

Shards are the unit of atomic writing. A writer (one per rank) writes a small *part* shard after
every batch, so an interrupted run loses at most the batch in flight, and from time to time folds
its parts into one large shard whose metadata names the parts it ``replaces``; a crash between
the two writes leaves duplicates that the next scan recognises and removes. ``merge_cache`` scans
all shards and writes ``index.json``, ``texts.jsonl`` and the final manifest atomically.

The writer is :mod:`mugcp.semantics.cache_writer`; ``SemanticCache`` (:mod:`mugcp.semantics.cache`)
reads a merged cache lazily: the index is loaded once, shard files are opened
with safetensors ``safe_open`` (memory-mapped) on first use and a lookup reads only its rows.
"""
from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from mugcp.errors import UserError
from mugcp.utils import atomic_write_json

FORMAT = "mugcp-semantic-cache"
FORMAT_VERSION = 1
SHARD_FORMAT = "mugcp-semantic-shard/1"
HIDDEN = "hidden"
STORED_DTYPE = torch.float16

MANIFEST_FILE = "manifest.json"
INDEX_FILE = "index.json"
TEXTS_FILE = "texts.jsonl"
SHARD_DIR = "shards"
FAILED_GLOB = "failed-r*.json"

# Fields that decide what an entry *means*; a cache never mixes entries that differ in one of them.
IDENTITY_FIELDS = ("mllm", "mllm_revision", "prompt", "layer", "max_new_tokens", "dtype")

EXTRACT_HINT = (
    "python -m mugcp.extract --mllm MODEL_DIR (--images DIR | --dataset NAME --root DIR | --config FILE) "
    "--out {path}"
)


class CacheError(UserError, RuntimeError):
    """A semantic cache that cannot be read or written as asked; the message says how to fix it."""


class CacheMismatchError(CacheError):
    """The cache on disk was made with a different MLLM, prompt, layer, ... than the one requested."""


class MissingKeyError(UserError, KeyError):
    """A key that is not in the cache. ``str()`` shows the message itself, not its repr."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


def hint(path: str | os.PathLike) -> str:
    return EXTRACT_HINT.format(path=path)




def read_manifest(path: str | os.PathLike) -> dict | None:
    """The manifest of the cache at ``path``, or None when there is none yet."""
    file = Path(path) / MANIFEST_FILE
    if not file.is_file():
        return None
    try:
        manifest = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise CacheError(f"{file}: not valid JSON ({err}); restore it or extract into a new --out directory.") from None
    if manifest.get("format") != FORMAT:
        raise CacheError(f"{file}: not a MuGCP semantic cache manifest (format {manifest.get('format')!r}).")
    if manifest.get("version", 0) > FORMAT_VERSION:
        raise CacheError(
            f"{file}: cache format version {manifest['version']} is newer than this library reads "
            f"({FORMAT_VERSION}); upgrade mugcp."
        )
    return manifest


def new_manifest(identity: Mapping[str, Any], extra: Mapping[str, Any] | None = None) -> dict:
    import transformers

    manifest: dict[str, Any] = {"format": FORMAT, "version": FORMAT_VERSION}
    manifest.update({field: identity.get(field) for field in IDENTITY_FIELDS})
    manifest.update(
        {
            "hidden_dtype": str(STORED_DTYPE).removeprefix("torch."),
            "transformers_version": transformers.__version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
    )
    for key, value in (extra or {}).items():
        if key not in IDENTITY_FIELDS:
            manifest[key] = value
    return manifest


def check_compatible(path: str | os.PathLike, stored: Mapping[str, Any], requested: Mapping[str, Any]) -> None:
    """Refuse to add entries made with other settings than the stored ones (no silent mixing)."""
    diffs = [
        f"{field}: cache has {stored.get(field)!r}, requested {requested.get(field)!r}"
        for field in IDENTITY_FIELDS
        if field in requested and stored.get(field) != requested.get(field)
    ]
    stored_name = (stored.get("dataset") or {}).get("name")
    requested_name = (requested.get("dataset") or {}).get("name")
    if stored_name and requested_name and stored_name != requested_name:
        diffs.append(f"dataset: cache has {stored_name!r}, requested {requested_name!r}")
    if diffs:
        raise CacheMismatchError(
            f"the semantic cache at {path} was made with different settings, refusing to mix entries:\n  "
            + "\n  ".join(diffs)
            + "\nRerun with the cache's settings to add to it, or pass a new --out directory."
        )


def write_manifest(path: str | os.PathLike, manifest: Mapping[str, Any]) -> None:
    atomic_write_json(Path(path) / MANIFEST_FILE, dict(manifest))
