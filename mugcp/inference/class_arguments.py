"""``--classes "a,b,c"`` / ``--classes-file F``: the class names a command predicts over (predict, export).

Imports no torch: both commands read these before anything is loaded.
"""

from __future__ import annotations

import argparse
from typing import Optional


def add_class_arguments(parser: argparse.ArgumentParser) -> None:
    names = parser.add_mutually_exclusive_group()
    names.add_argument(
        "--classes", help='comma-separated class names, e.g. "cat,dog,owl" (default: the run\'s own classes)'
    )
    names.add_argument("--classes-file", help="a text file with one class name per line")


def read_classes(args) -> Optional[list[str]]:
    """The names ``--classes`` or ``--classes-file`` give, checked; None when neither is given."""
    from mugcp.config import ConfigError
    from mugcp.data.classnames import read_classnames_file, validate_classnames

    if args.classes is not None:
        names = [name.strip() for name in args.classes.split(",")]
        if not all(names):
            raise ConfigError(
                f'--classes {args.classes!r}: give comma-separated non-empty names, e.g. --classes "cat,dog".'
            )
        return validate_classnames(names, "--classes", [f"--classes name {i + 1}" for i in range(len(names))])
    if args.classes_file is not None:
        return read_classnames_file(args.classes_file)
    return None
