"""MuGCP: fast prompt learning for frozen CLIP models.

    import mugcp
    model = mugcp.create_model("coop", ["cat", "dog"], backbone="ViT-B-32", pretrained="none")
    logits = model(images)            # (B, 2): images a (B, 3, 224, 224) batch of preprocessed images

    model, preprocess = mugcp.load_run("runs/my_run", classnames=["cat", "dog"])   # a trained run
    model.predict([PIL.Image.open("cat.jpg")])                                      # top-k classes

The names are imported on first use: ``import mugcp`` alone (as every command's ``--help`` does)
loads neither torch nor open_clip.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "create_model": "mugcp.methods",
    "get_method": "mugcp.methods",
    "list_methods": "mugcp.methods",
    "get_tokenizer": "mugcp.backbones",
    "load_clip": "mugcp.backbones",
    "load_run": "mugcp.inference.inference",
}
__all__ = [*sorted(_EXPORTS), "__version__"]


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'mugcp' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
