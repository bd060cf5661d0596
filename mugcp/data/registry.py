"""``build_dataset(cfg["data"])``: a dataset name (any common spelling) to its reader."""
from __future__ import annotations

import difflib
import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path

from mugcp.data.classnames import validate_classnames
from mugcp.data.coop import COOP_DATASETS, CoopDatasetSpec, build_coop_dataset, expected_layout
from mugcp.data.dataset import DatasetError, DatasetSplits
from mugcp.data.fashion_mnist import build_fashion_mnist
from mugcp.data.imagefolder import build_imagefolder
from mugcp.data.manifest import build_manifest

# Where a dataset's class names come from, so the warning about a duplicate says what to rename.
DUPLICATE_NAMES_FIX = {
    "imagefolder": "Rename or merge those class folders (under train/, val/ and test/) to tell them apart.",
    "manifest": "Give each label its own classname in the manifest to tell them apart.",
}
DEFAULT_VAL_FRACTION = 0.2
DEFAULT_VAL_SEED = 0

# CoOp's class names (OxfordPets, DescribableTextures, ImageNetV2...) normalise to these too.
OTHER_DATASETS = {
    "imagefolder": ("image_folder",),
    "manifest": (),
    "fashion_mnist": ("fashionmnist",),
}


def normalise_name(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", str(name).lower())


def _alias_table() -> dict[str, str]:
    table: dict[str, str] = {}
    for spec in COOP_DATASETS:
        for alias in (spec.name, spec.folder, *spec.aliases):
            table[normalise_name(alias)] = spec.name
    for name, aliases in OTHER_DATASETS.items():
        for alias in (name, *aliases):
            table[normalise_name(alias)] = name
    return table


ALIASES = _alias_table()
DATASET_NAMES = tuple(spec.name for spec in COOP_DATASETS) + tuple(OTHER_DATASETS)
# The papers' tables: the 11 datasets of base-to-novel, few-shot and cross-dataset transfer in their
# column order, and the ImageNet variants of domain generalisation.
STANDARD_DATASETS = ("imagenet", "caltech101", "oxford_pets", "stanford_cars", "flowers102", "food101", "fgvc_aircraft",
                     "sun397", "dtd", "eurosat", "ucf101")
IMAGENET_VARIANTS = ("imagenet_v2", "imagenet_sketch", "imagenet_a", "imagenet_r")


def canonical_dataset_name(name: str) -> str:
    """``Caltech101``, ``caltech-101`` and ``caltech101`` are all ``caltech101``."""
    key = normalise_name(name)
    if key in ALIASES:
        return ALIASES[key]
    close = difflib.get_close_matches(key, list(ALIASES), n=3, cutoff=0.6)
    hint = f" Did you mean: {', '.join(sorted({ALIASES[c] for c in close}))}?" if close else ""
    raise DatasetError(f"unknown data.dataset '{name}'.{hint} Known datasets: {', '.join(DATASET_NAMES)}.")


def _coop_spec(name: str) -> CoopDatasetSpec | None:
    return next((spec for spec in COOP_DATASETS if spec.name == name), None)


def _resolve_root(root) -> Path | None:
    if root is None or str(root).strip() == "":
        return None
    return Path(os.path.expandvars(os.path.expanduser(str(root))))


def build_dataset(data_cfg: Mapping) -> DatasetSplits:
    """The whole dataset named by ``data_cfg["dataset"]`` under ``data_cfg["root"]``."""
    if "dataset" not in data_cfg or data_cfg["dataset"] is None:
        raise DatasetError(f"data.dataset is not set. Known datasets: {', '.join(DATASET_NAMES)}.")
    name = canonical_dataset_name(data_cfg["dataset"])
    root = _resolve_root(data_cfg.get("root"))
    val_fraction = float(data_cfg.get("val_fraction", DEFAULT_VAL_FRACTION))
    val_seed = int(data_cfg.get("val_seed", DEFAULT_VAL_SEED))

    spec = _coop_spec(name)
    if spec is not None:
        if root is None:
            raise DatasetError(
                f"dataset '{name}': data.root is not set. Set it to the folder that holds {spec.folder}/ "
                f"(CoOp's $DATA). Expected layout: {expected_layout(spec)}."
            )
        dataset = build_coop_dataset(spec, root)
    else:
        readers: dict[str, Callable[[], DatasetSplits]] = {
            "fashion_mnist": lambda: build_fashion_mnist(root, val_fraction, val_seed),
            "imagefolder": lambda: build_imagefolder(_require_root(name, root), val_fraction, val_seed),
            "manifest": lambda: build_manifest(_require_root(name, root), val_fraction, val_seed),
        }
        dataset = readers[name]()
    dataset.classnames = validate_classnames(
        dataset.classnames, f"dataset '{name}' ({dataset.root})",
        [f"label {label}" for label in range(len(dataset.classnames))],
        fix=DUPLICATE_NAMES_FIX.get(name,
                                    "The benchmark's own list has them (ImageNet's does); they are kept as they are."),
        duplicates="warn",
    )
    dataset.max_image_pixels = data_cfg.get("max_image_pixels")
    dataset.source = {
        "dataset": name,
        "root": str(dataset.root) if dataset.root is not None else None,
        "val_fraction": val_fraction,
        "val_seed": val_seed,
    }
    return dataset


def _require_root(name: str, root: Path | None) -> Path:
    if root is None:
        what = "the tree's root folder" if name == "imagefolder" else "the manifest file or folder"
        raise DatasetError(f"dataset '{name}': data.root is not set; set it to {what}.")
    return root


class DataPathError(DatasetError):
    """A path of the data section (``key``) that does not exist."""

    def __init__(self, key: str, message: str):
        super().__init__(message)
        self.key = key


def check_data_config(data_cfg: Mapping) -> None:
    """The data section's names that need the registry, checked without reading the dataset: a known
    dataset, a root folder that exists (null: the dataset's default location) and a few-shot file that
    exists (``auto`` and ``none`` name none). Whether the root holds the dataset's layout is left to the
    run (and ``python -m mugcp.data check``): a dry run may be planned before the data is in place."""
    dataset = canonical_dataset_name(data_cfg["dataset"])
    root = _resolve_root(data_cfg.get("root"))
    if root is not None and not root.exists():
        raise DataPathError(
            "data.root", f"data.root={str(data_cfg['root'])!r} does not exist. Point it at the dataset's folder; "
            f"python -m mugcp.data check --dataset {dataset} --root ROOT checks a layout."
        )
    fewshot_file = data_cfg.get("fewshot_file")
    if fewshot_file is not None and str(fewshot_file).strip().lower() not in ("auto", "none"):
        if not Path(str(fewshot_file)).expanduser().is_file():
            raise DataPathError(
                "data.fewshot_file", f"data.fewshot_file={str(fewshot_file)!r}: no such file. Point it at a released "
                "split_fewshot/shot_<K>-seed_<S>.pkl, or set it to auto or none."
            )
