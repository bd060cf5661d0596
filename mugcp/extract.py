"""``python -m mugcp.extract``: cache an MLLM's answer (text + answer hidden states) for every image.

Examples::

    python -m mugcp.extract --mllm /models/llava-1.5-7b-hf --dataset dtd --root $DATA --out caches/dtd-llava
    python -m mugcp.extract --mllm /models/llava-1.5-7b-hf --images photos/ --out caches/photos --dry-run
    torchrun --nproc-per-node 8 -m mugcp.extract --mllm /models/qwen2.5-vl-7b --config configs/x.yaml --out c/
    python -m mugcp.extract --merge --out caches/dtd-llava      # index an interrupted run's shards

A rerun with the same settings adds only what is missing; other settings are refused.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m mugcp.extract",
        description="Extract per-image MLLM answers (text and answer-token hidden states) into a semantic cache.",
    )
    images = parser.add_argument_group("images (one of)")
    images.add_argument("--images", metavar="DIR", help="every image file under DIR; keys are paths relative to DIR")
    images.add_argument("--dataset", metavar="NAME", help="a dataset the data layer reads (dtd, imagenet, imagefolder...)")
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
    return parser


def build_source(args: argparse.Namespace, parser: argparse.ArgumentParser):
    from mugcp.semantics.sources import dataset_source, image_dir_source, parse_splits

    chosen = [flag for flag, value in (("--images", args.images), ("--dataset", args.dataset),
                                       ("--config", args.config)) if value]
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
    parser = build_parser()
    args = parser.parse_args(argv)

    from mugcp.errors import UserError
    from mugcp.semantics.cache_writer import merge_cache
    from mugcp.semantics.extraction import dry_run, extract
    from mugcp.semantics.extraction_setup import ExtractionSettings
    from mugcp.semantics.mllm import DEFAULT_PROMPT

    try:
        if args.merge:
            manifest = merge_cache(args.out)
            print(f"merged {args.out}: {manifest['entries']} entries in {manifest['shards']} shards, "
                  f"{len(manifest['failed'])} failed, {manifest['content_hash']}")
            return 0
        if not args.mllm:
            parser.error("--mllm PATH_OR_ID is required (a local model directory works offline)")
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
        source = build_source(args, parser)
        if args.dry_run:
            print(dry_run(source, settings).describe())
            return 0
        summary = extract(source, settings)
        if summary.manifest is not None:  # rank 0 (or the only process) reports
            print(summary.describe(settings.out))
        return 0
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
