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

Finished runs (``metrics.json`` present) are skipped; interrupted ones continue with ``--resume``, so
rerunning the command after a crash or Ctrl-C picks up where it stopped. At the end the runs are
summarised by ``mugcp.report`` in the protocol's layout (``ROOT/report/``). Published protocols:
``configs/sweeps/{base2new,cross_dataset,domain_generalization,fewshot}.yaml``.
"""
from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path
from typing import Callable, Optional

from mugcp.cli import run_cli


def main(argv=None, launcher: Optional[Callable] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mugcp.sweep", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep", help="sweep YAML file, or a published protocol: base2new, cross_dataset, domain_generalization, fewshot")
    parser.add_argument("--root", help="folder of the sweep's runs (default: runs/sweeps/<sweep file name>)")
    parser.add_argument("--dry-run", action="store_true", help="list the runs and their commands, run nothing")
    parser.add_argument("--jobs", type=int, default=1, help="runs at once: one GPU each with CUDA, else the CPU threads split [1]")
    parser.add_argument("--no-progress", action="store_true", help="no overall progress bar")
    args = parser.parse_args(argv)
    from mugcp.config import ConfigError
    from mugcp.experiments import describe_counts, load_sweep, plan, run_jobs, write_report
    from mugcp.experiments.jobs import METRICS_FILE

    if args.jobs < 1:
        raise ConfigError(f"--jobs must be at least 1, got {args.jobs}.")

    sweep = load_sweep(args.sweep)
    root = Path(args.root) if args.root else Path("runs") / "sweeps" / sweep.path.stem
    jobs = plan(sweep, root)
    runs = sum(job.module == "mugcp.train" for job in jobs)
    print(f"sweep {sweep.path} ({sweep.protocol}): {runs} training runs"
          + (f" + {len(jobs) - runs} evaluations" if len(jobs) > runs else "") + f" under {root}")
    if args.dry_run:
        for index, job in enumerate(jobs, 1):
            print(f"[{index}/{len(jobs)}] {job.mode:9s} {job.name}\n    {shlex.join(job.command())}")
        return 0
    try:
        counts = run_jobs(jobs, root, args.jobs, launcher=launcher, progress=not args.no_progress)
    except KeyboardInterrupt as stop:
        counts = stop.args[0] if stop.args and isinstance(stop.args[0], dict) else {}
        print(f"interrupted ({describe_counts(counts)}); rerun the same command to continue: finished runs are skipped, "
              "interrupted ones resume from their last checkpoint.", file=sys.stderr)
        return 130
    print(f"sweep done: {describe_counts(counts)}")
    finished = any((job.folder / METRICS_FILE).is_file() for job in jobs)
    if finished:
        try:
            write_report([root], root / "report", layout=sweep.protocol if sweep.protocol != "grid" else "groups")
        except FileNotFoundError as err:  # e.g. every evaluation of a transfer sweep failed: the runs stay, say why
            print(f"no report: {err}", file=sys.stderr)
    failed = counts.get("failed", 0) + counts.get("blocked", 0)
    if failed:
        print(f"{failed} job(s) did not finish; their logs are under {root / 'logs'}. Fix the cause and rerun the same command.",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    run_cli(main)
