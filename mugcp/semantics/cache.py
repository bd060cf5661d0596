"""Reading a semantic cache: ``SemanticCache`` gives each image's MLLM answer text and hidden states.

It reads a merged cache lazily: the index is loaded once, shard files are opened with safetensors
``safe_open`` (memory-mapped) on first use and a lookup reads only its rows. The layout is described
in :mod:`mugcp.semantics.cache_manifest`; caches are written by :mod:`mugcp.semantics.cache_writer`.
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from mugcp.semantics.cache_manifest import (
    HIDDEN,
    INDEX_FILE,
    MANIFEST_FILE,
    SHARD_DIR,
    TEXTS_FILE,
    CacheError,
    MissingKeyError,
    hint,
    read_manifest,
)


class SemanticCache:
    """Read-only, lazy view of a merged semantic cache.

    ``cache[key]`` is the (T, d_m) fp16 tensor of the answer-token hidden states (callers cast),
    ``cache.text(key)`` the answer text, ``cache.dim`` is d_m and ``cache.manifest`` the manifest.
    Shards are memory-mapped and opened on first use in each process, so the object can be
    handed to DataLoader workers (forked or spawned).
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        if not self.path.is_dir():
            raise CacheError(f"semantic cache {self.path} does not exist. Create it with `{hint(self.path)}`.")
        manifest = read_manifest(self.path)
        if manifest is None:
            raise CacheError(
                f"{self.path} has no {MANIFEST_FILE}, so it is not a semantic cache. "
                f"Create it with `{hint(self.path)}`."
            )
        index_file = self.path / INDEX_FILE
        if not index_file.is_file():
            has_shards = any((self.path / SHARD_DIR).glob("*.safetensors"))
            if has_shards:
                raise CacheError(
                    f"semantic cache {self.path} has shards but no {INDEX_FILE} (an interrupted extraction?). "
                    f"Finish it by rerunning the extraction, or index what is there with "
                    f"`python -m mugcp.extract --merge --out {self.path}`."
                )
            raise CacheError(f"semantic cache {self.path} holds no entries yet. Fill it with `{hint(self.path)}`.")
        index = json.loads(index_file.read_text(encoding="utf-8"))
        self.manifest: dict = manifest
        self.dim: int | None = index["dim"]
        self._shards: list[str] = index["shards"]
        self._entries: dict[str, list[int]] = index["entries"]
        self._texts: dict[str, str] | None = None
        self._handles: dict[int, Any] = {}
        self._pid = os.getpid()

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_handles"] = {}
        return state

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def keys(self) -> Iterable[str]:
        return self._entries.keys()

    def _entry(self, key: str) -> list[int]:
        try:
            return self._entries[key]
        except KeyError:
            pass
        failed = (self.manifest.get("failed") or {}).get(key)
        if failed is not None:
            raise MissingKeyError(
                f"{key!r}: the extraction could not read this image ({failed}); fix the file and rerun the "
                f"extraction into {self.path} (a rerun only adds missing images)."
            )
        raise MissingKeyError(
            f"{key!r} is not in the semantic cache {self.path} ({len(self)} entries, MLLM "
            f"{self.manifest.get('mllm')!r}). Add it with `{hint(self.path)}` (a rerun only adds missing images)."
        )

    def _handle(self, shard: int):
        if self._pid != os.getpid():
            self._handles, self._pid = {}, os.getpid()
        handle = self._handles.get(shard)
        if handle is None:
            file = self.path / SHARD_DIR / self._shards[shard]
            if not file.is_file():
                raise CacheError(
                    f"{file} is listed in {self.path / INDEX_FILE} but missing; rebuild the index with "
                    f"`python -m mugcp.extract --merge --out {self.path}` and rerun the extraction."
                )
            handle = safe_open(str(file), framework="pt").get_slice(HIDDEN)
            self._handles[shard] = handle
        return handle

    def __getitem__(self, key: str) -> torch.Tensor:
        shard, start, stop = self._entry(key)
        return self._handle(shard)[start:stop]

    def num_tokens(self, key: str) -> int:
        _, start, stop = self._entry(key)
        return stop - start

    def text(self, key: str) -> str:
        self._entry(key)
        if self._texts is None:
            texts = {}
            with open(self.path / TEXTS_FILE, encoding="utf-8") as handle:
                for line in handle:
                    record = json.loads(line)
                    texts[record["key"]] = record["text"]
            self._texts = texts
        return self._texts[key]

    def __repr__(self) -> str:
        return (f"SemanticCache({str(self.path)!r}, entries={len(self)}, dim={self.dim}, "
                f"mllm={self.manifest.get('mllm')!r})")
