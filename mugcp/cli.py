"""What the command-line tools share: argument parsing and turning bad input into one clear line.

The runner knows one error type, :class:`mugcp.errors.UserError`, which every layer's input errors
derive from, and the kernels' own base (``mugcp.kernels.errors.KernelError``), recognised only when the
kernels were imported at all; so importing this module imports no layer and no torch.
"""
from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable

from mugcp.errors import UserError


def user_errors() -> tuple[type[BaseException], ...]:
    """Errors that mean bad input: printed as one line, no traceback, exit status 2."""
    errors: list[type[BaseException]] = [UserError, FileNotFoundError]
    kernel_errors = sys.modules.get("mugcp.kernels.errors")
    if kernel_errors is not None:  # an error of the kernels can only come after they were imported
        errors.append(kernel_errors.KernelError)
    return tuple(errors)


def config_arguments(parser: argparse.ArgumentParser, example: str = "optim.lr=0.01 method=maple") -> None:
    """``--config`` and the ``KEY=VALUE`` overrides; ``example``: overrides this command accepts."""
    parser.add_argument("--config", help="YAML config (a path, or a name under configs/, e.g. methods/coop)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help=f"dotted overrides, e.g. {example}")


def run_cli(main: Callable[[], int]) -> None:
    """Run ``main`` and exit; user errors become ``error: ...`` on stderr with status 2."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    sys.exit(exit_status(main))


def exit_status(main: Callable[[], int]) -> int:
    """``main``'s exit status, with a user error printed as ``error: ...`` on stderr (status 2) and an
    interrupt as what it kept (130 for Ctrl-C, 128 + the signal's number for others); other errors raise."""
    try:
        code = main()
    except KeyboardInterrupt as err:
        # A run's RunInterrupted says what it kept; a bare Ctrl-C elsewhere kept nothing worth naming.
        print(str(err) or "interrupted.", file=sys.stderr)
        return getattr(err, "exit_code", 130)  # 130 for Ctrl-C, 143 for SIGTERM (Slurm's stop)
    except Exception as err:
        if not isinstance(err, user_errors()):
            raise
        print(f"error: {err}", file=sys.stderr)
        return 2
    return code or 0
