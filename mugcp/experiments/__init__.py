"""Experiments: sweeps over methods × datasets × shots × seeds, run here, and the reports of their results.

Above the engine: a sweep runs every training as its own ``python -m mugcp.train`` process, and
reports read only the files runs write. Names are imported on first use, so importing this package
(e.g. for a command's ``--help``) costs nothing.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "Sweep": "sweep_file", "load_sweep": "sweep_file", "PROTOCOLS": "sweep_file", "TRANSFER_PROTOCOLS": "sweep_file",
    "Job": "jobs", "plan": "jobs", "run_name": "jobs", "METRICS_FILE": "jobs",
    "run_jobs": "runner", "subprocess_launcher": "runner", "SubprocessLauncher": "runner", "device_slots": "runner", "describe_counts": "runner",
    "write_report": "report", "LAYOUTS": "tables",
    "find_runs": "results", "find_evaluations": "results", "aggregate": "results", "aggregate_transfer": "results",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
