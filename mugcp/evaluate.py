"""``python -m mugcp.evaluate --checkpoint DIR [--config FILE] [--output DIR] [key=value ...]``

Evaluates a trained prompt learner on any dataset, split and class subset. The run's own resolved
config (stored in the checkpoint) is the starting point; ``--config`` and overrides change what is
evaluated (the data keys); a training-only key or a method option that differs from the run's is refused.
Examples (RUN: a run folder; $DATA: the folder holding the CoOp datasets)::

    python -m mugcp.evaluate --checkpoint RUN data.eval_subsets=new
    python -m mugcp.evaluate --checkpoint RUN data.dataset=caltech101 data.root=$DATA data.protocol=all

The evaluation goes to a folder of its own, by default ``<run>/eval_<dataset>_<time>/`` (config.yaml,
log.txt, metrics.json, predictions/, per_class/, confusion/); nothing of the training is touched.
``--output`` must be a new folder or an evaluation's: a folder holding a training run (its checkpoint/,
splits.json or metrics) is refused, and a finished evaluation is replaced only with ``--overwrite``.
"""
from __future__ import annotations

import argparse

from mugcp.cli import config_arguments, run_cli
from mugcp.runs.layout import FINAL_METRICS_FILE
from mugcp.utils import check_output_folder


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mugcp.evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="checkpoint folder (or a run folder holding checkpoint/)")
    parser.add_argument("--output", help="a new folder for the evaluation (default: <run>/eval_<dataset>_<time>)")
    parser.add_argument("--overwrite", action="store_true", help="replace the finished evaluation in --output")
    parser.add_argument("--compare-zeroshot", action="store_true",
                        help="also evaluate zero-shot CLIP on the same backbone: per-class accuracy of both in "
                             "per_class/<subset>.csv")
    config_arguments(parser, example="data.eval_subsets=new data.max_eval_per_class=10")
    args = parser.parse_args(argv)
    if args.output:
        check_output_folder(args.output, "--output")  # a file there is one line, before torch is imported

    from mugcp.training.evaluate_checkpoint import evaluate_checkpoint

    overrides = list(args.overrides) + (["data.compare_zeroshot=true"] if args.compare_zeroshot else [])
    metrics, output = evaluate_checkpoint(args.checkpoint, args.config, overrides, args.output,
                                          overwrite=args.overwrite)
    summary = ", ".join(f"{name} {metrics[name]['accuracy']:.2f}%" for name in ("base", "new", "all")
                        if name in metrics)
    summary += f", HM {metrics['hm']:.2f}" if "hm" in metrics else ""
    summary += "" if metrics["pretrained"] else " (RANDOM weights)"  # open_clip's own warning about it is silenced
    print(f"{summary}; metrics: {output / FINAL_METRICS_FILE}")
    return 0


if __name__ == "__main__":
    run_cli(main)
