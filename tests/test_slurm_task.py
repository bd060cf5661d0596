"""What runs inside a Slurm job needs no importable mugcp: ``slurm_task`` travels by value (cloudpickle),
and the run-folder names it uses from ``mugcp.runs.layout`` travel with it as plain strings."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from mugcp.launch.slurm import pickle_tasks_by_value
from mugcp.launch.slurm_task import CommandTask, read_state
from mugcp.runs.layout import SLURM_STATE_FILE

UNPICKLE_AND_RUN = """
import pickle, sys
sys.modules["mugcp"] = None  # any import of mugcp now fails, as on a node without this checkout
with open(sys.argv[1], "rb") as handle:
    task = pickle.load(handle)
sys.exit(task())
"""


def test_a_task_runs_where_mugcp_cannot_be_imported(tmp_path):
    cloudpickle = pytest.importorskip("cloudpickle")
    pickle_tasks_by_value()
    folder = tmp_path / "run"
    task = CommandTask([sys.executable, "-c", "print('hello from the job')"], folder, resume_args=(), requeue=False)
    payload = tmp_path / "task.pkl"
    payload.write_bytes(cloudpickle.dumps(task))
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-c", UNPICKLE_AND_RUN, str(payload)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    record = json.loads((folder / SLURM_STATE_FILE).read_text(encoding="utf-8"))
    assert (record["job_id"], record["state"], record["returncode"]) == ("local", "done", 0)
    assert read_state(folder) == record
    assert (folder / "slurm-local.out").read_text(encoding="utf-8") == "hello from the job\n"
