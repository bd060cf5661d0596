"""A trained run read back from disk: its checkpoint, its resolved config and its class names.

Shared by ``mugcp.evaluate`` (the checkpoint's settings win over the evaluation config's) and by
``mugcp.predict`` / ``mugcp.load_run`` (the model rebuilt with the run's weights for new images).
"""
from __future__ import annotations

import copy
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from mugcp.config import DEFAULTS, ConfigError, merge
from mugcp.data.classnames import validate_classnames
from mugcp.runs.checkpoint import read_checkpoint
from mugcp.runs.layout import SPLITS_FILE
from mugcp.runs.learned_classes import is_class_specific, learned_classes_problem, preview


def apply_checkpoint_settings(cfg: dict, ckpt_config: dict) -> dict:
    """Make ``cfg`` build the checkpoint's model: its method and options, and the weights it was trained on."""
    cfg["method"] = {"name": ckpt_config["method"], **ckpt_config["method_options"]}
    if cfg["model"]["pretrained"] == "auto" and ckpt_config.get("pretrained") is None:
        cfg["model"]["pretrained"] = "none"  # a run trained on random weights is rebuilt on the same seed-0 weights
    return cfg


@dataclass
class TrainedRun:
    """What a run folder (or a bare checkpoint folder) holds, read once."""

    checkpoint: Path
    ckpt_config: dict
    tensors: dict[str, torch.Tensor]
    cfg: dict
    train_classnames: Optional[list[str]]
    classnames: Optional[list[str]]  # every class the run saw: training classes, then evaluation-only ones

    @property
    def method(self) -> str:
        return self.ckpt_config["method"]

    def resolve_classnames(self, requested: Optional[Sequence[str]]) -> list[str]:
        """The class names to predict over; class-specific prompts refuse any others."""
        requested = validate_classnames(requested) if requested is not None else None
        if is_class_specific(self.ckpt_config):
            own = self.train_classnames
            if own is None:
                raise ConfigError(
                    f"checkpoint {self.checkpoint} learned one prompt per class (method option class_specific=true) "
                    f"but its run folder has no {SPLITS_FILE} naming those classes; copy the run's {SPLITS_FILE} "
                    "next to the checkpoint folder."
                )
            if requested is not None and learned_classes_problem(own, requested):
                raise ConfigError(
                    f"checkpoint {self.checkpoint} learned one prompt per class (method option class_specific=true) "
                    f"for its {len(own)} training classes ({preview(own)}), so it cannot classify other class "
                    "names. Omit --classes / classnames to use its own classes, or train with "
                    "method.class_specific=false for prompts that transfer."
                )
            return list(own)
        if requested is not None:
            return list(requested)
        if self.classnames is None:
            raise ConfigError(
                f"checkpoint {self.checkpoint} records no class names (no {SPLITS_FILE} beside it): "
                "pass them with --classes \"a,b,c\" or --classes-file FILE (Python: classnames=[...])."
            )
        return list(self.classnames)


def run_classnames(checkpoint: Path) -> tuple[Optional[list[str]], Optional[list[str]]]:
    """(training classes, all classes) from the run's ``splits.json``; (None, None) when there is none."""
    for folder in (checkpoint.parent, checkpoint):
        path = folder / SPLITS_FILE
        if path.is_file():
            break
    else:
        return None, None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        train = list(data["train"]["classnames"])
        everything = list(dict.fromkeys(train + [n for subset in data.get("eval", {}).values()
                                                 for n in subset["classnames"]]))
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise ConfigError(f"{path}: not a splits file written by mugcp ({type(err).__name__}: {err}).") from None
    return train, everything


def read_trained_run(folder) -> TrainedRun:
    """Read a run folder (``RUN`` or ``RUN/checkpoint``): adapter, the run's config and its class names."""
    ckpt_config, tensors, path = read_checkpoint(folder)
    cfg = merge(copy.deepcopy(DEFAULTS), ckpt_config.get("run_config") or {}, "checkpoint run config", strict=False)
    apply_checkpoint_settings(cfg, ckpt_config)
    train_names, all_names = run_classnames(path)
    return TrainedRun(path, ckpt_config, tensors, cfg, train_names, all_names)
