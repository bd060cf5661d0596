"""How long ``--help`` of every command takes, as a user runs it (issue 16: under 1 s, no torch).

    pytest benchmarks/test_bench_cli.py --benchmark-only

Each round is a fresh ``python -m mugcp.<command> --help`` process, so the time is the interpreter's
start, the imports before argument parsing and the help text. ``import torch`` alone is timed beside
them: it is what every ``--help`` paid before. One more, untimed run per command reports the
process's peak resident memory (``peak_rss_mb``) and whether torch was imported.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.conftest import cpu_model

ROOT = Path(__file__).resolve().parent.parent
COMMANDS = ["train", "evaluate", "predict", "sweep", "extract", "report", "convert", "export", "data", "data check"]

# Runs one command's --help the way `python -m` does, then reports its own peak memory and imports.
# Peak memory is VmHWM, not ru_maxrss: a child started from this (torch-sized) process inherits its ru_maxrss.
PROBE = """
import json, re, runpy, sys
module, args = sys.argv[1], sys.argv[2:]
sys.argv = ["python -m " + module, *args]
try:
    runpy.run_module(module, run_name="__main__", alter_sys=True)
except SystemExit:
    pass
peak_kb = int(re.search(r"VmHWM:\\s+(\\d+) kB", open("/proc/self/status").read()).group(1))
print(json.dumps({"peak_rss_mb": peak_kb / 1024, "torch": "torch" in sys.modules}), file=sys.stderr)
"""


def run_quietly(argv: list[str]) -> subprocess.CompletedProcess:
    done = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr
    return done


@pytest.mark.parametrize("command", COMMANDS)
def test_help(benchmark, command):
    module, *args = f"mugcp.{command}".split()
    argv = [sys.executable, "-m", module, *args, "--help"]
    benchmark.pedantic(lambda: run_quietly(argv), rounds=7, iterations=1, warmup_rounds=1)
    probe = json.loads(
        run_quietly([sys.executable, "-c", PROBE, module, *args, "--help"]).stderr.strip().splitlines()[-1])
    benchmark.extra_info.update({"cpu": cpu_model(), "cpu_count": os.cpu_count(), **probe})
    assert not probe["torch"]


def test_import_torch_for_comparison(benchmark):
    benchmark.pedantic(lambda: run_quietly([sys.executable, "-c", "import torch"]), rounds=5, iterations=1,
                       warmup_rounds=1)
    probe = run_quietly([sys.executable, "-c", "import re, torch; print(re.search(r'VmHWM:\\s+(\\d+) kB', "
                                               "open('/proc/self/status').read()).group(1))"])
    benchmark.extra_info.update({"cpu": cpu_model(), "cpu_count": os.cpu_count(),
                                 "peak_rss_mb": int(probe.stdout.strip()) / 1024})
