"""Writing a semantic cache: self-describing safetensors shards, written atomically, and the merge step.

A writer (one per rank) writes a small *part* shard after every batch, so an interrupted run loses at
most the batch in flight, and from time to time folds its parts into one large shard whose metadata
names the parts it ``replaces``; a crash between the two writes leaves duplicates that the next scan
recognises and removes. ``merge_cache`` scans all shards and writes ``index.json``, ``texts.jsonl``
and the final manifest atomically. The layout is described in :mod:`mugcp.semantics.cache_manifest`.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
import uuid
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from mugcp.semantics.cache_manifest import (
    FAILED_GLOB,
    FORMAT,
    FORMAT_VERSION,
    HIDDEN,
    INDEX_FILE,
    MANIFEST_FILE,
    SHARD_DIR,
    SHARD_FORMAT,
    STORED_DTYPE,
    TEXTS_FILE,
    CacheError,
    check_compatible,
    hint,
    new_manifest,
    read_manifest,
    write_manifest,
)
from mugcp.utils import atomic_write, atomic_write_json, atomic_write_text


@dataclass(frozen=True)
class ShardEntry:
    key: str
    shard: str
    start: int
    stop: int
    text: str
    sha256: str


def _entry_digest(rows: torch.Tensor) -> str:
    return hashlib.sha256(rows.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


def _as_rows(key: str, hidden: torch.Tensor, dim: int | None) -> torch.Tensor:
    if not isinstance(hidden, torch.Tensor) or hidden.dim() != 2:
        shape = tuple(hidden.shape) if isinstance(hidden, torch.Tensor) else type(hidden).__name__
        raise CacheError(f"hidden states for {key!r} must be a 2-D tensor (tokens, d_m), got {shape}.")
    if hidden.shape[0] == 0:
        raise CacheError(f"hidden states for {key!r} have 0 rows; every entry needs at least one token.")
    if dim is not None and hidden.shape[1] != dim:
        raise CacheError(f"hidden states for {key!r} have width {hidden.shape[1]}, the cache stores d_m={dim}.")
    rows = hidden.detach().to("cpu", STORED_DTYPE)
    if not torch.isfinite(rows).all():
        raise CacheError(
            f"hidden states for {key!r} are not finite in {STORED_DTYPE} (values beyond +-65504 or NaN); "
            "choose another --layer or check the model's dtype."
        )
    return rows.contiguous()


def _write_shard(file: Path, entries: list[tuple[str, str, torch.Tensor, str]], replaces: list[str]) -> None:
    """Write (key, text, rows, sha) entries as one shard, atomically."""
    listing, offset = [], 0
    for key, text, rows, digest in entries:
        listing.append([key, offset, offset + rows.shape[0], text, digest])
        offset += rows.shape[0]
    hidden = torch.cat([rows for _, _, rows, _ in entries])
    metadata = {
        "format": SHARD_FORMAT,
        "entries": json.dumps(listing, ensure_ascii=False),
        "replaces": json.dumps(replaces),
    }

    def write(tmp: str) -> None:
        save_file({HIDDEN: hidden}, tmp, metadata=metadata)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())

    atomic_write(file, write)


def _read_shard_listing(file: Path) -> tuple[list[list], list[str]]:
    try:
        with safe_open(str(file), framework="pt") as handle:
            metadata = handle.metadata() or {}
    except Exception as err:  # a foreign or truncated file: name it, never guess
        raise CacheError(f"{file}: not a readable safetensors shard ({err}); "
                         "delete it and rerun the extraction.") from None
    if metadata.get("format") != SHARD_FORMAT:
        raise CacheError(f"{file}: not a MuGCP semantic shard (metadata format {metadata.get('format')!r}).")
    return json.loads(metadata["entries"]), json.loads(metadata.get("replaces", "[]"))


def scan_shards(path: str | os.PathLike, remove_replaced: bool = False) -> dict[str, ShardEntry]:
    """All entries stored in the shards of ``path`` (reads shard headers only).

    Parts that a later consolidated shard replaces are ignored (and deleted with
    ``remove_replaced``); a key stored twice keeps its first shard in name order, with a warning.
    """
    shard_dir = Path(path) / SHARD_DIR
    files = sorted(shard_dir.glob("*.safetensors")) if shard_dir.is_dir() else []
    listings = {}
    for file in files:
        try:
            listings[file.name] = _read_shard_listing(file)
        except CacheError:
            # A part that another writer folded and deleted between the listing and the read: only shard
            # tasks write while others scan, and their shares are disjoint, so the keys it held are not
            # this scanner's to extract; the merge scans again once every writer has ended.
            if file.exists():
                raise
    replaced = {name for _, replaces in listings.values() for name in replaces}
    entries: dict[str, ShardEntry] = {}
    duplicates = 0
    for name, (listing, _) in listings.items():
        if name in replaced:
            if remove_replaced:
                (shard_dir / name).unlink(missing_ok=True)
            continue
        for key, start, stop, text, digest in listing:
            if key in entries:
                duplicates += 1
                continue
            entries[key] = ShardEntry(key, name, start, stop, text, digest)
    if duplicates:
        warnings.warn(f"{shard_dir}: {duplicates} keys are stored in more than one shard; the first copy is used.")
    return entries


def read_failures(path: str | os.PathLike) -> dict[str, str]:
    failures: dict[str, str] = {}
    for file in sorted(Path(path).glob(FAILED_GLOB)):
        failures.update(json.loads(file.read_text(encoding="utf-8")))
    return failures


class CacheWriter:
    """Adds entries to a cache directory; one writer per process (rank).

    ``add`` buffers an entry, ``flush`` makes everything added so far durable as one part shard
    (call it after every batch), ``close`` folds the remaining parts into one shard. Parts are
    folded into a consolidated shard whenever they hold ``shard_bytes`` or ``shard_entries``.
    The writer does not touch the index: call ``merge_cache`` when every writer is closed.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        rank: int = 0,
        shard_bytes: int = 256 * 2**20,
        shard_entries: int = 4096,
    ) -> None:
        self.path = Path(path)
        self.shard_dir = self.path / SHARD_DIR
        self.shard_dir.mkdir(parents=True, exist_ok=True)
        self.rank = rank
        self.shard_bytes = shard_bytes
        self.shard_entries = shard_entries
        # A fresh token per writer keeps names unique across reruns with the same rank.
        self._stem = f"{time.strftime('%Y%m%d%H%M%S')}-{uuid.uuid4().hex[:6]}-r{rank:05d}"
        self._sequence = 0
        self._pending: list[tuple[str, str, torch.Tensor, str]] = []
        self._since_fold: list[tuple[str, str, torch.Tensor, str]] = []
        self._parts: list[str] = []
        self._keys: set[str] = set()
        self._failures: dict[str, str] = {}
        self._failure_file = self.path / f"failed-r{rank:05d}.json"
        if self._failure_file.is_file():
            self._failures = json.loads(self._failure_file.read_text(encoding="utf-8"))
        self.dim: int | None = None
        self.written = 0

    def add(self, key: str, text: str, hidden: torch.Tensor) -> None:
        if not isinstance(key, str) or not key:
            raise CacheError(f"cache keys must be non-empty strings, got {key!r}.")
        if not isinstance(text, str):
            raise CacheError(f"the text for {key!r} must be a str, got {type(text).__name__}.")
        if key in self._keys:
            raise CacheError(f"key {key!r} was added twice to the same writer.")
        rows = _as_rows(key, hidden, self.dim)
        self.dim = rows.shape[1]
        self._keys.add(key)
        self._pending.append((key, text, rows, _entry_digest(rows)))

    def add_failure(self, key: str, reason: str) -> None:
        self._failures[key] = reason
        atomic_write_json(self._failure_file, self._failures)

    def _next_name(self, kind: str) -> str:
        self._sequence += 1
        return f"{self._stem}-{kind}{self._sequence:06d}.safetensors"

    def flush(self) -> None:
        if not self._pending:
            return
        name = self._next_name("p")
        _write_shard(self.shard_dir / name, self._pending, replaces=[])
        self._parts.append(name)
        self._since_fold.extend(self._pending)
        self.written += len(self._pending)
        self._pending = []
        held = sum(rows.numel() * rows.element_size() for _, _, rows, _ in self._since_fold)
        if held >= self.shard_bytes or len(self._since_fold) >= self.shard_entries:
            self._fold()

    def _fold(self) -> None:
        if len(self._parts) > 1:
            _write_shard(self.shard_dir / self._next_name("s"), self._since_fold, replaces=self._parts)
            for name in self._parts:
                (self.shard_dir / name).unlink(missing_ok=True)
        self._parts, self._since_fold = [], []

    def close(self) -> None:
        self.flush()
        self._fold()

    def __enter__(self) -> CacheWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        # On an error keep what is durable (the parts) and do not fold: folding is only tidying.
        if exc_type is None:
            self.close()
        else:
            self.flush()


