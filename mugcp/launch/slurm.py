"""Commands on a Slurm cluster through submitit: arrays of runs, data-parallel jobs, and their states.

submitit is an optional extra (``pip install -e '.[slurm]'``), imported only when a job is submitted.
Each task runs its command as a subprocess (``slurm_task.CommandTask``) from the directory it was
submitted from, its output and state in its own run folder, so any ``python -m mugcp.<command> ...``
line can be sent as is. Job states come from ``squeue`` plus the
state file each task writes in its folder, never from ``sacct``: submitit's own states need the
accounting daemon, and without it they stay "UNKNOWN" and ``job.wait()`` never returns for a job
that was cancelled or killed (measured, see tests/test_slurm.py).

Requeue: submitit asks Slurm for ``--signal=USR2@90`` (90 s before the time limit) and on that signal
calls the task's ``checkpoint``; the task stops its command, submitit requeues it (``scontrol
requeue``) and the re-run appends ``resume_args`` (``--resume``). A requeue by Slurm itself
(pre-emption, node failure) takes the same path through ``SLURM_RESTART_COUNT``.
"""
from __future__ import annotations

import contextlib
import io
import os
import re
import shutil
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Optional

from mugcp.launch import slurm_task
from mugcp.launch.slurm_options import (  # noqa: F401  (re-exported: the options are imported from here too)
    SlurmOptions,
    add_slurm_arguments,
    parse_time_minutes,
)
from mugcp.launch.slurm_refusals import SlurmError, undone_if_refused, unreachable_hint
from mugcp.launch.slurm_task import CommandTask, DistributedTask, read_state
from mugcp.runs.layout import SLURM_LOG_STEM, SUBMITIT_DIR

INSTALL_HINT = "pip install -e '.[slurm]'"
# cancelled: scancel ended the job before its task started (it was pending); interrupted: it stopped mid-run.
STATES = ("pending", "running", "done", "failed", "interrupted", "cancelled")
FINISHED = ("done", "failed", "interrupted", "cancelled")

