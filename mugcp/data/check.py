"""Check a dataset on disk before training on it: its layout, its split file, every image.

``python -m mugcp.data check --dataset NAME --root ROOT [--split-file FILE]`` reads the dataset the
way a run does (so layout problems give the same message and fix), counts images and classes per
split, opens every image, and names the missing and unreadable ones. ``--split-file`` also checks a
run's ``splits.json`` (or, for a CoOp dataset, a split file in CoOp's format) against the dataset.
"""
from __future__ import annotations

import json
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from mugcp.data.coop import COOP_DATASETS, SPLIT_JSON, read_split_json
from mugcp.data.dataset import BadImageError, DatasetError, DatasetSplits, Datum
from mugcp.data.protocol import SPLITS_FORMAT, load_splits
from mugcp.data.registry import build_dataset, canonical_dataset_name

MAX_LISTED = 20  # problem files named one per line; the rest are counted


@dataclass
class SplitCount:
    name: str
    images: int
    classes: int
    missing: int = 0
    unreadable: int = 0


@dataclass
class DataCheck:
    """What ``check_dataset`` found; ``ok`` when every listed image exists and decodes."""

    dataset: DatasetSplits
    splits: list[SplitCount]
    missing: list[str] = field(default_factory=list)  # file paths
    unreadable: list[tuple[str, str]] = field(default_factory=list)  # (file path, reason)
    unknown_keys: list[str] = field(default_factory=list)  # split-file entries the dataset does not have
    empty_classes: list[tuple[str, str]] = field(default_factory=list)  # (split, class name) of a class without images
    checked: int = 0

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unreadable or self.unknown_keys or self.empty_classes)

    def table(self) -> str:
        header = ("split", "images", "classes", "missing", "unreadable")
        rows = [header] + [(s.name, str(s.images), str(s.classes), str(s.missing), str(s.unreadable))
                           for s in self.splits]
        widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
        return "\n".join(
            "  ".join(cell.ljust(width) if i == 0 else cell.rjust(width)
                      for i, (cell, width) in enumerate(zip(row, widths)))
            for row in rows
        )

    def problems(self) -> list[str]:
        lines = [f"missing: {path}" for path in self.missing[:MAX_LISTED]]
        lines += [f"unreadable: {path} ({reason})" for path, reason in self.unreadable[:MAX_LISTED]]
        lines += [f"not in the dataset: {key}" for key in self.unknown_keys[:MAX_LISTED]]
        lines += [f"no {split} images: class '{name}'" for split, name in self.empty_classes[:MAX_LISTED]]
        for what, items in (("missing", self.missing), ("unreadable", self.unreadable), ("unknown", self.unknown_keys),
                            ("classes without images", self.empty_classes)):
            if len(items) > MAX_LISTED:
                lines.append(f"... and {len(items) - MAX_LISTED} more {what}")
        return lines

    def summary(self) -> str:
        where = f"{self.dataset.name} at {self.dataset.root}"
        if self.ok:
            return f"OK: {where}: all {self.checked} images are readable."
        parts = []
        if self.missing:
            parts.append(f"{len(self.missing)} missing")
        if self.unreadable:
            parts.append(f"{len(self.unreadable)} unreadable")
        text = f"{where}: {' and '.join(parts)} of {self.checked} images" if parts else where
        fixes = []
        if self.missing or self.unreadable:
            fixes.append(
                "restore those files (download or extract the dataset again) or remove them from the split file; "
                "a run can also skip them with data.on_bad_image=skip"
            )
        if self.unknown_keys:
            text += f"; {len(self.unknown_keys)} split-file entries name images the dataset does not list"
            fixes.append("the split file was made for another copy or version of the dataset: regenerate it")
        if self.empty_classes:
            count = len(self.empty_classes)
            text += f"; {count} class{'es' if count > 1 else ''} without images in a split"
            fixes.append("add images to those classes (for an image folder: their class folders) or remove them; "
                         "a run trains such a class with no examples")
        return f"{text}. Fix: {'; '.join(fixes)}."


