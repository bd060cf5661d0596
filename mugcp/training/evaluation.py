"""Accuracy of a prompt learner on labelled images, per class subset (base / new / all)."""
from __future__ import annotations

import logging
import time

import torch
from tqdm.auto import tqdm

from mugcp.data import ImageDataset, build_loader, build_transform
from mugcp.runs.learned_classes import RETRAIN_HINT, is_class_specific_model, learned_classes_problem
from mugcp.runs.runtime import autocast
from mugcp.utils import harmonic_mean, progress_wanted

log = logging.getLogger("mugcp")


@torch.no_grad()
def evaluate(model, items, classnames, dataset, data_cfg: dict, device, precision: str, semantic=None,
             progress: bool = True, desc: str = "eval", recorder=None) -> dict:
    """Top-1 accuracy (percent) of ``model`` on ``items`` labelled over ``classnames``.

    ``recorder`` (a ``mugcp.analysis.predictions.PredictionRecorder``) receives every batch's keys, labels and logits.
    """
    model.set_classnames(classnames)
    model.eval()
    image_size = data_cfg["image_size"] or model.clip.image_size
    features = semantic.features_for(items) if semantic is not None else None
    eval_set = ImageDataset(items, dataset, build_transform(image_size, train=False),
                            on_bad_image=data_cfg["on_bad_image"], semantic=features)
    loader = build_loader(eval_set, data_cfg["eval_batch_size"], train=False, seed=0,
                          num_workers=data_cfg["num_workers"])
    correct = total = skipped = 0
    started = time.perf_counter()  # loading and decoding the images counts: it is part of what evaluation costs
    per_class_correct = torch.zeros(len(classnames), dtype=torch.long)
    per_class_total = torch.zeros(len(classnames), dtype=torch.long)
    for batch in tqdm(loader, desc=desc, unit="batch", disable=not progress_wanted(progress), leave=False):
        skipped += batch.get("n_skipped", 0)
        if batch["labels"].numel() == 0:
            continue
        inputs = {k: batch[k].to(device) for k in model.batch_inputs if k in batch}
        with autocast(precision, device):
            logits = model(batch["images"].to(device), **inputs)
        labels = batch["labels"]
        if recorder is not None:
            recorder.add(batch["keys"], labels, logits)
        hits = (logits.argmax(dim=-1).cpu() == labels)
        correct += int(hits.sum())
        total += labels.numel()
        per_class_total += torch.bincount(labels, minlength=len(classnames))
        per_class_correct += torch.bincount(labels[hits], minlength=len(classnames))
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)  # the last batch's kernels are part of its time
    seconds = time.perf_counter() - started
    if total == 0:
        raise RuntimeError(f"{desc}: no readable images to evaluate ({skipped} skipped).")
    present = per_class_total > 0  # classes with no readable image would count as 0 %
    per_class = (per_class_correct[present].float() / per_class_total[present].float() * 100).tolist()
    return {
        "accuracy": round(100.0 * correct / total, 4),
        "correct": correct,
        "total": total,
        "skipped": skipped,
        "mean_per_class_accuracy": round(sum(per_class) / len(per_class), 4),
        "classes": len(classnames),
        "eval_time_s": round(seconds, 6),
        "images_per_s": round(total / max(seconds, 1e-9), 2),
    }


def evaluate_subsets(model, splits, cfg: dict, device, precision: str, semantic=None, writer=None, output=None) -> dict:
    """Evaluate every subset of ``splits.eval``; adds ``hm`` when both base and new are present.

    Class-specific prompts are not evaluated on classes they did not learn (``splits.train_classnames``):
    such a subset is logged and listed under ``not_evaluated`` with the reason, and gets no accuracy.
    With ``output`` (the run folder) each subset also gets ``predictions/``, ``per_class/`` and
    ``confusion/`` files there, and with ``data.compare_zeroshot`` the per-class zero-shot accuracy
    of the same backbone beside its own.
    """
    from mugcp.analysis.predictions import PredictionRecorder, write_subset_outputs

    metrics: dict = {}
    for name, (items, classnames) in splits.eval.items():
        problem = (learned_classes_problem(splits.train_classnames, classnames) if is_class_specific_model(model)
                   else None)
        if problem:
            reason = (f"class-specific prompts (method.class_specific=true) cannot score these classes: {problem}; "
                      f"{RETRAIN_HINT}")
            log.info("%s: not evaluated: %s", name, reason)
            metrics.setdefault("not_evaluated", {})[name] = reason
            continue
        recorder = PredictionRecorder(classnames) if output is not None else None
        result = evaluate(model, items, classnames, splits.dataset, cfg["data"], device, precision, semantic,
                          progress=cfg["train"]["progress"], desc=f"eval {name}", recorder=recorder)
        metrics[name] = result
        log.info("%s: accuracy %.2f%% (%d/%d images, %d classes)", name, result["accuracy"], result["correct"],
                 result["total"], result["classes"])
        if writer is not None:
            writer.add_scalar(f"eval/{name}_accuracy", result["accuracy"])
        if output is not None:
            zero_shot = None
            if cfg["data"].get("compare_zeroshot"):
                zero_shot = zero_shot_predictions(model, items, classnames, splits.dataset, cfg, device,
                                                  precision, name)
                result["zeroshot_accuracy"] = round(
                    100.0 * float((zero_shot.predicted == zero_shot.labels).float().mean()), 4
                )
            write_subset_outputs(output, name, recorder.result(), zero_shot)
    if "base" in metrics and "new" in metrics:
        metrics["hm"] = round(harmonic_mean(metrics["base"]["accuracy"], metrics["new"]["accuracy"]), 4)
    metrics.update(evaluation_cost(metrics))
    return metrics


def evaluation_cost(metrics: dict) -> dict:
    """``eval_time_s`` and ``eval_images_per_s`` over the evaluated subsets (their own passes, without the
    zero-shot comparison or the files written); empty when nothing was evaluated."""
    subsets = [entry for entry in metrics.values() if isinstance(entry, dict) and "eval_time_s" in entry]
    if not subsets:
        return {}
    seconds = sum(entry["eval_time_s"] for entry in subsets)
    images = sum(entry["total"] for entry in subsets)
    return {"eval_time_s": round(seconds, 6), "eval_images_per_s": round(images / max(seconds, 1e-9), 2)}


def training_cost(images: int, train_time_s: float) -> dict:
    """``train_images_per_s``: training images this process stepped through per second of ``train_time_s``
    (which counts from the command's start, so setup is included)."""
    return {"train_images_per_s": round(images / max(train_time_s, 1e-9), 2)}


def zero_shot_predictions(model, items, classnames, dataset, cfg: dict, device, precision: str, name: str):
    """Predictions of zero-shot CLIP (the dataset's template) on the same backbone and images as ``model``."""
    from mugcp.analysis.predictions import PredictionRecorder
    from mugcp.methods import create_model

    zero_shot = create_model("zsclip", classnames, backbone=model.clip, attention=model.clip.attention_backend,
                             dataset=dataset.name)
    recorder = PredictionRecorder(classnames)
    evaluate(zero_shot, items, classnames, dataset, cfg["data"], device, precision, progress=cfg["train"]["progress"],
             desc=f"zero-shot {name}", recorder=recorder)
    return recorder.result()
