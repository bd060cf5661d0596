"""The semantic cache: per-image MLLM answers (text + answer-token hidden states) on disk.

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

``SemanticCache`` reads a merged cache lazily: the index is loaded once, shard files are opened
with safetensors ``safe_open`` (memory-mapped) on first use and a lookup reads only its rows.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from mugcp.errors import UserError

from mugcp.utils import atomic_write, atomic_write_json, atomic_write_text

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


# ----------------------------------------------------------------------------------------------
# manifest


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


# ----------------------------------------------------------------------------------------------
# shards


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
        raise CacheError(f"{file}: not a readable safetensors shard ({err}); delete it and rerun the extraction.") from None
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
    listings = {file.name: _read_shard_listing(file) for file in files}
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

    def __enter__(self) -> "CacheWriter":
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


# ----------------------------------------------------------------------------------------------
# reader


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
                f"{self.path} has no {MANIFEST_FILE}, so it is not a semantic cache. Create it with `{hint(self.path)}`."
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
        return f"SemanticCache({str(self.path)!r}, entries={len(self)}, dim={self.dim}, mllm={self.manifest.get('mllm')!r})"
