"""What runs inside a Slurm job: one command, its output and a state file in its run folder.

This module is shipped to the job by value (cloudpickle), so it uses the standard library only and
imports nothing from mugcp but the names of ``mugcp.runs.layout``, plain strings that travel with it
(tests/test_slurm_task.py unpickles a task where mugcp cannot be imported): the job then starts without
importing torch or open_clip, and it does not matter which checkout the compute node's ``python`` would import.

``<folder>/slurm_state.json`` is the run's own record, written atomically at each change:
``{"job_id", "state": running | done | failed | interrupted | requeued, "returncode", "restarts",
"command", "host", "updated"}``. ``mugcp.launch.slurm.job_states`` reads it beside ``squeue``, so job
states need no accounting daemon (``sacct``). The command's stdout and stderr go to
``<folder>/slurm-<job id>.out`` / ``.err`` (rank r > 0 of a distributed job: ``slurm-<job id>.rank<r>.out``).

A re-run of the same job (Slurm requeued it: time limit, pre-emption, node failure, ``scontrol
requeue``) appends ``resume_args`` to the command, so the run continues from its last checkpoint.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from mugcp.runs.layout import SLURM_LOG_STEM, SLURM_RANK_LOG_STEM, SLURM_STATE_FILE

STOP_GRACE_S = 30.0
# A command that dies of one of these was stopped from outside (scancel, requeue, pre-emption, the
# time limit), not by its own error: the run is "interrupted" and can resume.
STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGKILL, signal.SIGUSR1, signal.SIGUSR2,
                signal.SIGCONT}


class CommandFailed(RuntimeError):
    """The command exited non-zero; raised so that Slurm (and submitit's result pickle) record a failure."""


def current_job_id() -> str:
    """This job's id as squeue prints it: ``<array job>_<task>`` for array tasks."""
    array_job, array_task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    if array_job and array_task:
        return f"{array_job}_{array_task}"
    return os.environ.get("SLURM_JOB_ID", "local")


def read_state(folder: Path) -> dict:
    try:
        return json.loads((Path(folder) / SLURM_STATE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def write_state(folder: Path, **fields) -> None:
    """Atomic replace (temp file + rename): a reader on another node never sees half a file."""
    folder = Path(folder)
    record = {**read_state(folder), **fields, "host": socket.gethostname(), "updated": time.time()}
    fd, tmp = tempfile.mkstemp(prefix=f".{SLURM_STATE_FILE}.", dir=folder)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(record, handle, indent=2)
            handle.write("\n")
        os.chmod(tmp, 0o644)
        os.replace(tmp, folder / SLURM_STATE_FILE)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def checkpoint_signal() -> signal.Signals:
    """The signal submitit asks Slurm for before the time limit (``--signal``): USR2 unless
    SUBMITIT_PREEMPT_SIGNAL names another."""
    return getattr(signal, "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2"), signal.SIGUSR2)


def _ignore_checkpoint_signal() -> None:
    """In the command's process before exec: Slurm sends the checkpoint signal to every process of the
    step, and by default it kills. Ignored there (an ignored signal stays ignored across exec), the
    command is stopped by ``checkpoint`` with SIGTERM and a grace period instead, time to save."""
    signal.signal(checkpoint_signal(), signal.SIG_IGN)


class CommandTask:
    """Run ``command`` in ``folder``; submitit calls ``checkpoint`` on its pre-emption/time-limit signal.

    workdir: the command's working directory [``folder``].
    requeue: on that signal, stop the command, ask Slurm to requeue this task and re-run it with
        ``resume_args``; False: the task ends "interrupted" and is not requeued.
    resume_when: a file/folder name inside ``folder`` that must exist for ``resume_args`` to be added
        on a re-run (e.g. ``config.yaml``: a run stopped before it wrote anything starts afresh);
        None adds them on every re-run.
    """

    def __init__(self, command: list[str], folder: str | os.PathLike, resume_args: tuple[str, ...] = ("--resume",),
                 requeue: bool = True, resume_when: str | None = None, env: dict | None = None,
                 workdir: str | os.PathLike | None = None):
        self.command = [str(part) for part in command]
        self.folder = str(folder)
        self.workdir = str(workdir) if workdir is not None else self.folder
        self.resume_args = tuple(resume_args)
        self.requeue = requeue
        self.resume_when = resume_when
        self.env = dict(env or {})
        self._process: subprocess.Popen | None = None
        self._stop_requested = False

    def __getstate__(self) -> dict:
        return {name: value for name, value in self.__dict__.items() if name not in ("_process", "_stop_requested")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._process, self._stop_requested = None, False

    # -- what runs in the job -------------------------------------------------------------------
    def rank(self) -> int:
        return int(os.environ.get("SLURM_PROCID", "0"))

    @staticmethod
    def restarts() -> int:
        """How often Slurm requeued this job (every rank of a job sees the same count)."""
        return int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)

    def command_for(self) -> list[str]:
        command = list(self.command)
        resumable = self.resume_when is None or (Path(self.folder) / self.resume_when).exists()
        if self.resume_args and self.restarts() > 0 and resumable:
            command += [arg for arg in self.resume_args if arg not in command]
        return command

    def prepare_env(self) -> dict:
        env = dict(os.environ)
        env.update(self.env)
        return env

    def __call__(self) -> int:
        folder = Path(self.folder)
        folder.mkdir(parents=True, exist_ok=True)
        job_id, rank = current_job_id(), self.rank()
        env = self.prepare_env()
        command = self.command_for()
        if rank == 0:
            write_state(folder, job_id=job_id, state="running", returncode=None, restarts=self.restarts(),
                        command=command, started=time.time())
        stem = (SLURM_LOG_STEM if rank == 0 else SLURM_RANK_LOG_STEM).format(job_id=job_id, rank=rank)
        self._watch_for_stop()
        with open(folder / f"{stem}.out", "ab") as out, open(folder / f"{stem}.err", "ab") as err:
            self._process = subprocess.Popen(command, cwd=self.workdir, stdout=out, stderr=err,
                                             stdin=subprocess.DEVNULL, env=env, preexec_fn=_ignore_checkpoint_signal)
            # Polled, not Popen.wait(): a blocking wait holds Popen's lock while submitit's signal
            # handler (checkpoint) may need to stop the command.
            while (code := self._process.poll()) is None:
                time.sleep(0.2)
        # The command is over: a checkpoint signal now must not requeue a finished run.
        signal.pthread_sigmask(signal.SIG_BLOCK, {checkpoint_signal()})
        self._process = None
        # A command that handles SIGTERM to save may exit with a code of its own: what counts is that
        # the step was told to stop (scancel, requeue, pre-emption).
        stopped = self._stop_requested or (code < 0 and -code in STOP_SIGNALS) or (code - 128 in STOP_SIGNALS)
        if stopped and rank != 0:
            # The whole step got the signal; rank 0 decides about the requeue. Leaving now could end the
            # step (srun --kill-on-bad-exit) before rank 0 has asked for it; Slurm ends us in any case.
            time.sleep(STOP_GRACE_S)
        if rank == 0:
            state = "done" if code == 0 else "interrupted" if stopped else "failed"
            write_state(folder, state=state, returncode=code, ended=time.time())
        if code != 0:
            raise CommandFailed(f"{' '.join(command)} exited with {code} (log: {folder / stem}.err)")
        return code

    def _watch_for_stop(self) -> None:
        """Note a SIGTERM to this process (Slurm signals every process of the step), then pass it on to
        the handler submitit installed."""
        self._stop_requested = False
        previous = signal.getsignal(signal.SIGTERM)

        def note(signum, frame):
            self._stop_requested = True
            if callable(previous):
                previous(signum, frame)
            elif previous == signal.SIG_DFL:  # not under submitit: keep SIGTERM's usual effect
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                os.kill(os.getpid(), signal.SIGTERM)

        signal.signal(signal.SIGTERM, note)

    # -- submitit's hook: pre-emption or the time limit is near -----------------------------------
    def stop_command(self) -> None:
        """SIGTERM, then SIGKILL after the grace time. Works on the pid, not through Popen: this runs in
        a signal handler that may have interrupted ``Popen.poll`` with its wait lock held."""
        process = self._process
        if process is None:
            return
        deadline, signals = time.monotonic() + STOP_GRACE_S, [signal.SIGTERM, signal.SIGKILL]
        try:
            while True:
                if os.waitpid(process.pid, os.WNOHANG)[0]:
                    return
                if signals and (signals[0] == signal.SIGTERM or time.monotonic() > deadline):
                    os.kill(process.pid, signals.pop(0))  # each once: a saving command is not re-entered
                time.sleep(0.1)
        except (ChildProcessError, ProcessLookupError):  # already reaped / gone
            return

    def checkpoint(self, *args, **kwargs):
        """Called by submitit on rank 0 when the job gets its signal (``checkpoint_signal``).

        Returning a submission makes submitit requeue the task (``scontrol requeue``) with it; the
        re-run sees SLURM_RESTART_COUNT > 0 and adds ``resume_args``. None: not requeued.
        """
        self.stop_command()
        write_state(Path(self.folder), state="requeued" if self.requeue else "interrupted", ended=time.time())
        if not self.requeue:
            return None
        from submitit.core.utils import DelayedSubmission

        return DelayedSubmission(self)


class DistributedTask(CommandTask):
    """One task of a data-parallel job (one per GPU, or per CPU process with gloo): torchrun's
    environment (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT) set from
    Slurm's, which ``mugcp.training.distributed.Distributed.from_env`` reads like under torchrun."""

    def prepare_env(self) -> dict:
        env = super().prepare_env()
        env.update(torch_distributed_env())
        return env


def torch_distributed_env() -> dict:
    """The env:// rendezvous variables from Slurm's (as submitit's TorchDistributedEnvironment derives them).

    CUDA_VISIBLE_DEVICES is left as Slurm set it: ``Distributed.device`` picks ``local_rank`` modulo
    the visible devices, which is right both when each task sees all of the node's GPUs and when
    Slurm binds one GPU per task.
    """
    from submitit.helpers import TorchDistributedEnvironment

    dist_env = TorchDistributedEnvironment()
    return {
        "MASTER_ADDR": dist_env.master_addr,
        "MASTER_PORT": str(dist_env.master_port),
        "RANK": str(dist_env.rank),
        "WORLD_SIZE": str(dist_env.world_size),
        "LOCAL_RANK": str(dist_env.local_rank),
        "LOCAL_WORLD_SIZE": str(dist_env.local_world_size),
    }
