"""Optimiser and learning-rate schedule built from the ``optim`` config section."""
from __future__ import annotations

import math

import torch

from mugcp.config import ConfigError


def build_optimizer(params, optim_cfg: dict) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    if not params:
        raise ValueError("this method has no trainable parameters; evaluate it with python -m mugcp.evaluate instead.")
    name = optim_cfg["name"].lower()
    if name == "sgd":
        return torch.optim.SGD(params, lr=optim_cfg["lr"], momentum=optim_cfg["momentum"], weight_decay=optim_cfg["weight_decay"])
    if name == "adamw":
        return torch.optim.AdamW(params, lr=optim_cfg["lr"], betas=tuple(optim_cfg["betas"]), weight_decay=optim_cfg["weight_decay"])
    raise ConfigError(f"optim.name must be sgd or adamw, got '{optim_cfg['name']}'.")


def lr_factor(step: int, total_steps: int, warmup_steps: int, base_lr: float, warmup_lr: float, kind: str) -> float:
    """Multiplier of the base learning rate at ``step`` (0-based).

    Warm-up holds ``warmup_lr`` constant (CoOp's recipe); afterwards ``cosine`` anneals from the base
    rate to zero over the remaining steps, ``constant`` keeps it.
    """
    if step < warmup_steps:
        return warmup_lr / base_lr
    if kind == "constant":
        return 1.0
    if kind != "cosine":
        raise ConfigError(f"optim.scheduler must be cosine or constant, got '{kind}'.")
    span = max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(step - warmup_steps, span) / span))


def build_scheduler(optimizer: torch.optim.Optimizer, optim_cfg: dict, total_steps: int, steps_per_epoch: int):
    warmup = int(optim_cfg["warmup_epochs"] * steps_per_epoch)
    base_lr, warmup_lr, kind = optim_cfg["lr"], optim_cfg["warmup_lr"], optim_cfg["scheduler"]
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, total_steps, warmup, base_lr, warmup_lr, kind)
    )
