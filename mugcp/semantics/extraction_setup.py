"""What an extraction job is given and what it reports, and the processes and devices it runs on.

``ExtractionSettings`` (the MLLM, prompt, layer, batch, dtype...), ``ExtractionSummary`` and
``DryRunReport`` (what a job did, or would do), and the ranks: one process, or ``torchrun``'s
(rank, world size and device from its environment, a process group when there are several).
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from mugcp.config_schema import choice, integer, invalid
from mugcp.errors import UserError
from mugcp.semantics.cache_manifest import STORED_DTYPE
from mugcp.semantics.mllm import DEFAULT_PROMPT

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

    def check(self) -> None:
        """Every value against its spec (the config schema's kinds and bounds), before anything is loaded."""
        for name, spec in SETTING_SPECS.items():
            value = getattr(self, name)
            if not spec.accepts(value):
                raise invalid(f"--{name.replace('_', '-')}", value, spec.allowed())
        if not str(self.prompt).strip():
            raise invalid("--prompt", self.prompt, "a non-empty question")


# The command's values, in the same specs as the config keys (mugcp.config_schema).
SETTING_SPECS = {
    "max_new_tokens": integer(low=1),
    "layer": integer(),
    "batch_size": integer(low=1),
    "dtype": choice("auto", *DTYPES),
}


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
