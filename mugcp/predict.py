"""``python -m mugcp.predict --checkpoint RUN [--classes "a,b,c" | --classes-file F] IMAGE_OR_DIR ...``

Classifies images with a trained prompt: one row per image with its top-k classes and
probabilities, printed as a table, or written to ``--out preds.csv`` / ``preds.jsonl``. Folders are
searched recursively for image files (symlinked folders followed, each once); unreadable images are
named, skipped and counted, and ``--out`` lists them too, with the reason in its ``error`` column /
field. When no image could be classified (all unreadable) the exit status is 2.
Without ``--classes`` the run's own classes are used (training and evaluation classes from its
``splits.json``). MuGCP runs trained on MLLM answers need them for the new images too:
``--semantic-cache DIR`` (made by ``python -m mugcp.extract --images IMAGE_DIR``) or ``--mllm MODEL``.

From Python::

    model, preprocess = mugcp.load_run("runs/coop_dtd", classnames=["cat", "dog"])
    model.predict([PIL.Image.open("cat.jpg")])        # [Prediction(classes=[...], probs=[...])]
    logits = model(preprocess(image)[None])           # (1, 2)
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional

from mugcp.cli import run_cli


def read_classes(args) -> Optional[list[str]]:
    from mugcp.config import ConfigError
    from mugcp.data.classnames import read_classnames_file, validate_classnames

    if args.classes is not None:
        names = [name.strip() for name in args.classes.split(",")]
        if not all(names):
            raise ConfigError(f"--classes {args.classes!r}: give comma-separated non-empty names, e.g. --classes \"cat,dog\".")
        return validate_classnames(names, "--classes", [f"--classes name {i + 1}" for i in range(len(names))])
    if args.classes_file is not None:
        return read_classnames_file(args.classes_file)
    return None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mugcp.predict", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("images", nargs="+", metavar="IMAGE_OR_DIR", help="image files and folders of images (searched recursively)")
    parser.add_argument("--checkpoint", required=True, help="run folder (or its checkpoint/ folder)")
    names = parser.add_mutually_exclusive_group()
    names.add_argument("--classes", help='comma-separated class names, e.g. "cat,dog,owl" (default: the run\'s own classes)')
    names.add_argument("--classes-file", help="a text file with one class name per line")
    parser.add_argument("--top-k", type=int, default=5, help="classes per image [5]")
    parser.add_argument("--out", help="write predictions to a .csv or .jsonl file (default: print a table)")
    parser.add_argument("--batch-size", type=int, default=32, help="images per forward pass [32]")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N [auto]")
    parser.add_argument("--semantic-cache", metavar="DIR", help="MuGCP: a semantic cache holding these images (python -m mugcp.extract --images)")
    parser.add_argument("--mllm", metavar="PATH_OR_ID", help="MuGCP: run this MLLM on the images now (its answers are not stored)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    from mugcp.config import ConfigError
    from mugcp.inference.image_files import (OUTPUT_FORMATS, collect_images, no_image_classified, predict_files, result_rows, rows_csv,
                                          rows_jsonl, table)
    from mugcp.inference.inference import load_run
    from mugcp.utils import atomic_write_text, check_output_file

    if args.top_k < 1:
        raise ConfigError(f"--top-k must be at least 1, got {args.top_k}.")
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be at least 1, got {args.batch_size}.")
    out = Path(args.out) if args.out else None
    if out is not None and out.suffix.lower() not in OUTPUT_FORMATS:
        raise ConfigError(f"--out {out}: the file name must end in {' or '.join(OUTPUT_FORMATS)} (it picks the format).")
    if out is not None:
        check_output_file(out, "--out")  # before the images and the run are loaded
    classnames = read_classes(args)
    files = collect_images(args.images)
    model, preprocess = load_run(args.checkpoint, classnames, device=args.device, semantic_cache=args.semantic_cache, mllm=args.mllm)
    if model.semantics.needed and model.semantics.cache is None and model.semantics.mllm is None:
        raise ConfigError(model.semantics.missing_message())
    predictions, skipped = predict_files(model, preprocess, files, args.top_k, args.batch_size, progress=not args.no_progress)

    if out is not None:
        rows = result_rows(files, predictions, skipped)
        text = rows_csv(rows, min(args.top_k, len(model.classnames))) if out.suffix.lower() == ".csv" else rows_jsonl(rows)
        atomic_write_text(out, text)
    if not predictions:
        raise no_image_classified(skipped, out)
    if out is None:
        print(table(predictions))
    summary = f"{len(predictions)} images classified over {len(model.classnames)} classes"
    # open_clip's own warning about random weights is silenced: say it here
    summary += "" if model.learner.clip.pretrained is not None else " (RANDOM weights)"
    summary += f"; predictions: {out}" if out is not None else ""
    if skipped:
        summary += f"; {len(skipped)} unreadable image{'s' if len(skipped) > 1 else ''} skipped:"
    print(summary, file=sys.stderr if out is None else sys.stdout)
    for path, reason in skipped:
        print(f"  skipped {path}: {reason}", file=sys.stderr)
    return 0



if __name__ == "__main__":
    run_cli(main)
