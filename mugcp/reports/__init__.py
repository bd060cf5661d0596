"""Reports: runs' results found and aggregated over seeds, tables (Markdown, CSV) and plots. They read only
the files runs write. Names are imported on first use."""
from __future__ import annotations

import importlib

_EXPORTS = {
    "write_report": "report", "LAYOUTS": "tables",
    "find_runs": "results", "find_evaluations": "results", "aggregate": "results", "aggregate_transfer": "results",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
