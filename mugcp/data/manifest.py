"""CSV or JSON manifests listing ``path, label[, classname]``; paths are relative to the manifest.

``data.root`` is either one manifest file whose rows say their split (a ``split`` column/field, or a
JSON object ``{"train": [...], "val": [...], "test": [...]}`` as in CoOp's split files), or a folder
holding ``train.csv|json``, ``test.csv|json`` and optionally ``val.csv|json``. Without val rows, val
is carved from train.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path, PurePosixPath
from typing import Any

from mugcp.data.dataset import DatasetError, DatasetSplits, Datum, carve_val, prompt_classname

SPLITS = ("train", "val", "test")
LAYOUT = (
    "a CSV file with a header 'path,label,classname,split' (classname optional), a JSON list of "
    "{\"path\", \"label\", \"classname\", \"split\"} objects, a JSON object {\"train\"|\"val\"|\"test\": "
    "[[path, label, classname], ...]}, or a folder with train.csv|json, test.csv|json and optionally "
    "val.csv|json (then rows need no split); paths are relative to the manifest"
)

Row = tuple[str, int, str | None, str | None]  # path, label, classname, split


def _parse_label(value: Any, where: str) -> int:
    if isinstance(value, bool):
        raise DatasetError(f"{where}: label {value!r} is not an integer.")
    if isinstance(value, int):
        return value
    try:
        return int(str(value).strip())
    except ValueError:
        raise DatasetError(f"{where}: label {value!r} is not an integer.") from None


def _row_from_sequence(values: list, where: str) -> Row:
    if len(values) not in (2, 3) or not isinstance(values[0], str):
        raise DatasetError(f"{where}: expected [path, label] or [path, label, classname], got {values!r}.")
    classname = values[2] if len(values) == 3 and values[2] not in ("", None) else None
    return values[0], _parse_label(values[1], where), classname, None


def _row_from_mapping(entry: dict, where: str) -> Row:
    if "path" not in entry or "label" not in entry:
        raise DatasetError(f"{where}: each row needs 'path' and 'label' (got keys {sorted(entry)}).")
    classname = entry.get("classname") or None
    split = entry.get("split") or None
    return str(entry["path"]), _parse_label(entry["label"], where), classname, split


def _read_csv(path: Path) -> list[Row]:
    with open(path, newline="", encoding="utf-8-sig") as handle:  # utf-8-sig: a BOM (Excel) is not part of the header
        rows = [row for row in csv.reader(handle) if row and any(cell.strip() for cell in row)]
    if not rows:
        return []
    header = [cell.strip().lower() for cell in rows[0]]
    if "path" in header:
        if "label" not in header:
            raise DatasetError(f"{path}: the header needs a 'label' column (got {rows[0]}).")
        out = []
        for number, row in enumerate(rows[1:], start=2):
            entry = {name: (row[i].strip() if i < len(row) else "") for i, name in enumerate(header)}
            out.append(_row_from_mapping(entry, f"{path}:{number}"))
        return out
    return [_row_from_sequence([cell.strip() for cell in row], f"{path}:{n}") for n, row in enumerate(rows, 1)]


def _read_json_rows(entries: Any, where: str, split: str | None) -> list[Row]:
    if not isinstance(entries, list):
        raise DatasetError(f"{where}: expected a list of rows.")
    out = []
    for index, entry in enumerate(entries):
        at = f"{where}[{index}]"
        if isinstance(entry, dict):
            row = _row_from_mapping(entry, at)
        elif isinstance(entry, list):
            row = _row_from_sequence(entry, at)
        else:
            raise DatasetError(f"{at}: expected an object or a list, got {entry!r}.")
        out.append(row if split is None else (*row[:3], split))
    return out


def _read_json(path: Path) -> list[Row]:
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DatasetError(f"{path}: cannot read the manifest: {err}") from None
    if isinstance(data, dict):
        unknown = sorted(set(data) - set(SPLITS))
        if unknown:
            raise DatasetError(f"{path}: unknown split(s) {unknown}; use train, val and test.")
        return [row for split in SPLITS if split in data
                for row in _read_json_rows(data[split], f"{path}:{split}", split)]
    return _read_json_rows(data, str(path), None)


def read_manifest(path: Path) -> list[Row]:
    if path.suffix.lower() == ".csv":
        return _read_csv(path)
    if path.suffix.lower() == ".json":
        return _read_json(path)
    raise DatasetError(f"{path}: a manifest must end in .csv or .json. Expected: {LAYOUT}.")


def _find_split_manifest(folder: Path, split: str) -> Path | None:
    found = [folder / f"{split}{ext}" for ext in (".csv", ".json") if (folder / f"{split}{ext}").is_file()]
    if len(found) > 1:
        raise DatasetError(f"{folder}: both {found[0].name} and {found[1].name} exist; keep one.")
    return found[0] if found else None


def _collect_rows(root: Path) -> tuple[Path, dict[str, list[Row]], str]:
    """(folder the paths are relative to, rows per split, description of the source)."""
    if root.is_file():
        by_split: dict[str, list[Row]] = {split: [] for split in SPLITS}
        for number, row in enumerate(read_manifest(root), start=1):
            split = row[3]
            if split is None:
                raise DatasetError(
                    f"{root}: row {number} ({row[0]}) has no split. A single manifest needs a split "
                    f"(train, val or test) per row; or use a folder with train/test manifests. Expected: {LAYOUT}."
                )
            if split not in by_split:
                raise DatasetError(f"{root}: row {number} has split {split!r}; use train, val or test.")
            by_split[split].append(row)
        return root.parent, by_split, str(root)
    if root.is_dir():
        by_split = {}
        for split in SPLITS:
            path = _find_split_manifest(root, split)
            if path is None:
                if split != "val":
                    raise DatasetError(f"manifest: {root / (split + '.csv')} (or .json) not found. Expected: {LAYOUT}.")
                by_split[split] = []
                continue
            by_split[split] = read_manifest(path)
        return root, by_split, str(root)
    raise DatasetError(f"manifest: data.root {root} does not exist. Expected: {LAYOUT}.")


def _key(path: str) -> str:
    return PurePosixPath(path.replace("\\", "/")).as_posix()


def build_manifest(root: Path, val_fraction: float, val_seed: int) -> DatasetSplits:
    base, rows, source = _collect_rows(root)
    names: dict[int, str | None] = {}
    for split_rows in rows.values():
        for path, label, classname, _ in split_rows:
            if label < 0:
                raise DatasetError(f"{source}: {path} has negative label {label}.")
            known = names.get(label)
            if classname is not None and known is not None and prompt_classname(classname) != known:
                raise DatasetError(
                    f"{source}: label {label} is named both '{known}' and '{prompt_classname(classname)}'."
                )
            if classname is not None or label not in names:
                names[label] = prompt_classname(classname) if classname is not None else known
    if not rows["train"] or not rows["test"]:
        raise DatasetError(f"{source}: the manifest needs train and test rows. Expected: {LAYOUT}.")
    missing = sorted(set(range(max(names) + 1)) - set(names))
    if missing:
        raise DatasetError(f"{source}: labels must be 0..C-1; no rows for labels {missing[:10]}.")
    # A label with no class name anywhere still needs some text for the prompt.
    classnames = [names[label] or f"class {label}" for label in range(len(names))]
    splits = {
        split: [Datum(_key(path), label, classnames[label]) for path, label, _, _ in split_rows]
        for split, split_rows in rows.items()
    }
    train, val = splits["train"], splits["val"]
    if not val:
        train, val = carve_val(train, val_fraction, val_seed)
    return DatasetSplits("manifest", base, classnames, train, val, splits["test"])
