"""The dataset model every reader produces: labelled items keyed by a stable path, and their images.

A ``Datum`` carries no absolute path. Its ``key`` is relative to the dataset folder, so splits saved
on one machine load on another, and the key doubles as the semantic-feature cache key.
"""
from __future__ import annotations

import os
import random
import threading
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from PIL import Image, UnidentifiedImageError

from mugcp.config import ConfigError

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
)


class DatasetError(ConfigError):
    """A dataset that is missing or malformed on disk; the message names the path and the fix."""


class BadImageError(DatasetError):
    """One image that cannot be decoded (missing, truncated, not an image)."""


# PIL's bomb check reads the module-level Image.MAX_IMAGE_PIXELS inside Image.open. open_image_file applies
# its own limit instead, so it sets the global aside for the header read; the lock keeps two of its threads
# (data check decodes with a thread pool) from restoring each other's value.
_PIL_LIMIT_LOCK = threading.Lock()


def _open_header(path) -> tuple[Image.Image, Optional[int]]:
    """``Image.open`` (it reads the header only) without PIL's own bomb check; returns the image and PIL's limit."""
    with _PIL_LIMIT_LOCK:
        pil_limit = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None
        try:
            return Image.open(path), pil_limit
        finally:
            Image.MAX_IMAGE_PIXELS = pil_limit


def open_image_file(path: str | os.PathLike, max_pixels: Optional[int] = None,
                    key: Optional[str] = None) -> Image.Image:
    """The image file at ``path`` as RGB: what every reader of image files (datasets, data check, predict) calls.

    Anything unreadable raises ``BadImageError`` naming ``key`` (default: the path) and the file, with
    the reason in its ``reason`` attribute: missing, not an image, truncated, or more pixels than
    ``max_pixels`` (``data.max_image_pixels``; None: PIL's ``Image.MAX_IMAGE_PIXELS``). That last one is
    the guard against decompression bombs (a small file whose header claims e.g. 14000 x 14000 pixels,
    gigabytes once decoded); it is checked on the header, before any pixel is decoded, and replaces
    PIL's own check, which warns above its limit and raises its own error type above twice that.
    """
    try:
        image, pil_limit = _open_header(path)
        with image:
            limit = pil_limit if max_pixels is None else int(max_pixels)
            if limit is not None and image.width * image.height > limit:
                reason = (f"{image.width} x {image.height} = {image.width * image.height:,} pixels, over the limit of "
                          f"{limit:,} (data.max_image_pixels, a guard against decompression bombs; raise it if the "
                          "image is genuine)")
            else:
                image.load()
                return image.convert("RGB")
    except FileNotFoundError:
        reason = "file not found"
    except IsADirectoryError:
        reason = "a folder, not an image file"
    except UnidentifiedImageError:
        reason = "not a recognised image format"
    except Image.DecompressionBombError as err:  # PIL's own check, e.g. while decoding an animated frame
        reason = f"{str(err).rstrip('.')} (raise data.max_image_pixels if the image is genuine)"
    except (OSError, ValueError, SyntaxError) as err:
        reason = str(err) or type(err).__name__
    error = BadImageError(
        f"cannot read image '{key if key is not None else path}' ({path}): {reason}. Replace or remove the file, "
        f"or set data.on_bad_image=skip to drop unreadable images."
    )
    error.reason = reason
    raise error


@dataclass(frozen=True)
class Datum:
    key: str
    label: int
    classname: str


def prompt_classname(raw: str) -> str:
    # Folder and split-file names use underscores ("apple_pie"); CLIP reads them as text.
    return " ".join(raw.replace("_", " ").split())


