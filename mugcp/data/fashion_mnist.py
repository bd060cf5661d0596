"""Fashion-MNIST from its standard idx files (gzipped or not).

The Debian package ``dataset-fashion-mnist`` installs them under /usr/share/datasets/fashion-mnist.
Keys are ``train/00123`` and ``test/00007`` (the index in the idx file), so they are stable.
"""
from __future__ import annotations

import functools
import gzip
import os
from pathlib import Path
from typing import TYPE_CHECKING

from PIL import Image

from mugcp.data.dataset import BadImageError, DatasetError, DatasetSplits, Datum, carve_val, not_a_folder

if TYPE_CHECKING:
    import numpy as np

DEFAULT_ROOT = Path("/usr/share/datasets/fashion-mnist")
CLASSNAMES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]
FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
IMAGES_MAGIC = 2051
LABELS_MAGIC = 2049
LAYOUT = (
    "ROOT/train-images-idx3-ubyte[.gz], ROOT/train-labels-idx1-ubyte[.gz], "
    "ROOT/t10k-images-idx3-ubyte[.gz], ROOT/t10k-labels-idx1-ubyte[.gz] "
    "(install them with `apt-get install dataset-fashion-mnist`, or set data.root)"
)


def _find(root: Path, stem: str) -> Path:
    for candidate in (root / stem, root / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    raise DatasetError(f"fashion_mnist: {root / stem}[.gz] not found. Expected layout: {LAYOUT}.")


def _read_bytes(path: Path) -> bytes:
    with open(path, "rb") as handle:
        head = handle.read(2)
    opener = gzip.open if head == b"\x1f\x8b" else open
    try:
        with opener(path, "rb") as handle:
            return handle.read()
    except (OSError, EOFError) as err:
        raise DatasetError(f"fashion_mnist: cannot read {path}: {err}") from None


def read_idx(path: Path, magic: int) -> np.ndarray:
    """An idx array (big-endian header: magic, then one uint32 per dimension, then uint8 data)."""
    import numpy as np  # here: the dataset registry imports this module, and `data check --help` imports the registry

    data = _read_bytes(path)
    ndim = magic & 0xFF
    header = 4 * (1 + ndim)
    if len(data) < header or int.from_bytes(data[:4], "big") != magic:
        found = int.from_bytes(data[:4], "big") if len(data) >= 4 else None
        raise DatasetError(f"fashion_mnist: {path} is not an idx file with magic {magic} (found {found}).")
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    expected = int(np.prod(shape))
    if len(data) - header != expected:
        raise DatasetError(
            f"fashion_mnist: {path} is truncated or padded: header says {shape} = {expected} bytes, "
            f"found {len(data) - header}."
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


@functools.lru_cache(maxsize=4)
def _load_split(images_path: Path, labels_path: Path, _stamp: tuple) -> tuple[np.ndarray, np.ndarray]:
    images = read_idx(images_path, IMAGES_MAGIC)
    labels = read_idx(labels_path, LABELS_MAGIC)
    if len(images) != len(labels):
        raise DatasetError(
            f"fashion_mnist: {images_path} has {len(images)} images but {labels_path} has {len(labels)} labels."
        )
    if labels.size and int(labels.max()) >= len(CLASSNAMES):
        raise DatasetError(f"fashion_mnist: {labels_path} has label {int(labels.max())}; expected 0..9.")
    return images, labels


def load_split(root: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(images (N, 28, 28) uint8, labels (N,) uint8) of one split, cached per process."""
    images_path, labels_path = (_find(root, stem) for stem in FILES[split])
    stamp = tuple((os.stat(p).st_mtime_ns, os.stat(p).st_size) for p in (images_path, labels_path))
    return _load_split(images_path.resolve(), labels_path.resolve(), stamp)


class FashionMNISTSplits(DatasetSplits):
    """Images live in memory; ``open_image`` renders one as an RGB PIL image."""

    def _array(self, key: str) -> np.ndarray:
        split, _, index = key.partition("/")
        if split not in FILES or not index.isdigit():
            raise BadImageError(f"'{key}' is not a Fashion-MNIST key (expected train/NNNNN or test/NNNNN).")
        images, _ = load_split(self.root, split)
        if int(index) >= len(images):
            raise BadImageError(f"'{key}': the {split} split of {self.root} has only {len(images)} images.")
        return images[int(index)]

    def open_image(self, key: str) -> Image.Image:
        return Image.fromarray(self._array(key)).convert("RGB")

    def file_of(self, key: str) -> None:
        return None  # every image lives in the split's idx file

    def describe(self, key: str) -> str:
        split, _, index = key.partition("/")
        return f"fashion-mnist {split} image #{int(index) if index.isdigit() else index} ({self.root})"


def build_fashion_mnist(root: Path | None, val_fraction: float, val_seed: int) -> DatasetSplits:
    root = Path(root) if root is not None else DEFAULT_ROOT
    if not root.is_dir():
        raise DatasetError(f"fashion_mnist: data.root {root} {not_a_folder(root)}. Expected layout: {LAYOUT}.")
    items = {}
    for split in FILES:
        _, labels = load_split(root, split)
        items[split] = [
            Datum(f"{split}/{index:05d}", int(label), CLASSNAMES[int(label)]) for index, label in enumerate(labels)
        ]
    train, val = carve_val(items["train"], val_fraction, val_seed)
    return FashionMNISTSplits("fashion_mnist", root, list(CLASSNAMES), train, val, items["test"])
