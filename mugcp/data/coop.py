"""The CoOp benchmark datasets, read from the folder layouts of CoOp's DATASETS.md.

``data.root`` is the folder that holds every dataset (CoOp's ``$DATA``), e.g. ROOT/oxford_pets/;
pointing it at the dataset's own folder works too. Eleven datasets come with CoOp's fixed
``split_zhou_*.json`` (or, for ImageNet and FGVC-Aircraft, the dataset's own files); the four
ImageNet variants are test-only and take their class names from ``classnames.txt``.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from mugcp.data.dataset import (
    DatasetError,
    DatasetSplits,
    Datum,
    classnames_from_items,
    list_class_folders,
    list_images,
    not_a_folder,
    prompt_classname,
)

SPLIT_JSON = "split_json"
IMAGENET = "imagenet"
IMAGENET_TEST_ONLY = "imagenet_test_only"
IMAGENET_V2 = "imagenet_v2"
AIRCRAFT = "aircraft"


@dataclass(frozen=True)
class CoopDatasetSpec:
    name: str
    folder: str  # under data.root
    image_dir: str  # under folder; "" when split paths start at the folder itself
    layout: str
    split_file: str | None = None
    aliases: tuple[str, ...] = ()

    @property
    def marker(self) -> str:
        """The one file that identifies this dataset's folder."""
        if self.layout == SPLIT_JSON:
            return self.split_file
        if self.layout == AIRCRAFT:
            return "variants.txt"
        return "classnames.txt"


COOP_DATASETS: tuple[CoopDatasetSpec, ...] = (
    CoopDatasetSpec("imagenet", "imagenet", "images", IMAGENET),
    CoopDatasetSpec("caltech101", "caltech-101", "101_ObjectCategories", SPLIT_JSON, "split_zhou_Caltech101.json"),
    CoopDatasetSpec("oxford_pets", "oxford_pets", "images", SPLIT_JSON, "split_zhou_OxfordPets.json", ("pets",)),
    CoopDatasetSpec("stanford_cars", "stanford_cars", "", SPLIT_JSON, "split_zhou_StanfordCars.json", ("cars",)),
    CoopDatasetSpec(
        "flowers102", "oxford_flowers", "jpg", SPLIT_JSON, "split_zhou_OxfordFlowers.json", ("flowers",)
    ),
    CoopDatasetSpec("food101", "food-101", "images", SPLIT_JSON, "split_zhou_Food101.json"),
    CoopDatasetSpec("fgvc_aircraft", "fgvc_aircraft", "images", AIRCRAFT, aliases=("aircraft",)),
    CoopDatasetSpec("sun397", "sun397", "SUN397", SPLIT_JSON, "split_zhou_SUN397.json"),
    CoopDatasetSpec(
        "dtd", "dtd", "images", SPLIT_JSON, "split_zhou_DescribableTextures.json", ("describable_textures",)
    ),
    CoopDatasetSpec("eurosat", "eurosat", "2750", SPLIT_JSON, "split_zhou_EuroSAT.json"),
    CoopDatasetSpec("ucf101", "ucf101", "UCF-101-midframes", SPLIT_JSON, "split_zhou_UCF101.json"),
    CoopDatasetSpec("imagenet_v2", "imagenetv2", "imagenetv2-matched-frequency-format-val", IMAGENET_V2),
    CoopDatasetSpec("imagenet_sketch", "imagenet-sketch", "images", IMAGENET_TEST_ONLY),
    CoopDatasetSpec("imagenet_a", "imagenet-adversarial", "imagenet-a", IMAGENET_TEST_ONLY,
                    aliases=("imagenet_adversarial",)),
    CoopDatasetSpec("imagenet_r", "imagenet-rendition", "imagenet-r", IMAGENET_TEST_ONLY,
                    aliases=("imagenet_rendition",)),
)


