"""Where the extraction's images come from: a folder of images, or any dataset the data layer reads.

A source is a sorted list of dataset-relative keys, an ``open(key) -> PIL RGB`` that raises
``UnreadableImageError`` for a bad file, and a small description for the cache manifest.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from mugcp.data.image_tree import find_images
from mugcp.errors import UserError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"})
ALL_SPLITS = ("train", "val", "test")


class SourceError(UserError, ValueError):
    """The image source cannot be listed (missing folder, empty dataset, unknown split)."""


class UnreadableImageError(RuntimeError):
    """One image that cannot be decoded; the extraction records it and goes on."""


@dataclass
class ImageSource:
    keys: list[str]
    opener: Callable[[str], Image.Image]
    description: dict = field(default_factory=dict)

    def open(self, key: str) -> Image.Image:
        return self.opener(key)

    def __len__(self) -> int:
        return len(self.keys)


def _open_file(path: Path, key: str) -> Image.Image:
    try:
        with Image.open(path) as image:
            image.load()
            return image.convert("RGB")
    except Exception as err:  # PIL raises many types for broken files; each one means "unreadable"
        raise UnreadableImageError(f"{path}: {type(err).__name__}: {err}") from None


def image_dir_source(directory: str | Path) -> ImageSource:
    """Every image file under ``directory`` (recursively); the key is its path relative to it."""
    root = Path(directory).expanduser()
    if not root.is_dir():
        raise SourceError(f"--images {directory}: no such directory.")
    root = root.resolve()
    # Listed the way predict lists a folder (symlinked folders followed once), so every image it finds has a key.
    keys = sorted(path.relative_to(root).as_posix() for path in find_images(root, IMAGE_EXTENSIONS))
    if not keys:
        raise SourceError(
            f"--images {directory}: no image files found (extensions: {', '.join(sorted(IMAGE_EXTENSIONS))})."
        )
    return ImageSource(
        keys=keys,
        opener=lambda key: _open_file(root / key, key),
        description={"name": f"images:{root.name}", "root": str(root)},
    )


def parse_splits(text: str | Sequence[str] | None) -> list[str]:
    if text is None:
        return list(ALL_SPLITS)
    names = [name.strip() for name in (text.split(",") if isinstance(text, str) else text) if name.strip()]
    unknown = [name for name in names if name not in ALL_SPLITS]
    if unknown or not names:
        raise SourceError(f"--splits {text!r}: use a comma-separated subset of {', '.join(ALL_SPLITS)}.")
    return names


def dataset_source(data_cfg: Mapping, splits: Sequence[str] = ALL_SPLITS) -> ImageSource:
    """All images of the chosen splits of ``build_dataset(data_cfg)`` (whole splits, no few-shot sampling:
    the cache serves every seed and shot count)."""
    from mugcp.data import BadImageError, build_dataset

    dataset = build_dataset(data_cfg)
    keys = sorted({item.key for split in splits for item in dataset.split(split)})
    if not keys:
        raise SourceError(f"dataset {dataset.name}: the splits {', '.join(splits)} hold no images.")

    def opener(key: str) -> Image.Image:
        try:
            return dataset.open_image(key)
        except BadImageError as err:
            raise UnreadableImageError(str(err)) from None

    return ImageSource(
        keys=keys,
        opener=opener,
        description={
            "name": dataset.name,
            "root": str(dataset.root) if dataset.root is not None else None,
            "splits": list(splits),
        },
    )
