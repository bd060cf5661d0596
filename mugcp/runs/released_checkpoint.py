"""Released checkpoints into ours: a Dassl file (``model.pth.tar-N``) → an adapter checkpoint folder.

Reading is weights-only, in either of torch's file formats: objects of other classes in the file
(Dassl's learning-rate schedulers) are read as inert stand-ins, so no code from the file runs. Which released
tensor is which of ours is each method's own declaration (``ReleasedNames`` beside the method, see
:mod:`mugcp.methods.released`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from mugcp.config import ConfigError, load_config
from mugcp.methods.registry import get_method, list_methods
from mugcp.methods.released import split_state
from mugcp.runs.layout import ADAPTER_CONFIG_FILE
from mugcp.runs.torch_files import read_weights_only


def methods_with_released_checkpoints() -> list[str]:
    return [name for name in list_methods() if get_method(name).released is not None]


def read_dassl_file(path: Path) -> dict:
    """The pickled dict, read weights-only (either torch format; see :mod:`mugcp.runs.torch_files`)."""
    if not path.is_file():
        raise ConfigError(f"Dassl checkpoint not found: {path}. Pass a model.pth.tar-N or model-best.pth.tar file.")
    content = read_weights_only(path, "a Dassl model.pth.tar-N file")
    if not isinstance(content, dict) or not isinstance(content.get("state_dict"), dict):
        found = sorted(content)[:8] if isinstance(content, dict) else type(content).__name__
        raise ConfigError(f"{path} is not a Dassl checkpoint: expected a dict with 'state_dict' "
                          f"(and 'epoch', 'optimizer'), found {found}.")
    return content


def released_state(content: dict) -> dict[str, torch.Tensor]:
    state = {}
    for key, value in content["state_dict"].items():
        key = key[len("module."):] if key.startswith("module.") else key
        state[key] = value
    return state


def check_out_folder(out: Path, overwrite: bool) -> None:
    """Writing replaces the whole folder: refuse to replace anything but a checkpoint, and that only when asked."""
    if not out.exists() and not out.is_symlink():
        return
    if not out.is_dir():
        raise ConfigError(f"--out {out} is a file; --out names the checkpoint folder to write: choose a new folder.")
    if not any(out.iterdir()):
        return
    if not (out / ADAPTER_CONFIG_FILE).is_file():
        raise ConfigError(f"--out {out} is a folder that holds no checkpoint (no {ADAPTER_CONFIG_FILE}); "
                          "--overwrite replaces only a "
                          "checkpoint folder: choose a new folder for --out.")
    if not overwrite:
        raise ConfigError(f"--out {out} already holds a checkpoint: pass --overwrite to replace it, "
                          "or choose another --out.")


def convert(method: str, backbone: str, source: Path, out: Path, pretrained: str = "openai",
            options: Optional[dict] = None, overwrite: bool = False) -> tuple[Path, list[str]]:
    """Write our checkpoint folder for a released Dassl checkpoint; returns the folder and the released
    keys left out (class-name buffers, frozen CLIP weights). An existing checkpoint folder ``out`` is
    replaced only with ``overwrite``; any other existing ``out`` is refused."""
    from mugcp.backbones import load_clip, normalize_model_name
    from mugcp.methods import create_model, resolve_options
    from mugcp.runs.checkpoint import save_checkpoint

    known = methods_with_released_checkpoints()
    if method not in known:
        raise ConfigError(f"--method '{method}' has no released checkpoints to convert; "
                          f"choose one of {', '.join(sorted(known))}.")
    check_out_folder(Path(out), overwrite)
    content = read_dassl_file(source)
    backbone = normalize_model_name(backbone)
    clip = load_clip(backbone, pretrained=None)  # only the architecture matters: no weights are read or written
    mapping, ignored = split_state(method, get_method(method).released, released_state(content), clip.embed_dim, source)
    given = dict(options or {})
    clashes = {key: (given[key], value) for key, value in mapping.options.items()
               if key in given and given[key] != value}
    if clashes:
        raise ConfigError(f"--option values contradict the tensor shapes in {source}: "
                          + ", ".join(f"{k}={a} (file: {b})" for k, (a, b) in clashes.items()))
    cfg = load_config(f"methods/{method}")
    method_options = resolve_options(method, {**{k: v for k, v in cfg["method"].items() if k != "name"},
                                              **given, **mapping.options}, "convert --option")
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
