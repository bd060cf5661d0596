"""Running a sweep's jobs on this machine: subprocesses, several at once, one GPU or a share of the CPU each.

A failed job does not stop the others; a job whose training failed blocks its evaluations; Ctrl-C
(or SIGINT / SIGTERM to the sweep alone) stops starting jobs, forwards the signal to the running
ones, waits for them to save, and re-raises with the counts so far. A job another process owns is
left to it (``elsewhere``): each job is claimed under ``ROOT/.claims`` by the sweep running it, and
each run folder is locked by the process training in it (``mugcp.runs.run_lock``).
"""
from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Optional

from mugcp.runs.layout import (
    CHECKPOINT_DIR,
    FINAL_METRICS_FILE,
    SWEEP_CLAIMS_DIR,
    SWEEP_LOGS_DIR,
    TRAINER_STATE_FILE,
    sweep_claim_file,
    sweep_log_file,
)
from mugcp.runs.run_lock import RunFolderBusy, RunLock, describe_holder, holder
from mugcp.sweeps.jobs import Job, refresh_mode
from mugcp.sweeps.launcher import device_slots, subprocess_launcher
from mugcp.sweeps.run_configs import describe_changes, mark_superseded


def _interrupted_message(job: Job) -> str:
    """What a rerun will do with an interrupted job, from what is on disk (not what we hope is there)."""
    if job.module != "mugcp.train":
        return "a rerun evaluates it again"
    state = job.folder / CHECKPOINT_DIR / TRAINER_STATE_FILE
    if state.is_file():
        return f"its last epoch checkpoint is in {state.parent}; a rerun resumes from it"
    return "nothing to resume from yet; a rerun starts it again"


def _last_error(log_path: Path) -> str:
    try:
        lines = [line.strip() for line in log_path.read_text(encoding="utf-8", errors="replace").splitlines()
                 if line.strip()]
    except OSError:
        return ""
    errors = [line for line in lines if line.startswith("error:") or "Error" in line.split(":")[0]]
    return (errors or lines or [""])[-1][:300]


def run_jobs(jobs: Sequence[Job], root: Path, jobs_in_parallel: int = 1, launcher: Optional[Callable] = None,
             progress: bool = True, slots: Optional[list[dict]] = None,
             queued_elsewhere: Optional[Callable[[Job, Path], Optional[str]]] = None) -> dict:
    """Run every pending job, at most ``jobs_in_parallel`` at once; a failed one does not stop the others.

    Returns counts per status. A job another live process owns (another sweep's claim, or a process
    holding its run folder) is left to it: ``elsewhere``. A finished run whose config changed is not
    run: ``changed``. SIGINT or SIGTERM stops starting jobs, asks the running ones to stop (they
    keep their checkpoint), waits for them, and raises KeyboardInterrupt with the counts; a second
    signal kills them. ``queued_elsewhere(job, root)`` says who else will run a job (e.g. a Slurm job of
    the same sweep), or None; the command passes the launcher's, so this layer knows no launcher.
    """
    return SweepRunner(jobs, root, jobs_in_parallel, launcher, progress, slots, queued_elsewhere).run()


