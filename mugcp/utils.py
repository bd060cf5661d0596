"""Small helpers shared by every stage: atomic writes, seeding, whether to draw progress bars."""
from __future__ import annotations

import json
import os
import random
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mugcp.errors import UserError


class OutputPathError(UserError):
    """An output path that cannot be written: a file where a folder must go, or a folder where a file must."""


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)`` then rename over ``path``: readers never see a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())

    atomic_write(path, write)


def atomic_write_json(path: str | os.PathLike, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def _file_in_the_way(path: Path) -> Path | None:
    """The first of ``path``'s parents that exists as something other than a folder, or None."""
    for parent in reversed(path.parents):
        if parent.exists() and not parent.is_dir():
            return parent
    return None


def check_output_folder(path: str | os.PathLike, flag: str) -> Path:
    """An output folder the command will create or fill: refused (one line) when it, or a folder on the
    way to it, is a file. Checked before anything is loaded, so the mistake costs nothing."""
    path = Path(path)
    blocker = path if path.exists() and not path.is_dir() else _file_in_the_way(path)
    if blocker is not None:
        raise OutputPathError(f"{flag} {path}: {blocker} is a file, not a folder. "
                              f"Choose another {flag} (a folder), or move that file away.")
    return path


def check_output_file(path: str | os.PathLike, flag: str) -> Path:
    """An output file: refused (one line) when it is a folder, or a folder on the way to it is a file."""
    path = Path(path)
    if path.is_dir():
        raise OutputPathError(f"{flag} {path} is a folder, not a file. "
                              f"Choose a file name, e.g. {path / 'predictions.csv'}.")
    blocker = _file_in_the_way(path)
    if blocker is not None:
        raise OutputPathError(f"{flag} {path}: {blocker} is a file, not a folder. "
                              f"Choose another {flag}, or move that file away.")
    return path


def seed_everything(seed: int) -> None:
    # Imported here: the atomic writers are used by modules a command's --help imports, which must not load torch.
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def harmonic_mean(base: float, new: float) -> float:
    """The harmonic mean of the base- and new-class accuracies (HM), 0 when both are 0."""
    return 0.0 if base + new == 0 else 2 * base * new / (base + new)


def progress_wanted(enabled: bool) -> bool:
    """Draw progress bars only where they redraw in place: a terminal or a notebook.

    Redirected to a file (a sweep's ``logs/``, ``nohup``, a job scheduler's output) every redraw
    would stay as a ``\r`` fragment; the log lines say how training goes there instead.
    """
    if not enabled:
        return False
    try:
        return os.isatty(sys.stderr.fileno())
    except (AttributeError, OSError, ValueError):  # no file descriptor: a notebook's or a test's stream
        return True
