"""How the local runner starts one job: a ``python -m`` subprocess with its own environment (a GPU each, or a
share of the CPU threads), and how a stop signal reaches it (sent again if the job did not hear it)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Optional

from mugcp.config import ConfigError
from mugcp.sweeps.jobs import Job

RESEND_S = 10.0  # a stopped job still running after this long did not hear its SIGINT: send it again


class SubprocessLauncher:
    """Runs a job as ``python -m MODULE ...``, its console output in ``log_path``; returns the exit status.

    The launcher interface: ``launcher(job, env, log_path) -> exit status`` (blocking; 0 = done,
    130 = interrupted), and optionally ``interrupt(signum)``: ask every job it is running to stop.
    Each job runs in its own process group, so a terminal's Ctrl-C or a ``kill -INT`` reaches the
    sweep alone and the sweep forwards it: a job does not get the terminal's SIGINT and then the
    sweep's while it is stopping, and none keeps running after the sweep as an orphan. (A job
    still running ``RESEND_S`` after its SIGINT did not hear it and gets it again; see ``_wait``.)
    """

    def __init__(self, python: str = sys.executable):
        self.python = python
        # re-entrant: interrupt() runs in a signal handler, perhaps while this thread holds it
        self._lock = threading.RLock()
        self._running: dict[int, subprocess.Popen] = {}
        self._stopping: Optional[int] = None
        self._sent: dict[int, float] = {}  # pid: when it was last signalled

    def __call__(self, job: Job, env: dict, log_path: Path) -> int:
        with open(log_path, "w", encoding="utf-8") as log:
            with self._lock:
                process = subprocess.Popen(job.command(self.python), stdout=log, stderr=subprocess.STDOUT,
                                           stdin=subprocess.DEVNULL, env=env, start_new_session=True)
                self._running[process.pid] = process
                if self._stopping is not None:  # the stop came while this one was starting
                    self._send(process, self._stopping)
            try:
                code = self._wait(process)
                # Stopped by us: whatever it was doing (even importing torch, where SIGINT surfaces as an
                # ImportError) it ended because it was asked to, and a rerun continues it.
                return 130 if code != 0 and self._stopping is not None else code
            finally:
                with self._lock:
                    self._running.pop(process.pid, None)
                    self._sent.pop(process.pid, None)

    def _wait(self, process: subprocess.Popen) -> int:
        """Wait for the job; once asked to stop, repeat SIGINT every ``RESEND_S`` while it still runs.

        A signal can be lost: one that lands between fork and exec is taken by the handler the child
        inherited from this process, and an import that catches everything may swallow one. A job
        that heard it exits within a second or two, long before a repeat.
        """
        while True:
            try:
                return process.wait(timeout=1.0)
            except subprocess.TimeoutExpired:
                with self._lock:
                    sent = self._sent.get(process.pid)
                    if self._stopping == signal.SIGINT and sent is not None and time.monotonic() - sent >= RESEND_S:
                        self._send(process, signal.SIGINT)

    def interrupt(self, signum: int = signal.SIGINT) -> None:
        with self._lock:
            self._stopping = signum
            for process in list(self._running.values()):
                self._send(process, signum)

    def _send(self, process: subprocess.Popen, signum: int) -> None:
        self._sent[process.pid] = time.monotonic()
        try:
            process.send_signal(signum)
        except ProcessLookupError:
            pass


def subprocess_launcher(python: str = sys.executable) -> SubprocessLauncher:
    return SubprocessLauncher(python)


def device_slots(jobs: int) -> list[dict]:
    """Environment changes per parallel slot: one GPU each with CUDA, else an even split of the CPU threads."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    try:
        import torch

        gpus = torch.cuda.device_count()
    except Exception:  # pragma: no cover - torch is a dependency
        gpus = 0
    if gpus:
        ids = [v.strip() for v in visible.split(",")] if visible else [str(i) for i in range(gpus)]
        ids = ids[:gpus]
        if jobs > len(ids):
            raise ConfigError(f"--jobs {jobs}: this machine has {len(ids)} GPU(s) and each run takes one; "
                              f"use --jobs {len(ids)} or fewer.")
        return [{"CUDA_VISIBLE_DEVICES": ids[slot]} for slot in range(jobs)]
    threads = max(1, (os.cpu_count() or 1) // jobs)
    return [{"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)} for _ in range(jobs)]
