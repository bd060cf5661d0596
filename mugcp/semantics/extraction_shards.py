"""One shard of an extraction, run without a process group, and the merge that checks the cache is complete.

``python -m mugcp.extract ... --shard I --shards N`` (what each task of a Slurm job array runs, or a task
of a hand-written ``sbatch --array``): shard I owns the images ``sorted(requested keys)[I::N]``. Shares
are cut from the *requested* keys, not from the pending ones, because tasks start at different times
and each sees a different part of the cache written; the requested keys are the same for all. A shard
extracts those of its images the cache does not hold yet into its own shard files (writer rank I),
then stops: no barrier, no merge. ``merge_checked`` runs once every shard has ended: it indexes the
cache and names the images still missing, by shard. Running a shard again redoes only its missing images.
"""
from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from mugcp.semantics.cache_manifest import CacheError, check_compatible, new_manifest, read_manifest, write_manifest
from mugcp.semantics.cache_writer import merge_cache, read_failures, scan_shards
from mugcp.semantics.extraction import extract_keys, merged_dataset, requested_identity
from mugcp.semantics.extraction_setup import (
    ExtractionError,
    ExtractionSettings,
    ExtractionSummary,
    resolve_device,
    resolve_dtype,
)
from mugcp.semantics.sources import ImageSource


class CacheIncomplete(CacheError):
    """The merged cache lacks requested images (a shard failed or has not run); the message names them."""


def check_shard(index: Optional[int], count: int) -> None:
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ExtractionError(f"--shards must be a whole number >= 1, got {count!r}.")
    if index is not None and (isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < count):
        raise ExtractionError(f"--shard {index!r} is outside 0..{count - 1} (--shards {count}).")


def shard_share(keys: Sequence[str], index: int, count: int) -> list[str]:
    """The keys shard ``index`` of ``count`` owns: the same for every task whatever the cache holds."""
    return sorted(set(keys))[index::count]


def shards_with_missing(keys: Sequence[str], stored, count: int) -> dict[int, list[str]]:
    """``{shard: its keys not stored}`` for every shard that has any."""
    missing = {index: [key for key in shard_share(keys, index, count) if key not in stored] for index in range(count)}
    return {index: left for index, left in missing.items() if left}


def extract_shard(source: ImageSource, settings: ExtractionSettings, index: int, count: int) -> ExtractionSummary:
    """Extract the missing images of shard ``index`` of ``count``; writes shards, not the index."""
    check_shard(index, count)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ExtractionError("--shard runs as one process; under torchrun leave --shard out (the ranks share the "
                              "work), or start one process per shard.")
    if settings.batch_size < 1:
        raise ExtractionError(f"--batch-size must be at least 1, got {settings.batch_size}.")
    started = time.perf_counter()
    # A Slurm task sees the GPUs given to it, numbered from 0.
    device = resolve_device(settings.device, 0)
    dtype = resolve_dtype(settings.dtype, device)
    identity, _ = requested_identity(settings, dtype)
    out = Path(settings.out)
    requested = {**identity, "dataset": source.description}
    if read_manifest(out) is None:
        # Shards that start together may each write it; they write the same identity, and the check
        # below reads back whichever landed last.
        out.mkdir(parents=True, exist_ok=True)
        write_manifest(out, new_manifest(identity, {"dataset": source.description}))
    check_compatible(out, read_manifest(out), requested)

    share = shard_share(source.keys, index, count)
    stored = scan_shards(out)
    mine = [key for key in share if key not in stored]
    written, failed, batch_size = extract_keys(source, settings, identity["mllm"], dtype, device, mine,
                                               writer_rank=index, show_progress=settings.progress)
    return ExtractionSummary(
        requested=len(share),
        already_stored=len(share) - len(mine),
        extracted=written,
        failed=failed,
        seconds=time.perf_counter() - started,
        manifest=None,
        final_batch_size=batch_size,
    )


@dataclass
class Completeness:
    """What a merged cache holds of the requested images."""

    requested: int
    stored: int
    unreadable: dict[str, str]              # requested, not stored, recorded as unreadable images
    missing: list[str]                      # requested, not stored, never tried (or their shard failed)
    missing_by_shard: dict[int, list[str]] = field(default_factory=dict)
    shards: int = 1

    @property
    def complete(self) -> bool:
        return not self.missing

    def describe(self, out: os.PathLike, rerun: str = "") -> str:
        unreadable = (f"; {len(self.unreadable)} unreadable (listed under 'failed' in manifest.json)"
                      if self.unreadable else "")
        if self.complete:
            return f"{out} is complete: {self.stored} of {self.requested} images stored{unreadable}."
        lines = [f"{out} is incomplete: {len(self.missing)} of {self.requested} images are missing{unreadable}."]
        if self.shards > 1:
            for index, keys in sorted(self.missing_by_shard.items()):
                shown = ", ".join(keys[:3]) + (" ..." if len(keys) > 3 else "")
                lines.append(f"  shard {index} of {self.shards}: {len(keys)} missing ({shown})")
        else:
            lines.append("  missing: " + ", ".join(self.missing[:5]) + (" ..." if len(self.missing) > 5 else ""))
        lines.append(rerun or "Rerun the extraction command: it extracts only the missing images.")
        return "\n".join(lines)


def check_complete(out: os.PathLike, keys: Sequence[str], shards: int = 1) -> Completeness:
    stored = scan_shards(out)
    failures = read_failures(out)
    requested = sorted(set(keys))
    absent = [key for key in requested if key not in stored]
    missing = [key for key in absent if key not in failures]
    missing_set = set(missing)
    by_shard = {index: [key for key in left if key in missing_set]
                for index, left in shards_with_missing(requested, stored, shards).items()}
    return Completeness(
        requested=len(requested),
        stored=len(requested) - len(absent),
        unreadable={key: failures[key] for key in absent if key in failures},
        missing=missing,
        missing_by_shard={index: left for index, left in by_shard.items() if left},
        shards=shards,
    )


def merge_checked(out: os.PathLike, source: ImageSource, shards: int = 1) -> tuple[dict, Completeness]:
    """Index the cache (``merge_cache``, with the source's splits added to its dataset record) and say
    what of ``source`` it holds. Run it once every shard has ended."""
    manifest = read_manifest(out)
    if manifest is None:
        raise CacheIncomplete(f"{out}: no manifest.json: no shard has written anything yet, so there is nothing "
                              "to merge.")
    manifest = merge_cache(out, {"dataset": merged_dataset(manifest, source.description)})
    return manifest, check_complete(out, source.keys, shards)
