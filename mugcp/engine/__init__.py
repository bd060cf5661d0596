"""Training, evaluation and checkpoints.

Names are imported on first use: the Slurm launcher's modules (``mugcp.engine.slurm*``) are imported by
commands before they know whether they train at all, and must not load open_clip and the methods.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "CheckpointError": "checkpoint", "read_checkpoint": "checkpoint", "save_checkpoint": "checkpoint",
    "evaluate": "evaluation", "evaluate_subsets": "evaluation", "harmonic_mean": "evaluation",
    "TrainingDiverged": "trainer", "train": "trainer",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
