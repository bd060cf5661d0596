"""Classifying image files in batches: collecting them from folders, the predictions, and their tables.

Unreadable images are named, skipped and returned with the reason, never raised; the output
formats are a console table, CSV and JSON lines. This module imports no torch (``predict --onnx``
uses it). The files list every image, in the order found:
a skipped one has no classes and its reason in ``error`` (CSV: empty cells; JSONL: ``"error": null``
on every classified line, so each line has the same keys).
"""
from __future__ import annotations

import csv
import io
import json
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from mugcp.config import ConfigError
from mugcp.data.dataset import IMAGE_EXTENSIONS
from mugcp.data.dataset import open_image_file as open_image
from mugcp.data.image_tree import find_images
from mugcp.errors import UserError

OUTPUT_FORMATS = (".csv", ".jsonl")


@dataclass
class Prediction:
    """The top-k classes of one image, most probable first (``probs`` are softmax probabilities)."""

    classes: list[str]
    probs: list[float]
    indices: list[int]
    path: Optional[str] = None


def key_candidates(path: str, relative: Optional[str] = None) -> list[str]:
    """Where an image may sit in a semantic cache: relative to the folder given (as ``extract --images``
    keys it), the path as given, absolute, or its bare file name."""
    if not path:
        return [""]
    candidates = [relative] if relative else []
    candidates += [path, str(Path(path).resolve()), Path(path).name]
    return list(dict.fromkeys(candidates))


class NoImageClassifiedError(UserError):
    """Every image given was unreadable: a run that classified nothing is not a success."""


@dataclass
class ImageFile:
    path: str  # as shown and written
    relative: Optional[str] = None  # relative to the folder argument it was found in
    candidates: list[str] = field(default_factory=list)


def collect_images(arguments: Sequence[str]) -> list[ImageFile]:
    """Files as given, and the image files under folders (recursively, sorted, hidden ones skipped,
    symlinked folders followed once: see :func:`mugcp.data.image_tree.find_images`)."""
    found: list[ImageFile] = []
    for argument in arguments:
        path = Path(argument)
        if path.is_dir():
            files = find_images(path, IMAGE_EXTENSIONS)
            if not files:
                raise ConfigError(f"{argument}: no image files in this folder "
                                  f"(extensions: {', '.join(sorted(IMAGE_EXTENSIONS))}).")
            found += [ImageFile(str(p), p.relative_to(path).as_posix()) for p in files]
        elif path.exists():
            found.append(ImageFile(str(path)))
        else:
            raise ConfigError(f"{argument}: no such file or folder. Pass image files or folders of images.")
    for image in found:
        image.candidates = key_candidates(image.path, image.relative)
    return found


@dataclass
class Row:
    """One image of the output: its prediction, or the reason it was skipped."""

    path: str
    prediction: Optional[Prediction] = None
    error: Optional[str] = None


def result_rows(files: Sequence[ImageFile], predictions: Sequence[Prediction],
                skipped: Sequence[tuple[str, str]]) -> list[Row]:
    """Every image once, in the order ``files`` lists them."""
    order = {f.path: index for index, f in enumerate(files)}
    rows = [Row(p.path, prediction=p) for p in predictions] + [Row(path, error=reason) for path, reason in skipped]
    return sorted(rows, key=lambda row: order.get(row.path, len(order)))


def rows_csv(rows: Sequence[Row], top_k: int) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["path", *(f"{column}_{rank}" for rank in range(1, top_k + 1) for column in ("class", "prob")),
                     "error"])
    for row in rows:
        p = row.prediction
        cells = [row.path]
        for rank in range(top_k):
            cells += [p.classes[rank], f"{p.probs[rank]:.6f}"] if p is not None and rank < len(p.classes) else ["", ""]
        writer.writerow(cells + [row.error or ""])
    return buffer.getvalue()


def rows_jsonl(rows: Sequence[Row]) -> str:
    lines = []
    for row in rows:
        p = row.prediction
        lines.append(json.dumps({"path": row.path, "classes": p.classes if p else [], "probs": p.probs if p else [],
                                 "error": row.error}))
    return "".join(line + "\n" for line in lines)


