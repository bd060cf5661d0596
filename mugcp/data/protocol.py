"""Evaluation protocols: few-shot sampling by seed, base/new class splits, and their JSON record.

Few-shot sampling is Dassl's ``generate_fewshot_dataset``: one ``random.Random(seed)`` (the same
stream as ``random.seed(seed)``), classes in order of first appearance, ``sample(items, K)`` per
class; the train split is drawn first, then val with min(K, 4). A class with fewer than K images is
kept whole and draws nothing (``data.fewshot_short_classes: keep``); ``pad`` instead fills it up to
K with repeats (all its images once, then random extra copies), so every class weighs the same.
Where the released code's cache of the draw is present (``data.fewshot_file``), its images are used.
"""
from __future__ import annotations

import json
import logging
import math
import random
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from mugcp.data.dataset import DatasetError, DatasetSplits, Datum
from mugcp.data.fewshot_file import find_fewshot_file, load_released_fewshot
from mugcp.utils import atomic_write_json

SUBSETS = ("all", "base", "new")
BASE2NEW = "base2new"
# Protocols that train and evaluate on every class of the dataset.
ALL_CLASS_PROTOCOLS = ("fewshot", "all", "cross_dataset", "domain_generalization")
SPLITS_FORMAT = "mugcp.splits/1"
EVAL_SAMPLE_SEED = "max_eval_per_class"
SHORT_CLASS_RULES = ("keep", "pad")

log = logging.getLogger("mugcp")


def _group_by_label(items: Iterable[Datum]) -> dict[int, list[Datum]]:
    groups: dict[int, list[Datum]] = defaultdict(list)
    for item in items:
        groups[item.label].append(item)
    return groups


def few_shot_with_rng(items: Sequence[Datum], shots: int | None, rng: random.Random,
                      short_classes: str = "keep") -> list[Datum]:
    if short_classes not in SHORT_CLASS_RULES:
        raise DatasetError(f"data.fewshot_short_classes must be keep or pad, got '{short_classes}'.")
    if shots is None or shots <= 0:
        return list(items)
    out: list[Datum] = []
    for group in _group_by_label(items).values():
        if len(group) >= shots:
            out.extend(rng.sample(group, shots))
        elif short_classes == "pad":
            out.extend(group + rng.choices(group, k=shots - len(group)))
        else:
            out.extend(group)
    return out


def few_shot(items: Sequence[Datum], shots: int | None, seed: int, short_classes: str = "keep") -> list[Datum]:
    """``shots`` items per class chosen by ``seed``; ``shots`` None or <= 0 keeps everything."""
    return few_shot_with_rng(items, shots, random.Random(seed), short_classes)


def class_subset(n_classes: int, which: str) -> list[int]:
    """The labels of ``which``: base is the first ceil(n/2) labels, new the rest."""
    if which not in SUBSETS:
        raise DatasetError(f"unknown class subset '{which}': use one of {', '.join(SUBSETS)}.")
    labels = list(range(n_classes))
    if which == "all":
        return labels
    half = math.ceil(n_classes / 2)
    return labels[:half] if which == "base" else labels[half:]


def subsample_classes(
    items: Sequence[Datum], classnames: Sequence[str], which: str
) -> tuple[list[Datum], list[str]]:
    """Keep the items of one class subset, relabelled from 0, with that subset's class names."""
    selected = class_subset(len(classnames), which)
    relabel = {label: new for new, label in enumerate(selected)}
    kept = [Datum(item.key, relabel[item.label], item.classname) for item in items if item.label in relabel]
    return kept, [classnames[label] for label in selected]


def cap_per_class(items: Sequence[Datum], limit: int | None) -> list[Datum]:
    """At most ``limit`` items per class, the same ones for every run seed; order is kept."""
    if limit is None or limit <= 0:
        return list(items)
    rng = random.Random(EVAL_SAMPLE_SEED)
    chosen: set[int] = set()
    by_label: dict[int, list[int]] = defaultdict(list)
    for index, item in enumerate(items):
        by_label[item.label].append(index)
    for label in sorted(by_label):
        indices = by_label[label]
        chosen.update(indices if len(indices) <= limit else rng.sample(indices, limit))
    return [item for index, item in enumerate(items) if index in chosen]


