"""``python -m mugcp.sweep SWEEP.yaml [--root DIR] [--dry-run] [--jobs N]``: a paper's protocol in one command.

A sweep file names a protocol and the grid to run; every run is ``python -m mugcp.train`` (and, for
the transfer protocols, ``python -m mugcp.evaluate`` on each target) in its own folder under one root::

    protocol: base2new            # base2new | fewshot | cross_dataset | domain_generalization | grid
    datasets: [caltech101, dtd]   # cross_dataset / domain_generalization: source + targets instead
    seeds: [1, 2, 3]
    methods: [coop, maple, mugcp] # each starts from configs/methods/<name>.yaml (or from `config:`)
    shots: [16]
    overrides:                    # key: value for every run; $VARS are expanded, {dataset} {method}
      data.root: $DATA            #   {seed} {shots} are filled in per run
    method_overrides:             # per method, e.g. its semantic cache
      mugcp: {semantic.cache: caches/{dataset}}
    eval_overrides: {}            # transfer protocols: for every `mugcp.evaluate` on a target ({dataset} = target)
    method_eval_overrides:        #   and per method
      mugcp: {semantic.cache: caches/{dataset}}

Each run starts from its method's released recipe for the protocol, dataset and K
(``configs/recipes/``; not for ``grid``; ``recipes: false`` turns them off), under the sweep's
overrides. Every run's config is resolved and checked before anything runs (``--dry-run --json``
prints them). Finished runs (``metrics.json`` present) are skipped; interrupted ones continue with
``--resume``, so rerunning the command after a crash or Ctrl-C picks up where it stopped. A finished
run whose config differs from the sweep's now is reported key by key and left alone
(``--rerun-changed``: rerun it into ``<name>_v2``). A run another process owns is left to it. At the end the runs are
summarised by ``mugcp.report`` in the protocol's layout (``ROOT/report/``). Published protocols:
``configs/sweeps/{base2new,cross_dataset,domain_generalization,fewshot}.yaml``.

On a Slurm cluster, ``--launcher slurm`` submits the unfinished runs as one job array and returns
(``--wait`` follows them); the same command again skips finished and queued runs, resumes interrupted
ones and resubmits failed ones. ``--status`` prints each run's job id, state and last log line.
Options: the ``--slurm-*`` flags, or a ``slurm:`` section in the sweep file (partition, time,
gpus_per_run, cpus_per_run, mem, account, array_parallelism, setup).
"""
from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Optional

from mugcp.cli import run_cli
from mugcp.launch.slurm import add_slurm_arguments


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m mugcp.sweep", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep", help="sweep YAML file, or a published protocol: base2new, cross_dataset, "
                                      "domain_generalization, fewshot")
    parser.add_argument("--root", help="folder of the sweep's runs (default: runs/sweeps/<sweep file name>)")
    parser.add_argument("--dry-run", action="store_true",
                        help="list the runs and their commands, run nothing (every config is still checked)")
    parser.add_argument("--json", action="store_true",
                        help="with --dry-run: one JSON object per training run, with its resolved config")
    parser.add_argument("--rerun-changed", action="store_true",
                        help="rerun finished runs whose config differs from the sweep's now into fresh folders "
                             "(<name>_v2)")
    parser.add_argument("--jobs", type=int, default=1,
                        help="runs at once: one GPU each with CUDA, else the CPU threads split [1]")
    parser.add_argument("--no-progress", action="store_true", help="no overall progress bar")
    parser.add_argument("--launcher", choices=("local", "slurm"), default="local",
                        help="local: run here [default]; slurm: submit the unfinished runs as one job array and return")
    parser.add_argument("--wait", action="store_true",
                        help="with --launcher slurm: follow the jobs until they end, then report")
    parser.add_argument("--status", action="store_true",
                        help="each run's Slurm job id, state and last log line; the report once all are done")
    add_slurm_arguments(parser, only=["partition", "time", "gpus_per_run", "cpus_per_run", "mem", "account",
                                      "array_parallelism", "setup"])
    return parser


