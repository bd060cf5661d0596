"""A sweep on a Slurm cluster: submit what is not finished, follow it, and say where each run stands.

``submit_sweep`` sends every training run that is neither finished nor already queued as one job
array (one task per run, through ``mugcp.launch.slurm``), and records ``{run: job id, folder}`` in
``ROOT/slurm_jobs.json``. Rerunning it skips finished runs, leaves pending and running ones alone,
resumes interrupted ones (their command gets ``--resume`` when the folder holds a checkpoint) and
resubmits failed ones. The whole "read the record → ask squeue → submit → write the record" step
holds an exclusive ``flock`` on ``ROOT/.slurm_submit.lock``, so two submissions of one sweep never
queue the same run twice; a run a local process trains (its run-folder lock, or a local sweep's claim
under ``ROOT/.claims``) is left to it.

Transfer protocols: each training's evaluations are submitted with it, as a small array that starts
once that training task has ended (``afterany``). If the training failed, they fail at once (no
checkpoint), and the rerun that resubmits the training submits them again. (Chosen over "submit them
when --wait or --status sees the training finish", which needs someone watching, and over
``afterok``, which leaves them pending for ever after a failed training on clusters that do not
cancel jobs whose dependency can no longer be met.)
"""
from __future__ import annotations

import fcntl
import shutil
import sys
import time
from collections.abc import Callable
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Optional

from mugcp.launch.slurm import (
    FINISHED,
    SlurmError,
    SlurmOptions,
    job_states,
    last_log_line,
    require_slurm,
    submit_commands,
)
from mugcp.runs.layout import (
    CONFIG_FILE,
    FINAL_METRICS_FILE,
    REPORT_DIR,
    RESULTS_TABLE_FILE,
    SUBMITIT_DIR,
    SWEEP_CLAIMS_DIR,
    SWEEP_SLURM_JOBS_FILE,
    SWEEP_SUBMIT_LOCK_FILE,
    sweep_claim_file,
)
from mugcp.runs.run_lock import describe_holder, empty_run_folder, holder, lock_within
from mugcp.sweeps.jobs import Job, refresh_mode
from mugcp.utils import atomic_write_json

LOCK_WAIT_S = 600.0
POLL_S = 5.0
QUEUED = ("pending", "running")


def sweep_options(sweep, args) -> SlurmOptions:
    """The sweep file's ``slurm:`` section, then the ``--slurm-*`` flags on top."""
    return SlurmOptions.from_mapping(sweep.slurm, where=f"{sweep.path}: slurm").updated_from_args(args)


