"""``python -m mugcp.train [--config FILE] [--output DIR] [--resume] [--print-config] [key=value ...]``

With no arguments it runs the built-in demo (configs/demo.yaml): base-to-novel prompt learning on
Fashion-MNIST with ViT-B-32, a few minutes on a laptop CPU. ``--print-config`` prints the resolved
config (what the run's config.yaml would hold) and exits without creating anything.

On Slurm, one data-parallel run over K nodes x G GPUs (one process per GPU, the same result as torchrun
with the same global batch); the command prints the job id and returns, --wait follows the job::

    python -m mugcp.train --config methods/mugcp --output runs/x \\
        --launcher slurm --slurm-nodes 2 --slurm-gpus-per-node 4

Ctrl-C (SIGINT) and SIGTERM (how Slurm stops a job) both save the checkpoint of the step in flight;
--resume continues from it (a second Ctrl-C stops at once, losing that step). --resume on a finished
run (one with metrics.json) says so and changes nothing; add --reevaluate to evaluate its checkpoint
again (metrics.json and the evaluation lines of metrics.jsonl are replaced).
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path

from mugcp.cli import config_arguments, run_cli
from mugcp.config import CONFIG_DIR, load_config
from mugcp.launch.slurm_launch import add_launcher_arguments
from mugcp.runs.layout import CONFIG_FILE, FINAL_METRICS_FILE, SUBMITIT_DIR
from mugcp.utils import check_output_folder

DEMO_CONFIG = CONFIG_DIR / "demo.yaml"
SLURM_FLAGS = ["partition", "time", "nodes", "gpus_per_node", "tasks_per_node", "cpus_per_run", "mem", "account",
               "setup"]


def default_output(cfg: dict) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{cfg['method']['name']}_{cfg['data']['dataset']}_seed{cfg['train']['seed']}_{stamp}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mugcp.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    config_arguments(parser)
    parser.add_argument("--output", help="run folder (default: runs/<method>_<dataset>_seed<k>_<time>)")
    parser.add_argument("--resume", action="store_true", help="continue the run in --output from its last checkpoint")
    parser.add_argument("--overwrite", action="store_true", help="replace a finished run in --output")
    parser.add_argument("--reevaluate", action="store_true",
                        help="with --resume on a finished run: evaluate its checkpoint again (replaces metrics.json)")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config (the run's config.yaml) and exit; creates nothing")
    add_launcher_arguments(parser, SLURM_FLAGS, wait_help="with --launcher slurm: follow the job until it ends")
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    if args.output:
        check_output_folder(args.output, "--output")  # a file there is one line, before Slurm or the config is read
    if args.launcher == "slurm":
        from mugcp.launch.slurm import require_slurm

        require_slurm()  # before the config is read: no Slurm here is one line, at once

    if args.resume and not args.output:
        parser.error("--resume needs --output pointing at the run to continue")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not args.output:
        parser.error("under torchrun, pass --output: every process must write to the same run folder")
    if args.resume and args.overwrite:
        parser.error("--resume continues the run in --output and --overwrite deletes it: pass one of them")
    if args.reevaluate and not args.resume:
        parser.error("--reevaluate evaluates a finished run again: pass it with --resume --output RUN")
    from mugcp.runs.run_setup import check_resume_folder, check_run_config, run_config_text

    config = args.config or DEMO_CONFIG
    if args.resume:
        check_resume_folder(Path(args.output))
        if (Path(args.output) / FINAL_METRICS_FILE).is_file() and not args.reevaluate:
            print(f"{args.output} is a finished run ({FINAL_METRICS_FILE}): nothing to resume, nothing changed. "
                  f"To evaluate its checkpoint again: python -m mugcp.train --output {args.output} --resume "
                  "--reevaluate")
            return 0
        if not args.config:
            config = Path(args.output) / CONFIG_FILE  # continue the run as it was configured, not the demo
    cfg = load_config(config, args.overrides)
    if args.print_config:
        print(run_config_text(cfg), end="")
        return 0
    check_run_config(cfg)  # before --overwrite deletes anything and before any data or model is loaded
    output = Path(args.output) if args.output else default_output(cfg)
    if args.launcher == "slurm":
        return submit_to_slurm(args, argv, parser, cfg, output)

    from mugcp.training.stopping import StopOnSignal
    from mugcp.training.trainer import train

    # Ctrl-C and SIGTERM (a Slurm stop or requeue) alike: save the step in flight and stop.
    with StopOnSignal(signal.SIGTERM, signal.SIGINT) as stop:
        metrics = train(cfg, output, resume=args.resume, overwrite=args.overwrite, stop=stop)
    if not metrics:  # not rank 0 of a torchrun job
        return 0
    print(describe_metrics(metrics))
    print(f"run folder: {output}")
    return 0


def describe_metrics(metrics: dict) -> str:
    summary = ", ".join(f"{name} {metrics[name]['accuracy']:.2f}%" for name in ("base", "new", "all")
                        if name in metrics)
    if "hm" in metrics:
        summary += f", HM {metrics['hm']:.2f}"
    summary += "".join(f", {name} not evaluated (class-specific prompts, see the log)"
                       for name in metrics.get("not_evaluated", {}))
    return f"done in {metrics['wall_time_s']:.0f} s: {summary}" + ("" if metrics["pretrained"] else " (RANDOM weights)")


def submit_to_slurm(args, argv, parser, cfg: dict, output: Path) -> int:
    import json

    from mugcp.launch.slurm import SlurmOptions
    from mugcp.launch.slurm_launch import follow, job_report, submit_training, task_arguments

    options = SlurmOptions().updated_from_args(args)
    job = submit_training(cfg, task_arguments(argv, parser, drop=("output", "overwrite")), output, options,
                          resume=args.resume, overwrite=args.overwrite)
    print(job.describe(), flush=True)
    if not args.wait:
        return 0
    states = follow({job.job_id: job.folder},
                    on_change=lambda now: print(f"job {job.job_id}: {now[job.job_id]}", flush=True))
    metrics_file = output / FINAL_METRICS_FILE
    if states[job.job_id] != "done" or not metrics_file.is_file():
        print(job_report(job.job_id, output, states[job.job_id], output / SUBMITIT_DIR), file=sys.stderr)
        return 1
    print(describe_metrics(json.loads(metrics_file.read_text(encoding="utf-8"))))
    print(f"run folder: {output}")
    return 0


if __name__ == "__main__":
    run_cli(main)