@dataclass
class ProtocolSplits:
    """What one run trains, validates and evaluates on; labels are relabelled per subset."""

    train: list[Datum]
    train_classnames: list[str]
    val: list[Datum]
    eval: dict[str, tuple[list[Datum], list[str]]]
    seed: int
    shots: int | None
    dataset_name: str
    dataset_source: dict = field(default_factory=dict)
    dataset: DatasetSplits | None = field(default=None, compare=False, repr=False)

    def to_json(self) -> dict:
        def rows(items: Sequence[Datum]) -> list[list]:
            return [[item.key, item.label, item.classname] for item in items]

        return {
            "format": SPLITS_FORMAT,
            "dataset": self.dataset_name,
            "source": self.dataset_source,
            "seed": self.seed,
            "shots": self.shots,
            "train": {"items": rows(self.train), "classnames": list(self.train_classnames)},
            "val": {"items": rows(self.val), "classnames": list(self.train_classnames)},
            "eval": {
                name: {"items": rows(items), "classnames": list(names)} for name, (items, names) in self.eval.items()
            },
        }

    @classmethod
    def from_json(cls, data: Mapping, dataset: DatasetSplits | None = None, where: str = "splits") -> ProtocolSplits:
        if not isinstance(data, Mapping) or data.get("format") != SPLITS_FORMAT:
            found = data.get("format") if isinstance(data, Mapping) else type(data).__name__
            raise DatasetError(f"{where}: not a MuGCP splits file (format {found!r}, expected {SPLITS_FORMAT!r}).")
        try:
            def items(rows: list) -> list[Datum]:
                return [Datum(str(key), int(label), str(name)) for key, label, name in rows]

            splits = cls(
                train=items(data["train"]["items"]),
                train_classnames=list(data["train"]["classnames"]),
                val=items(data["val"]["items"]),
                eval={
                    name: (items(part["items"]), list(part["classnames"])) for name, part in data["eval"].items()
                },
                seed=int(data["seed"]),
                shots=None if data["shots"] is None else int(data["shots"]),
                dataset_name=str(data["dataset"]),
                dataset_source=dict(data.get("source") or {}),
            )
        except (KeyError, TypeError, ValueError) as err:
            raise DatasetError(f"{where}: malformed splits file ({type(err).__name__}: {err}).") from None
        if dataset is not None:
            splits.attach(dataset, where)
        return splits

    def attach(self, dataset: DatasetSplits, where: str = "splits") -> None:
        if dataset.name != self.dataset_name:
            raise DatasetError(
                f"{where}: these splits are for dataset '{self.dataset_name}', not '{dataset.name}'."
            )
        self.dataset = dataset


def _protocol_subsets(data_cfg: Mapping) -> tuple[str, list[str]]:
    protocol = str(data_cfg.get("protocol", BASE2NEW))
    if protocol in ALL_CLASS_PROTOCOLS:
        return "all", ["all"]
    if protocol != BASE2NEW:
        raise DatasetError(
            f"unknown data.protocol '{protocol}': use {BASE2NEW} or one of {', '.join(ALL_CLASS_PROTOCOLS)}."
        )
    train_classes = str(data_cfg.get("train_classes", "base"))
    eval_subsets = data_cfg.get("eval_subsets", ["base", "new"])
    if isinstance(eval_subsets, str):
        eval_subsets = [eval_subsets]
    for which in [train_classes, *eval_subsets]:
        class_subset(0, which)  # validates the name
    return train_classes, list(eval_subsets)


def warn_classes_without_examples(train: Sequence[Datum], classnames: Sequence[str], dataset: DatasetSplits) -> None:
    """One warning naming the training classes that have no image (an empty class folder, say): the run
    still learns their prompts' place among the classes, from no example of them."""
    present = {item.label for item in train}
    empty = [name for label, name in enumerate(classnames) if label not in present]
    if train and empty:  # no training images at all: a test-only dataset, not a class's problem
        shown = ", ".join(repr(name) for name in empty[:5]) + (f" and {len(empty) - 5} more" if len(empty) > 5 else "")
        log.warning("%d training class%s of %s ha%s no images: %s; %s trained with no example. Add images or "
                    "remove the class (python -m mugcp.data check --dataset %s --root %s lists them).", len(empty),
                    "es" if len(empty) > 1 else "", dataset.name, "ve" if len(empty) > 1 else "s", shown,
                    "they are" if len(empty) > 1 else "it is", dataset.name, dataset.root)


