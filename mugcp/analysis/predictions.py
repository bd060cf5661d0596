"""Per-sample predictions of one evaluated subset, and what follows from them: per-class accuracy
and the confusion counts. Written by every evaluation as ``predictions/<subset>.csv`` and
``per_class/<subset>.csv`` (plus the confusion figure, see ``mugcp.analysis.confusion``).
"""
from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from mugcp.runs.layout import CONFUSION_DIR, PER_CLASS_DIR, PREDICTIONS_DIR
from mugcp.utils import atomic_write_text

TOP_K = 5


@dataclass
class SubsetPredictions:
    """Every evaluated image of one subset: its key, true label and the top-k classes with probabilities."""

    classnames: list[str]
    keys: list[str]
    labels: torch.Tensor  # (N,) long
    top_indices: torch.Tensor  # (N, k) long, most probable first
    top_probs: torch.Tensor  # (N, k) float, softmax over all classes

    @property
    def predicted(self) -> torch.Tensor:
        return self.top_indices[:, 0]

    def __len__(self) -> int:
        return len(self.keys)

    def class_counts(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(images per class, correctly classified images per class), both ``(C,)``."""
        classes = len(self.classnames)
        hits = self.predicted == self.labels
        return torch.bincount(self.labels, minlength=classes), torch.bincount(self.labels[hits], minlength=classes)

    def per_class_accuracy(self) -> list[Optional[float]]:
        """Accuracy (%) per class; None for a class with no evaluated image."""
        counts, correct = self.class_counts()
        return [None if int(n) == 0 else 100.0 * int(c) / int(n) for n, c in zip(counts, correct)]

    def confusion(self) -> torch.Tensor:
        """``(C, C)`` counts: row = true class, column = predicted class."""
        classes = len(self.classnames)
        flat = self.labels * classes + self.predicted
        return torch.bincount(flat, minlength=classes * classes).view(classes, classes)


class PredictionRecorder:
    """Collects what ``evaluate`` sees batch by batch into a :class:`SubsetPredictions`."""

    def __init__(self, classnames: Sequence[str], top_k: int = TOP_K):
        self.classnames = list(classnames)
        self.top_k = max(1, min(top_k, len(self.classnames)))
        self._keys: list[str] = []
        self._labels: list[torch.Tensor] = []
        self._indices: list[torch.Tensor] = []
        self._probs: list[torch.Tensor] = []

    def add(self, keys: Sequence[str], labels: torch.Tensor, logits: torch.Tensor) -> None:
        if len(keys) != labels.numel() or logits.shape[0] != labels.numel():
            raise ValueError(f"{len(keys)} keys, {labels.numel()} labels and {logits.shape[0]} logit rows "
                             "in one batch.")
        probs, indices = logits.detach().float().softmax(dim=-1).topk(self.top_k, dim=-1)
        self._keys.extend(str(k) for k in keys)
        self._labels.append(labels.detach().cpu().long())
        self._indices.append(indices.cpu())
        self._probs.append(probs.cpu())

    def result(self) -> SubsetPredictions:
        empty_long = torch.zeros(0, self.top_k, dtype=torch.long)
        return SubsetPredictions(
            self.classnames, list(self._keys),
            torch.cat(self._labels) if self._labels else torch.zeros(0, dtype=torch.long),
            torch.cat(self._indices) if self._indices else empty_long,
            torch.cat(self._probs) if self._probs else empty_long.float(),
        )


def predictions_csv(result: SubsetPredictions) -> str:
    """One row per image: key, true label and name, predicted label and name, top-k names and probabilities."""
    names = result.classnames
    k = result.top_indices.shape[1]
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["key", "label", "label_name", "predicted", "predicted_name", "correct",
                     *(f"{column}_{rank}" for rank in range(1, k + 1) for column in ("top", "prob"))])
    for key, label, indices, probs in zip(result.keys, result.labels.tolist(), result.top_indices.tolist(),
                                          result.top_probs.tolist()):
        cells = [key, label, names[label], indices[0], names[indices[0]], int(indices[0] == label)]
        for index, prob in zip(indices, probs):
            cells += [names[index], f"{prob:.6f}"]
        writer.writerow(cells)
    return buffer.getvalue()


def per_class_rows(result: SubsetPredictions, zero_shot: Optional[Sequence[Optional[float]]] = None) -> list[dict]:
    """Per class: index, name, count, correct, accuracy (%) and, when given, zero-shot accuracy and the gain over it."""
    counts, correct = result.class_counts()
    accuracy = result.per_class_accuracy()
    rows = []
    for index, name in enumerate(result.classnames):
        row = {"class_index": index, "class": name, "count": int(counts[index]), "correct": int(correct[index]),
               "accuracy": accuracy[index]}
        if zero_shot is not None:
            row["zeroshot_accuracy"] = zero_shot[index]
            row["gain"] = (None if accuracy[index] is None or zero_shot[index] is None
                           else accuracy[index] - zero_shot[index])
        rows.append(row)
    return rows


def per_class_csv(rows: Sequence[dict]) -> str:
    columns = list(rows[0]) if rows else ["class_index", "class", "count", "correct", "accuracy"]
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(columns)
    for row in rows:
        writer.writerow(["" if row[c] is None else (f"{row[c]:.4f}" if isinstance(row[c], float) else row[c])
                         for c in columns])
    return buffer.getvalue()


def write_subset_outputs(folder: str | Path, subset: str, result: SubsetPredictions,
                         zero_shot: Optional[SubsetPredictions] = None, figure: bool = True) -> dict[str, Path]:
    """``predictions/<subset>.csv``, ``per_class/<subset>.csv`` and the confusion figure and pairs under ``folder``."""
    from mugcp.analysis.confusion import write_confusion

    folder = Path(folder)
    written = {"predictions": folder / PREDICTIONS_DIR / f"{subset}.csv",
               "per_class": folder / PER_CLASS_DIR / f"{subset}.csv"}
    atomic_write_text(written["predictions"], predictions_csv(result))
    rows = per_class_rows(result, zero_shot.per_class_accuracy() if zero_shot is not None else None)
    atomic_write_text(written["per_class"], per_class_csv(rows))
    if figure:
        written.update(write_confusion(folder / CONFUSION_DIR, subset, result))
    return written
