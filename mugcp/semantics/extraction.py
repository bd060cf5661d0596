"""The extraction job: every pending image of a source through the MLLM, into a semantic cache.

One process or many (``torchrun``): every rank reads which keys are already stored, takes every
``world_size``-th pending key, writes its own shards, and rank 0 merges the index at the end.
A rerun skips stored keys, so an interrupted job is resumed by running it again.
"""
from __future__ import annotations

import os
import sys
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import torch
import torch.distributed as dist
from tqdm import tqdm

from mugcp.errors import UserError

from mugcp.semantics.cache import (
    STORED_DTYPE,
    CacheWriter,
    check_compatible,
    merge_cache,
    new_manifest,
    read_failures,
    read_manifest,
    scan_shards,
    write_manifest,
)
from mugcp.semantics.mllm import (
    DEFAULT_PROMPT,
    MLLM,
    MLLMError,
    is_out_of_memory,
    load_text_config,
    resolve_layer,
    resolve_model_name,
)
from mugcp.semantics.sources import ImageSource, UnreadableImageError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ExtractionError(UserError, RuntimeError):
    """The job cannot go on (e.g. one image alone does not fit in memory); the message says why."""


@dataclass
class ExtractionSettings:
    mllm: str
    out: Path
    prompt: str = DEFAULT_PROMPT
    max_new_tokens: int = 64
    layer: int = -1
    batch_size: int = 8
    dtype: str = "auto"
    device: str = "auto"
    revision: str | None = None
    progress: bool = True
    shard_bytes: int = 256 * 2**20
    shard_entries: int = 4096


@dataclass
class ExtractionSummary:
    requested: int
    already_stored: int
    extracted: int
    failed: dict[str, str]
    seconds: float
    manifest: dict | None = None
    final_batch_size: int = 0

    def describe(self, out: Path) -> str:
        rate = self.extracted / self.seconds if self.seconds > 0 else 0.0
        lines = [
            f"extracted {self.extracted} images in {self.seconds:.1f} s ({rate:.2f} img/s) into {out}; "
            f"{self.already_stored} of {self.requested} were already stored; {len(self.failed)} failed."
        ]
        for key, reason in list(self.failed.items())[:20]:
            lines.append(f"  failed: {key}: {reason}")
        if len(self.failed) > 20:
            lines.append(f"  ... and {len(self.failed) - 20} more (listed under 'failed' in manifest.json)")
        if self.manifest:
            lines.append(
                f"cache: {self.manifest['entries']} entries, {self.manifest['tokens']} tokens, "
                f"d_m={self.manifest['hidden_dim']}, {self.manifest['content_hash']}"
            )
        return "\n".join(lines)


@dataclass
class DryRunReport:
    requested: int
    already_stored: int
    pending: int
    hidden_dim: int
    max_new_tokens: int
    mean_tokens: float | None
    previously_failed: int
    per_token_bytes: int = field(init=False)

    def __post_init__(self) -> None:
        self.per_token_bytes = self.hidden_dim * torch.finfo(STORED_DTYPE).bits // 8

    @property
    def upper_bound_bytes(self) -> int:
        return self.pending * self.max_new_tokens * self.per_token_bytes

    def describe(self) -> str:
        lines = [
            f"images: {self.requested} requested, {self.already_stored} already stored, {self.pending} to extract"
            + (f" ({self.previously_failed} failed before and will be retried)" if self.previously_failed else ""),
            f"hidden states: d_m={self.hidden_dim}, {self.per_token_bytes} bytes per answer token (fp16)",
            f"cache growth, upper bound (every answer {self.max_new_tokens} tokens): {_human(self.upper_bound_bytes)}",
        ]
        if self.mean_tokens is not None:
            typical = self.pending * self.mean_tokens * self.per_token_bytes
            lines.append(f"cache growth at the stored mean of {self.mean_tokens:.1f} tokens/answer: {_human(typical)}")
        return "\n".join(lines)


