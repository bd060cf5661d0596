"""``python -m mugcp.train [--config FILE] [--output DIR] [--resume] [--print-config] [key=value ...]``

With no arguments it runs the built-in demo (configs/demo.yaml): base-to-novel prompt learning on
Fashion-MNIST with ViT-B-32, a few minutes on a laptop CPU. ``--print-config`` prints the resolved
config (what the run's config.yaml would hold) and exits without creating anything.
"""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from mugcp.cli import config_arguments, run_cli
from mugcp.config import CONFIG_DIR, load_config

DEMO_CONFIG = CONFIG_DIR / "demo.yaml"


def default_output(cfg: dict) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{cfg['method']['name']}_{cfg['data']['dataset']}_seed{cfg['train']['seed']}_{stamp}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mugcp.train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    config_arguments(parser)
    parser.add_argument("--output", help="run folder (default: runs/<method>_<dataset>_seed<k>_<time>)")
    parser.add_argument("--resume", action="store_true", help="continue the run in --output from its last checkpoint")
    parser.add_argument("--overwrite", action="store_true", help="replace a finished run in --output")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config (the run's config.yaml) and exit; creates nothing")
    args = parser.parse_args(argv)

    if args.resume and not args.output:
        parser.error("--resume needs --output pointing at the run to continue")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not args.output:
        parser.error("under torchrun, pass --output: every process must write to the same run folder")
    if args.resume and args.overwrite:
        parser.error("--resume continues the run in --output and --overwrite deletes it: pass one of them")
    from mugcp.engine.run_setup import check_resume_folder, check_run_config, run_config_text

    config = args.config or DEMO_CONFIG
    if args.resume:
        check_resume_folder(Path(args.output))
        if not args.config:
            config = Path(args.output) / "config.yaml"  # continue the run as it was configured, not the demo
    cfg = load_config(config, args.overrides)
    if args.print_config:
        print(run_config_text(cfg), end="")
        return 0
    check_run_config(cfg)  # before --overwrite deletes anything and before any data or model is loaded
    output = Path(args.output) if args.output else default_output(cfg)

    from mugcp.engine.trainer import train

    metrics = train(cfg, output, resume=args.resume, overwrite=args.overwrite)
    if not metrics:  # not rank 0 of a torchrun job
        return 0
    summary = ", ".join(f"{name} {metrics[name]['accuracy']:.2f}%" for name in ("base", "new", "all") if name in metrics)
    if "hm" in metrics:
        summary += f", HM {metrics['hm']:.2f}"
    summary += "".join(f", {name} not evaluated (class-specific prompts, see the log)" for name in metrics.get("not_evaluated", {}))
    print(f"done in {metrics['wall_time_s']:.0f} s: {summary}" + ("" if metrics["pretrained"] else " (RANDOM weights)"))
    print(f"run folder: {output}")
    return 0


if __name__ == "__main__":
    run_cli(main)