def read_jobs(root: Path) -> dict:
    """``{run name: {"job_id", "folder", "submitted", "mode"}}`` from ``ROOT/slurm_jobs.json`` ({} if none)."""
    import json

    try:
        data = json.loads((Path(root) / SWEEP_SLURM_JOBS_FILE).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except ValueError as err:
        raise SlurmError(f"{Path(root) / SWEEP_SLURM_JOBS_FILE} is not valid JSON ({err}); it records the sweep's "
                         "Slurm jobs. "
                         "Remove it only once none of them is queued or running (squeue --me).") from None
    return dict(data.get("jobs", {}))


def _write_jobs(root: Path, recorded: dict) -> None:
    atomic_write_json(Path(root) / SWEEP_SLURM_JOBS_FILE, {"version": 1, "jobs": recorded})


@contextmanager
def submission_lock(root: Path, wait_s: float = LOCK_WAIT_S):
    """Held across read → squeue → submit → write, so concurrent submissions of one root take turns."""
    path = Path(root) / SWEEP_SUBMIT_LOCK_FILE
    with open(path, "a+") as handle:
        if not lock_within(handle, wait_s, poll_s=0.2):
            raise SlurmError(f"another submission of this sweep has held {path} for {wait_s:.0f} s; "
                             "wait for it to end, then rerun.")
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def recorded_states(jobs: list[Job], recorded: dict) -> dict[str, tuple[str, str]]:
    """``{run name: (job id, state)}`` for the runs the record knows in the folder they run in now."""
    known = {job.name: recorded[job.name]["job_id"] for job in jobs
             if job.name in recorded and recorded[job.name].get("folder") == str(job.folder)}
    if not known:
        return {}
    require_slurm()
    folders = {job.name: job.folder for job in jobs}
    states = job_states({job_id: folders[name] for name, job_id in known.items()})
    return {name: (job_id, states[job_id]) for name, job_id in known.items()}


def queued_on_slurm(job: Job, root: Path) -> Optional[str]:
    """For the local runner: the pending or running Slurm job this sweep's record says will run ``job``, or None.

    Without ``squeue`` here (a root shared with a machine outside the cluster) nothing can be known: None.
    """
    try:
        record = read_jobs(root).get(job.name) if (Path(root) / SWEEP_SLURM_JOBS_FILE).is_file() else None
    except SlurmError:
        return None
    if not record or record.get("folder") != str(job.folder) or shutil.which("squeue") is None:
        return None
    try:
        state = job_states({record["job_id"]: job.folder})[record["job_id"]]
    except SlurmError:  # squeue failed (controller down): the run-folder lock still keeps two trainings apart
        return None
    return f"queued on Slurm: {state} as job {record['job_id']}" if state in QUEUED else None


def _local_owner(job: Job, root: Path) -> Optional[str]:
    """Who runs ``job`` outside Slurm right now: a process holding its folder, or a local sweep's claim."""
    owner = holder(job.folder)
    if owner is not None:
        return f"its folder is in use by {describe_holder(owner)}"
    claims = root / SWEEP_CLAIMS_DIR
    claim = holder(claims, sweep_claim_file(job.name)) if claims.is_dir() else None
    if claim is not None:
        return f"a local sweep runs it ({describe_holder(claim)})"
    return None


def _start_afresh(job: Job) -> None:
    """An ``overwrite`` run is emptied here, not by ``train --overwrite`` in the job: that would also
    delete the job's own output and state files, which are open in the same folder by then."""
    empty_run_folder(job.folder)
    job.mode = "new"


def _decide(jobs: list[Job], root: Path, states: dict) -> tuple[list[Job], list[Job]]:
    """Mark each job queued / skipped / changed / elsewhere / blocked, and return (trainings, evaluations) to submit."""
    trainings, evaluations = [], []
    for job in jobs:
        job_id, state = states.get(job.name, (None, None))
        parent = job.depends_on
        if state in QUEUED:
            job.status, job.message = "queued", f"{state} as Slurm job {job_id}"
        elif job.module == "mugcp.train" and job.mode == "changed":
            job.status, job.message = "changed", "finished with another config"
        elif job.module == "mugcp.train" and refresh_mode(job) == "done":
            job.status = "skipped"
        elif parent is not None and parent.status in ("changed", "elsewhere", "blocked"):
            job.status, job.message = "blocked", f"{parent.name} is {parent.status}"
        elif parent is not None and parent.status == "skipped" and refresh_mode(job) == "done":
            job.status = "skipped"
        elif (owner := _local_owner(job, root)) is not None:
            job.status, job.message = "elsewhere", owner
        else:
            if job.module == "mugcp.train" and job.mode == "overwrite":
                _start_afresh(job)
            job.status = "submit"
            (trainings if job.module == "mugcp.train" else evaluations).append(job)
    return trainings, evaluations


@contextmanager
def _root_removed_if_refused(root: Path):
    """Create the sweep's root; if nothing could be submitted into it, remove it again (with its lock file)."""
    root.mkdir(parents=True, exist_ok=True)
    try:
        yield
    except SlurmError:
        if not read_jobs(root):
            (root / SWEEP_SUBMIT_LOCK_FILE).unlink(missing_ok=True)
            with suppress(OSError):
                root.rmdir()  # only if empty: a run another process started there stays
        raise


def submit_sweep(jobs: list[Job], root: Path, options: SlurmOptions, name: str = "mugcp-sweep",
                 say: Callable[[str], None] = print) -> dict:
    """Submit every job that is not finished, queued or run elsewhere; returns counts per status.

    Trainings go as one array; the evaluations of each training as an array after it (``afterany``).
    Each submitted job's status becomes ``submitted``, its message its Slurm job id.
    """
    require_slurm()
    root = Path(root)
    if not root.exists():  # a refused first submission leaves no empty root behind
        with _root_removed_if_refused(root):
            return submit_sweep(jobs, root, options, name, say)
    env = ({"OMP_NUM_THREADS": str(options.cpus_per_run), "MKL_NUM_THREADS": str(options.cpus_per_run)}
           if options.cpus_per_run else {})
    with submission_lock(root):
        recorded = read_jobs(root)
        states = recorded_states(jobs, recorded)
        trainings, evaluations = _decide(jobs, root, states)
        ids: dict[str, str] = {name_: job_id for name_, (job_id, state) in states.items() if state in QUEUED}

        def send(batch: list[Job], after: Optional[str], resume_args: tuple) -> None:
            new_ids = submit_commands([job.command(sys.executable) for job in batch], [job.folder for job in batch],
                                      options, name=name, log_folder=root / SUBMITIT_DIR, resume_args=resume_args,
                                      resume_when=CONFIG_FILE if resume_args else None, env=env,
                                      dependency=f"afterany:{after}" if after else None)
            for job, job_id in zip(batch, new_ids):
                job.status, job.message = "submitted", job_id
                ids[job.name] = job_id
                recorded[job.name] = {"job_id": job_id, "folder": str(job.folder), "mode": job.mode,
                                      "submitted": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
            _write_jobs(root, recorded)  # after each array: a later refusal must not forget what is queued

        if trainings:
            send(trainings, None, ("--resume",))
        groups: dict[Optional[str], list[Job]] = {}
        for job in evaluations:  # a finished training's evaluations need not wait
            groups.setdefault(ids.get(job.depends_on.name), []).append(job)
        for after, batch in groups.items():
            send(batch, after, ())
    for job in jobs:
        if job.status == "submitted":
            say(f"submitted {job.name} ({job.mode}) as Slurm job {job.message}")
        elif job.status in ("queued", "elsewhere", "changed", "blocked"):
            say(f"{job.status} {job.name} — {job.message}")
    return _counts(jobs)


def _counts(jobs: list[Job]) -> dict:
    counts: dict[str, int] = {}
    for job in jobs:
        counts[job.status] = counts.get(job.status, 0) + 1
    return counts


def describe_submission(counts: dict) -> str:
    order = ("submitted", "queued", "skipped", "elsewhere", "changed", "blocked")
    words = {"queued": "already queued or running (left alone)", "skipped": "finished",
             "elsewhere": "running outside Slurm"}
    return ", ".join(f"{counts[s]} {words.get(s, s)}" for s in order if counts.get(s))


# -- where the sweep stands ----------------------------------------------------------------------
def sweep_rows(jobs: list[Job], root: Path) -> list[dict]:
    """Per job: ``{"job", "job_id", "state", "line"}``; state is pending / running / done / failed /
    interrupted from Slurm and the run folder, ``done`` for a run finished by any launcher, ``changed``,
    or ``not submitted``."""
    recorded = read_jobs(root)
    finished = {job.name for job in jobs if job.mode != "changed" and (job.folder / FINAL_METRICS_FILE).is_file()
                and (job.depends_on is None or (job.depends_on.folder / FINAL_METRICS_FILE).is_file())}
    # A finished run's job has ended: only the others need squeue (and a reachable controller).
    states = recorded_states([job for job in jobs if job.name not in finished], recorded)
    rows = []
    for job in jobs:
        job_id, state = states.get(job.name, (_recorded_id(job, recorded), None))
        if state not in QUEUED and job.name in finished:
            state = "done"
        elif state is None:
            state = "changed" if job.mode == "changed" else "not submitted"
        line = last_log_line(job.folder, job_id) if job_id else ""
        rows.append({"job": job, "job_id": job_id, "state": state, "line": line})
    return rows


def _recorded_id(job: Job, recorded: dict) -> str:
    """The job id the record holds for ``job`` in the folder it runs in now ("" if none)."""
    entry = recorded.get(job.name, {})
    return entry.get("job_id", "") if entry.get("folder") == str(job.folder) else ""


def format_rows(rows: list[dict], width: int = 140) -> str:
    name_width = max([len("run")] + [len(row["job"].name) for row in rows])
    id_width = max([len("Slurm job")] + [len(row["job_id"]) for row in rows])
    lines = [f"{'run':{name_width}}  {'Slurm job':{id_width}}  {'state':13}  last log line"]
    for row in rows:
        text = row["line"] if len(row["line"]) <= width else row["line"][:width - 1] + "…"
        lines.append((f"{row['job'].name:{name_width}}  {row['job_id'] or '-':{id_width}}  {row['state']:13}  "
                      f"{text}").rstrip())
    return "\n".join(lines)


def summarise(rows: list[dict]) -> str:
    counts: dict[str, int] = {}
    for row in rows:
        counts[row["state"]] = counts.get(row["state"], 0) + 1
    order = ("done", "running", "pending", "failed", "interrupted", "cancelled", "not submitted", "changed")
    return ", ".join(f"{counts[s]} {s}" for s in order if counts.get(s))


def follow(jobs: list[Job], root: Path, progress: bool = True, poll_s: Optional[float] = None,
           say: Callable[[str], None] = print) -> list[dict]:
    """Wait until none of the sweep's recorded Slurm jobs is pending or running, with a progress bar
    and a line per change; returns ``sweep_rows``."""
    from tqdm.auto import tqdm

    from mugcp.launch.slurm import wait_for_jobs

    recorded = read_jobs(root)
    names = {recorded[job.name]["job_id"]: job.name for job in jobs
             if job.name in recorded and recorded[job.name].get("folder") == str(job.folder)}
    folders = {job.name: job.folder for job in jobs}
    followed = {job_id: folders[name] for job_id, name in names.items()}
    if followed:
        require_slurm()
    bar = tqdm(total=len(followed), unit="run", desc="slurm", disable=not progress, dynamic_ncols=True)
    seen: dict[str, str] = {}

    def on_change(states: dict) -> None:
        for job_id, state in states.items():
            if seen.get(job_id) != state:
                seen[job_id] = state
                tqdm.write(f"{time.strftime('%H:%M:%S')} {state} {names[job_id]} ({job_id})")
        bar.n = sum(state in FINISHED for state in states.values())
        counts = {s: sum(v == s for v in states.values())
                  for s in ("running", "pending", "failed", "interrupted", "cancelled")}
        bar.set_postfix_str(", ".join(f"{n} {s}" for s, n in counts.items() if n))
        bar.refresh()

    try:
        if followed:
            wait_for_jobs(followed, poll_s=POLL_S if poll_s is None else poll_s, on_change=on_change)
    finally:
        bar.close()
    return sweep_rows(jobs, root)


def report_when_done(rows: list[dict], root: Path, protocol: str, say: Callable[[str], None] = print) -> bool:
    """Write ``ROOT/report`` once nothing is pending or running and some run finished; True if written."""
    from mugcp.reports.report import write_report

    if any(row["state"] in QUEUED for row in rows) or not any(row["state"] == "done" for row in rows):
        return False
    try:
        write_report([root], root / REPORT_DIR, layout=protocol if protocol != "grid" else "groups")
    except FileNotFoundError as err:
        print(f"no report: {err}", file=sys.stderr)
        return False
    say(f"report: {root / REPORT_DIR / RESULTS_TABLE_FILE}")
    return True


def status_code(rows: list[dict]) -> int:
    """0 when every job is done (or still queued), 1 when some need a rerun (failed, interrupted, cancelled,
    not submitted, changed)."""
    return 0 if all(row["state"] in ("done", *QUEUED) for row in rows) else 1


def run_command(sweep, jobs: list[Job], root: Path, args) -> int:
    """``mugcp.sweep`` with ``--launcher slurm`` (submit; ``--wait``: follow) or ``--status``; the exit status."""
    root = Path(root)
    if args.status:
        rows = sweep_rows(jobs, root)
        print(format_rows(rows))
        print(f"status: {summarise(rows)}")
        report_when_done(rows, root, sweep.protocol)
        return status_code(rows)
    options = sweep_options(sweep, args)
    counts = submit_sweep(jobs, root, options, name=f"mugcp-{sweep.path.stem}")
    follow_hint = "" if args.wait or not (counts.get("submitted") or counts.get("queued")) else \
        f". Follow with: python -m mugcp.sweep {args.sweep} --root {root} --status"
    nothing = "" if counts.get("submitted") else "nothing submitted: "
    print(f"slurm: {nothing}{describe_submission(counts)}{follow_hint}")
    if counts.get("changed"):
        print(f"{counts['changed']} finished run(s) differ from what this sweep runs now and were not submitted. "
              "Pass --rerun-changed to rerun them into fresh folders (<name>_v2).", file=sys.stderr)
    if not args.wait:
        return 1 if counts.get("changed") else 0
    try:
        rows = follow(jobs, root, progress=not args.no_progress)
    except KeyboardInterrupt:
        print("stopped following; the Slurm jobs keep running (--status shows them, scancel stops them).",
              file=sys.stderr)
        return 130
    print(format_rows(rows))
    print(f"sweep done: {summarise(rows)}")
    report_when_done(rows, root, sweep.protocol)
    code = status_code(rows)
    if code:
        print("Some runs did not finish (see the table: each run's slurm-<job id>.err in its folder says why). "
              "Rerun the same command: failed runs are resubmitted and interrupted ones resume.", file=sys.stderr)
    return code