def content_hash(entries: Mapping[str, ShardEntry]) -> str:
    """A digest of (key, text, rows) over all entries; independent of how entries fell into shards."""
    digest = hashlib.sha256()
    for key in sorted(entries):
        entry = entries[key]
        digest.update(json.dumps([key, entry.text, entry.stop - entry.start, entry.sha256]).encode("utf-8"))
    return "sha256:" + digest.hexdigest()


def merge_cache(path: str | os.PathLike, manifest_updates: Mapping[str, Any] | None = None) -> dict:
    """Rebuild ``index.json`` and ``texts.jsonl`` from the shards and finalise the manifest.

    Safe to rerun at any time (``python -m mugcp.extract --merge --out DIR``).
    """
    path = Path(path)
    manifest = read_manifest(path)
    if manifest is None:
        raise CacheError(f"{path}: no {MANIFEST_FILE}; this is not a semantic cache. Create one with `{hint(path)}`.")
    entries = scan_shards(path, remove_replaced=True)
    shards = sorted({entry.shard for entry in entries.values()})
    shard_ids = {name: i for i, name in enumerate(shards)}
    dim = None
    for name in shards:
        with safe_open(str(path / SHARD_DIR / name), framework="pt") as handle:
            width = handle.get_slice(HIDDEN).get_shape()[1]
        if dim is not None and width != dim:
            raise CacheError(f"{path / SHARD_DIR / name}: width {width} differs from the other shards ({dim}).")
        dim = width
    ordered = sorted(entries)
    index = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "dim": dim,
        "shards": shards,
        "entries": {key: [shard_ids[entries[key].shard], entries[key].start, entries[key].stop] for key in ordered},
    }
    texts = "".join(
        json.dumps({"key": key, "text": entries[key].text, "tokens": entries[key].stop - entries[key].start},
                   ensure_ascii=False) + "\n"
        for key in ordered
    )
    failures = {key: reason for key, reason in read_failures(path).items() if key not in entries}
    manifest = dict(manifest)
    manifest.update(manifest_updates or {})
    manifest.update(
        {
            "hidden_dim": dim,
            "entries": len(entries),
            "tokens": sum(entry.stop - entry.start for entry in entries.values()),
            "shards": len(shards),
            "content_hash": content_hash(entries),
            "failed": failures,
            "merged": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
    )
    # The manifest goes last: a reader that sees the new manifest also sees the new index.
    atomic_write_text(path / TEXTS_FILE, texts)
    atomic_write_text(path / INDEX_FILE, json.dumps(index, ensure_ascii=False, separators=(",", ":")))
    write_manifest(path, manifest)
    return manifest


def write_cache(
    path: str | os.PathLike,
    entries: Mapping[str, tuple[str, torch.Tensor]],
    manifest_extra: Mapping[str, Any] | None = None,
) -> dict:
    """Write ``{key: (text, hidden (T, d_m))}`` into the cache at ``path`` and merge it; returns the manifest.

    For tests and for caches made outside ``mugcp.extract``. ``manifest_extra`` fills manifest
    fields (e.g. ``{"mllm": "my-model", "prompt": "...", "dataset": {"name": "dtd"}}``). Adding
    to an existing cache requires matching identity fields, like the extraction does.
    """
    path = Path(path)
    extra = dict(manifest_extra or {})
    existing = read_manifest(path)
    if existing is None:
        write_manifest(path, new_manifest(extra, extra))
    else:
        check_compatible(path, existing, extra)
    stored = scan_shards(path)
    clashes = sorted(set(entries) & set(stored))
    if clashes:
        raise CacheError(f"{path}: keys already stored: {clashes[:5]}{' ...' if len(clashes) > 5 else ''}.")
    with CacheWriter(path) as writer:
        for key, (text, hidden) in entries.items():
            writer.add(key, text, hidden)
    return merge_cache(path)