def build_protocol(data_cfg: Mapping, seed: int, dataset: DatasetSplits | None = None) -> ProtocolSplits:
    """Few-shot train/val and the evaluation subsets of one run.

    ``data_cfg["seed"]``, when set, fixes the sampling seed independently of the run's ``seed``.
    Protocol ``base2new`` trains on ``train_classes`` and evaluates ``eval_subsets``; the
    ``fewshot`` / ``cross_dataset`` / ``domain_generalization`` protocols use all classes for both.
    Test-only datasets (ImageNet-V2/-Sketch/-A/-R) give an empty train split.
    """
    from mugcp.data.registry import build_dataset

    if dataset is None:
        dataset = build_dataset(data_cfg)
    sample_seed = int(data_cfg["seed"]) if data_cfg.get("seed") is not None else int(seed)
    shots = data_cfg.get("shots")
    shots = None if shots is None or int(shots) <= 0 else int(shots)
    train_classes, eval_subsets = _protocol_subsets(data_cfg)

    rng = random.Random(sample_seed)
    short_classes = str(data_cfg.get("fewshot_short_classes", "keep"))
    train_all = few_shot_with_rng(dataset.train, shots, rng, short_classes)
    val_all = few_shot_with_rng(dataset.val, None if shots is None else min(shots, 4), rng, short_classes)
    released_file = find_fewshot_file(data_cfg.get("fewshot_file", "auto"), dataset, shots, sample_seed)
    if released_file is not None:
        released = load_released_fewshot(released_file, dataset)
        train_all = released.train
        val_all = released.val if released.val is not None else val_all
        log.info("few-shot subset: the released code's %s (%d train%s images), not drawn here",
                 released_file, len(train_all), "" if released.val is None else f", {len(val_all)} val")
    train, train_classnames = subsample_classes(train_all, dataset.classnames, train_classes)
    warn_classes_without_examples(train, train_classnames, dataset)
    val, _ = subsample_classes(val_all, dataset.classnames, train_classes)

    eval_split = str(data_cfg.get("eval_split", "test"))
    if eval_split not in ("val", "test"):
        raise DatasetError(f"data.eval_split must be val or test, got '{eval_split}'.")
    eval_items = cap_per_class(dataset.split(eval_split), data_cfg.get("max_eval_per_class"))
    evaluation = {which: subsample_classes(eval_items, dataset.classnames, which) for which in eval_subsets}
    return ProtocolSplits(
        train=train,
        train_classnames=train_classnames,
        val=val,
        eval=evaluation,
        seed=sample_seed,
        shots=shots,
        dataset_name=dataset.name,
        dataset_source=dict(dataset.source),
        dataset=dataset,
    )


def save_splits(splits: ProtocolSplits, path: str | Path) -> None:
    atomic_write_json(path, splits.to_json())


def load_splits(path: str | Path, dataset: DatasetSplits | Mapping | None = None) -> ProtocolSplits:
    """Read splits written by ``save_splits``.

    ``dataset`` (a DatasetSplits, or a data config to build one) gives access to the images; without
    it the dataset is rebuilt from the source recorded in the file.
    """
    from mugcp.data.registry import build_dataset

    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"splits file not found: {path}.")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DatasetError(f"{path}: not valid JSON: {err}") from None
    splits = ProtocolSplits.from_json(data, where=str(path))
    if isinstance(dataset, Mapping):
        dataset = build_dataset(dataset)
    elif dataset is None:
        if not splits.dataset_source:
            raise DatasetError(f"{path}: records no dataset source; pass the dataset to load_splits.")
        dataset = build_dataset(splits.dataset_source)
    splits.attach(dataset, str(path))
    return splits
