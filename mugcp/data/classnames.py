"""Class names, checked once, the same way, wherever they come in.

Datasets (``build_dataset``), models (``create_model``, ``set_classnames``), ``load_run(classnames=...)``
and ``predict --classes`` / ``--classes-file`` all call ``validate_classnames``: a list (or tuple) of
non-empty, distinct strings, each stripped of surrounding whitespace and of a UTF-8 byte-order mark
(what a text file saved by some editors starts with). Two names are the same class when CLIP reads
them the same: its tokenizer ignores case, and the models read ``_`` as a space, so ``"Cat"``,
``"cat"`` and ``" cat "`` would give identical prompts and identical scores: a duplicate.

Duplicates are refused where a user types the list (``load_run``, ``predict``). A dataset's list is
fixed by its files, and the standard ones have duplicates (CLIP's ImageNet names, which open_clip and
the CoOp benchmark use, name ``missile`` and ``sunglasses`` twice each): there they are named in a
warning, and the model layer, which receives both kinds, checks the structure only.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Optional

from mugcp.config import ConfigError

log = logging.getLogger("mugcp")
BYTE_ORDER_MARK = "\ufeff"
DUPLICATE_POLICIES = ("error", "warn", "allow")
MAX_SHOWN = 5


class ClassNamesError(ConfigError):
    """A class list that is not a list of non-empty, distinct names; the message names the entry and the fix."""


def clip_reading(name: str) -> str:
    """How CLIP reads a class name: lower case, ``_`` as a space, runs of spaces as one."""
    return " ".join(name.replace("_", " ").split()).lower()


def _example(text: str) -> str:
    parts = [part.strip() for part in text.split(",") if part.strip()] if "," in text else text.split()
    return repr(parts[:3] if len(parts) > 1 else ["cat", "dog"])


def validate_classnames(
    names,
    where: str = "classnames",
    entries: Optional[Sequence[str]] = None,
    fix: str = "",
    duplicates: str = "error",
) -> list[str]:
    """``names`` as a clean list: each stripped of whitespace and a byte-order mark, all distinct.

    ``where`` names the source in messages (``classnames``, ``--classes-file F``, a dataset);
    ``entries[i]`` names entry i (default ``where[i]``), e.g. ``line 3``; ``fix`` ends a duplicate's
    message with the source's own remedy. Raises ``ClassNamesError`` (one line: what and where).
    ``duplicates``: ``error`` (lists a user gives), ``warn`` (a dataset's own list: logged, kept) or
    ``allow`` (the model layer, which takes both).
    """
    if duplicates not in DUPLICATE_POLICIES:
        raise ValueError(f"duplicates must be one of {', '.join(DUPLICATE_POLICIES)}, got {duplicates!r}")
    if isinstance(names, (str, bytes)):
        text = names.decode("utf-8", "replace") if isinstance(names, bytes) else names
        raise ClassNamesError(
            f"{where} is one string ({text!r}), not a list of class names; a string would be read letter by letter. "
            f"Pass a list, e.g. {_example(text)}."
        )
    if isinstance(names, Mapping) or not isinstance(names, Sequence):
        why = ("; a set has no order, and the order of the names is the order of the labels"
               if isinstance(names, (set, frozenset)) else "")
        raise ClassNamesError(f"{where} must be a list of class names (strings), got a {type(names).__name__}{why}.")
    entries = list(entries) if entries is not None else [f"{where}[{i}]" for i in range(len(names))]
    cleaned: list[str] = []
    for index, name in enumerate(names):
        if not isinstance(name, str):
            raise ClassNamesError(
                f"{entries[index]} is {name!r} ({type(name).__name__}), not a string; class names are text, "
                f"e.g. {str(name)!r}."
            )
        stripped = name.replace(BYTE_ORDER_MARK, "").strip()
        if not stripped:
            raise ClassNamesError(f"{entries[index]} is an empty class name ({name!r}); every class needs a name.")
        cleaned.append(stripped)
    if not cleaned:
        raise ClassNamesError(f"{where} is empty: give at least one class name.")
    if duplicates == "allow":
        return cleaned
    seen: dict[str, list[int]] = {}
    for index, name in enumerate(cleaned):
        seen.setdefault(clip_reading(name), []).append(index)
    repeated = [indices for indices in seen.values() if len(indices) > 1]
    if repeated:
        shown = "; ".join(
            " and ".join(f"{entries[i]} {cleaned[i]!r}" for i in indices) for indices in repeated[:MAX_SHOWN]
        ) + (f"; and {len(repeated) - MAX_SHOWN} more" if len(repeated) > MAX_SHOWN else "")
        message = (f"{where} names the same class more than once: {shown}. CLIP reads names without case, '_' or extra "
                   f"spaces, so these {'get' if duplicates == 'warn' else 'would get'} identical prompts and identical "
                   "scores.")
        if duplicates == "error":
            raise ClassNamesError(f"{message} {fix or 'Remove or rename the duplicates.'}")
        log.warning("%s %s", message, fix)
    return cleaned


def read_classnames_file(path: str | os.PathLike) -> list[str]:
    """One class name per line; blank lines and lines starting with '#' are skipped; a leading BOM is dropped."""
    path = Path(path)
    where = f"--classes-file {path}"
    if not path.is_file():
        what = "a folder" if path.is_dir() else "no such file"
        raise ClassNamesError(f"{where}: {what}. It must be a text file listing one class name per line.")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise ClassNamesError(f"{where}: not UTF-8 text ({err.reason} at byte {err.start}); "
                              "save it as UTF-8.") from None
    names, entries = [], []
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip() and not line.strip().startswith("#"):
            names.append(line)
            entries.append(f"{where} line {number}")
    if not names:
        raise ClassNamesError(f"{where} holds no class names (one per line; '#' starts a comment).")
    return validate_classnames(names, where, entries, fix="Keep each class on one line only.")
