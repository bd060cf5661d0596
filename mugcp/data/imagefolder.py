"""Any ImageFolder tree: ROOT/train/<class>/*, ROOT/test/<class>/*, optionally ROOT/val/<class>/*."""
from __future__ import annotations

from pathlib import Path

from mugcp.data.dataset import (
    DatasetError,
    DatasetSplits,
    Datum,
    carve_val,
    list_class_folders,
    list_images,
    not_a_folder,
    prompt_classname,
)

LAYOUT = "ROOT/train/<class name>/<image>, ROOT/test/<class name>/<image> and optionally ROOT/val/<class name>/<image>"


def _read_split(split_dir: Path, split: str, label_of: dict[str, int], classnames: list[str]) -> list[Datum]:
    items = []
    for folder in list_class_folders(split_dir):
        if folder not in label_of:
            raise DatasetError(
                f"{split_dir / folder}: class '{folder}' has no folder in {split_dir.parent / 'train'}; "
                f"every class needs training images."
            )
        label = label_of[folder]
        for image in list_images(split_dir / folder):
            items.append(Datum(f"{split}/{folder}/{image.name}", label, classnames[label]))
    return items


def build_imagefolder(root: Path, val_fraction: float, val_seed: int) -> DatasetSplits:
    """Labels follow the sorted class folders of train/; without val/, val is carved from train."""
    if not root.is_dir():
        raise DatasetError(f"imagefolder: data.root {root} {not_a_folder(root)}. Expected layout: {LAYOUT}.")
    for split in ("train", "test"):
        if not (root / split).is_dir():
            raise DatasetError(f"imagefolder: {root / split} not found. Expected layout: {LAYOUT}.")
    folders = list_class_folders(root / "train")
    if not folders:
        raise DatasetError(f"imagefolder: {root / 'train'} has no class folders. Expected layout: {LAYOUT}.")
    classnames = [prompt_classname(folder) for folder in folders]
    label_of = {folder: label for label, folder in enumerate(folders)}
    train = _read_split(root / "train", "train", label_of, classnames)
    test = _read_split(root / "test", "test", label_of, classnames)
    if (root / "val").is_dir():
        val = _read_split(root / "val", "val", label_of, classnames)
    else:
        train, val = carve_val(train, val_fraction, val_seed)
    if not train or not test:
        raise DatasetError(f"imagefolder: no images found under {root}. Expected layout: {LAYOUT}.")
    return DatasetSplits("imagefolder", root, classnames, train, val, test)
