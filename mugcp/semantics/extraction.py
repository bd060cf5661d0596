"""The extraction job: every pending image of a source through the MLLM, into a semantic cache.

One process or many (``torchrun``): every rank reads which keys are already stored, takes every
``world_size``-th pending key, writes its own shards, and rank 0 merges the index at the end.
A rerun skips stored keys, so an interrupted job is resumed by running it again.
"""
from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from tqdm import tqdm

from mugcp.semantics.cache_manifest import (
    check_compatible,
    new_manifest,
    read_manifest,
    write_manifest,
)
from mugcp.semantics.cache_writer import (
    CacheWriter,
    merge_cache,
    read_failures,
    scan_shards,
)
from mugcp.semantics.extraction_setup import (
    DryRunReport,
    ExtractionError,
    ExtractionSettings,
    ExtractionSummary,
    resolve_device,
    resolve_dtype,
    start_distributed,
)
from mugcp.semantics.mllm import (
    MLLM,
    MLLMError,
    is_out_of_memory,
    load_text_config,
    resolve_layer,
    resolve_model_name,
)
from mugcp.semantics.sources import ImageSource, UnreadableImageError

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


def extract_keys(source: ImageSource, settings: ExtractionSettings, mllm_name: str, dtype: torch.dtype,
                 device: torch.device, keys: Sequence[str], writer_rank: int,
                 show_progress: bool) -> tuple[int, dict, int]:
    """Extract ``keys`` into the cache with one writer; returns (entries written, {key: why it failed}, final
    batch size)."""
    if not keys:  # a rerun with nothing left to do never loads the model
        return 0, {}, settings.batch_size
    mllm = MLLM(
        mllm_name,
        prompt=settings.prompt,
        layer=settings.layer,
        max_new_tokens=settings.max_new_tokens,
        dtype=dtype,
        device=device,
        revision=settings.revision,
    )
    writer = CacheWriter(settings.out, rank=writer_rank, shard_bytes=settings.shard_bytes,
                         shard_entries=settings.shard_entries)
    extractor = Extractor(source, settings, mllm, writer)
    with writer:
        extractor.run(keys, show_progress=show_progress)
    return writer.written, extractor.failed, extractor.batch_size


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

        written, failed_here, batch_size = extract_keys(source, settings, identity["mllm"], dtype, group.device, mine,
                                                        writer_rank=group.rank,
                                                        show_progress=settings.progress and group.rank == 0)

        results = group.gather((written, failed_here, batch_size))
        group.barrier()
        manifest = None
        if group.rank == 0:
            manifest = merge_cache(out, {"dataset": merged_dataset(stored_manifest, source.description)})
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


def merged_dataset(stored_manifest: dict | None, description: dict) -> dict:
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
    "extract_keys",
    "merged_dataset",
]
