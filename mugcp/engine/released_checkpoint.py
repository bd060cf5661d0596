"""Released checkpoints into ours: a Dassl file (``model.pth.tar-N``) → an adapter checkpoint folder.

Reading is weights-only: objects of other classes in the file (Dassl's learning-rate schedulers) are
read as inert stand-ins, so no code from the file runs. Which released tensor is which of ours is
each method's own declaration (``ReleasedNames`` beside the method, see :mod:`mugcp.methods.released`).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import torch

from mugcp.config import ConfigError, load_config
from mugcp.methods.registry import get_method, list_methods
from mugcp.methods.released import split_state

log = logging.getLogger("mugcp.convert")


def methods_with_released_checkpoints() -> list[str]:
    return [name for name in list_methods() if get_method(name).released is not None]


def _stand_in(name: str) -> type:
    """An inert class standing for ``module.Qualified`` (e.g. Dassl's scheduler): never runs its code."""
    module, _, qualname = name.rpartition(".")

    def init(self, *args, **kwargs):
        self.args = args

    return type(qualname, (), {"__module__": module, "__qualname__": qualname, "__init__": init, "__setstate__": lambda self, state: None})


def read_dassl_file(path: Path) -> dict:
    """The pickled dict, read with ``torch.load(weights_only=True)``. Objects of other classes in it
    (Dassl's learning-rate schedulers) are read as inert stand-ins, so no code from the file runs."""
    if not path.is_file():
        raise ConfigError(f"Dassl checkpoint not found: {path}. Pass a model.pth.tar-N or model-best.pth.tar file.")
    try:
        unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except Exception as err:
        raise ConfigError(f"{path} is not a torch checkpoint ({type(err).__name__}: {err}); expected a Dassl model.pth.tar-N file.") from None
    stand_ins = [_stand_in(name) for name in unsafe]
    if stand_ins:
        log.debug("reading %d non-tensor object types as inert stand-ins: %s", len(unsafe), ", ".join(unsafe))
    try:
        with torch.serialization.safe_globals(stand_ins):
            content = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:
        raise ConfigError(f"cannot read {path} as a weights-only torch checkpoint: {err}") from None
    if not isinstance(content, dict) or not isinstance(content.get("state_dict"), dict):
        found = sorted(content)[:8] if isinstance(content, dict) else type(content).__name__
        raise ConfigError(f"{path} is not a Dassl checkpoint: expected a dict with 'state_dict' (and 'epoch', 'optimizer'), found {found}.")
    return content


def released_state(content: dict) -> dict[str, torch.Tensor]:
    state = {}
    for key, value in content["state_dict"].items():
        key = key[len("module."):] if key.startswith("module.") else key
        state[key] = value
    return state


def convert(method: str, backbone: str, source: Path, out: Path, pretrained: str = "openai", options: Optional[dict] = None) -> tuple[Path, list[str]]:
    """Write our checkpoint folder for a released Dassl checkpoint; returns the folder and the released
    keys left out (class-name buffers, frozen CLIP weights)."""
    from mugcp.backbones import load_clip, normalize_model_name
    from mugcp.engine.checkpoint import save_checkpoint
    from mugcp.methods import create_model, resolve_options

    known = methods_with_released_checkpoints()
    if method not in known:
        raise ConfigError(f"--method '{method}' has no released checkpoints to convert; choose one of {', '.join(sorted(known))}.")
    content = read_dassl_file(source)
    backbone = normalize_model_name(backbone)
    clip = load_clip(backbone, pretrained=None)  # only the architecture matters: no weights are read or written
    mapping, ignored = split_state(method, get_method(method).released, released_state(content), clip.embed_dim, source)
    given = dict(options or {})
    clashes = {key: (given[key], value) for key, value in mapping.options.items() if key in given and given[key] != value}
    if clashes:
        raise ConfigError(f"--option values contradict the tensor shapes in {source}: " + ", ".join(f"{k}={a} (file: {b})" for k, (a, b) in clashes.items()))
    cfg = load_config(f"methods/{method}")
    method_options = resolve_options(method, {**{k: v for k, v in cfg["method"].items() if k != "name"}, **given, **mapping.options}, "convert --option")
    torch.manual_seed(0)
    # Checkpoints hold no class names; a class-specific CoOp context needs one name per class row.
    count = mapping.tensors["ctx"].shape[0] if method == "coop" and mapping.options.get("class_specific") else 2
    placeholder_classes = [f"class {i}" for i in range(count)]
    try:
        model = create_model(method, placeholder_classes, backbone=clip, **method_options)
        model.load_adapter_state(mapping.tensors, source=str(source))
    except ValueError as err:
        raise ConfigError(f"{source} does not fit {method} on {backbone}: {err}") from None
    cfg["model"].update({"backbone": backbone, "pretrained": pretrained})
    cfg["method"] = {"name": method, **method_options}
    extra = {
        "pretrained": pretrained,
        "converted_from": {"file": str(source), "epoch": content.get("epoch"), "released_keys": sorted(mapping.used)},
    }
    return save_checkpoint(out, model, cfg, extra=extra), ignored
