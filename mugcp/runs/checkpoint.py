"""Checkpoints: ``adapter_config.json`` + ``adapter_model.safetensors`` (+ ``trainer_state.pt`` to resume).

Only the prompt learner's trainable tensors are saved — never the frozen CLIP, never class names —
so a checkpoint is a few hundred kB and loads with other class names. A checkpoint folder is
written complete in a temporary folder and swapped in with renames, so a crash at any moment leaves
either the previous checkpoint or the new one, never a mixture.
"""
from __future__ import annotations

import json
import os
import pickle
import shutil
import tempfile
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors.torch import load_file, save_file

from mugcp.errors import UserError
from mugcp.runs.layout import (
    ADAPTER_CONFIG_FILE,
    ADAPTER_WEIGHTS_FILE,
    CHECKPOINT_DIR,
    PREVIOUS_SUFFIX,
    TRAINER_STATE_FILE,
)

FORMAT_VERSION = 1


class CheckpointError(UserError, ValueError):
    pass


def save_checkpoint(folder: str | os.PathLike, model, run_config: dict, trainer_state: Optional[dict] = None,
                    extra: Optional[dict] = None) -> Path:
    """Write the adapter (and optionally the trainer state) to ``folder`` atomically."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    staging.chmod(0o755)
    try:
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.adapter_state().items()}
        save_file(tensors, str(staging / ADAPTER_WEIGHTS_FILE))
        (staging / ADAPTER_WEIGHTS_FILE).chmod(0o644)  # safetensors creates it owner-only; checkpoints are shared
        config = {
            "format_version": FORMAT_VERSION,
            "method": model.method_name,
            "backbone": model.clip.name,
            "pretrained": model.clip.pretrained,
            "method_options": model.options,
            "num_trainable_parameters": model.num_trainable_parameters(),
            "tensors": {k: list(v.shape) for k, v in tensors.items()},
            "run_config": run_config,
        }
        config.update(extra or {})
        (staging / ADAPTER_CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        if trainer_state is not None:
            torch.save(trainer_state, staging / TRAINER_STATE_FILE)
        previous = folder.with_name(folder.name + PREVIOUS_SUFFIX)
        if previous.exists():
            shutil.rmtree(previous)
        if folder.exists():
            os.replace(folder, previous)
        os.replace(staging, folder)
        if previous.exists():
            shutil.rmtree(previous)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return folder


def find_checkpoint(folder: str | os.PathLike) -> Path:
    """The checkpoint folder itself, or a run folder holding ``checkpoint/``; errors name the path."""
    folder = Path(folder)
    candidates = [folder, folder / CHECKPOINT_DIR, folder.with_name(folder.name + PREVIOUS_SUFFIX)]
    for candidate in candidates:
        if (candidate / ADAPTER_CONFIG_FILE).is_file() and (candidate / ADAPTER_WEIGHTS_FILE).is_file():
            return candidate
    if not folder.exists():
        raise CheckpointError(f"checkpoint not found: {folder} does not exist.")
    raise CheckpointError(
        f"{folder} is not a checkpoint: expected {ADAPTER_CONFIG_FILE} and {ADAPTER_WEIGHTS_FILE} in it "
        f"(or in {folder / CHECKPOINT_DIR})."
    )


def read_checkpoint(folder: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor], Path]:
    path = find_checkpoint(folder)
    try:
        config = json.loads((path / ADAPTER_CONFIG_FILE).read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path / ADAPTER_CONFIG_FILE} is not valid JSON: {err}") from None
    for field in ("method", "backbone", "method_options"):
        if field not in config:
            raise CheckpointError(f"{path / ADAPTER_CONFIG_FILE} lacks the field '{field}'; was it written by mugcp?")
    try:
        tensors = load_file(str(path / ADAPTER_WEIGHTS_FILE))
    except Exception as err:
        raise CheckpointError(f"cannot read {path / ADAPTER_WEIGHTS_FILE}: {err}") from None
    return config, tensors, path


def read_trainer_state(folder: str | os.PathLike) -> Optional[dict[str, Any]]:
    """The optimiser, scheduler and loss-scaler state saved for ``--resume`` (None when absent).

    Read with ``weights_only=True``: tensors and plain containers only, so a run folder from
    elsewhere cannot run code when resumed. Files that need full unpickling are refused, not opened.
    """
    path = find_checkpoint(folder) / TRAINER_STATE_FILE
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "Unsupported global" in str(err):
            raise CheckpointError(
                f"{path} holds Python objects that only load with full unpickling, which can run code; mugcp refuses "
                "to open it. Resuming needs a trainer state written by this version: train again without --resume "
                "(the adapter weights beside it still evaluate)."
            ) from None
        raise _corrupt(path, "not a valid PyTorch file") from None
    except Exception as err:  # torch reports damaged files as RuntimeError, EOFError, zipfile errors...
        raise _corrupt(path, err) from None
    if not isinstance(state, dict) or not {"epoch", "step", "optimizer", "scheduler"} <= set(state):
        raise _corrupt(path, "not a mugcp trainer state")
    return state


def _corrupt(path: Path, err: BaseException | str) -> CheckpointError:
    reason = err if isinstance(err, str) else (str(err).splitlines()[0] if str(err) else type(err).__name__)
    return CheckpointError(
        f"{path} is damaged and cannot be read ({reason}). Resuming needs it: restore the file, or train again "
        "without --resume (--overwrite replaces the run)."
    )


def check_compatible(config: dict, method: str, backbone: str, source: Path) -> None:
    """A checkpoint for another method or backbone is refused, naming both."""
    problems = []
    if config["method"] != method:
        problems.append(f"method '{config['method']}' (checkpoint) vs '{method}' (requested)")
    if config["backbone"] != backbone:
        problems.append(f"backbone '{config['backbone']}' (checkpoint) vs '{backbone}' (requested)")
    if problems:
        raise CheckpointError(
            f"checkpoint {source} does not match this run: {'; '.join(problems)}. "
            "Drop the conflicting method.name / model.backbone setting, or pick the matching checkpoint."
        )