class SweepRunner:
    """One local run of a sweep's jobs (see ``run_jobs``): the free device slots, the worker threads and the
    stop, shared by the main thread that hands out jobs and the threads that run them (guarded by ``lock``)."""

    def __init__(self, jobs: Sequence[Job], root: Path, jobs_in_parallel: int = 1, launcher: Optional[Callable] = None,
                 progress: bool = True, slots: Optional[list[dict]] = None,
                 queued_elsewhere: Optional[Callable[[Job, Path], Optional[str]]] = None):
        self.jobs, self.root, self.parallel, self.progress = jobs, Path(root), jobs_in_parallel, progress
        self.launcher = launcher or subprocess_launcher()
        self.slots = slots or device_slots(jobs_in_parallel)
        self.queued_elsewhere = queued_elsewhere
        self.logs = self.root / SWEEP_LOGS_DIR
        self.total = len(jobs)
        self.lock = threading.Condition()
        self.free_slots = list(range(len(self.slots)))
        self.threads: list[threading.Thread] = []
        self.interrupted = threading.Event()
        self.signals_seen: list[int] = []
        self.bar, self.write = None, print

    def run(self) -> dict:
        """Counts per status; raises KeyboardInterrupt(counts) when a signal or an interrupted job stopped the sweep."""
        from tqdm.auto import tqdm

        self.logs.mkdir(parents=True, exist_ok=True)
        (self.root / SWEEP_CLAIMS_DIR).mkdir(exist_ok=True)
        pending = self._pending()
        self.write = tqdm.write  # a line above the progress bar
        self.bar = tqdm(total=self.total, initial=self.total - len(pending), unit="run", desc="sweep",
                        disable=not self.progress, dynamic_ncols=True)
        previous = _install(self._on_signal)
        try:
            self._hand_out(pending)
            for thread in self.threads:
                thread.join()
        except KeyboardInterrupt:
            self.interrupted.set()
            for thread in self.threads:
                thread.join()
        finally:
            _restore(previous)
            self.bar.close()
        counts: dict[str, int] = {}
        for job in self.jobs:
            status = job.status if job.status != "pending" else "not started"
            counts[status] = counts.get(status, 0) + 1
        if self.interrupted.is_set():
            raise KeyboardInterrupt(counts)
        return counts

    def _pending(self) -> list[Job]:
        """The jobs to run; finished ones are ``skipped``, finished ones with another config ``changed``."""
        for job in self.jobs:
            if job.mode == "done":
                job.status = "skipped"
            elif job.mode == "changed":
                job.status, job.message = "changed", f"finished with another config ({describe_changes(job.changes)})"
        return [job for job in self.jobs if job.status == "pending"]

    def _hand_out(self, queue: list[Job]) -> None:
        """Start each job once a slot is free and what it depends on has finished, until none is left or a stop."""
        queue = list(queue)
        while queue and not self.interrupted.is_set():
            ready, blocked = self._next(queue)
            if ready is None and blocked is None:
                continue
            if ready is None:
                queue.remove(blocked)
                self._block(blocked)
                continue
            queue.remove(ready)
            with self.lock:
                slot = self.free_slots.pop(0)
            if self.parallel == 1:
                self._work(ready, slot)  # in this thread: an in-process launcher's job gets Ctrl-C directly
            else:
                thread = threading.Thread(target=self._work, args=(ready, slot), daemon=True)
                self.threads.append(thread)
                thread.start()

    def _next(self, queue: list[Job]) -> tuple[Optional[Job], Optional[Job]]:
        """Once a slot is free: a job that can start, and one whose dependency did not finish (either may be None)."""
        with self.lock:
            while not self.free_slots:
                self.lock.wait(0.2)
            ready = next((j for j in queue if j.depends_on is None or j.depends_on.status in ("ok", "skipped")), None)
            blocked = next((j for j in queue if j.depends_on is not None and j.depends_on.status in UNFINISHED), None)
            if ready is None and blocked is None:
                self.lock.wait(0.2)
            return ready, blocked

    def _block(self, job: Job) -> None:
        if job.depends_on.status == "elsewhere":
            job.status, job.message = "elsewhere", f"left to the owner of {job.depends_on.name}"
        else:
            job.status, job.message = "blocked", f"{job.depends_on.name} did not finish"
        self._say(f"[{self.jobs.index(job) + 1}/{self.total}] {job.status} {job.name} — {job.message}")
        self._finish(None)

    def _say(self, text: str) -> None:
        with self.lock:
            self.write(f"{time.strftime('%H:%M:%S')} {text}")

    def _finish(self, slot: Optional[int]) -> None:
        with self.lock:
            if slot is not None:
                self.free_slots.append(slot)
            self.bar.update(1)
            self.lock.notify_all()

    def _work(self, job: Job, slot: int) -> None:
        """Claim the job, look at its folder again, and run it unless another process owns it or a stop came."""
        index = self.jobs.index(job) + 1
        claim = _claim(job, self.root)
        if claim is not None and not _startable(job, self.root, self.queued_elsewhere):
            claim = claim.release()
        if claim is None:
            self._say(f"[{index}/{self.total}] {job.status} {job.name} — {job.message}")
            return self._finish(slot)
        try:
            if self.interrupted.is_set():  # the stop came while this job waited for its slot
                return
            self._launch(job, slot, index)
        finally:
            claim.release()
        self._finish(slot)

    def _launch(self, job: Job, slot: int, index: int) -> None:
        action = {"resume": "resume", "overwrite": "restart"}.get(job.mode, "start")
        changed = f" in {job.folder.name} (config changed: {describe_changes(job.changes)})" if job.supersedes else ""
        self._say(f"[{index}/{self.total}] {action} {job.name}{changed}")
        env = dict(os.environ, **self.slots[slot])
        log_path = self.logs / sweep_log_file(job.name)
        started = time.time()
        code = self._call_launcher(job, env, log_path)
        job.seconds = time.time() - started
        _set_status(job, code, log_path)
        if job.status == "interrupted":
            self.interrupted.set()
        if job.status == "ok" and job.supersedes is not None:
            mark_superseded(job.supersedes, job.folder, job.changes)
        self._say(f"[{index}/{self.total}] {job.status} {job.name} in {_duration(job.seconds)}"
                  + (f" — {job.message}" if job.message else ""))

    def _call_launcher(self, job: Job, env: dict, log_path: Path) -> int:
        try:
            return self.launcher(job, env, log_path)
        except KeyboardInterrupt:
            self.interrupted.set()
            return 130
        except Exception as err:  # an in-process launcher's crash is this job's failure, not the sweep's
            with open(log_path, "a", encoding="utf-8") as log:
                log.write(f"error: {type(err).__name__}: {err}\n")
            return 1

    def _on_signal(self, signum, frame) -> None:
        self.signals_seen.append(signum)
        self.interrupted.set()
        stop = getattr(self.launcher, "interrupt", None)
        if stop is None:  # an in-process launcher: the job in this thread gets the KeyboardInterrupt itself
            raise KeyboardInterrupt
        name = signal.Signals(signum).name
        if len(self.signals_seen) == 1:
            _write_now(f"{name}: no new jobs; the running ones save their checkpoint and stop "
                       "(send it again to kill them).")
            stop(signal.SIGINT)
        else:
            _write_now(f"{name} again: killing the running jobs.")
            stop(signal.SIGKILL)


