"""``--launcher slurm`` for a command's own work: one data-parallel ``mugcp.train`` run as a Slurm job,
and what ``mugcp.extract`` shares with it (the flags, the command line each task runs, a folder's job).

The command line a task runs is the one the user typed, minus the launcher's own options, so every
other option (and its default) means in the job what it means locally. Tasks run from the directory
the command was started in, so relative paths do too (see ``mugcp.launch.slurm``). Importing this module
loads neither torch nor the models (commands build their parsers with it).
"""
from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from mugcp.launch.slurm import (
    FINISHED,
    SlurmError,
    SlurmOptions,
    add_slurm_arguments,
    job_states,
    last_log_line,
    require_slurm,
    submit_distributed,
    wait_for_jobs,
)
from mugcp.launch.slurm_task import read_state, write_state
from mugcp.runs.layout import CONFIG_FILE, SLURM_LOG_STEM
from mugcp.runs.run_lock import empty_run_folder

LAUNCHER_DESTS = ("launcher", "wait")
ACTIVE = ("pending", "running")


def add_launcher_arguments(parser: argparse.ArgumentParser, slurm_flags: Sequence[str], wait_help: str) -> None:
    """``--launcher local|slurm``, ``--wait`` and the ``--slurm-*`` flags the command uses."""
    group = parser.add_argument_group("where it runs")
    group.add_argument("--launcher", choices=("local", "slurm"), default="local",
                       help="local: this machine [default]; slurm: submit to Slurm through submitit and return")
    group.add_argument("--wait", action="store_true", help=wait_help)
    add_slurm_arguments(parser, only=slurm_flags)


def _action_for(parser: argparse.ArgumentParser, option: str) -> Optional[argparse.Action]:
    """The action argparse would pick for ``option``, allowing its unique-prefix abbreviations."""
    actions = parser._option_string_actions  # argparse's own table of option strings (stable since 3.2)
    if option in actions:
        return actions[option]
    if parser.allow_abbrev:
        matches = {actions[name] for name in actions if name.startswith(option)}
        if len(matches) == 1:
            return matches.pop()
    return None


def task_arguments(argv: Sequence[str], parser: argparse.ArgumentParser, drop: Sequence[str] = ()) -> list[str]:
    """``argv`` without the launcher's options (``--launcher``, ``--wait``, ``--slurm-*``) and the options
    whose destinations are in ``drop``: the command line each Slurm task runs."""
    dests = set(LAUNCHER_DESTS) | set(drop) | {action.dest for action in parser._actions
                                               if action.dest.startswith("slurm_")}
    kept, position = [], 0
    while position < len(argv):
        token = argv[position]
        if token == "--":
            kept.extend(argv[position:])
            break
        action = _action_for(parser, token.partition("=")[0]) if token.startswith("--") else None
        if action is None:
            kept.append(token)
            position += 1
            continue
        if action.nargs not in (None, 0):
            raise ValueError(f"{token}: options taking {action.nargs!r} values are not passed on to Slurm tasks")
        span = 1 if "=" in token or action.nargs == 0 else 2
        if action.dest not in dests:
            kept.extend(argv[position:position + span])
        position += span
    return kept


# -- a folder's job ------------------------------------------------------------------------------
def record_submission(folder: Path, job_id: str) -> None:
    """Note the job in the folder's ``slurm_state.json`` now, so a rerun knows it while it is still pending
    (the task itself writes there once it starts)."""
    Path(folder).mkdir(parents=True, exist_ok=True)
    write_state(Path(folder), job_id=job_id, state="submitted", returncode=None, submitted=time.time())


def active_jobs(folders: Sequence[Path]) -> dict[Path, tuple[str, str]]:
    """``{folder: (job id, pending | running)}`` for the folders whose last job is still queued or running."""
    recorded = {}
    for folder in folders:
        record = read_state(folder)
        if record.get("job_id") and record.get("job_id") != "local" and record.get("state") not in FINISHED:
            recorded[folder] = record["job_id"]
    if not recorded:
        return {}
    states = job_states({job_id: folder for folder, job_id in recorded.items()})
    return {folder: (job_id, states[job_id]) for folder, job_id in recorded.items() if states[job_id] in ACTIVE}