def _check_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Combinations of flags that mean nothing, refused before the sweep file is read."""
    if args.json and not args.dry_run:
        parser.error("--json describes the planned runs: pass it with --dry-run")
    if args.wait and args.launcher != "slurm":
        parser.error("--wait follows Slurm jobs: pass it with --launcher slurm (a local sweep always runs to the end)")
    if args.launcher == "slurm" and args.jobs != 1:
        parser.error("--jobs is for the local launcher; on Slurm, --slurm-array-parallelism caps the runs at once")
    if args.launcher == "slurm" and not args.dry_run:
        from mugcp.launch.slurm import require_slurm

        require_slurm()  # before planning: one line, exit 2
    if args.jobs < 1:
        from mugcp.config import ConfigError

        raise ConfigError(f"--jobs must be at least 1, got {args.jobs}.")


def _announce(sweep, jobs: list, root: Path, console) -> None:
    """What the sweep runs, which recipes it follows, and the finished runs whose config changed since."""
    from mugcp.sweeps.jobs import recipe_notes
    from mugcp.sweeps.run_configs import describe_changes

    runs = sum(job.module == "mugcp.train" for job in jobs)
    print(f"sweep {sweep.path} ({sweep.protocol}): {runs} training runs"
          + (f" + {len(jobs) - runs} evaluations" if len(jobs) > runs else "") + f" under {root}"
          + ("" if sweep.recipes and sweep.protocol != "grid"
             else " (no released recipes: the method configs as they are)"), file=console)
    for note in recipe_notes(jobs, sweep.protocol):
        print(f"recipe: {note}", file=console)
    changed = [job for job in jobs if job.mode == "changed"]
    for job in changed:
        print(f"changed: {job.name} finished with another config: {describe_changes(job.changes)}", file=sys.stderr)
    if changed:
        print(f"{len(changed)} finished run(s) differ from what this sweep runs now; they are neither reused nor "
              "overwritten. Pass --rerun-changed to rerun them into fresh folders (<name>_v2), or restore the "
              "settings they ran with.", file=sys.stderr)


def _dry_run(jobs: list, as_json: bool) -> int:
    from mugcp.sweeps.jobs import describe_job
    from mugcp.sweeps.run_configs import to_json

    if as_json:
        for job in jobs:
            if job.module == "mugcp.train":
                print(to_json(dict(describe_job(job), evaluations=[
                    {"dataset": ev.fields["dataset"], "folder": str(ev.folder), "mode": ev.mode,
                     "command": ev.command()}
                    for ev in jobs if ev.depends_on is job])))
        return 0
    for index, job in enumerate(jobs, 1):
        print(f"[{index}/{len(jobs)}] {job.mode:9s} {job.name}\n    {shlex.join(job.command())}")
    return 0


def _run_here(sweep, jobs: list, root: Path, args: argparse.Namespace, launcher: Optional[Callable]) -> int:
    """The local launcher: run the jobs, report once some finished, say what is left; the exit status."""
    from mugcp.launch.slurm_sweep import queued_on_slurm
    from mugcp.reports import write_report
    from mugcp.runs.layout import FINAL_METRICS_FILE, REPORT_DIR, SWEEP_LOGS_DIR
    from mugcp.sweeps import describe_counts, run_jobs

    try:
        counts = run_jobs(jobs, root, args.jobs, launcher=launcher, progress=not args.no_progress,
                          queued_elsewhere=queued_on_slurm)
    except KeyboardInterrupt as stop:
        counts = stop.args[0] if stop.args and isinstance(stop.args[0], dict) else {}
        print(f"interrupted ({describe_counts(counts)}); rerun the same command to continue: finished runs are "
              "skipped, interrupted ones resume from their last checkpoint.", file=sys.stderr)
        return 130
    print(f"sweep done: {describe_counts(counts)}")
    if any((job.folder / FINAL_METRICS_FILE).is_file() for job in jobs):
        try:
            write_report([root], root / REPORT_DIR, layout=sweep.protocol if sweep.protocol != "grid" else "groups")
        except FileNotFoundError as err:  # e.g. every evaluation of a transfer sweep failed: the runs stay, say why
            print(f"no report: {err}", file=sys.stderr)
    if counts.get("elsewhere"):
        print(f"{counts['elsewhere']} job(s) are running in another process (another sweep, or a run started by hand); "
              "they were left to it. Rerun the same command once they end to include them in the report.",
              file=sys.stderr)
    failed = counts.get("failed", 0) + counts.get("blocked", 0)
    if failed:
        print(f"{failed} job(s) did not finish; their logs are under {root / SWEEP_LOGS_DIR}. "
              "Fix the cause and rerun the same command.", file=sys.stderr)
    return 1 if failed or counts.get("changed") else 0


def main(argv=None, launcher: Optional[Callable] = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    _check_arguments(parser, args)
    from mugcp.sweeps import load_sweep, plan

    sweep = load_sweep(args.sweep)
    if sweep.slurm is not None or args.launcher == "slurm":
        from mugcp.launch.slurm_sweep import sweep_options

        sweep_options(sweep, args)  # a bad `slurm:` key or value is one line, even with --dry-run
    root = Path(args.root) if args.root else Path("runs") / "sweeps" / sweep.path.stem
    jobs = plan(sweep, root, rerun_changed=args.rerun_changed)
    console = sys.stderr if args.json else sys.stdout  # --json: stdout holds the JSON lines alone
    _announce(sweep, jobs, root, console)
    if (args.launcher == "slurm" or args.status) and not args.dry_run:
        from mugcp.launch.slurm_sweep import run_command

        return run_command(sweep, jobs, root, args)
    if args.dry_run:
        return _dry_run(jobs, args.json)
    return _run_here(sweep, jobs, root, args, launcher)


if __name__ == "__main__":
    run_cli(main)
