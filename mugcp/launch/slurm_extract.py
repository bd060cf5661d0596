"""``mugcp.extract --launcher slurm --shards N``: one array task per shard of the images, then the merge.

Each task runs the same extract command with ``--shard I --shards N`` (see
``mugcp.semantics.extraction_shards``). Without ``--wait`` a merge job follows the array
(``--dependency=afterany``): it indexes the cache and fails, naming the missing images by shard, when a
task did not finish its share. With ``--wait`` the submitting command follows the tasks and merges itself.
Rerunning the command submits only the shards that still miss images and leaves the shards whose
jobs are queued or running alone.

Under ``<cache>/.slurm/``: ``shard-<I>-of-<N>/`` (each task's ``slurm-<job>.out/.err`` and
``slurm_state.json``), ``merge/`` (the merge job's), and ``lock``, held while a submission reads the
states and submits, so two submissions at once never submit the same shard twice.
"""
from __future__ import annotations

import fcntl
import re
import sys
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Optional

from mugcp.launch.slurm import SlurmError, SlurmOptions, cancel_jobs, require_slurm, submit_commands
from mugcp.launch.slurm_launch import active_jobs, follow, job_report, record_submission
from mugcp.runs.layout import SUBMITIT_DIR
from mugcp.semantics.cache_writer import scan_shards
from mugcp.semantics.extraction_shards import (
    CacheIncomplete,
    Completeness,
    check_shard,
    merge_checked,
    shards_with_missing,
)
from mugcp.semantics.sources import ImageSource

SLURM_DIR = ".slurm"
_SHARD_FOLDER = re.compile(r"shard-(\d+)-of-(\d+)")


def shard_folder(out: Path, index: int, count: int) -> Path:
    return Path(out) / SLURM_DIR / f"shard-{index}-of-{count}"


@contextmanager
def _submission_lock(out: Path):
    lock_file = Path(out) / SLURM_DIR / "lock"
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_file, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@dataclass
class ExtractionJobs:
    out: Path
    shards: int
    submitted: dict[int, str] = field(default_factory=dict)         # shard -> job id, by this submission
    left_alone: dict[int, tuple[str, str]] = field(default_factory=dict)  # shard -> (job id, state) of an earlier one
    merge_job: Optional[str] = None
    completeness: Optional[Completeness] = None                     # when merged here (--wait, or nothing to do)

    @property
    def jobs(self) -> dict[str, Path]:
        """Every shard job still to follow: ``{job id: its folder}``."""
        ids = {**{index: job for index, (job, _) in self.left_alone.items()}, **self.submitted}
        return {job: shard_folder(self.out, index, self.shards) for index, job in sorted(ids.items())}

    def describe(self) -> str:
        lines = []
        if self.submitted:
            array = sorted({job.split("_")[0] for job in self.submitted.values()})
            tasks = [self.submitted[index] for index in sorted(self.submitted)]
            lines.append(f"submitted shard{'s' if len(tasks) > 1 else ''} "
                         f"{', '.join(map(str, sorted(self.submitted)))} of {self.shards} as job {', '.join(array)}"
                         + (f" ({', '.join(tasks)})" if len(tasks) > 1 else ""))
        for index, (job, state) in sorted(self.left_alone.items()):
            lines.append(f"left alone: shard {index} of {self.shards} (job {job}, {state}) from an earlier submission")
        if self.merge_job:
            lines.append(f"the merge runs as job {self.merge_job} once they have ended; it fails naming the missing "
                         f"images if a shard did not finish (rerun this command to redo only those)")
        if self.jobs:
            followed = [*self.jobs, *([self.merge_job] if self.merge_job else [])]
            arrays = sorted({job.split("_")[0] for job in followed}, key=int)
            lines.append(f"logs and states: {self.out / SLURM_DIR}/shard-<i>-of-{self.shards}/; "
                         f"follow with squeue -j {','.join(arrays)}")
        if not self.submitted and not self.left_alone:
            lines.append(f"nothing to extract: every image of the {self.shards} shard(s) is stored.")
        return "\n".join(lines)


