"""Training and evaluation: the trainer, optimiser and schedule, stopping on signals, data-parallel
processes, evaluation of a model and of a saved checkpoint. Names are imported on first use."""
from __future__ import annotations

import importlib

_EXPORTS = {
    "evaluate": "evaluation", "evaluate_subsets": "evaluation", "harmonic_mean": "evaluation",
    "TrainingDiverged": "trainer", "train": "trainer",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