def expected_layout(spec: CoopDatasetSpec) -> str:
    images = f"ROOT/{spec.folder}/{spec.image_dir}/" if spec.image_dir else f"ROOT/{spec.folder}/"
    if spec.layout == SPLIT_JSON:
        return (
            f"ROOT/{spec.folder}/{spec.split_file} ({{\"train\"|\"val\"|\"test\": [[relpath, label, classname], "
            f"...]}}) with the images under {images} (relpath is relative to that folder)"
        )
    if spec.layout == AIRCRAFT:
        return (
            f"ROOT/{spec.folder}/variants.txt (one class per line), "
            f"ROOT/{spec.folder}/images_variant_{{train,val,test}}.txt (lines 'IMAGE_ID VARIANT') "
            f"and the images as {images}IMAGE_ID.jpg"
        )
    if spec.layout == IMAGENET:
        return (
            f"ROOT/{spec.folder}/classnames.txt (lines 'WNID class name') and "
            f"{images}train/WNID/*.JPEG and {images}val/WNID/*.JPEG (val is the test set)"
        )
    if spec.layout == IMAGENET_V2:
        return (
            f"ROOT/{spec.folder}/classnames.txt (ImageNet's, lines 'WNID class name') and "
            f"{images}LABEL/*.jpeg with LABEL = 0..999"
        )
    return f"ROOT/{spec.folder}/classnames.txt (ImageNet's, lines 'WNID class name') and {images}WNID/*"


def locate_dataset_folder(spec: CoopDatasetSpec, root: Path) -> Path:
    """ROOT/<folder>, or ROOT itself when it already is the dataset's folder."""
    if not root.is_dir():
        raise DatasetError(
            f"dataset '{spec.name}': data.root {root} {not_a_folder(root)}. Expected layout: {expected_layout(spec)}; "
            f"set data.root to the folder that holds {spec.folder}/."
        )
    for candidate in (root / spec.folder, root):
        if (candidate / spec.marker).is_file():
            return candidate
    raise DatasetError(
        f"dataset '{spec.name}': {root / spec.folder / spec.marker} not found. Expected layout: "
        f"{expected_layout(spec)}. CoOp's DATASETS.md says where to download the split files."
    )


def _require_dir(path: Path, spec: CoopDatasetSpec) -> Path:
    if not path.is_dir():
        raise DatasetError(
            f"dataset '{spec.name}': image folder {path} not found. Expected layout: {expected_layout(spec)}."
        )
    return path


def _key(*parts: str) -> str:
    return "/".join(part.strip("/") for part in parts if part)


def read_split_json(path: Path, image_dir: str) -> dict[str, list[Datum]]:
    """CoOp's split file; keys become ``image_dir/relpath``."""
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DatasetError(f"{path}: cannot read the split file: {err}") from None
    if not isinstance(data, dict):
        raise DatasetError(f"{path}: expected an object with train, val and test lists.")
    splits: dict[str, list[Datum]] = {}
    for split in ("train", "val", "test"):
        if split not in data:
            raise DatasetError(f"{path}: the '{split}' list is missing; a split file has train, val and test.")
        entries = data[split]
        if not isinstance(entries, list):
            raise DatasetError(f"{path}: '{split}' must be a list of [relpath, label, classname].")
        items = []
        for index, entry in enumerate(entries):
            if (
                not isinstance(entry, (list, tuple))
                or len(entry) != 3
                or not isinstance(entry[0], str)
                or isinstance(entry[1], bool)
                or not isinstance(entry[1], int)
                or not isinstance(entry[2], str)
            ):
                raise DatasetError(
                    f"{path}: {split}[{index}] is {entry!r}; each entry must be [relpath, label, classname] "
                    f"(string, integer, string)."
                )
            items.append(Datum(_key(image_dir, entry[0]), entry[1], prompt_classname(entry[2])))
        splits[split] = items
    return splits


def read_classnames_txt(path: Path) -> dict[str, str]:
    """ImageNet's classnames.txt: ``WNID class name`` per line, in label order."""
    if not path.is_file():
        raise DatasetError(f"{path} not found; it holds lines 'WNID class name' (CoOp's imagenet/classnames.txt).")
    names: dict[str, str] = {}
    for number, line in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), start=1):
        if not line.strip():
            continue
        folder, _, name = line.strip().partition(" ")
        if not name.strip():
            raise DatasetError(f"{path}:{number}: expected 'WNID class name', got {line.strip()!r}.")
        names[folder] = name.strip()
    return names


def _read_class_folders(
    image_dir: Path, key_prefix: str, folder_to_label: dict[str, int], classnames: list[str], where: Path
) -> list[Datum]:
    items = []
    for folder in list_class_folders(image_dir):
        if folder not in folder_to_label:
            raise DatasetError(f"{image_dir / folder}: class folder '{folder}' is not listed in {where}.")
        label = folder_to_label[folder]
        for image in list_images(image_dir / folder):
            items.append(Datum(_key(key_prefix, folder, image.name), label, classnames[label]))
    return items


