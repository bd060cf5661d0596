"""What the command-line tools share: argument parsing and turning known errors into one clear line."""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Callable

def user_errors() -> tuple[type[BaseException], ...]:
    """Errors that mean bad input: printed as one line, no traceback, exit status 2."""
    from mugcp.backbones import PretrainedLoadError
    from mugcp.config import ConfigError
    from mugcp.engine.checkpoint import CheckpointError
    from mugcp.engine.trainer import TrainingDiverged
    from mugcp.errors import UserError
    from mugcp.semantics.cache import CacheError

    errors: list[type[BaseException]] = [ConfigError, PretrainedLoadError, CheckpointError, TrainingDiverged, CacheError, FileNotFoundError, UserError]
    try:
        from kernels.attention import AttentionBackendError

        errors.append(AttentionBackendError)
    except ImportError:  # pragma: no cover
        pass
    return tuple(errors)


def config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML config (a path, or a name under configs/, e.g. methods/coop)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. optim.lr=0.01 method=maple")


def run_cli(main: Callable[[], int]) -> None:
    """Run ``main`` and exit; user errors become ``error: ...`` on stderr with status 2."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        code = main()
    except user_errors() as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt as err:
        # A run's RunInterrupted says what it kept; a bare Ctrl-C elsewhere kept nothing worth naming.
        print(str(err) or "interrupted.", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)
