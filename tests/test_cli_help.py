"""Every command's ``--help`` answers without importing torch (issue 16): parsing comes before the library.

Each command runs in a fresh interpreter (``runpy``, as ``python -m`` does) so that nothing this test
process imported counts; the child reports whether torch was imported and what ``--help`` printed.
How fast that is (under 1 s) is measured in ``benchmarks/test_bench_cli.py``, not here.
"""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

COMMANDS = [
    ("mugcp.train", []), ("mugcp.evaluate", []), ("mugcp.predict", []), ("mugcp.sweep", []), ("mugcp.extract", []),
    ("mugcp.report", []), ("mugcp.convert", []), ("mugcp.export", []), ("mugcp.data", []), ("mugcp.data", ["check"]),
]

CHILD = """
import io, json, runpy, sys
from contextlib import redirect_stdout
module, args = sys.argv[1], sys.argv[2:]
sys.argv = ["python -m " + module, *args]
printed = io.StringIO()
with redirect_stdout(printed):
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
        status = 0
    except SystemExit as stop:
        status = stop.code
heavy = sorted(name for name in ("torch", "torchvision", "open_clip", "transformers", "safetensors")
               if name in sys.modules)
print(json.dumps({"status": status, "heavy": heavy, "help": printed.getvalue()}))
"""


def help_of(module: str, args: list[str]) -> dict:
    done = subprocess.run([sys.executable, "-c", CHILD, module, *args, "--help"],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("module, args", COMMANDS, ids=[" ".join([m, *a]) for m, a in COMMANDS])
def test_help_imports_no_torch(module, args):
    result = help_of(module, args)
    assert result["status"] in (0, None), result
    assert result["heavy"] == [], f"{module} {' '.join(args)} --help imported {result['heavy']}"
    assert result["help"].startswith(f"usage: python -m {' '.join([module, *args])}"), result["help"]


def test_data_help_names_its_commands():
    result = help_of("mugcp.data", [])
    assert result["status"] in (0, None)
    assert "check" in result["help"] and "python -m mugcp.data check --help" in result["help"]