def submit_extraction(source: ImageSource, args: Sequence[str], out: Path, shards: int, options: SlurmOptions,
                      merge_job: bool = True, python: str = sys.executable) -> ExtractionJobs:
    """Submit ``python -m mugcp.extract ARGS --shard I --shards N`` for every shard with missing images.

    ARGS: the extract command line without the launcher's options and without --shard/--shards.
    merge_job: a job that merges once the tasks have ended (else call ``finish_extraction``). With
    nothing left to submit or follow, the cache is merged and checked here and now.
    """
    check_shard(None, shards)
    require_slurm()
    out = Path(out)
    with _submission_lock(out):
        jobs = ExtractionJobs(out, shards)
        earlier = active_jobs(sorted((out / SLURM_DIR).glob("shard-*-of-*")))
        for folder, (job, state) in earlier.items():
            index, count = map(int, _SHARD_FOLDER.fullmatch(folder.name).groups())
            if count != shards:
                raise SlurmError(
                    f"shard {index} of an earlier --shards {count} submission is still {state} (job {job}); the shares "
                    f"of --shards {shards} would overlap it. Rerun with --shards {count}, or scancel "
                    f"{job.split('_')[0]}.")
            jobs.left_alone[index] = (job, state)
        stored = scan_shards(out) if out.is_dir() else {}
        to_submit = [index for index in shards_with_missing(source.keys, stored, shards)
                     if index not in jobs.left_alone]
        if to_submit:
            commands = [[python, "-m", "mugcp.extract", *args, "--shard", str(index), "--shards", str(shards)]
                        for index in to_submit]
            folders = [shard_folder(out, index, shards) for index in to_submit]
            # A requeued task simply runs again: it skips what its earlier run stored.
            ids = submit_commands(commands, folders, options, name=f"mugcp-extract-{out.name}",
                                  log_folder=out / SLURM_DIR / SUBMITIT_DIR, resume_args=())
            for index, folder, job in zip(to_submit, folders, ids):
                record_submission(folder, job)
                jobs.submitted[index] = job
        if jobs.jobs and merge_job:
            jobs.merge_job = _submit_merge(args, out, shards, options, list(jobs.jobs), python)
    if not jobs.jobs:
        _, jobs.completeness = merge_checked(out, source, shards)
    return jobs


def finish_extraction(jobs: ExtractionJobs, source: ImageSource,
                      on_change: Optional[Callable[[dict], None]] = None) -> Completeness:
    """Follow the shard jobs until they have ended, then merge here; ``CacheIncomplete`` names what is missing
    and how each unfinished job ended."""
    states = follow(jobs.jobs, on_change=on_change)
    submitit_logs = jobs.out / SLURM_DIR / SUBMITIT_DIR
    unfinished = [job_report(job, jobs.jobs[job], state, submitit_logs) for job, state in states.items()
                  if state != "done"]
    try:
        _, jobs.completeness = merge_checked(jobs.out, source, jobs.shards)
    except CacheIncomplete as err:  # no task got as far as writing the manifest
        raise CacheIncomplete("\n".join([str(err), *unfinished])) from None
    if not jobs.completeness.complete:
        raise CacheIncomplete("\n".join([jobs.completeness.describe(jobs.out), *unfinished]))
    return jobs.completeness


def _submit_merge(args: Sequence[str], out: Path, shards: int, options: SlurmOptions, after: list[str],
                  python: str) -> str:
    folder = out / SLURM_DIR / "merge"
    # an earlier merge would index a cache still being written
    cancel_jobs([job for job, _ in active_jobs([folder]).values()])
    arrays = sorted({job.split("_")[0] for job in after})
    # The merge reads shard headers and writes the index: one CPU, no GPU, whatever the shards asked for.
    merge_options = replace(options, gpus_per_run=0, cpus_per_run=1, array_parallelism=None)
    command = [python, "-m", "mugcp.extract", *args, "--merge", "--shards", str(shards)]
    [job] = submit_commands([command], [folder], merge_options, name=f"mugcp-extract-merge-{out.name}",
                            log_folder=out / SLURM_DIR / SUBMITIT_DIR, requeue=False, resume_args=(),
                            dependency="afterany:" + ":".join(arrays))
    record_submission(folder, job)
    return job
