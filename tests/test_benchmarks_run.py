"""The benchmark suite, as the design card runs it (`pytest benchmarks/ --benchmark-only`), passes here:
its benchmarks assert their own results against the reference paths, so a benchmark that breaks is a
failing test, not a missing number. About 11 minutes on a 2-core CPU (2026-12-05)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_benchmark_suite_passes():
    command = [sys.executable, "-m", "pytest", "benchmarks/", "--benchmark-only", "-q", "-p", "no:cacheprovider"]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=3600)
    tail = "\n".join((done.stdout + done.stderr).splitlines()[-30:])
    assert done.returncode == 0, tail
    assert " passed" in tail and " failed" not in tail, tail