def _split_file_parts(path: Path, dataset: DatasetSplits) -> list[tuple[str, list[Datum]]]:
    """The named item lists of a run's splits.json, or of a CoOp-format split file for a CoOp dataset."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DatasetError(f"split file not found: {path}.") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DatasetError(f"{path}: cannot read the split file: {err}") from None
    if isinstance(data, dict) and data.get("format") == SPLITS_FORMAT:
        splits = load_splits(path, dataset)
        parts = [(f"{path.name} train", splits.train), (f"{path.name} val", splits.val)]
        return parts + [(f"{path.name} eval {name}", items) for name, (items, _) in splits.eval.items()]
    spec = next((s for s in COOP_DATASETS if s.name == dataset.name and s.layout == SPLIT_JSON), None)
    if spec is None:
        raise DatasetError(
            f"{path}: not a MuGCP splits file (format {SPLITS_FORMAT!r}, the splits.json beside every run); "
            f"split files in CoOp's format apply only to the CoOp datasets that ship one, not to {dataset.name}."
        )
    return [(f"{path.name} {name}", items) for name, items in read_split_json(path, spec.image_dir).items()]


def _open(dataset: DatasetSplits, key: str) -> Optional[tuple[str, str]]:
    """None when the image opens, else ("missing" | "unreadable", description)."""
    path = dataset.file_of(key)
    if path is not None and not path.is_file():
        return "missing", str(path)
    try:
        dataset.open_image(key)
    except BadImageError as err:
        return "unreadable", f"{dataset.describe(key)}\t{getattr(err, 'reason', err)}"
    return None


def classes_without_images(dataset: DatasetSplits) -> list[tuple[str, str]]:
    """(split, class name) for each class with no image in train or test; a split with no images at all
    (a test-only dataset's train) is not a class's problem. A val split carved from few images may lack some."""
    empty = []
    for split in ("train", "test"):
        items = dataset.split(split)
        present = {item.label for item in items}
        if items:
            empty += [(split, name) for label, name in enumerate(dataset.classnames) if label not in present]
    return empty


def check_dataset(
    name: str,
    root: Optional[str | os.PathLike],
    split_file: Optional[str | os.PathLike] = None,
    open_images: bool = True,
    workers: int = 4,
    progress: bool = True,
    max_image_pixels: Optional[int] = None,
) -> DataCheck:
    """Read dataset ``name`` under ``root`` as a run would and check every image it lists.

    A layout problem raises ``DatasetError`` (naming the path and the expected layout). With
    ``open_images=False`` only the files' presence is checked, which is much faster on big datasets.
    An image with more than ``max_image_pixels`` pixels (None: PIL's limit) is unreadable, as in a run.
    """
    dataset = build_dataset({"dataset": canonical_dataset_name(name), "root": None if root is None else str(root),
                             "max_image_pixels": max_image_pixels})
    parts: list[tuple[str, list[Datum]]] = [(split, dataset.split(split)) for split in ("train", "val", "test")]
    unknown: list[str] = []
    if split_file is not None:
        extra = _split_file_parts(Path(split_file), dataset)
        known = {item.key for _, items in parts for item in items}
        unknown = sorted({item.key for _, items in extra for item in items} - known)
        parts += extra
    keys = sorted({item.key for _, items in parts for item in items} - set(unknown))

    if open_images:
        from tqdm.auto import tqdm  # here: its import costs ~0.3 s that `--help` should not pay

        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:  # decoding releases the GIL
            results = list(tqdm(pool.map(lambda key: _open(dataset, key), keys), total=len(keys), desc="opening images",
                                unit="img", disable=not progress or len(keys) < 100))
    else:
        results = [None if (path := dataset.file_of(key)) is None or path.is_file() else ("missing", str(path))
                   for key in keys]
    bad = {key: result for key, result in zip(keys, results) if result is not None}

    check = DataCheck(dataset, [], unknown_keys=unknown, checked=len(keys))
    for _key, (kind, text) in sorted(bad.items()):
        if kind == "missing":
            check.missing.append(text)
        else:
            path, _, reason = text.partition("\t")
            check.unreadable.append((path, reason))
    check.empty_classes = classes_without_images(dataset)
    for split, items in parts:
        check.splits.append(SplitCount(
            split, len(items), len({item.label for item in items}),
            missing=sum(1 for item in items if bad.get(item.key, ("",))[0] == "missing"),
            unreadable=sum(1 for item in items if bad.get(item.key, ("",))[0] == "unreadable"),
        ))
    return check


def main(argv: Optional[Sequence[str]] = None) -> int:
    import argparse

    from mugcp.config import ConfigError
    from mugcp.data.registry import DATASET_NAMES

    parser = argparse.ArgumentParser(prog="python -m mugcp.data check", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", required=True, help=f"dataset name: {', '.join(DATASET_NAMES)}")
    parser.add_argument("--root", help="data.root: the folder (or manifest) the dataset is read from")
    parser.add_argument("--split-file",
                        help="also check this split file: a run's splits.json, or a CoOp split_zhou_*.json")
    parser.add_argument("--no-open", action="store_true",
                        help="only check that the files exist (fast), do not decode them")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="threads decoding images")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--max-image-pixels", type=int, metavar="N",
                        help="data.max_image_pixels: larger images count as unreadable "
                             "(default: PIL's limit, 89,478,485)")
    args = parser.parse_args(argv)
    if args.max_image_pixels is not None and args.max_image_pixels < 1:
        raise ConfigError(f"--max-image-pixels must be at least 1, got {args.max_image_pixels}.")

    check = check_dataset(args.dataset, args.root, args.split_file, open_images=not args.no_open,
                          workers=args.workers, progress=not args.no_progress, max_image_pixels=args.max_image_pixels)
    print(f"{check.dataset.summary()}\n{check.table()}")
    if check.ok:
        print(check.summary())
        return 0
    print("\n".join(check.problems()))
    raise ConfigError(check.summary())
