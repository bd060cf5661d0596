"""The released code's few-shot subsets: CoOp's ``split_fewshot/shot_{K}-seed_{S}.pkl``.

CoOp's datasets draw ``K`` images per class once per seed and pickle them as
``{"train": [Datum, ...], "val": [Datum, ...]}`` (ImageNet's file has ``train`` only), each Datum a
``dassl.data.datasets.base_dataset.Datum`` whose attributes are ``_impath`` (an absolute path on the
machine that wrote the file), ``_label``, ``_domain`` and ``_classname``. Runs that find such a file
train on exactly those images.

A pickle can run any code when loaded. These files are read by an unpickler that knows one class
name, Dassl's ``Datum``, maps it to an inert record, and refuses every other global, so nothing from
the file runs. Image paths are mapped onto ``data.root`` by their path under the dataset's folder.
"""
from __future__ import annotations

import io
import pickle
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from mugcp.data.dataset import DatasetError, DatasetSplits, Datum
from mugcp.errors import UserError

DASSL_DATUM = ("dassl.data.datasets.base_dataset", "Datum")


class FewShotFileError(DatasetError, UserError):
    """A released few-shot file that cannot be used; the message names the file and what is wrong."""


class ReleasedDatum:
    """What a pickled Dassl ``Datum`` becomes here: its four attributes, no behaviour."""

    __slots__ = ("impath", "label", "domain", "classname")

    def __setstate__(self, state) -> None:
        if isinstance(state, tuple) and len(state) == 2:  # (__dict__, slots) from classes with __slots__
            state = state[0] or {}
        if not isinstance(state, dict):
            raise pickle.UnpicklingError(f"a Datum's state must be a dict, found {type(state).__name__}")
        self.impath = state.get("_impath")
        self.label = state.get("_label")
        self.domain = state.get("_domain")
        self.classname = state.get("_classname")


class _DatumOnlyUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) == DASSL_DATUM:
            return ReleasedDatum
        raise pickle.UnpicklingError(f"it refers to {module}.{name}; only {'.'.join(DASSL_DATUM)} records are read")


@dataclass
class ReleasedFewShot:
    path: Path
    train: list[Datum]
    val: Optional[list[Datum]]  # None: the file has no val subset (ImageNet's)


def released_file_name(shots: int, seed: int) -> str:
    return f"shot_{shots}-seed_{seed}.pkl"


def find_fewshot_file(setting, dataset: DatasetSplits, shots: Optional[int], seed: int) -> Optional[Path]:
    """The file ``data.fewshot_file`` names: ``auto`` looks in the dataset folder's ``split_fewshot/``."""
    if shots is None or setting is None or str(setting).strip().lower() == "none":
        return None
    if str(setting).strip().lower() == "auto":
        if dataset.root is None:
            return None
        candidate = Path(dataset.root) / "split_fewshot" / released_file_name(shots, seed)
        return candidate if candidate.is_file() else None
    path = Path(str(setting)).expanduser()
    if not path.is_file():
        raise FewShotFileError(
            f"data.fewshot_file={str(setting)!r}: no such file. Point it at a released "
            f"split_fewshot/{released_file_name(shots, seed)}, or set it to auto or none."
        )
    return path


def read_fewshot_pickle(path: Path) -> dict:
    """The file's ``{"train": [...], "val": [...]}`` with every Datum as a ``ReleasedDatum``; nothing in it runs."""
    try:
        data = _DatumOnlyUnpickler(io.BytesIO(Path(path).read_bytes())).load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError) as err:
        raise FewShotFileError(f"{path}: refused as a few-shot file: {err}. Use a split_fewshot file the released code "
                               "wrote, or set data.fewshot_file=none.") from None
    if not isinstance(data, dict) or not isinstance(data.get("train"), list):
        raise FewShotFileError(f"{path}: expected a dict with a 'train' list of Datum records "
                               "(CoOp's split_fewshot format).")
    for part in ("train", "val"):
        for record in data.get(part) or []:
            if not (isinstance(record, ReleasedDatum) and isinstance(record.impath, str)
                    and isinstance(record.label, int)):
                raise FewShotFileError(f"{path}: '{part}' holds something other than Datum records "
                                       "with a path and a label.")
    return data


def _key_under_dataset(impath: str, known: Mapping[str, Datum], folder_name: str) -> tuple[Optional[str], str]:
    """(the split key the released path stands for, or None; the path to name when it is missing)."""
    parts = [p for p in impath.replace("\\", "/").split("/") if p]
    for start in range(len(parts)):
        key = "/".join(parts[start:])
        if key in known:
            return key, key
    if folder_name in parts:
        last = len(parts) - 1 - parts[::-1].index(folder_name)
        return None, "/".join(parts[last + 1:])
    return None, impath


def _map_records(records, split: list[Datum], dataset: DatasetSplits, part: str, path: Path) -> list[Datum]:
    known = {item.key: item for item in split}
    folder_name = Path(dataset.root).name if dataset.root is not None else ""
    mapped, missing, relabelled = [], [], []
    for record in records:
        key, shown = _key_under_dataset(record.impath, known, folder_name)
        if key is None or not _exists(dataset, key):
            missing.append(shown)
        elif known[key].label != record.label:
            relabelled.append(f"{key} (label {record.label} there, {known[key].label} here)")
        else:
            mapped.append(known[key])
    if missing:
        raise FewShotFileError(
            f"{path}: {len(missing)} of its {len(records)} {part} images are not in this dataset's {part} split under "
            f"{dataset.root}: {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}. Point data.root at the "
            "dataset the file was drawn from, or set data.fewshot_file=none to draw the subset here."
        )
    if relabelled:
        raise FewShotFileError(
            f"{path}: {len(relabelled)} {part} images have another label in this dataset: {', '.join(relabelled[:5])}. "
            "The file was drawn from another split file; set data.fewshot_file=none to draw the subset here."
        )
    return mapped


def _exists(dataset: DatasetSplits, key: str) -> bool:
    return dataset.file_of(key).is_file()


def load_released_fewshot(path: Path, dataset: DatasetSplits) -> ReleasedFewShot:
    """The released subset as items of ``dataset`` (our labels and class names), checked image by image."""
    data = read_fewshot_pickle(path)
    train = _map_records(data["train"], dataset.train, dataset, "train", path)
    val = _map_records(data["val"], dataset.val, dataset, "val", path) if data.get("val") is not None else None
    return ReleasedFewShot(Path(path), train, val)
