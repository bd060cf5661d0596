"""Prompts learned one per class (CoOp / KgCoOp ``class_specific: true``) exist for their training classes only.

Such prompts hold one context per training class, in label order. Put to other classes they either do
not fit (another number of classes: a shape mismatch) or, when the counts happen to agree, score the
new classes with the contexts of the old ones: an accuracy that measures nothing. So every path
compares class lists first, with ``learned_classes_problem``: the training run skips the evaluation of
such a subset and says why (``metrics.json`` lists it under ``not_evaluated``, and no HM is computed
without it); ``mugcp.evaluate`` refuses up front (``check_checkpoint_classes``); ``predict`` and
``load_run`` refuse other class names (``TrainedRun.resolve_classnames``).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Optional

import torch

from mugcp.config import ConfigError
from mugcp.data.classnames import clip_reading

RETRAIN_HINT = "train with method.class_specific=false for prompts that transfer to other classes"


class UnlearnedClassesError(ConfigError):
    """Class-specific prompts asked to score classes they were not trained on."""


def preview(names: Sequence[str], shown: int = 5) -> str:
    """The first ``shown`` names, and how many more there are."""
    return ", ".join(names[:shown]) + (f", ... ({len(names) - shown} more)" if len(names) > shown else "")


def learned_classes_problem(learned: Optional[Sequence[str]], classnames: Sequence[str],
                            learned_count: Optional[int] = None) -> Optional[str]:
    """Why prompts learned one per class for ``learned`` cannot score ``classnames`` (None: they can).

    The lists must match in order, as CLIP reads the names (case, ``_`` and spacing aside). When the
    training classes are not known by name, ``learned_count`` (the number of contexts) must match at least.
    """
    if learned is not None:
        if [clip_reading(name) for name in classnames] == [clip_reading(name) for name in learned]:
            return None
        return (f"they were learned for the {len(learned)} training classes ({preview(learned)}), "
                f"not for these {len(classnames)} ({preview(classnames)})")
    if learned_count is not None and learned_count != len(classnames):
        return f"they were learned for {learned_count} classes, and these are {len(classnames)} ({preview(classnames)})"
    return None


def is_class_specific(ckpt_config: dict) -> bool:
    """True when the checkpoint learned one prompt per training class (CoOp / KgCoOp ``class_specific``)."""
    return bool(ckpt_config["method_options"].get("class_specific"))


def is_class_specific_model(model) -> bool:
    return bool(getattr(model, "options", {}).get("class_specific"))


def learned_context_count(tensors: Mapping[str, torch.Tensor]) -> Optional[int]:
    """The number of classes a class-specific checkpoint holds contexts for (its ``ctx`` is (C, n_ctx, d))."""
    ctx = tensors.get("ctx")
    return int(ctx.shape[0]) if ctx is not None and ctx.dim() == 3 else None


def check_checkpoint_classes(checkpoint: Path, ckpt_config: dict, tensors: Mapping[str, torch.Tensor],
                             learned: Optional[Sequence[str]],
                             subsets: Mapping[str, tuple[Sequence, Sequence[str]]], dataset: str) -> None:
    """Refuse (``UnlearnedClassesError``) to evaluate class-specific prompts on any subset of classes they did
    not learn.

    ``learned``: the run's training classes (``trained_run.run_classnames``), None when unknown (a bare or
    converted checkpoint): then the number of learned contexts must match at least.
    """
    if not is_class_specific(ckpt_config):
        return
    count = learned_context_count(tensors)
    for name, (_, classnames) in subsets.items():
        problem = learned_classes_problem(learned, classnames, count)
        if problem:
            raise UnlearnedClassesError(
                f"checkpoint {checkpoint} learned one prompt per class (method option class_specific=true), so it "
                f"cannot be evaluated on the '{name}' classes of {dataset}: {problem}. Evaluate it on the classes it "
                f"was trained on, or {RETRAIN_HINT}."
            )