def _human(size: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"


# ----------------------------------------------------------------------------------------------
# processes and devices


@dataclass
class Distributed:
    rank: int
    world_size: int
    device: torch.device
    owns_group: bool

    def barrier(self) -> None:
        if self.world_size > 1:
            if self.device.type == "cuda":
                dist.barrier(device_ids=[self.device.index])
            else:
                dist.barrier()

    def gather(self, value):
        if self.world_size == 1:
            return [value]
        values = [None] * self.world_size
        dist.all_gather_object(values, value)
        return values

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def resolve_device(name: str, local_rank: int) -> torch.device:
    if name == "auto":
        return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    return device


def start_distributed(device_name: str) -> Distributed:
    """Rank and device from torchrun's environment; a process group (NCCL on GPUs, gloo on CPUs) when N > 1."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name, local_rank)
    owns_group = False
    if world_size > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        owns_group = True
    return Distributed(rank, world_size, device, owns_group)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32  # reduced-precision matmul on CPUs is far slower, never a default there
    if name not in DTYPES:
        raise ExtractionError(f"--dtype {name!r}: use auto, {', '.join(DTYPES)}.")
    if device.type == "cpu" and name != "float32":
        warnings.warn(f"--dtype {name} on the CPU is much slower than float32.")
    return DTYPES[name]


# ----------------------------------------------------------------------------------------------
# the job


def requested_identity(settings: ExtractionSettings, dtype: torch.dtype) -> tuple[dict, object]:
    """The manifest fields that define the cache's entries; needs only the model's config."""
    name = resolve_model_name(settings.mllm)
    config, text_config = load_text_config(name, settings.revision)
    identity = {
        "mllm": name,
        # A local directory has no revision; a Hub model records the commit it resolved to.
        "mllm_revision": None if Path(name).is_dir() else getattr(config, "_commit_hash", None) or settings.revision,
        "prompt": settings.prompt,
        "layer": resolve_layer(settings.layer, text_config, name),
        "max_new_tokens": settings.max_new_tokens,
        "dtype": str(dtype).removeprefix("torch."),
    }
    return identity, text_config


def dry_run(source: ImageSource, settings: ExtractionSettings) -> DryRunReport:
    """Count what a run would do and estimate the cache growth; loads no weights, writes nothing."""
    device = resolve_device(settings.device, int(os.environ.get("LOCAL_RANK", "0")))
    identity, text_config = requested_identity(settings, resolve_dtype(settings.dtype, device))
    stored_manifest = read_manifest(settings.out)
    if stored_manifest is not None:
        check_compatible(settings.out, stored_manifest, {**identity, "dataset": source.description})
    stored = scan_shards(settings.out) if Path(settings.out).is_dir() else {}
    requested = set(source.keys)
    already = [stored[key] for key in requested & set(stored)]
    tokens = [entry.stop - entry.start for entry in stored.values()]
    failures = read_failures(settings.out) if Path(settings.out).is_dir() else {}
    return DryRunReport(
        requested=len(requested),
        already_stored=len(already),
        pending=len(requested) - len(already),
        hidden_dim=int(text_config.hidden_size),
        max_new_tokens=settings.max_new_tokens,
        mean_tokens=sum(tokens) / len(tokens) if tokens else None,
        previously_failed=len(set(failures) & (requested - set(stored))),
    )


def _chunks(keys: Sequence[str], size_of) -> Iterator[list[str]]:
    """Consecutive chunks whose size is read at each step (it shrinks after an out-of-memory)."""
    start = 0
    while start < len(keys):
        size = size_of()
        yield list(keys[start:start + size])
        start += size


class Extractor:
    """Runs one rank's share of the job."""

    def __init__(self, source: ImageSource, settings: ExtractionSettings, mllm: MLLM, writer: CacheWriter) -> None:
        self.source = source
        self.settings = settings
        self.mllm = mllm
        self.writer = writer
        self.batch_size = settings.batch_size
        self.failed: dict[str, str] = {}

    def _load(self, keys: list[str]) -> list[tuple[str, object]]:
        loaded = []
        for key in keys:
            try:
                loaded.append((key, self.source.open(key)))
            except UnreadableImageError as err:
                loaded.append((key, err))
        return loaded

    def _describe(self, keys: list[str], images: list) -> list:
        """Answers for a batch; on out-of-memory, the batch is split in halves (and later batches shrink)."""
        try:
            return self.mllm.describe(images)
        except Exception as err:
            if not is_out_of_memory(err):
                raise
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            if len(images) == 1:
                raise ExtractionError(
                    f"out of memory on a single image ({keys[0]}) with --max-new-tokens "
                    f"{self.settings.max_new_tokens}; lower --max-new-tokens, use --dtype bfloat16 on a GPU, "
                    "or a GPU with more memory."
                ) from err
            half = (len(images) + 1) // 2
            self.batch_size = max(1, min(self.batch_size, half))
            tqdm.write(f"out of memory on a batch of {len(images)} images; retrying in halves of {half} "
                       f"(batch size is now {self.batch_size})", file=sys.stderr)
            return self._describe(keys[:half], images[:half]) + self._describe(keys[half:], images[half:])

    def _process(self, loaded: list[tuple[str, object]]) -> None:
        good = [(key, image) for key, image in loaded if not isinstance(image, UnreadableImageError)]
        for key, error in loaded:
            if isinstance(error, UnreadableImageError):
                self.failed[key] = str(error)
                self.writer.add_failure(key, str(error))
                tqdm.write(f"skipping unreadable image {error}", file=sys.stderr)
        if good:
            keys = [key for key, _ in good]
            answers = self._describe(keys, [image for _, image in good])
            for key, answer in zip(keys, answers):
                self.writer.add(key, answer.text, answer.hidden)
        self.writer.flush()

    def run(self, keys: Sequence[str], show_progress: bool) -> int:
        bar = tqdm(total=len(keys), unit="img", desc="extract", disable=not show_progress, dynamic_ncols=True)
        # One loader thread decodes the next chunk while the model works on this one.
        with bar, ThreadPoolExecutor(max_workers=1) as pool:
            chunks = _chunks(keys, lambda: self.batch_size)
            upcoming = pool.submit(self._load, next(chunks, []))
            while True:
                loaded = upcoming.result()
                if not loaded:
                    break
                upcoming = pool.submit(self._load, next(chunks, []))
                self._process(loaded)
                bar.update(len(loaded))
                if self.failed:
                    bar.set_postfix(failed=len(self.failed))
        return self.writer.written


def extract(source: ImageSource, settings: ExtractionSettings) -> ExtractionSummary:
    """Extract every image of ``source`` that the cache at ``settings.out`` does not hold yet."""
    if settings.batch_size < 1:
        raise ExtractionError(f"--batch-size must be at least 1, got {settings.batch_size}.")
    started = time.perf_counter()
    group = start_distributed(settings.device)
    try:
        dtype = resolve_dtype(settings.dtype, group.device)
        identity, _ = requested_identity(settings, dtype)
        out = Path(settings.out)
        stored_manifest = read_manifest(out)
        # Every rank reads the same manifest, so a mismatch stops every rank alike.
        if stored_manifest is not None:
            check_compatible(out, stored_manifest, {**identity, "dataset": source.description})
        elif group.rank == 0:
            out.mkdir(parents=True, exist_ok=True)
            write_manifest(out, new_manifest(identity, {"dataset": source.description}))
        group.barrier()

        stored = set(scan_shards(out))
        group.barrier()  # nobody writes a shard before every rank has listed the stored keys
        requested = sorted(set(source.keys))
        pending = [key for key in requested if key not in stored]
        mine = pending[group.rank::group.world_size]

        written, failed_here, batch_size = 0, {}, settings.batch_size
        if mine:  # a rerun with nothing left to do never loads the model
            mllm = MLLM(
                identity["mllm"],
                prompt=settings.prompt,
                layer=settings.layer,
                max_new_tokens=settings.max_new_tokens,
                dtype=dtype,
                device=group.device,
                revision=settings.revision,
            )
            writer = CacheWriter(out, rank=group.rank, shard_bytes=settings.shard_bytes,
                                 shard_entries=settings.shard_entries)
            extractor = Extractor(source, settings, mllm, writer)
            with writer:
                extractor.run(mine, show_progress=settings.progress and group.rank == 0)
            written, failed_here, batch_size = writer.written, extractor.failed, extractor.batch_size

        results = group.gather((written, failed_here, batch_size))
        group.barrier()
        manifest = None
        if group.rank == 0:
            manifest = merge_cache(out, {"dataset": _merged_dataset(stored_manifest, source.description)})
        group.barrier()
        failed: dict[str, str] = {}
        for _, rank_failed, _ in results:
            failed.update(rank_failed)
        return ExtractionSummary(
            requested=len(requested),
            already_stored=len(requested) - len(pending),
            extracted=sum(written for written, _, _ in results),
            failed=failed,
            seconds=time.perf_counter() - started,
            manifest=manifest,
            final_batch_size=min(size for _, _, size in results),
        )
    finally:
        group.close()


def _merged_dataset(stored_manifest: dict | None, description: dict) -> dict:
    """The manifest's dataset record, with the splits of every run so far."""
    previous = (stored_manifest or {}).get("dataset") or {}
    merged = {**previous, **description}
    if "splits" in previous or "splits" in description:
        splits = list(dict.fromkeys([*previous.get("splits", []), *description.get("splits", [])]))
        merged["splits"] = splits
    return merged


__all__ = [
    "DryRunReport",
    "ExtractionError",
    "ExtractionSettings",
    "ExtractionSummary",
    "MLLMError",
    "dry_run",
    "extract",
]
