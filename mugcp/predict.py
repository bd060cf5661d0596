"""``python -m mugcp.predict (--checkpoint RUN | --onnx FILE) [--classes "a,b,c" | --classes-file F] IMAGE_OR_DIR ...``

Classifies images with a trained prompt: one row per image with its top-k classes and
probabilities, printed as a table, or written to ``--out preds.csv`` / ``preds.jsonl``. Folders are
searched recursively for image files (symlinked folders followed, each once); unreadable images are
named, skipped and counted, and ``--out`` lists them too, with the reason in its ``error`` column /
field. When no image could be classified (all unreadable) the exit status is 2.
Without ``--classes`` the run's own classes are used (training and evaluation classes from its
``splits.json``). MuGCP runs trained on MLLM answers need them for the new images too:
``--semantic-cache DIR`` (made by ``python -m mugcp.extract --images IMAGE_DIR``) or ``--mllm MODEL``.
``--onnx FILE`` runs a file of ``python -m mugcp.export`` with onnxruntime alone (no torch), over the
classes it was exported for (docs/export.md).

From Python::

    model, preprocess = mugcp.load_run("runs/coop_dtd", classnames=["cat", "dog"])
    model.predict([PIL.Image.open("cat.jpg")])        # [Prediction(classes=[...], probs=[...])]
    logits = model(preprocess(image)[None])           # (1, 2)
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mugcp.cli import run_cli
from mugcp.inference.class_arguments import add_class_arguments, read_classes


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mugcp.predict", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("images", nargs="+", metavar="IMAGE_OR_DIR",
                        help="image files and folders of images (searched recursively)")
    model = parser.add_mutually_exclusive_group(required=True)
    model.add_argument("--checkpoint", help="run folder (or its checkpoint/ folder)")
    model.add_argument("--onnx", metavar="FILE",
                       help="a file of python -m mugcp.export, run by onnxruntime without torch")
    add_class_arguments(parser)
    parser.add_argument("--top-k", type=int, default=5, help="classes per image [5]")
    parser.add_argument("--out", help="write predictions to a .csv or .jsonl file (default: print a table)")
    parser.add_argument("--batch-size", type=int, default=32, help="images per forward pass [32]")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N [auto]")
    parser.add_argument("--semantic-cache", metavar="DIR",
                        help="MuGCP: a semantic cache holding these images (python -m mugcp.extract --images)")
    parser.add_argument("--mllm", metavar="PATH_OR_ID",
                        help="MuGCP: run this MLLM on the images now (its answers are not stored)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    # Everything below imports no torch until load_run: --onnx runs with onnxruntime alone.
    from mugcp.config import ConfigError
    from mugcp.inference.image_files import (
        OUTPUT_FORMATS,
        collect_images,
        no_image_classified,
        result_rows,
        rows_csv,
        rows_jsonl,
        table,
    )
    from mugcp.utils import atomic_write_text, check_output_file

    if args.top_k < 1:
        raise ConfigError(f"--top-k must be at least 1, got {args.top_k}.")
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be at least 1, got {args.batch_size}.")
    out = Path(args.out) if args.out else None
    if out is not None and out.suffix.lower() not in OUTPUT_FORMATS:
        raise ConfigError(f"--out {out}: the file name must end in {' or '.join(OUTPUT_FORMATS)} "
                          "(it picks the format).")
    if out is not None:
        check_output_file(out, "--out")  # before the images and the run are loaded
    classnames = read_classes(args)
    files = collect_images(args.images)
    if args.onnx is not None:
        predictions, skipped, model_classes = predict_onnx(args, classnames, files)
        weights_note = ""
    else:
        predictions, skipped, model_classes, weights_note = predict_checkpoint(args, classnames, files)

    if out is not None:
        rows = result_rows(files, predictions, skipped)
        text = rows_csv(rows, min(args.top_k, len(model_classes))) if out.suffix.lower() == ".csv" else rows_jsonl(rows)
        atomic_write_text(out, text)
    if not predictions:
        raise no_image_classified(skipped, out)
    if out is None:
        print(table(predictions))
    summary = f"{len(predictions)} images classified over {len(model_classes)} classes{weights_note}"
    summary += f"; predictions: {out}" if out is not None else ""
    if skipped:
        summary += f"; {len(skipped)} unreadable image{'s' if len(skipped) > 1 else ''} skipped:"
    print(summary, file=sys.stderr if out is None else sys.stdout)
    for path, reason in skipped:
        print(f"  skipped {path}: {reason}", file=sys.stderr)
    return 0


def predict_checkpoint(args, classnames, files):
    """(predictions, skipped images, class names, a note on the weights) of the run's PyTorch model; open_clip's
    own warning about random weights is silenced, so the note says it."""
    from mugcp.config import ConfigError
    from mugcp.inference.image_files import predict_files
    from mugcp.inference.inference import load_run

    model, preprocess = load_run(args.checkpoint, classnames, device=args.device, semantic_cache=args.semantic_cache,
                                 mllm=args.mllm)
    if model.semantics.needed and model.semantics.cache is None and model.semantics.mllm is None:
        raise ConfigError(model.semantics.missing_message())
    predictions, skipped = predict_files(model, preprocess, files, args.top_k, args.batch_size,
                                         progress=not args.no_progress)
    return (predictions, skipped, model.classnames,
            "" if model.learner.clip.pretrained is not None else " (RANDOM weights)")


def predict_onnx(args, classnames, files):
    """(predictions, skipped images, class names) of an exported file, with onnxruntime (no torch)."""
    from mugcp.config import ConfigError
    from mugcp.inference.onnx_runner import OnnxClassifier

    for option, value in (("--semantic-cache", args.semantic_cache), ("--mllm", args.mllm)):
        if value is not None:
            raise ConfigError(f"{option} does not apply to --onnx: an exported MuGCP computes its semantic prompts "
                              "from the image.")
    if args.device not in ("auto", "cpu"):
        raise ConfigError(f"--device {args.device} with --onnx: exported files run on the CPU (onnxruntime); "
                          "use --device cpu.")
    classifier = OnnxClassifier(args.onnx)
    if classnames is not None and classnames != classifier.classnames:
        shown = ", ".join(classifier.classnames[:5]) + (", ..." if len(classifier.classnames) > 5 else "")
        raise ConfigError(f"--onnx {args.onnx} was exported for its {len(classifier.classnames)} classes ({shown}); "
                          "other classes need another export: python -m mugcp.export RUN --classes ... "
                          "--out FILE.onnx.")
    predictions, skipped = classifier.predict_files(files, args.top_k, args.batch_size)
    return predictions, skipped, classifier.classnames


if __name__ == "__main__":
    run_cli(main)
