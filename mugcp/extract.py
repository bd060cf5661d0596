"""``python -m mugcp.extract``: cache an MLLM's answer (text + answer hidden states) for every image.

Examples::

    python -m mugcp.extract --mllm /models/llava-1.5-7b-hf --dataset dtd --root $DATA --out caches/dtd-llava
    python -m mugcp.extract --mllm /models/llava-1.5-7b-hf --images photos/ --out caches/photos --dry-run
    torchrun --nproc-per-node 8 -m mugcp.extract --mllm /models/qwen2.5-vl-7b --config configs/x.yaml --out c/
    python -m mugcp.extract --merge --out caches/dtd-llava      # index an interrupted run's shards
    python -m mugcp.extract --mllm /models/llava --dataset dtd --root $DATA --out c/ --launcher slurm --shards 16 \
        --slurm-gpus-per-run 1 --slurm-time 2:00:00           # 16 array tasks, then a merge job
    python -m mugcp.extract ... --shard 3 --shards 16          # one shard by hand (e.g. in your own sbatch --array)

A rerun with the same settings adds only what is missing; other settings are refused.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mugcp.cli import exit_status, run_cli
from mugcp.launch.slurm_launch import add_launcher_arguments


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m mugcp.extract",
        description="Extract per-image MLLM answers (text and answer-token hidden states) into a semantic cache.",
    )
    images = parser.add_argument_group("images (one of)")
    images.add_argument("--images", metavar="DIR", help="every image file under DIR; keys are paths relative to DIR")
    images.add_argument("--dataset", metavar="NAME",
                        help="a dataset the data layer reads (dtd, imagenet, imagefolder...)")
    images.add_argument("--root", metavar="DIR", help="the dataset's root folder (data.root)")
    images.add_argument("--config", metavar="FILE", help="a run config; its data section names the dataset")
    images.add_argument("--splits", default="train,val,test", help="comma-separated splits to extract [train,val,test]")
    images.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. data.root=/data")

    model = parser.add_argument_group("model")
    model.add_argument("--mllm", metavar="PATH_OR_ID",
                       help="Hugging Face image-text-to-text model: a local directory (offline) or a Hub id")
    model.add_argument("--revision", help="Hub revision of --mllm (ignored for a local directory)")
    # No default here: the built-in question lives beside the MLLM code, which imports torch; --help must not.
    model.add_argument("--prompt", help="the question asked about every image (default: a one-sentence description of "
                                        "the main object's colour, shape, texture, parts and material)")
    model.add_argument("--max-new-tokens", type=int, default=64, help="longest answer, in tokens [64]")
    model.add_argument("--layer", type=int, default=-1,
                       help="hidden layer to keep: 0 = embeddings, -1 = last [-1]")
    model.add_argument("--batch-size", type=int, default=8, help="images per generate call [8]")
    model.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                       help="model dtype; auto = bfloat16 on GPUs that support it, float32 on the CPU")
    model.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (torchrun: one GPU per rank)")

    run = parser.add_argument_group("run")
    run.add_argument("--out", required=True, metavar="CACHE_DIR", help="the semantic cache directory")
    run.add_argument("--dry-run", action="store_true", help="count images and estimate the cache size, then stop")
    run.add_argument("--merge", action="store_true", help="only (re)build the index of --out from its shards")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    run.add_argument("--shards", type=int, metavar="N",
                     help="split the images into N shards: N Slurm array tasks with --launcher slurm; with --shard, "
                          "this process's share; with --merge (and the images), the missing images by shard")
    run.add_argument("--shard", type=int, metavar="I", help="extract only shard I (0..N-1) of --shards N; no merge")
    add_launcher_arguments(parser, SLURM_FLAGS, wait_help="with --launcher slurm: follow the tasks, then merge and "
                           "check the cache here (else a merge job follows them)")
    return parser


SLURM_FLAGS = ["partition", "time", "gpus_per_run", "cpus_per_run", "mem", "account", "array_parallelism", "setup"]


def build_source(args: argparse.Namespace, parser: argparse.ArgumentParser, optional: bool = False):
    from mugcp.semantics.sources import dataset_source, image_dir_source, parse_splits

    chosen = [flag for flag, value in (("--images", args.images), ("--dataset", args.dataset),
                                       ("--config", args.config)) if value]
    if optional and not chosen and not args.root and not args.overrides:
        return None
    if len(chosen) != 1:
        parser.error("give exactly one of --images DIR, --dataset NAME (with --root DIR) or --config FILE")
    if args.images:
        if args.overrides or args.root:
            parser.error("--images takes no --root and no config overrides")
        return image_dir_source(args.images)

    from mugcp.config import load_config
    from mugcp.config_schema import check_values
    from mugcp.data.registry import check_data_config

    overrides = list(args.overrides)
    if args.dataset:
        overrides = [f"data.dataset={args.dataset}"] + ([f"data.root={args.root}"] if args.root else []) + overrides
    elif args.root:
        overrides = overrides + [f"data.root={args.root}"]
    cfg = load_config(args.config, overrides)
    check_values(cfg)  # the same schema as train and evaluate, before a dataset or model is read
    check_data_config(cfg["data"])
    return dataset_source(cfg["data"], parse_splits(args.splits))


def main(argv: list[str] | None = None) -> int:
    """The command's exit status: a user error prints one line and gives 2 (``mugcp.cli.exit_status``),
    here as for ``python -m mugcp.extract``, so a caller in Python gets the status too."""
    return exit_status(lambda: _extract(argv))


def _check_flags(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.shard is not None and args.shards is None:
        parser.error("--shard I needs --shards N (how many shards the images are split into)")
    if args.shards is not None and args.shard is None and args.launcher == "local" and not args.merge:
        parser.error("--shards N runs N tasks with --launcher slurm, or this process's share with --shard I")
    if args.launcher == "slurm" and (args.shard is not None or args.merge or args.dry_run):
        parser.error("--launcher slurm submits the whole extraction; it takes no --shard, --merge or --dry-run")


def _extract(argv: list[str] | None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    _check_flags(parser, args)
    from mugcp.semantics.extraction import dry_run, extract

    if args.launcher == "slurm":
        from mugcp.launch.slurm import require_slurm

        require_slurm()  # before any dataset or model is read
    if args.merge:
        return _merge(args, parser)
    if not args.mllm:
        parser.error("--mllm PATH_OR_ID is required (a local model directory works offline)")
    settings = _settings(args)
    source = build_source(args, parser)
    if args.dry_run:
        print(dry_run(source, settings).describe())
        return 0
    if args.launcher == "slurm":
        return submit_to_slurm(args, argv, parser, source, settings)
    if args.shard is not None:
        from mugcp.semantics.extraction_shards import extract_shard

        summary = extract_shard(source, settings, args.shard, args.shards)
        print(f"shard {args.shard} of {args.shards}: " + summary.describe(settings.out))
        print(f"once every shard has ended: python -m mugcp.extract --merge --out {settings.out} "
              f"--shards {args.shards} (with the image arguments, to check the cache is complete)")
        return 0
    summary = extract(source, settings)
    if summary.manifest is not None:  # rank 0 (or the only process) reports
        print(summary.describe(settings.out))
    return 0


def _merge(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """``--merge``: index the shards; with the image arguments, first check that every image is in them."""
    from mugcp.semantics.cache_writer import merge_cache

    source = build_source(args, parser, optional=True)
    if source is None:
        manifest = merge_cache(args.out)
    else:
        from mugcp.semantics.extraction_shards import CacheIncomplete, merge_checked

        manifest, completeness = merge_checked(args.out, source, args.shards or 1)
        if not completeness.complete:
            raise CacheIncomplete(completeness.describe(args.out))
        print(completeness.describe(args.out))
    print(f"merged {args.out}: {manifest['entries']} entries in {manifest['shards']} shards, "
          f"{len(manifest['failed'])} failed, {manifest['content_hash']}")
    return 0


def _settings(args: argparse.Namespace):
    """The extraction's settings from the flags, checked (a ``UserError`` names the flag)."""
    from mugcp.semantics.extraction_setup import ExtractionSettings
    from mugcp.semantics.mllm import DEFAULT_PROMPT

    settings = ExtractionSettings(
        mllm=args.mllm,
        out=Path(args.out),
        prompt=DEFAULT_PROMPT if args.prompt is None else args.prompt,
        max_new_tokens=args.max_new_tokens,
        layer=args.layer,
        batch_size=args.batch_size,
        dtype=args.dtype,
        device=args.device,
        revision=args.revision,
        progress=not args.no_progress,
    )
    settings.check()
    return settings


def submit_to_slurm(args, argv, parser, source, settings) -> int:
    from mugcp.launch.slurm import SlurmOptions
    from mugcp.launch.slurm_extract import finish_extraction, submit_extraction
    from mugcp.launch.slurm_launch import task_arguments

    options = SlurmOptions().updated_from_args(args)
    task_args = task_arguments(argv, parser, drop=("shards", "shard"))
    if "--no-progress" not in task_args:
        task_args.append("--no-progress")  # a progress bar redrawn into a log file is noise

    def show(states: dict) -> None:
        counts = {state: list(states.values()).count(state) for state in dict.fromkeys(states.values())}
        print("shards: " + ", ".join(f"{count} {state}" for state, count in counts.items()), flush=True)

    jobs = submit_extraction(source, task_args, settings.out, args.shards or 1, options, merge_job=not args.wait)
    print(jobs.describe(), flush=True)
    if jobs.jobs and args.wait:
        finish_extraction(jobs, source, on_change=show)
    if jobs.completeness is not None:
        print(jobs.completeness.describe(settings.out))
    return 0


if __name__ == "__main__":
    run_cli(main)
