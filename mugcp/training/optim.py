"""Optimiser and learning-rate schedule built from the ``optim`` config section.

``optim.scheduler``:

- ``released`` (default): the schedule of the released CoOp/CoCoOp/MaPLe/KgCoOp/PromptSRC trainers,
  Dassl's ``ConstantWarmupScheduler`` around ``CosineAnnealingLR(T_max=MAX_EPOCH)`` stepped once per
  epoch (after the epoch's last optimiser step). Every step of epoch ``e`` (0-based) uses one rate:
  ``warmup_lr`` while ``e < warmup_epochs``, then ``lr * (1 + cos(pi * (e - warmup_epochs) / epochs)) / 2``.
  The cosine's period counts the warm-up epochs too, so the last epoch's rate is above zero.
- ``cosine_per_step``: warm-up as above, then a cosine over the remaining optimiser steps to zero.
- ``constant``: warm-up as above, then ``lr``.

The schedule's epoch: a run of ``total_steps`` optimiser steps over ``optim.epochs`` epochs gives
step ``k`` (0-based) the epoch ``k * epochs // total_steps``. With ``optim.max_steps`` unset (or not
below ``epochs`` x batches per epoch) that is the data epoch, as in the released code; when
``max_steps`` cuts the run short, the whole schedule (warm-up, cosine) is compressed into it, each
epoch lasting ``max_steps / epochs`` steps. A resumed run's schedule is a function of the step count
alone, so it continues exactly, mid-epoch included.
"""
from __future__ import annotations

import math

import torch

from mugcp.config import ConfigError

SCHEDULES = ("released", "cosine_per_step", "constant")


def parameter_groups(params, base_lr: float) -> list[dict]:
    """Trainable parameters as optimiser groups: a plain iterable is one group at ``base_lr``; groups given as
    ``{"params": [...], "lr_scale": s}`` (``PromptLearner.parameter_groups``) run at ``s · base_lr``."""
    items = list(params)
    if not items or not isinstance(items[0], dict):
        items = [{"params": items}]
    groups = []
    for group in items:
        trainable = [p for p in group["params"] if p.requires_grad]
        if trainable:
            scale = float(group.get("lr_scale", 1.0))
            groups.append({**group, "params": trainable, "lr_scale": scale, "lr": base_lr * scale})
    return groups


def build_optimizer(params, optim_cfg: dict) -> torch.optim.Optimizer:
    params = parameter_groups(params, float(optim_cfg["lr"]))
    if not params:
        raise ValueError("this method has no trainable parameters; evaluate it with python -m mugcp.evaluate instead.")
    name = optim_cfg["name"].lower()
    if name == "sgd":
        return torch.optim.SGD(params, lr=optim_cfg["lr"], momentum=optim_cfg["momentum"],
                               weight_decay=optim_cfg["weight_decay"])
    # adam: weight decay added to the gradient (L2, Dassl's "adam", TCP's released optimiser); adamw: decoupled.
    adam = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}.get(name)
    if adam is not None:
        return adam(params, lr=optim_cfg["lr"], betas=tuple(optim_cfg["betas"]), eps=optim_cfg["eps"],
                    weight_decay=optim_cfg["weight_decay"])
    raise ConfigError(f"optim.name must be sgd, adam or adamw, got '{optim_cfg['name']}'.")


def run_length(epochs: int, steps_per_epoch: int, max_steps: int | None) -> int:
    """Optimiser steps of the whole run: every epoch, or ``max_steps`` when that is fewer."""
    total = int(epochs) * int(steps_per_epoch)
    return min(total, int(max_steps)) if max_steps else total


def schedule_epoch(step: int, total_steps: int, epochs: int) -> int:
    """The (0-based) epoch of the schedule that step ``step`` (0-based) belongs to."""
    return min(int(epochs) - 1, step * int(epochs) // max(1, int(total_steps)))


def learning_rate(step: int, total_steps: int, optim_cfg: dict) -> float:
    """The rate the optimiser step ``step`` (0-based) uses, for a run of ``total_steps`` steps."""
    kind, base_lr, epochs = optim_cfg["scheduler"], float(optim_cfg["lr"]), int(optim_cfg["epochs"])
    warmup_epochs, warmup_lr = int(optim_cfg["warmup_epochs"]), float(optim_cfg["warmup_lr"])
    if kind not in SCHEDULES:
        raise ConfigError(f"optim.scheduler must be one of {', '.join(SCHEDULES)}, got '{kind}'.")
    epoch = schedule_epoch(step, total_steps, epochs)
    if epoch < warmup_epochs:
        return warmup_lr
    if kind == "constant":
        return base_lr
    if kind == "released":
        return base_lr * 0.5 * (1.0 + math.cos(math.pi * (epoch - warmup_epochs) / epochs))
    warmup_steps = -(-warmup_epochs * total_steps // epochs)  # the first step whose epoch is >= warmup_epochs
    span = max(1, total_steps - warmup_steps)
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * min(step - warmup_steps, span) / span))


def group_learning_rate(step: int, total_steps: int, optim_cfg: dict, lr_scale: float = 1.0) -> float:
    """The rate of a parameter group at ``lr_scale`` times ``optim.lr``: the schedule scaled, except the
    warm-up, which is ``warmup_lr`` for every group (Dassl's ConstantWarmupScheduler sets each group to it)."""
    if schedule_epoch(step, total_steps, int(optim_cfg["epochs"])) < int(optim_cfg["warmup_epochs"]):
        return float(optim_cfg["warmup_lr"])
    return lr_scale * learning_rate(step, total_steps, optim_cfg)


def build_scheduler(optimizer: torch.optim.Optimizer, optim_cfg: dict, total_steps: int):
    """A scheduler stepped after every optimiser step; its state is the step count (saved for ``--resume``).
    Each group follows ``group_learning_rate`` with its ``lr_scale`` (1 for groups without one)."""
    base_lr = float(optim_cfg["lr"])
    learning_rate(0, total_steps, optim_cfg)  # a bad optim.scheduler fails here, not at the first step

    def factor(scale: float):
        return lambda step: group_learning_rate(step, total_steps, optim_cfg, scale) / (base_lr * scale)

    factors = [factor(float(group.get("lr_scale", 1.0))) for group in optimizer.param_groups]
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factors)