def _labels_from_class_folders(image_dir: Path, wnid_names: dict[str, str],
                               names_file: Path) -> tuple[list[str], dict[str, int]]:
    """Labels in the order of the sorted WordNet-id folders, named by ``classnames.txt``."""
    wnids = list_class_folders(image_dir)
    unknown = [wnid for wnid in wnids if wnid not in wnid_names]
    if unknown:
        raise DatasetError(f"{image_dir}: class folders {unknown[:10]} are not listed in {names_file}.")
    return [wnid_names[wnid] for wnid in wnids], {wnid: label for label, wnid in enumerate(wnids)}


def _read_imagenet(spec: CoopDatasetSpec, folder: Path) -> tuple[list[str], list[Datum], list[Datum], list[Datum]]:
    names_file = folder / "classnames.txt"
    wnid_names = read_classnames_txt(names_file)
    train_dir = _require_dir(folder / spec.image_dir / "train", spec)
    test_dir = _require_dir(folder / spec.image_dir / "val", spec)
    # Like CoOp, labels follow the sorted class folders of train/.
    classnames, folder_to_label = _labels_from_class_folders(train_dir, wnid_names, names_file)
    train = _read_class_folders(train_dir, _key(spec.image_dir, "train"), folder_to_label, classnames, train_dir)
    test = _read_class_folders(test_dir, _key(spec.image_dir, "val"), folder_to_label, classnames, train_dir)
    # CoOp evaluates ImageNet on its val set and uses the same images for validation.
    return classnames, train, list(test), test


def _read_imagenet_test_only(spec: CoopDatasetSpec,
                             folder: Path) -> tuple[list[str], list[Datum], list[Datum], list[Datum]]:
    names_file = folder / "classnames.txt"
    wnid_names = read_classnames_txt(names_file)
    image_dir = _require_dir(folder / spec.image_dir, spec)
    if spec.layout == IMAGENET_V2:
        classnames = list(wnid_names.values())
        folder_to_label = {str(label): label for label in range(len(classnames))}
        test = _read_class_folders(image_dir, spec.image_dir, folder_to_label, classnames, names_file)
    else:
        # ImageNet-A/-R hold 200 of the 1000 classes: labels follow their own sorted folders.
        classnames, folder_to_label = _labels_from_class_folders(image_dir, wnid_names, names_file)
        test = _read_class_folders(image_dir, spec.image_dir, folder_to_label, classnames, names_file)
    if not test:
        raise DatasetError(f"dataset '{spec.name}': no images found. Expected layout: {expected_layout(spec)}.")
    return classnames, [], [], test


def _read_aircraft(spec: CoopDatasetSpec, folder: Path) -> tuple[list[str], list[Datum], list[Datum], list[Datum]]:
    variants_file = folder / "variants.txt"
    classnames = [line.strip() for line in variants_file.read_text(encoding="utf-8-sig").splitlines() if line.strip()]
    label_of = {name: label for label, name in enumerate(classnames)}
    _require_dir(folder / spec.image_dir, spec)
    splits = []
    for split in ("train", "val", "test"):
        list_file = folder / f"images_variant_{split}.txt"
        if not list_file.is_file():
            raise DatasetError(
                f"dataset '{spec.name}': {list_file} not found. Expected layout: {expected_layout(spec)}."
            )
        items = []
        for number, line in enumerate(list_file.read_text(encoding="utf-8-sig").splitlines(), start=1):
            if not line.strip():
                continue
            image_id, _, variant = line.strip().partition(" ")
            if variant not in label_of:
                raise DatasetError(
                    f"{list_file}:{number}: variant {variant!r} is not listed in {variants_file}."
                )
            items.append(Datum(_key(spec.image_dir, f"{image_id}.jpg"), label_of[variant], variant))
        splits.append(items)
    return classnames, *splits


def build_coop_dataset(spec: CoopDatasetSpec, root: Path) -> DatasetSplits:
    folder = locate_dataset_folder(spec, root)
    if spec.layout == SPLIT_JSON:
        _require_dir(folder / spec.image_dir, spec)
        splits = read_split_json(folder / spec.split_file, spec.image_dir)
        classnames = classnames_from_items(
            splits["train"] + splits["val"] + splits["test"], str(folder / spec.split_file)
        )
        train, val, test = splits["train"], splits["val"], splits["test"]
    elif spec.layout == IMAGENET:
        classnames, train, val, test = _read_imagenet(spec, folder)
    elif spec.layout == AIRCRAFT:
        classnames, train, val, test = _read_aircraft(spec, folder)
    else:
        classnames, train, val, test = _read_imagenet_test_only(spec, folder)
    return DatasetSplits(spec.name, folder, classnames, train, val, test)