UNFINISHED = ("failed", "interrupted", "blocked", "changed", "elsewhere")


def _claim(job: Job, root: Path) -> Optional[RunLock]:
    """This sweep's hold on ``job`` (another sweep on the same root skips it), or None with the job marked
    ``elsewhere``."""
    claim = RunLock(root / SWEEP_CLAIMS_DIR, sweep_claim_file(job.name))
    try:
        return claim.acquire()
    except RunFolderBusy:
        owner = describe_holder(holder(root / SWEEP_CLAIMS_DIR, claim.path.name) or {})
        job.status, job.message = "elsewhere", f"another sweep runs it ({owner})"
        return None


def _startable(job: Job, root: Path, queued_elsewhere: Optional[Callable[[Job, Path], Optional[str]]]) -> bool:
    """With the claim held, look at the folder again: another process may own it or have finished it since the
    plan, or a Slurm job of the same sweep (``--launcher slurm``) may be about to."""
    owner = holder(job.folder)
    if owner is not None:
        job.status, job.message = "elsewhere", f"its folder is in use by {describe_holder(owner)}"
        return False
    queued = queued_elsewhere(job, root) if queued_elsewhere else None
    if queued is not None:
        job.status, job.message = "elsewhere", queued
        return False
    if refresh_mode(job) == "done":
        job.status, job.message = "skipped", "finished by another process since this sweep started"
        return False
    return True


def _set_status(job: Job, code: int, log_path: Path) -> None:
    finished = (job.folder / FINAL_METRICS_FILE).is_file()
    owner = holder(job.folder) if code != 0 else None
    if code == 0 or (code in (130, -2) and finished):  # interrupted while it was exiting: its results are complete
        job.status = "ok"
    elif owner is not None:  # it was refused: another process took the folder between our look and its start
        job.status, job.message = "elsewhere", f"its folder is in use by {describe_holder(owner)}"
    elif code in (130, -2):
        job.status, job.message = "interrupted", _interrupted_message(job)
    else:
        job.status, job.message = "failed", f"exit {code}: {_last_error(log_path)} (log: {log_path})"


def _write_now(text: str) -> None:
    """A line from a signal handler: unbuffered, so it cannot collide with a print the handler interrupted."""
    try:
        os.write(sys.stderr.fileno(), f"{time.strftime('%H:%M:%S')} {text}\n".encode())
    except (OSError, ValueError, AttributeError):
        pass


def _install(handler) -> Optional[dict]:
    if threading.current_thread() is not threading.main_thread():
        return None  # signal handlers belong to the main thread; a sweep run from a worker thread keeps the defaults
    return {signum: signal.signal(signum, handler) for signum in (signal.SIGINT, signal.SIGTERM)}


def _restore(previous: Optional[dict]) -> None:
    for signum, handler in (previous or {}).items():
        signal.signal(signum, handler)


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s" if minutes else f"{seconds:.1f}s"


def describe_counts(counts: dict) -> str:
    order = ("ok", "skipped", "elsewhere", "changed", "failed", "interrupted", "blocked", "not started")
    words = {"elsewhere": "running elsewhere"}
    return ", ".join(f"{counts[s]} {words.get(s, s)}" for s in order if counts.get(s))
