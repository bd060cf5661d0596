"""``python -m mugcp.export RUN --out model.onnx [--classes "a,b,c" | --classes-file F] [--dtype fp16] [--check]``

Exports a trained run as one ONNX graph: preprocessed images (N, 3, S, S) in, with any batch size,
logits over the class list out (the run's own classes unless --classes / --classes-file name others).
The file carries the class names, method, backbone and preprocessing as metadata, so
``python -m mugcp.predict --onnx model.onnx photos/`` runs it with onnxruntime alone (no torch).
Every method exports: CoOp-like methods as the prompted image encoder and one matmul with the class
features, CoCoOp and MuGCP with their whole per-image path. MuGCP runs on MLLM answers do not (the
MLLM would be needed for every new image); runs with semantic.source=clip or none do.
--check runs onnxruntime and the PyTorch model on the same random images and prints the largest
logit difference. See docs/export.md.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from mugcp.cli import run_cli
from mugcp.inference.class_arguments import add_class_arguments, read_classes


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mugcp.export", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("run", metavar="RUN", help="run folder (or its checkpoint/ folder)")
    parser.add_argument("--out", required=True, help="the .onnx file to write")
    add_class_arguments(parser)
    parser.add_argument(
        "--dtype",
        default="fp32",
        choices=["fp32", "fp16"],
        help="weights and arithmetic of the graph [fp32]; fp16 keeps fp32 images in and logits out",
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="compare onnxruntime with PyTorch on random images and print the difference",
    )
    args = parser.parse_args(argv)
    from mugcp.config import ConfigError

    out = Path(args.out)
    if out.suffix.lower() != ".onnx":
        raise ConfigError(f"--out {out}: the file name must end in .onnx.")
    if out.is_dir():
        raise ConfigError(f"--out {out} is a folder; give a file name ending in .onnx.")
    run = Path(args.run)
    if run.is_dir() and out.resolve().is_relative_to(run.resolve()):
        raise ConfigError(
            f"--out {out} lies inside the run {run}; this command writes no run it did not create: write it elsewhere."
        )
    classnames = read_classes(args)

    from mugcp.inference.export import check_exportable, export_run, largest_logit_difference

    check_exportable(run)
    learner, metadata = export_run(run, out, classnames, args.dtype)
    print(
        f"exported {metadata.method} ({metadata.backbone}, {len(metadata.classnames)} classes, {metadata.dtype}, "
        f"{metadata.image_size}px) to {out} ({out.stat().st_size / 2**20:.1f} MiB)"
    )
    if args.check:
        difference, largest = largest_logit_difference(learner, out, metadata.image_size)
        print(
            f"check: onnxruntime vs PyTorch on 4 random images: largest logit difference {difference:.3g} "
            f"(largest logit {largest:.3g})"
        )
    return 0


if __name__ == "__main__":
    run_cli(main)
