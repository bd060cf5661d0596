"""Owning a run folder: one process at a time trains or evaluates in it.

Two processes in one folder interleave their checkpoints, metrics and ``log.txt`` (a sweep rerun
while an orphaned trainer still runs, two sweeps on one root, a second ``--resume`` by hand), and
nothing shows it afterwards. ``RunLock`` is an OS lock (``flock``) on ``<folder>/.lock``: the kernel
releases it when its process exits, however it exits, so a crash never leaves a stale lock; the
holder writes its pid and host into the file so a refused process can name it. Any launcher (local
subprocesses, Slurm) can ask ``holder(folder)`` whether a run is live before starting it.

Only the standard library is used, so a sweep can check folders without importing torch. The lock
is advisory and needs a file system with working ``flock`` (local disks, NFSv4, Lustre with
``flock`` mounted); where ``fcntl`` does not exist (Windows) no lock is taken and ``holder`` is None.
"""
from __future__ import annotations

import os
import shutil
import socket
import time
from pathlib import Path
from typing import Optional

from mugcp.errors import UserError
from mugcp.runs.layout import LOCK_FILE

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

PROBE_GRACE_S = 1.0


class RunFolderBusy(UserError):
    """Another live process trains or evaluates in this run folder."""

    def __init__(self, folder: Path, holder: str):
        self.folder, self.holder = Path(folder), holder
        super().__init__(
            f"run folder {folder} is in use by {holder}: it is training or evaluating there. Wait for it to end "
            "(or stop it), or choose another --output; two processes never share a run folder.")


class RunLock:
    """The lock of one run folder, held from ``acquire()`` to ``release()`` (or the process's end)."""

    def __init__(self, folder: Path, name: str = LOCK_FILE):
        self.folder = Path(folder)
        self.path = self.folder / name
        self._fd: Optional[int] = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> RunLock:
        """Take the lock now or raise RunFolderBusy naming the holder; the folder must exist."""
        if fcntl is None or self._fd is not None:
            return self
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        # A short grace: perhaps only a sweep's probe (``holder``) holds it, which lets go at once.
        if not lock_within(fd, PROBE_GRACE_S, poll_s=0.05):
            os.close(fd)
            raise RunFolderBusy(self.folder, describe_holder(_read_holder(self.path)))
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()} {socket.gethostname()} {time.strftime('%Y-%m-%dT%H:%M:%S')}\n".encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)  # closing the only descriptor drops the flock

    def empty_folder(self) -> None:
        """Remove everything in the folder but the lock file itself, which stays held: no other process can
        move in between the emptying and what the holder writes next."""
        if fcntl is not None and not self.held:
            raise RuntimeError(f"{self.path}: empty_folder needs the lock held (acquire it first)")
        for entry in self.folder.iterdir():
            if entry.name == self.path.name:
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def empty_run_folder(folder: Path) -> None:
    """Empty a run folder (``--overwrite``) under its lock: a live process working there refuses it with
    ``RunFolderBusy`` (after ``RunLock``'s short grace for a probe), and the lock file itself stays."""
    with RunLock(folder) as lock:
        lock.empty_folder()


def _read_holder(path: Path) -> dict:
    try:
        fields = path.read_text(encoding="utf-8", errors="replace").split()
    except OSError:
        return {}
    holder = {}
    if fields and fields[0].isdigit():
        holder["pid"] = int(fields[0])
    if len(fields) > 1:
        holder["host"] = fields[1]
    if len(fields) > 2:
        holder["since"] = fields[2]
    return holder


def describe_holder(holder: dict) -> str:
    if "pid" not in holder:
        return "another process (it has not written its pid yet)"
    where = f" on {holder['host']}" if holder.get("host") and holder["host"] != socket.gethostname() else ""
    since = f" since {holder['since']}" if holder.get("since") else ""
    return f"process {holder['pid']}{where}{since}"


def holder(folder: Path, name: str = LOCK_FILE) -> Optional[dict]:
    """``{"pid", "host", "since"}`` of the live process holding ``folder``, or None when nobody does.

    Probes with a non-blocking lock that is dropped at once; a folder (or lock file) that does not exist is free.
    """
    path = Path(folder) / name
    if fcntl is None or not path.is_file():
        return None
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return _read_holder(path) or {"pid": None}
    finally:
        os.close(fd)
    return None


def lock_within(fd, seconds: float, poll_s: float) -> bool:
    """Take an exclusive ``flock`` on ``fd`` (a descriptor or file object), trying for ``seconds``; False if
    another holds it still."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(poll_s)
