"""``python -m mugcp.convert --method NAME --backbone MODEL DASSL_FILE --out DIR [--option KEY=VALUE ...]``

Turns a checkpoint published with a baseline's released code (a Dassl file: ``model.pth.tar-N`` or
``model-best.pth.tar``, a torch-pickled dict with ``state_dict``, ``epoch``, ``optimizer``, ...) into
this library's checkpoint folder (``adapter_config.json`` + ``adapter_model.safetensors``), which
``python -m mugcp.evaluate --checkpoint DIR`` then evaluates. Prompt counts and depths are read from
the tensor shapes; options the file cannot tell (``ctx_init``, which decides the fixed words of the
class texts, ``class_token_position``) come from the method's published config unless ``--option``
sets them. The released buffers ``token_prefix`` / ``token_suffix`` (class-name embeddings) and any
frozen CLIP weights in the file are dropped: the CLIP weights are the ones ``--pretrained`` names.
A file that is not a Dassl checkpoint of the method is refused, naming the keys that do not fit.
Files in torch's older format (``torch.save(..., _use_new_zipfile_serialization=False)``) are read
too, weights-only like the rest: nothing in a file runs. An existing ``--out`` checkpoint folder is
replaced only with ``--overwrite``; any other existing ``--out`` (a file, a run folder) is refused.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from mugcp.cli import run_cli


def parse_options(items: list[str]) -> dict:
    from mugcp.config import ConfigError, parse_value

    options = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--option '{item}' must look like KEY=VALUE (e.g. ctx_init='a photo of a').")
        key, text = item.split("=", 1)
        options[key.strip()] = parse_value(text)
    return options


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mugcp.convert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dassl_file", type=Path,
                        help="released checkpoint, e.g. output/.../MultiModalPromptLearner/model.pth.tar-5")
    parser.add_argument("--method", required=True, help="coop, cocoop, kgcoop, ivlp, maple, promptsrc, prograd or tcp")
    parser.add_argument("--backbone", required=True, help="open_clip model the prompts were trained on, e.g. ViT-B-16")
    parser.add_argument("--pretrained", default="openai",
                        help="CLIP weights to evaluate with (recorded in the checkpoint; default openai)")
    parser.add_argument("--out", required=True, type=Path, help="checkpoint folder to write (a new or empty folder)")
    parser.add_argument("--overwrite", action="store_true", help="replace the checkpoint folder --out if it exists")
    parser.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                        help="method option the file cannot tell, e.g. ctx_init='a photo of a'")
    args = parser.parse_args(argv)
    from mugcp.runs.released_checkpoint import convert

    folder, ignored = convert(args.method, args.backbone, args.dassl_file, args.out, args.pretrained,
                              parse_options(args.option), overwrite=args.overwrite)
    if ignored:
        print(f"left out {len(ignored)} released tensors that hold no prompt (class-name buffers, frozen CLIP "
              f"weights), e.g. {', '.join(ignored[:3])}")
    print(f"wrote {folder} ({args.method}, {args.backbone}); evaluate with: "
          f"python -m mugcp.evaluate --checkpoint {folder} data.dataset=...")
    return 0


if __name__ == "__main__":
    run_cli(main)