def job_log(folder: Path, job_id: str) -> Path:
    """Where a job's command writes its stderr (rank 0): errors and progress."""
    return Path(folder) / (SLURM_LOG_STEM.format(job_id=job_id) + ".err")


def job_report(job_id: str, folder: Path, state: str, log_folder: Optional[Path] = None) -> str:
    """One line: how a job ended, the last line it wrote and where its log is (submitit's own log in
    ``log_folder`` when the job ended before its command started, e.g. a failing ``--slurm-setup`` line)."""
    line, log = last_log_line(folder, job_id), job_log(folder, job_id)
    if not log.exists() and log_folder is not None:
        log = Path(log_folder) / job_id / f"{job_id}_0_log.err"
    return f"job {job_id} {state}" + (f": {line}" if line else "") + f" (log: {log})"


# -- one data-parallel training run ----------------------------------------------------------------
@dataclass
class TrainingJob:
    job_id: str
    folder: Path
    world_size: int
    earlier: Optional[str] = None  # the state of an earlier submission's job that is followed instead

    def describe(self) -> str:
        if self.earlier:
            return (f"job {self.job_id} ({self.earlier}) already trains {self.folder}; no other job was submitted. "
                    f"Log: {job_log(self.folder, self.job_id)}")
        return (f"submitted job {self.job_id}: {self.world_size} process{'es' if self.world_size > 1 else ''} "
                f"into {self.folder} (log: {job_log(self.folder, self.job_id)}; follow with squeue -j {self.job_id})")


def submit_training(cfg: dict, args: Sequence[str], output: Path, options: SlurmOptions, resume: bool = False,
                    overwrite: bool = False, python: str = sys.executable) -> TrainingJob:
    """Submit ``python -m mugcp.train ARGS --output OUTPUT`` (ARGS without --output and --overwrite) as one
    data-parallel job: ``options.nodes`` ×
    (``gpus_per_node``, or ``tasks_per_node`` CPU processes), each with torchrun's environment.

    Everything a task would refuse is checked here first (the folder, the global batch over the
    processes). A requeued job continues with ``--resume`` once the run has written its config.
    When the folder's previous job is still queued or running, that job is returned, not a new one.
    """
    from mugcp.runs.run_setup import check_output_free, check_resume_folder
    from mugcp.training.distributed import Distributed

    require_slurm()
    output = Path(output)
    per_node = options.tasks_per_node or options.gpus_per_node
    world_size = options.nodes * per_node
    if world_size < 1:
        raise SlurmError("a data-parallel Slurm run needs --slurm-gpus-per-node >= 1, "
                         "or --slurm-tasks-per-node for CPU processes (gloo).")
    earlier = active_jobs([output]).get(output)
    if earlier:
        return TrainingJob(earlier[0], output, world_size, earlier=earlier[1])
    Distributed(world_size=world_size).check_batch_size(cfg["data"]["batch_size"])
    if resume:
        check_resume_folder(output)
    check_output_free(output, resume, overwrite)
    if overwrite and output.exists():
        empty_run_folder(output)  # here, not in the job: the job's own log and state live in this folder
    command = [python, "-m", "mugcp.train", *args, "--output", str(output)]
    job_id = submit_distributed(command, output, options, name=f"mugcp-train-{output.name}", resume_when=CONFIG_FILE)
    record_submission(output, job_id)
    return TrainingJob(job_id, output, world_size)


def follow(jobs: dict[str, Path], on_change: Optional[Callable[[dict], None]] = None,
           poll_s: float = 2.0) -> dict[str, str]:
    """Wait until every job has ended; ``on_change`` sees each new set of states."""
    return wait_for_jobs(jobs, poll_s=poll_s, on_change=on_change)
