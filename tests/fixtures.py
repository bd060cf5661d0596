"""Small on-disk datasets with generated images, in every layout ``mugcp.data`` reads.

Every helper writes under the folder it is given and returns the path to put in ``data.root``.
Images are tiny (``IMAGE_SIZE``), non-square, and their colour encodes (label, index), so two
images never look alike. Use them in any test that needs a real dataset on disk::

    root = make_imagefolder(tmp_path, ["cat", "dog"], per_class=3)
    dataset = build_dataset({"dataset": "imagefolder", "root": root})
"""
from __future__ import annotations

import csv
import gzip
import io
import json
import struct
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from mugcp.data.coop import AIRCRAFT, COOP_DATASETS, IMAGENET, IMAGENET_TEST_ONLY, IMAGENET_V2, SPLIT_JSON

IMAGE_SIZE = (20, 14)  # width, height
DEFAULT_CLASSES = ("red_fox", "blue_whale", "snow_owl", "sand_cat", "tree_frog")
SPLITS = ("train", "val", "test")


def image_color(label: int, index: int) -> tuple[int, int, int]:
    return ((40 * label + 7) % 256, (23 * index + 50) % 256, (90 + 11 * label + 5 * index) % 256)


def write_image(path: Path, label: int = 0, index: int = 0, size: tuple[int, int] = IMAGE_SIZE) -> Path:
    """A solid-colour image with a one-pixel marker, as JPEG or PNG by the file's suffix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.new("RGB", size, image_color(label, index))
    image.putpixel((0, 0), (255, 255, 255))
    image.save(path)
    return path


def write_corrupt_image(path: Path) -> Path:
    """A file with an image suffix that no decoder accepts."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"this is not an image\x00\x01\x02")
    return path


def write_bomb_image(path: Path, size: tuple[int, int] = (14000, 14000)) -> Path:
    """A PNG of a few dozen bytes whose header claims ``size`` (a decompression bomb); nothing that big is ever
    allocated."""
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    Image.new("L", (1, 1)).save(buffer, "PNG")
    data = bytearray(buffer.getvalue())
    # IHDR is the first chunk: length (4 bytes at 8), type (12), width and height (16, 20), ..., CRC (29) over
    # type + data.
    struct.pack_into(">II", data, 16, *size)
    struct.pack_into(">I", data, 29, zlib.crc32(bytes(data[12:29])))
    path.write_bytes(bytes(data))
    return path


def write_truncated_image(path: Path) -> Path:
    """A real JPEG cut in half: it opens, then fails while decoding."""
    write_image(path, size=(64, 64))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def _per_split(per_class: int | dict[str, int], splits: Sequence[str]) -> dict[str, int]:
    if isinstance(per_class, int):
        return {split: per_class for split in splits}
    return {split: per_class[split] for split in splits}


def make_imagefolder(
    tmp_path: Path,
    classes: Sequence[str] = DEFAULT_CLASSES[:3],
    per_class: int | dict[str, int] = 3,
    splits: Sequence[str] = ("train", "test"),
    ext: str = ".png",
) -> Path:
    """ROOT/<split>/<class>/<class>_<i><ext>; pass splits=("train", "val", "test") for an explicit val."""
    root = Path(tmp_path) / "imagefolder"
    for split, count in _per_split(per_class, splits).items():
        for label, name in enumerate(classes):
            for index in range(count):
                write_image(root / split / name / f"{name}_{index}{ext}", label, index)
    return root


def _write_split_json(folder: Path, spec, classes: Sequence[str], counts: dict[str, int]) -> None:
    image_dir = folder / spec.image_dir if spec.image_dir else folder
    split = {}
    for split_name, count in counts.items():
        rows = []
        for label, name in enumerate(classes):
            for index in range(count):
                # Stanford Cars keeps train and test images in sibling folders under the dataset folder.
                sub = ("cars_test" if split_name == "test" else "cars_train") if not spec.image_dir else name
                relpath = f"{sub}/{name}_{split_name}_{index}.jpg"
                write_image(image_dir / relpath, label, index)
                rows.append([relpath, label, name])
        split[split_name] = rows
    (folder / spec.split_file).write_text(json.dumps(split), encoding="utf-8")


def wnid(label: int) -> str:
    return f"n{1440764 + label:08d}"


def _write_classnames_txt(folder: Path, names: Sequence[str]) -> None:
    lines = [f"{wnid(label)} {name}" for label, name in enumerate(names)]
    (folder / "classnames.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")


