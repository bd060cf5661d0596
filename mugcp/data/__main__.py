"""``python -m mugcp.data check --dataset NAME --root ROOT [--split-file FILE]``: see ``mugcp.data.check``."""
import sys

from mugcp.cli import run_cli

COMMANDS = ("check",)
USAGE = "usage: python -m mugcp.data check --dataset NAME --root ROOT [--split-file FILE]"


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] in (["-h"], ["--help"]):
        print(f"{USAGE}\n\ncommands:\n  check  a dataset's layout, split file and every image "
              f"(python -m mugcp.data check --help)")
        return 0
    if not argv or argv[0] not in COMMANDS:
        given = f"unknown command '{argv[0]}'" if argv else "no command given"
        print(f"{USAGE}\n"
              f"error: {given}; the commands are: {', '.join(COMMANDS)}.", file=sys.stderr)
        return 2
    from mugcp.data.check import main as check_main

    return check_main(argv[1:])


if __name__ == "__main__":
    run_cli(main)
