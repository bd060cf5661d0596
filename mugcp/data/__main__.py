"""``python -m mugcp.data check --dataset NAME --root ROOT [--split-file FILE]``: see ``mugcp.data.check``."""
import sys

from mugcp.cli import run_cli

COMMANDS = {"check": "check a dataset on disk: its layout, split file and every image"}
USAGE = "usage: python -m mugcp.data check --dataset NAME --root ROOT [--split-file FILE]"


def help_text() -> str:
    commands = "\n".join(f"  {name:<8}{what}" for name, what in COMMANDS.items())
    return (f"{USAGE}\n\nTools for datasets.\n\ncommands:\n{commands}\n\n"
            "python -m mugcp.data COMMAND --help describes a command's options.")


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help"):
        print(help_text())
        return 0
    if not argv or argv[0] not in COMMANDS:
        given = f"unknown command '{argv[0]}'" if argv else "no command given"
        print(f"{USAGE}\nerror: {given}; the commands are: {', '.join(COMMANDS)}.", file=sys.stderr)
        return 2
    from mugcp.data.check import main as check_main

    return check_main(argv[1:])


if __name__ == "__main__":
    run_cli(main)