@dataclass
class DatasetSplits:
    """A whole dataset as its files define it; ``classnames[label]`` is the name of ``label``."""

    name: str
    root: Path | None
    classnames: list[str]
    train: list[Datum]
    val: list[Datum]
    test: list[Datum]
    source: dict = field(default_factory=dict, compare=False, repr=False)
    # data.max_image_pixels: images with more pixels are unreadable (None: PIL's Image.MAX_IMAGE_PIXELS).
    max_image_pixels: Optional[int] = field(default=None, compare=False, repr=False)

    def split(self, which: str) -> list[Datum]:
        if which not in ("train", "val", "test"):
            raise ValueError(f"unknown split '{which}': use train, val or test.")
        return getattr(self, which)

    def describe(self, key: str) -> str:
        if self.root is None:
            return key
        return str(self.root / key)

    def file_of(self, key: str) -> Path | None:
        """The file that holds ``key``'s image, or None when images do not live one per file."""
        return self.root / key if self.root is not None else Path(key)

    def open_image(self, key: str) -> Image.Image:
        """The image behind ``key`` as RGB; anything unreadable (over ``max_image_pixels`` too) raises BadImageError."""
        return open_image_file(self.file_of(key), self.max_image_pixels, key=key)

    def summary(self) -> str:
        return (
            f"{self.name}: {len(self.classnames)} classes, {len(self.train)} train / "
            f"{len(self.val)} val / {len(self.test)} test images"
        )


def classnames_from_items(items: Iterable[Datum], where: str) -> list[str]:
    """Class names indexed by label, checking labels are 0..C-1 and each has one name."""
    names: dict[int, str] = {}
    for item in items:
        known = names.setdefault(item.label, item.classname)
        if known != item.classname:
            raise DatasetError(
                f"{where}: label {item.label} is named both '{known}' and '{item.classname}'. "
                f"Each label needs exactly one class name."
            )
    if not names:
        raise DatasetError(f"{where}: no labelled images found.")
    missing = sorted(set(range(max(names) + 1)) - set(names))
    if min(names) < 0 or missing:
        raise DatasetError(
            f"{where}: labels must be 0..C-1 with every class present; "
            f"missing labels {missing[:10]}{' ...' if len(missing) > 10 else ''}"
            + (f", negative label {min(names)}" if min(names) < 0 else "")
            + "."
        )
    return [names[label] for label in range(len(names))]


def carve_val(train: Sequence[Datum], fraction: float, seed: int) -> tuple[list[Datum], list[Datum]]:
    """Move ``fraction`` of each class from train to val, chosen by ``seed``; order is kept.

    A class with a single image stays in train. The seed is the dataset's, not the run's, so every
    run samples its few shots from the same train pool.
    """
    if not 0.0 <= fraction < 1.0:
        raise DatasetError(f"data.val_fraction must be in [0, 1), got {fraction}.")
    by_label: dict[int, list[int]] = defaultdict(list)
    for index, item in enumerate(train):
        by_label[item.label].append(index)
    rng = random.Random(seed)
    val_indices: set[int] = set()
    for label in sorted(by_label):
        indices = by_label[label]
        n_val = round(len(indices) * fraction)
        if fraction > 0 and len(indices) >= 2:
            n_val = min(max(n_val, 1), len(indices) - 1)
        val_indices.update(rng.sample(indices, n_val))
    kept = [item for index, item in enumerate(train) if index not in val_indices]
    val = [item for index, item in enumerate(train) if index in val_indices]
    return kept, val


def not_a_folder(path: Path) -> str:
    """Why ``path`` cannot be read as a dataset folder, in words: it is a file, or it does not exist."""
    return "is a file, not a folder" if path.is_file() else "does not exist"


def list_images(folder: Path) -> list[Path]:
    """Image files directly inside ``folder``, sorted by name, hidden files skipped."""
    return sorted(
        entry
        for entry in folder.iterdir()
        if entry.is_file() and not entry.name.startswith(".") and entry.suffix.lower() in IMAGE_EXTENSIONS
    )


def list_class_folders(folder: Path) -> list[str]:
    return sorted(entry.name for entry in folder.iterdir() if entry.is_dir() and not entry.name.startswith("."))
