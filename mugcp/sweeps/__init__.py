"""Sweeps over methods × datasets × shots × seeds: the sweep file, the planned jobs and their configs, and the
local runner (every training its own ``python -m mugcp.train`` process). Names are imported on first use."""
from __future__ import annotations

import importlib

_EXPORTS = {
    "Sweep": "sweep_file", "load_sweep": "sweep_file", "PROTOCOLS": "sweep_file", "TRANSFER_PROTOCOLS": "sweep_file",
    "Job": "jobs", "plan": "jobs", "run_name": "jobs",
    "run_jobs": "runner", "describe_counts": "runner",
    "subprocess_launcher": "launcher", "SubprocessLauncher": "launcher", "device_slots": "launcher",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