def no_image_classified(skipped: Sequence[tuple[str, str]], out: Optional[Path]) -> NoImageClassifiedError:
    path, reason = skipped[0]
    if len(skipped) == 1:
        return NoImageClassifiedError(f"no image classified: {path} is unreadable ({reason}).")
    listed = f"{out} lists each with its reason" if out is not None else "--out FILE.csv lists each with its reason"
    return NoImageClassifiedError(f"no image classified: all {len(skipped)} are unreadable, e.g. {path} ({reason}); "
                                  f"{listed}.")


def table(predictions: Sequence[Prediction]) -> str:
    cells = [[p.path, *(f"{c} ({100 * q:.1f}%)" for c, q in zip(p.classes, p.probs))] for p in predictions]
    width = max((len(row) for row in cells), default=1)
    header = ["image", *(f"top-{rank}" for rank in range(1, width))]
    rows = [header] + [row + [""] * (width - len(row)) for row in cells]
    widths = [max(len(row[i]) for row in rows) for i in range(width)]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)


def predict_files(model, preprocess, files: Sequence[ImageFile], top_k: int, batch_size: int,
                  progress: bool = True) -> tuple[list[Prediction], list[tuple[str, str]]]:
    """Batched predictions of a ``TrainedModel`` for image files; unreadable ones are returned as
    (path, reason), not raised."""
    from tqdm.auto import tqdm

    from mugcp.data import DatasetSplits, Datum, ImageDataset, build_loader

    by_path = {f.path: f for f in files}
    files = list(by_path.values())
    dataset = DatasetSplits("images", None, [], [], [], [])
    items = [Datum(f.path, 0, "") for f in files]
    skipped: list[tuple[str, str]] = []
    semantics = model.semantics
    if semantics.cache is not None:
        # Check every image up front (not after an hour of batches); one missing because it cannot be read is skipped.
        missing = [f for f in files if semantics.cache_key(f.candidates) is None]
        unreadable = []
        for f in missing:
            try:
                open_image(f.path)
            except ConfigError as err:
                unreadable.append(f.path)
                skipped.append((f.path, bad_image_reason(err)))
        if len(unreadable) < len(missing):
            raise ConfigError(semantics.missing_keys_message([f.path for f in missing if f.path not in unreadable],
                                                             len(files)))
        unreadable_set = set(unreadable)
        items = [item for item in items if item.key not in unreadable_set]
    loader = build_loader(ImageDataset(items, dataset, preprocess, on_bad_image="skip"), batch_size, train=False,
                          seed=0)
    predictions: list[Prediction] = []
    bar = tqdm(total=len(items), unit="img", desc="predict", disable=not progress, dynamic_ncols=True)
    loader_log = logging.getLogger("mugcp.data.loader")
    level = loader_log.level
    # its per-image warning suggests a training option; the summary names them instead
    loader_log.setLevel(logging.ERROR)
    with bar:
        for batch in loader:
            for key in batch["skipped_keys"]:
                skipped.append((key, _reason(dataset, key)))
            if batch["keys"]:
                keys = batch["keys"]
                results = model.classify(batch["images"], [by_path[k].candidates for k in keys],
                                         lambda: [open_image(k) for k in keys], top_k)
                for result, key in zip(results, keys):
                    result.path = key
                predictions.extend(results)
            bar.update(len(batch["keys"]) + batch["n_skipped"])
            if skipped:
                bar.set_postfix(skipped=len(skipped))
    loader_log.setLevel(level)
    return predictions, skipped


def _reason(dataset, key: str) -> str:
    try:
        dataset.open_image(key)
    except ConfigError as err:
        return bad_image_reason(err)
    return "unreadable"


def bad_image_reason(err: Exception) -> str:
    """The reason part of a BadImageError ("cannot read image 'k' (path): REASON. Replace or remove ...")."""
    found = re.search(r"\): (.*?)\. Replace or remove", str(err))
    return found.group(1) if found else str(err)
