"""A run folder and the model it describes: the folder's file names (layout.py), setup and locking, checkpoints,
trained runs, device and precision, and released (Dassl) checkpoints imported into ours.

Names are imported on first use, so the Slurm launcher can read a run folder without loading torch.
"""
from __future__ import annotations

import importlib

_EXPORTS = {"CheckpointError": "checkpoint", "read_checkpoint": "checkpoint", "save_checkpoint": "checkpoint"}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
