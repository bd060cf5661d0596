"""Device and numeric precision for a run: decided once, here, never inside model code."""
from __future__ import annotations

import contextlib
import logging

import torch

from mugcp.config import ConfigError

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "amp_bf16", "amp_fp16")


def resolve_device(choice: str = "auto") -> torch.device:
    if choice in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(choice)
    except RuntimeError:
        raise ConfigError(f"train.device={choice!r} is not a device; use auto, cpu, cuda or cuda:N.") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"train.device={choice} but CUDA is not available on this machine; use train.device=cpu "
                          "or auto.")
    return device


def resolve_precision(choice: str, device: torch.device) -> str:
    """``auto`` is bf16 autocast on CUDA and fp32 on the CPU (bf16 matmul is far slower on CPUs)."""
    if choice in (None, "auto"):
        return "amp_bf16" if device.type == "cuda" else "fp32"
    if choice not in PRECISIONS:
        raise ConfigError(f"train.precision must be one of auto, {', '.join(PRECISIONS)}; got '{choice}'.")
    if device.type == "cpu" and choice != "fp32":
        log.warning("train.precision=%s on the CPU: reduced-precision matmul is much slower than fp32 here.", choice)
    return choice


def autocast(precision: str, device: torch.device):
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "amp_bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def peak_memory_mb(device: torch.device) -> float:
    """Peak accelerator memory, or the process's peak resident set size on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports kB
