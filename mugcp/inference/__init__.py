"""A trained run on new images: loading it (``load_run``), its semantic inputs, image files, and inspecting what
it learned. Names are imported on first use."""
from __future__ import annotations

import importlib

_EXPORTS = {"load_run": "inference", "TrainedModel": "inference", "Preprocess": "inference"}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