def make_coop_dataset(
    tmp_path: Path,
    name: str,
    classes: Sequence[str] = DEFAULT_CLASSES,
    per_class: int | dict[str, int] | None = None,
    present: Sequence[int] | None = None,
) -> Path:
    """One CoOp benchmark in its DATASETS.md layout under ``tmp_path/data``; returns that $DATA root.

    ``name`` is a canonical name from ``mugcp.data.COOP_DATASETS`` (e.g. "caltech101", "imagenet_a").
    ``per_class`` counts images per class and split (default train 3, val 2, test 2; ImageNet has
    no val, test-only variants only test). ``present`` (test-only variants except V2) lists which
    labels of ``classes`` get an image folder, like ImageNet-A's 200 of 1000 classes.
    """
    spec = next((s for s in COOP_DATASETS if s.name == name), None)
    if spec is None:
        raise ValueError(f"unknown CoOp dataset {name!r}")
    root = Path(tmp_path) / "data"
    folder = root / spec.folder
    folder.mkdir(parents=True, exist_ok=True)
    if spec.layout in (IMAGENET_TEST_ONLY, IMAGENET_V2):
        splits = ("test",)
    elif spec.layout == IMAGENET:
        splits = ("train", "test")
    else:
        splits = SPLITS
    counts = _per_split(per_class if per_class is not None else {"train": 3, "val": 2, "test": 2}, splits)

    if spec.layout == SPLIT_JSON:
        _write_split_json(folder, spec, classes, counts)
    elif spec.layout == AIRCRAFT:
        (folder / "variants.txt").write_text("\n".join(classes) + "\n", encoding="utf-8")
        image_id = 1000000
        for split, count in counts.items():
            lines = []
            for label, variant in enumerate(classes):
                for index in range(count):
                    image_id += 1
                    write_image(folder / spec.image_dir / f"{image_id}.jpg", label, index)
                    lines.append(f"{image_id} {variant}")
            (folder / f"images_variant_{split}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    elif spec.layout == IMAGENET:
        _write_classnames_txt(folder, classes)
        for split, count in counts.items():
            sub = "val" if split == "test" else "train"
            for label in range(len(classes)):
                for index in range(count):
                    write_image(folder / spec.image_dir / sub / wnid(label) / f"{wnid(label)}_{index}.JPEG", label,
                                index)
    else:
        _write_classnames_txt(folder, classes)
        labels = range(len(classes)) if present is None or spec.layout == IMAGENET_V2 else present
        for label in labels:
            class_folder = str(label) if spec.layout == IMAGENET_V2 else wnid(label)
            for index in range(counts["test"]):
                write_image(folder / spec.image_dir / class_folder / f"{index}.jpg", label, index)
        if spec.layout == IMAGENET_TEST_ONLY:
            (folder / spec.image_dir / "README.txt").write_text("not a class\n", encoding="utf-8")
    return root


def make_manifest(
    tmp_path: Path,
    classes: Sequence[str] = DEFAULT_CLASSES[:3],
    per_class: int | dict[str, int] = 3,
    fmt: str = "csv",
    splits: Sequence[str] = ("train", "test"),
    with_classnames: bool = True,
) -> Path:
    """Images under tmp_path/manifest/images and a manifest listing them; returns the data.root.

    fmt: "csv" (one CSV with a split column), "json" (list of objects with split), "json_splits"
    ({"train": [[path, label, classname], ...], ...}), "csv_folder" / "json_folder" (one
    manifest per split in the folder, no split column; the folder is returned).
    """
    base = Path(tmp_path) / "manifest"
    rows = []
    for split, count in _per_split(per_class, splits).items():
        for label, name in enumerate(classes):
            for index in range(count):
                relpath = f"images/{split}/{name}_{index}.png"
                write_image(base / relpath, label, index)
                rows.append({"path": relpath, "label": label, "classname": name if with_classnames else "",
                             "split": split})
    columns = ["path", "label", "classname", "split"] if with_classnames else ["path", "label", "split"]

    if fmt == "csv":
        path = base / "manifest.csv"
        with open(path, "w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)
        return path
    if fmt == "json":
        path = base / "manifest.json"
        path.write_text(json.dumps([{c: row[c] for c in columns} for row in rows]), encoding="utf-8")
        return path
    if fmt == "json_splits":
        path = base / "manifest.json"
        data = {
            split: [[r["path"], r["label"]] + ([r["classname"]] if with_classnames else []) for r in rows
                    if r["split"] == split]
            for split in splits
        }
        path.write_text(json.dumps(data), encoding="utf-8")
        return path
    if fmt in ("csv_folder", "json_folder"):
        for split in splits:
            selected = [r for r in rows if r["split"] == split]
            if fmt == "csv_folder":
                with open(base / f"{split}.csv", "w", newline="", encoding="utf-8") as handle:
                    writer = csv.writer(handle)
                    for r in selected:
                        writer.writerow([r["path"], r["label"]] + ([r["classname"]] if with_classnames else []))
            else:
                (base / f"{split}.json").write_text(
                    json.dumps([[r["path"], r["label"]] + ([r["classname"]] if with_classnames else [])
                                for r in selected]),
                    encoding="utf-8",
                )
        return base
    raise ValueError(f"unknown manifest format {fmt!r}")


def fashion_mnist_arrays(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic 28x28 uint8 images and labels i % 10."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    labels = (np.arange(n) % 10).astype(np.uint8)
    return images, labels


def write_idx(path: Path, array: np.ndarray, gz: bool) -> Path:
    magic = 0x08 << 8 | array.ndim  # 0x08: unsigned byte data
    header = magic.to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    payload = header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    if gz:
        path = path.with_name(path.name + ".gz")
        with gzip.open(path, "wb") as handle:
            handle.write(payload)
    else:
        path.write_bytes(payload)
    return path


def make_fashion_mnist(tmp_path: Path, n_train: int = 50, n_test: int = 20, gz: bool = True) -> Path:
    """The four Fashion-MNIST idx files with generated content; labels are index % 10."""
    root = Path(tmp_path) / "fashion-mnist"
    for prefix, n, seed in (("train", n_train, 1), ("t10k", n_test, 2)):
        images, labels = fashion_mnist_arrays(n, seed)
        write_idx(root / f"{prefix}-images-idx3-ubyte", images, gz)
        write_idx(root / f"{prefix}-labels-idx1-ubyte", labels, gz)
    return root