# squeue's job states (man squeue, JOB STATE CODES) in our five words.
_PENDING = {"PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "CONFIGURING", "RESV_DEL_HOLD", "SPECIAL_EXIT"}
_RUNNING = {"RUNNING", "COMPLETING", "SIGNALING", "STAGE_OUT", "RESIZING", "SUSPENDED", "STOPPED"}
_FAILED = {"FAILED", "OUT_OF_MEMORY"}
_INTERRUPTED = {"CANCELLED", "PREEMPTED", "TIMEOUT", "DEADLINE", "NODE_FAIL", "BOOT_FAIL", "REVOKED"}


def slurm_available() -> Optional[str]:
    """None when jobs can be submitted from here, else the reason in one line."""
    for tool in ("sbatch", "srun", "squeue", "scancel"):
        if shutil.which(tool) is None:
            return (f"{tool} not found: --launcher slurm runs where Slurm's commands are on PATH "
                    "(a cluster's login node)")
    try:
        import submitit  # noqa: F401
    except ImportError:
        return f"submitit is not installed: {INSTALL_HINT}"
    return None


def require_slurm() -> None:
    reason = slurm_available()
    if reason:
        raise SlurmError(f"--launcher slurm: {reason}")


# -- submission ----------------------------------------------------------------------------------
def pickle_tasks_by_value() -> None:
    """The task classes travel by value: the job needs submitit, not an importable mugcp (see slurm_task)."""
    import cloudpickle

    cloudpickle.register_pickle_by_value(slurm_task)


def _executor(log_folder: Path, options: SlurmOptions, name: str, max_requeues: int, **parameters):
    require_slurm()
    import submitit

    pickle_tasks_by_value()
    executor = submitit.SlurmExecutor(folder=Path(log_folder) / "%j", max_num_timeout=max_requeues)
    params = {"job_name": name, "time": options.time, "partition": options.partition, "account": options.account,
              "mem": options.mem, "setup": options.setup or None, **parameters}
    executor.update_parameters(**{key: value for key, value in params.items() if value is not None})
    return executor


def _submit(executor, tasks: list) -> list[str]:
    from submitit.core.utils import FailedJobError, FailedSubmissionError

    sbatch_said = io.StringIO()
    try:
        # submitit prints sbatch's stderr when it fails, then raises with the same text: it is said once, below.
        with contextlib.redirect_stderr(sbatch_said), executor.batch():
            jobs = [executor.submit(task) for task in tasks]
    except (FailedJobError, FailedSubmissionError) as err:  # sbatch refused (partition, account, size): its words
        message = " ".join(str(err).split()) or " ".join(sbatch_said.getvalue().split())
        hint = unreachable_hint(message)
        if hint:
            raise SlurmError(f"sbatch could not submit: {hint} sbatch said: {message[-300:]}") from None
        raise SlurmError(f"sbatch refused the job: {message[-400:]} (`sinfo -o '%P %c %m %G'` lists each partition's "
                         "CPUs, memory and GPUs)") from None
    return [job.job_id for job in jobs]


def submit_commands(commands: Sequence[Sequence[str]], folders: Sequence[os.PathLike], options: SlurmOptions,
                    name: str = "mugcp", log_folder: Optional[os.PathLike] = None,
                    resume_args: Sequence[str] = ("--resume",), requeue: bool = True, resume_when: Optional[str] = None,
                    max_requeues: int = 3, env: Optional[Mapping[str, str]] = None,
                    workdir: Optional[os.PathLike] = None, dependency: Optional[str] = None) -> list[str]:
    """One job array, one task per command, its output and state in its folder; returns the job ids in order.

    workdir: where the commands run [the current directory, as with sbatch and the local launcher, so
    relative paths in them mean the same]. log_folder: submitit's pickles and wrapper logs
    [``<first folder's parent>/.submitit``].
    requeue / resume_when / resume_args: see ``CommandTask``. max_requeues: time-limit requeues
    allowed per task (pre-emption requeues are not counted). dependency: sbatch's ``--dependency``,
    e.g. ``afterany:123`` (start once every task of job 123 has ended).
    """
    if len(commands) != len(folders):
        raise ValueError(f"{len(commands)} commands but {len(folders)} folders")
    if not commands:
        return []
    folders = [Path(folder).resolve() for folder in folders]
    log_folder = Path(log_folder) if log_folder else folders[0].parent / SUBMITIT_DIR
    gpus = {"gpus_per_node": options.gpus_per_run} if options.gpus_per_run else {}
    workdir = Path(workdir or Path.cwd()).resolve()
    tasks = [CommandTask(list(command), folder, tuple(resume_args), requeue, resume_when, dict(env or {}), workdir)
             for command, folder in zip(commands, folders)]
    with undone_if_refused(folders, log_folder):
        executor = _executor(log_folder, options, name, max_requeues, nodes=1, ntasks_per_node=1,
                             cpus_per_task=options.cpus_per_run, array_parallelism=options.array_parallelism,
                             additional_parameters=None if requeue else {"no-requeue": True}, dependency=dependency,
                             **gpus)
        return _submit(executor, tasks)


def submit_distributed(command: Sequence[str], folder: os.PathLike, options: SlurmOptions, name: str = "mugcp-train",
                       tasks_per_node: Optional[int] = None, log_folder: Optional[os.PathLike] = None,
                       resume_args: Sequence[str] = ("--resume",), requeue: bool = True,
                       resume_when: Optional[str] = None, max_requeues: int = 3,
                       env: Optional[Mapping[str, str]] = None, workdir: Optional[os.PathLike] = None) -> str:
    """One data-parallel run: ``options.nodes`` nodes × one task per GPU (``gpus_per_node``; on CPUs,
    ``tasks_per_node`` gloo processes), each with torchrun's environment; returns the job id.

    A task that fails ends the others (``srun --kill-on-bad-exit``) instead of leaving them waiting
    in a collective. Other arguments as for ``submit_commands``.
    """
    if tasks_per_node is None:
        tasks_per_node = options.tasks_per_node
    per_node = tasks_per_node if tasks_per_node is not None else options.gpus_per_node
    if per_node < 1:
        raise SlurmError("a distributed Slurm run needs --slurm-gpus-per-node >= 1, or --slurm-tasks-per-node for CPU "
                         "processes (gloo).")
    if options.gpus_per_node and tasks_per_node not in (None, options.gpus_per_node):
        raise SlurmError(f"tasks_per_node={tasks_per_node} with gpus_per_node={options.gpus_per_node}: "
                         "one task runs per GPU.")
    folder = Path(folder).resolve()
    log_folder = Path(log_folder) if log_folder else folder / SUBMITIT_DIR
    gpus = {"gpus_per_node": options.gpus_per_node} if options.gpus_per_node else {}
    workdir = Path(workdir or Path.cwd()).resolve()
    task = DistributedTask(list(command), folder, tuple(resume_args), requeue, resume_when, dict(env or {}), workdir)
    with undone_if_refused([folder], log_folder):
        executor = _executor(log_folder, options, name, max_requeues, nodes=options.nodes, ntasks_per_node=per_node,
                             cpus_per_task=options.cpus_per_run, srun_args=["--kill-on-bad-exit=1"],
                             additional_parameters=None if requeue else {"no-requeue": True}, **gpus)
        return _submit(executor, [task])[0]


# -- states --------------------------------------------------------------------------------------
def _squeue_states(job_ids: Sequence[str]) -> dict[str, str]:
    """Slurm's state of each job it still remembers (MinJobAge after the end, 300 s by default)."""
    base_ids = sorted({job_id.split("_")[0] for job_id in job_ids})
    states: dict[str, str] = {}
    for base in base_ids:  # one by one: squeue fails the whole call when any id is unknown
        result = subprocess.run(["squeue", "-h", "-r", "-t", "all", "-o", "%i|%T", "-j", base],
                                capture_output=True, text=True, timeout=60)
        if result.returncode != 0:
            if "Invalid job id" in result.stderr:
                continue
            said = " ".join(result.stderr.split())
            hint = unreachable_hint(said)
            raise SlurmError(f"squeue could not tell the jobs' states: {hint} squeue said: {said[-300:]}" if hint
                             else f"squeue failed ({result.returncode}): {said}")
        for line in result.stdout.splitlines():
            job_id, _, state = line.strip().partition("|")
            states[job_id] = state.split()[0] if state else ""
    return states


def _from_file(folder: Optional[Path], job_id: str) -> Optional[str]:
    record = read_state(folder) if folder else {}
    if record.get("job_id") != job_id:
        return None
    return {"requeued": "pending"}.get(record.get("state"), record.get("state"))


def job_states(jobs: Mapping[str, Optional[os.PathLike]]) -> dict[str, str]:
    """``{job id: pending | running | done | failed | interrupted}`` for ``{job id: its run folder}``.

    squeue tells pending/running and, while Slurm remembers a finished job, how it ended; the run
    folder's ``slurm_state.json`` tells it after that, and whether the command itself succeeded.
    A job cancelled before its task started (``scancel`` while pending) is "cancelled"; one that neither
    knows is "interrupted" (it ended without its task finishing): rerunning either is the way on.
    """
    slurm = _squeue_states(list(jobs))
    result = {}
    for job_id, folder in jobs.items():
        folder = Path(folder) if folder else None
        scheduler, own = slurm.get(job_id), _from_file(folder, job_id)
        if scheduler in _PENDING:
            state = "pending"
        elif scheduler in _RUNNING:
            state = own if scheduler == "COMPLETING" and own in FINISHED else "running"
        elif scheduler == "CANCELLED" and own in (None, "submitted"):  # its task never started: cancelled while pending
            state = "cancelled"
        elif scheduler in _INTERRUPTED:
            state = "interrupted"
        elif scheduler in _FAILED:
            state = "interrupted" if own == "interrupted" else "failed"
        elif scheduler == "COMPLETED":
            state = own if own in ("failed", "interrupted") else "done"
        else:  # forgotten by Slurm (or a state this table does not know): the task's own record
            state = own if own in FINISHED else "interrupted"
        result[job_id] = state
    return result


def wait_for_jobs(jobs: Mapping[str, Optional[os.PathLike]], timeout_s: Optional[float] = None, poll_s: float = 1.0,
                  on_change: Optional[Callable[[dict], None]] = None) -> dict[str, str]:
    """Poll ``job_states`` until every job has finished (or ``timeout_s``); returns the last states."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    last: dict[str, str] = {}
    while True:
        states = job_states(jobs)
        if states != last and on_change:
            on_change(states)
        last = states
        if all(state in FINISHED for state in states.values()):
            return states
        if deadline is not None and time.monotonic() > deadline:
            return states
        time.sleep(poll_s)


def cancel_jobs(job_ids: Sequence[str]) -> None:
    if job_ids:
        subprocess.run(["scancel", *job_ids], capture_output=True, text=True, timeout=60)


def last_log_line(folder: os.PathLike, job_id: str) -> str:
    """The line of the job's log that says what happened (stderr first: errors and progress go there):
    the first line of a command's ``error:`` message (a hint may follow it on later lines), else the
    exception line of a traceback, else the last non-empty line."""
    for suffix in (".err", ".out"):
        path = Path(folder) / (SLURM_LOG_STEM.format(job_id=job_id) + suffix)
        try:
            with open(path, "rb") as handle:
                handle.seek(max(0, path.stat().st_size - 8192))
                text = handle.read().decode("utf-8", "replace").replace("\r", "\n")
                lines = [line.strip() for line in text.splitlines()]
        except OSError:
            continue
        lines = [line for line in lines if line]
        if lines:
            return telling_line(lines)
    return ""


def telling_line(lines: Sequence[str]) -> str:
    errors = [line for line in lines if line.startswith("error:")]
    if errors:
        return errors[-1]
    exceptions = [line for line in lines if re.match(r"^[\w.]+(Error|Exception|Interrupt)\b.*:", line)]
    return (exceptions or lines)[-1]
