"""Running a sweep's jobs on this machine: subprocesses, several at once, one GPU or a share of the CPU each.

A failed job does not stop the others; a job whose training failed blocks its evaluations; Ctrl-C
stops starting jobs, lets the running ones save and re-raises with the counts so far.
"""
from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

from mugcp.config import ConfigError
from mugcp.experiments.jobs import METRICS_FILE, Job

def subprocess_launcher(python: str = sys.executable) -> Callable:
    """Runs a job as ``python -m MODULE ...``, its console output in ``log_path``; returns the exit status."""

    def launch(job: Job, env: dict, log_path: Path) -> int:
        with open(log_path, "w", encoding="utf-8") as log:
            process = subprocess.Popen(job.command(python), stdout=log, stderr=subprocess.STDOUT, env=env)
            try:
                return process.wait()
            except KeyboardInterrupt:
                process.wait()  # the child got the same Ctrl-C and stops at its own pace (checkpoint kept)
                raise

    return launch


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
            raise ConfigError(f"--jobs {jobs}: this machine has {len(ids)} GPU(s) and each run takes one; use --jobs {len(ids)} or fewer.")
        return [{"CUDA_VISIBLE_DEVICES": ids[slot]} for slot in range(jobs)]
    threads = max(1, (os.cpu_count() or 1) // jobs)
    return [{"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)} for _ in range(jobs)]


def _interrupted_message(job: Job) -> str:
    """What a rerun will do with an interrupted job, from what is on disk (not what we hope is there)."""
    if job.module != "mugcp.train":
        return "a rerun evaluates it again"
    state = job.folder / "checkpoint" / "trainer_state.pt"
    if state.is_file():
        return f"its last epoch checkpoint is in {state.parent}; a rerun resumes from it"
    return "nothing to resume from yet; a rerun starts it again"


def _last_error(log_path: Path) -> str:
    try:
        lines = [line.strip() for line in log_path.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]
    except OSError:
        return ""
    errors = [line for line in lines if line.startswith("error:") or "Error" in line.split(":")[0]]
    return (errors or lines or [""])[-1][:300]


def run_jobs(jobs: Sequence[Job], root: Path, jobs_in_parallel: int = 1, launcher: Optional[Callable] = None,
             progress: bool = True, slots: Optional[list[dict]] = None) -> dict:
    """Run every pending job, at most ``jobs_in_parallel`` at once; a failed one does not stop the others.

    Returns counts per status. Ctrl-C stops starting new jobs, lets the running ones end (they keep
    their checkpoint), and re-raises KeyboardInterrupt.
    """
    from tqdm.auto import tqdm

    launcher = launcher or subprocess_launcher()
    slots = slots or device_slots(jobs_in_parallel)
    logs = root / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    total = len(jobs)
    for job in jobs:
        if job.mode == "done":
            job.status = "skipped"
    pending = [job for job in jobs if job.status == "pending"]
    bar = tqdm(total=total, initial=total - len(pending), unit="run", desc="sweep", disable=not progress, dynamic_ncols=True)
    lock = threading.Condition()
    free_slots = list(range(len(slots)))
    running: list[threading.Thread] = []
    interrupted = threading.Event()

    def say(text: str) -> None:
        with lock:
            tqdm.write(f"{time.strftime('%H:%M:%S')} {text}")

    def work(job: Job, slot: int) -> None:
        index = jobs.index(job) + 1
        action = {"resume": "resume", "overwrite": "restart"}.get(job.mode, "start")
        say(f"[{index}/{total}] {action} {job.name}")
        env = dict(os.environ, **slots[slot])
        log_path = logs / (job.name.replace("/", "__") + ".txt")
        started = time.time()
        try:
            code = launcher(job, env, log_path)
        except KeyboardInterrupt:
            code = 130
            interrupted.set()
        except Exception as err:  # an in-process launcher's crash is this job's failure, not the sweep's
            code = 1
            with open(log_path, "a", encoding="utf-8") as log:
                log.write(f"error: {type(err).__name__}: {err}\n")
        job.seconds = time.time() - started
        finished = (job.folder / METRICS_FILE).is_file()
        if code == 0 or (code in (130, -2) and finished):  # Ctrl-C while it was exiting: its results are complete
            job.status = "ok"
        elif code in (130, -2):
            job.status, job.message = "interrupted", _interrupted_message(job)
            interrupted.set()
        else:
            job.status, job.message = "failed", f"exit {code}: {_last_error(log_path)} (log: {log_path})"
        say(f"[{index}/{total}] {job.status} {job.name} in {_duration(job.seconds)}" + (f" — {job.message}" if job.message else ""))
        with lock:
            free_slots.append(slot)
            bar.update(1)
            lock.notify_all()

    try:
        queue = list(pending)
        while queue and not interrupted.is_set():
            with lock:
                while not free_slots:
                    lock.wait(0.2)
                ready = next((j for j in queue if j.depends_on is None or j.depends_on.status in ("ok", "skipped")), None)
                blocked = next((j for j in queue if j.depends_on is not None and j.depends_on.status in ("failed", "interrupted", "blocked")), None)
                if ready is None and blocked is None:
                    lock.wait(0.2)
                    continue
            if blocked is not None and ready is None:
                queue.remove(blocked)
                blocked.status, blocked.message = "blocked", f"{blocked.depends_on.name} did not finish"
                say(f"[{jobs.index(blocked) + 1}/{total}] blocked {blocked.name} — {blocked.message}")
                bar.update(1)
                continue
            queue.remove(ready)
            with lock:
                slot = free_slots.pop(0)
            if jobs_in_parallel == 1:
                work(ready, slot)  # in this thread: Ctrl-C reaches the job directly
            else:
                thread = threading.Thread(target=work, args=(ready, slot), daemon=True)
                running.append(thread)
                thread.start()
        for thread in running:
            thread.join()
    except KeyboardInterrupt:
        interrupted.set()
        for thread in running:
            thread.join()
    finally:
        bar.close()
    counts: dict[str, int] = {}
    for job in jobs:
        status = job.status if job.status != "pending" else "not started"
        counts[status] = counts.get(status, 0) + 1
    if interrupted.is_set():
        raise KeyboardInterrupt(counts)
    return counts


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s" if minutes else f"{seconds:.1f}s"


def describe_counts(counts: dict) -> str:
    order = ("ok", "skipped", "failed", "interrupted", "blocked", "not started")
    return ", ".join(f"{counts[s]} {s}" for s in order if counts.get(s))
