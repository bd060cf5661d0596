"""What Slurm refused, said once in one line with the fix, and what a refused submission created, removed.

``SlurmError`` is every Slurm failure a user can fix (missing commands, a bad option, a refusal);
``unreachable_hint`` names the fix when no controller answers; ``undone_if_refused`` leaves the
folders of a refused submission as they were.
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

from mugcp.errors import UserError

# What sbatch / squeue say when no controller answers (SLURM_CONF unset or wrong, slurmctld down).
_UNREACHABLE = ("could not establish a configuration source", "unable to contact slurm controller",
                "unable to establish a connection", "connection refused", "socket timed out", "fetch_config")


class SlurmError(UserError):
    """Slurm or submitit is missing, an option is wrong, or a Slurm command refused: one line says which."""


def unreachable_hint(stderr: str) -> Optional[str]:
    """The fix to name when a Slurm command's ``stderr`` says no controller answered, else None."""
    if not any(words in stderr.lower() for words in _UNREACHABLE):
        return None
    conf = os.environ.get("SLURM_CONF")
    where = f"SLURM_CONF={conf}" if conf else "SLURM_CONF is unset"
    return f"no Slurm controller answered ({where})" + \
        "; check that SLURM_CONF names the cluster's slurm.conf and that `sinfo` lists its partitions."


@contextlib.contextmanager
def undone_if_refused(folders: Sequence[Path], log_folder: Path):
    """Create ``folders``; if the submission fails, remove what it created and nothing else: the folders that
    were not there (if still empty), and the pickles and submission script submitit left in ``log_folder``."""
    created = [folder for folder in dict.fromkeys(folders) if not folder.exists()]
    log_folder_existed = log_folder.exists()
    before = set(log_folder.iterdir()) if log_folder_existed else set()
    for folder in folders:
        folder.mkdir(parents=True, exist_ok=True)
    try:
        yield
    except SlurmError:  # refused: nothing was queued (an interrupt might come after sbatch queued it: left alone)
        for entry in (set(log_folder.iterdir()) - before) if log_folder.is_dir() else ():
            if entry.is_file() or entry.is_symlink():  # its own pickles, .submission_file_*.sh
                entry.unlink()
        for folder in ([] if log_folder_existed else [log_folder]) + created[::-1]:
            with contextlib.suppress(OSError):
                folder.rmdir()  # only if empty: never what was there before
        raise
