"""``python -m mugcp.inspect RUN [IMAGE_OR_DIR ...] --out DIR``: what a trained run learned.

Writes the nearest vocabulary words of every learned text context vector (per prompted layer for
deep-prompt methods; Markdown and CSV). Given images, for MuGCP: the AMG attention of each semantic
token over the patches at every prompted layer (one PNG grid per image), the MPF gates, the SCP
caption used per image; for CoCoOp and MuGCP: the size of the per-image conditional prompts against
the shared context. Runs on the CPU with random weights; MuGCP goes through the kernels' reference path.
MuGCP runs trained on MLLM answers need them for the images: ``--semantic-cache DIR`` or ``--mllm MODEL``.
"""
from __future__ import annotations

import argparse

from mugcp.cli import run_cli
from mugcp.utils import check_output_folder


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mugcp.inspect", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", help="run folder (or its checkpoint/ folder)")
    parser.add_argument("images", nargs="*", metavar="IMAGE_OR_DIR",
                        help="images (files or folders) for the per-image views")
    parser.add_argument("--out", default="inspect", help="output folder [inspect/]")
    parser.add_argument("--top-k", type=int, default=5, help="nearest words per context vector [5]")
    parser.add_argument("--classes", help='comma-separated class names (default: the run\'s own classes)')
    parser.add_argument("--device", default="cpu", help="cpu, auto, cuda or cuda:N [cpu]")
    parser.add_argument("--semantic-cache", metavar="DIR",
                        help="MuGCP on MLLM answers: a semantic cache holding these images")
    parser.add_argument("--mllm", metavar="PATH_OR_ID", help="MuGCP on MLLM answers: run this MLLM on the images now")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    check_output_folder(args.out, "--out")  # before the run and its backbone are loaded

    from mugcp.inference.inspection import inspect_run

    classes = [name.strip() for name in args.classes.split(",")] if args.classes else None
    result = inspect_run(args.run, args.images, args.out, k=args.top_k, classnames=classes,
                         semantic_cache=args.semantic_cache, mllm=args.mllm, device=args.device,
                         progress=not args.no_progress)
    for kind, paths in result.files.items():
        shown = ", ".join(str(p) for p in paths[:3]) + (f" ... ({len(paths)} files)" if len(paths) > 3 else "")
        print(f"{kind}: {shown}")
    for note in result.notes:
        print(f"note: {note}")
    return 0


if __name__ == "__main__":
    run_cli(main)
