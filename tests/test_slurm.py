"""mugcp.launch.slurm against a real single-node Slurm (the `slurm_cluster` fixture, tests/slurm_cluster.py).

Every job runs a small Python script of this file in its own folder; the scripts block on a file
the test creates, so the states seen in between (pending, running) are certain, not timed.
"""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("submitit", reason="submitit is not installed: pip install -e '.[slurm]'")

from mugcp.launch.slurm import (  # noqa: E402
    SlurmOptions,
    job_states,
    last_log_line,
    submit_commands,
    submit_distributed,
    wait_for_jobs,
)
from mugcp.launch.slurm_task import read_state  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
WAIT_S = 45

# Records its arguments and working folder, says it started, waits for `go` (or exits at once when
# resumed), prints to both streams and exits with the code in `code.txt` (0 if absent); notes a SIGTERM.
WORKER = """
import json, os, pathlib, signal, sys, time
here = pathlib.Path(sys.argv[2])
def stop(signum, frame):  # where a real run would save its checkpoint
    with open(here / "stopped", "a") as note:
        note.write(signal.Signals(signum).name + "\\n")
    sys.exit(143)
signal.signal(signal.SIGTERM, stop)
with open(here / "calls.jsonl", "a") as calls:
    wrapper_has_torch = "libtorch" in pathlib.Path(f"/proc/{os.getppid()}/maps").read_text()
    calls.write(json.dumps({"argv": sys.argv[1:], "cwd": os.getcwd(), "restarts": os.environ.get("SLURM_RESTART_COUNT"),
                            "wrapper_has_torch": wrapper_has_torch}) + "\\n")
(here / "started").touch()
if "--resume" not in sys.argv:
    while not (here / "go").exists():
        time.sleep(0.1)
print("out", sys.argv[1])
print("err", sys.argv[1], file=sys.stderr)
sys.exit(int((here / "code.txt").read_text()) if (here / "code.txt").exists() else 0)
"""


def _worker(tmp_path: Path, names, codes=None):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    folders = [tmp_path / name for name in names]
    for folder, code in zip(folders, codes or [None] * len(names)):
        folder.mkdir()
        if code is not None:
            (folder / "code.txt").write_text(str(code))
    commands = [[sys.executable, str(script), name, str(folder)] for name, folder in zip(names, folders)]
    return commands, folders


def _until(condition, what: str, timeout: float = WAIT_S):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def _calls(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "calls.jsonl").read_text().splitlines()]


def test_an_array_runs_each_command_in_its_folder_with_its_output_there(slurm_cluster, tmp_path):
    commands, folders = _worker(tmp_path, ["a", "b"])
    for folder in folders:
        (folder / "go").touch()
    ids = submit_commands(commands, folders, SlurmOptions(time=5), name="two", log_folder=tmp_path / "log")
    assert (len(ids) == 2 and ids[0].endswith("_0") and ids[1].endswith("_1")
            and ids[0].split("_")[0] == ids[1].split("_")[0])
    states = wait_for_jobs(dict(zip(ids, folders)), timeout_s=WAIT_S, poll_s=0.3)
    assert states == {ids[0]: "done", ids[1]: "done"}
    for job_id, folder, name in zip(ids, folders, ["a", "b"]):
        # SLURM_RESTART_COUNT is set on a requeue only. The task travels by value: the job's wrapper
        # process never imports mugcp (so neither torch nor open_clip).
        # The command runs where it was submitted from (relative paths mean the same as locally).
        assert _calls(folder) == [{"argv": [name, str(folder)], "cwd": os.getcwd(), "restarts": None,
                                   "wrapper_has_torch": False}]
        assert (folder / f"slurm-{job_id}.out").read_text() == f"out {name}\n"
        assert (folder / f"slurm-{job_id}.err").read_text() == f"err {name}\n"
        record = read_state(folder)
        assert (record["job_id"], record["state"], record["returncode"], record["restarts"]) == (job_id, "done", 0, 0)


def test_states_pending_running_done_failed_from_squeue_and_the_state_file(slurm_cluster, tmp_path):
    commands, folders = _worker(tmp_path, ["ok", "bad"], codes=[None, 3])
    # One task at a time: the second stays pending while the first runs.
    ids = submit_commands(commands, folders, SlurmOptions(time=5, array_parallelism=1), log_folder=tmp_path / "log")
    jobs = dict(zip(ids, folders))
    _until(lambda: (folders[0] / "started").exists(), "the first task to start")
    assert job_states(jobs) == {ids[0]: "running", ids[1]: "pending"}
    (folders[0] / "go").touch()
    _until(lambda: (folders[1] / "started").exists(), "the second task to start")
    assert job_states(jobs)[ids[1]] == "running"
    (folders[1] / "go").touch()
    assert wait_for_jobs(jobs, timeout_s=WAIT_S, poll_s=0.3) == {ids[0]: "done", ids[1]: "failed"}
    assert read_state(folders[1])["returncode"] == 3
    assert (folders[1] / f"slurm-{ids[1]}.err").read_text() == "err bad\n"
    assert last_log_line(folders[1], ids[1]) == "err bad"


def test_a_job_slurm_has_forgotten_is_told_by_its_state_file(slurm_cluster, tmp_path):
    # Past MinJobAge squeue answers "Invalid job id"; the folder's record of that same job decides.
    done, stale, empty = tmp_path / "done", tmp_path / "stale", tmp_path / "empty"
    for folder, record in ((done, {"job_id": "999991", "state": "done"}),
                           (stale, {"job_id": "999992", "state": "running"})):
        folder.mkdir()
        (folder / "slurm_state.json").write_text(json.dumps(record))
    empty.mkdir()
    assert job_states({"999991": done, "999992": stale, "999993": empty}) == {
        "999991": "done", "999992": "interrupted", "999993": "interrupted"}


def test_scancel_mid_run_is_interrupted(slurm_cluster, tmp_path):
    commands, folders = _worker(tmp_path, ["c"])
    [job_id] = submit_commands(commands, folders, SlurmOptions(time=5), log_folder=tmp_path / "log")
    _until(lambda: (folders[0] / "started").exists(), "the task to start")
    subprocess.run(["scancel", job_id], check=True)
    assert wait_for_jobs({job_id: folders[0]}, timeout_s=WAIT_S, poll_s=0.3) == {job_id: "interrupted"}
    _until(lambda: read_state(folders[0]).get("state") == "interrupted", "the task to record the stop", timeout=15)
    assert read_state(folders[0])["returncode"] == 143  # the command's own exit on SIGTERM: still "interrupted"
    assert (folders[0] / "stopped").read_text() == "SIGTERM\n"


def test_preemption_signal_and_requeue_rerun_the_task_with_resume(slurm_cluster, tmp_path):
    commands, folders = _worker(tmp_path, ["signalled", "requeued"])
    ids = submit_commands(commands, folders, SlurmOptions(time=5), log_folder=tmp_path / "log")
    for folder in folders:
        _until(lambda: (folder / "started").exists(), f"{folder.name} to start")
    # What Slurm sends at --signal=USR2@90 before the time limit (and submitit's own test hook):
    # submitit calls the task's checkpoint, which requeues it.
    subprocess.run(["scancel", "--signal=USR2", ids[0]], check=True)
    # Pre-emption or an admin's requeue: Slurm requeues the job itself.
    subprocess.run(["scontrol", "requeue", ids[1]], check=True)
    states = wait_for_jobs(dict(zip(ids, folders)), timeout_s=WAIT_S, poll_s=0.5)
    assert states == {ids[0]: "done", ids[1]: "done"}
    # USR2 reaches every process of the step; the command ignores it and gets SIGTERM from the task, with
    # time to save, instead of dying of USR2 (Slurm's requeue sends SIGTERM itself).
    assert (folders[0] / "stopped").read_text() == (folders[1] / "stopped").read_text() == "SIGTERM\n"
    for folder, name in zip(folders, ["signalled", "requeued"]):
        assert [call["argv"] for call in _calls(folder)] == [[name, str(folder)], [name, str(folder), "--resume"]]
        assert [call["restarts"] for call in _calls(folder)] == [None, "1"]
        assert read_state(folder)["restarts"] == 1


def test_without_requeue_the_signal_ends_the_task_interrupted(slurm_cluster, tmp_path):
    commands, folders = _worker(tmp_path, ["once"])
    [job_id] = submit_commands(commands, folders, SlurmOptions(time=5), requeue=False, log_folder=tmp_path / "log")
    _until(lambda: (folders[0] / "started").exists(), "the task to start")
    subprocess.run(["scancel", "--signal=USR2", job_id], check=True)
    assert wait_for_jobs({job_id: folders[0]}, timeout_s=WAIT_S, poll_s=0.3) == {job_id: "interrupted"}
    assert [call["argv"] for call in _calls(folders[0])] == [["once", str(folders[0])]]


# The real mugcp.training.distributed, imported without running the package __init__ files (they load
# open_clip: ~10 s per process on a busy 2-core machine).
DISTRIBUTED = """
import json, os, pathlib, sys, types, torch
for name in ("mugcp", "mugcp.training"):
    package = types.ModuleType(name)
    package.__path__ = [os.path.join(os.environ["PYTHONPATH"], *name.split("."))]
    sys.modules[name] = package
from mugcp.training.distributed import Distributed
d = Distributed.from_env(torch.device("cpu"))
total = d.mean(torch.tensor([float(d.rank + 1)])) * d.world_size   # an all_reduce over the ranks
names = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
record = {"rank": d.rank, "world_size": d.world_size, "local_rank": d.local_rank, "sum": total.item(),
          "env": {name: os.environ.get(name) for name in names}}
pathlib.Path(sys.argv[1], f"rank{d.rank}.json").write_text(json.dumps(record))
d.close()
"""


def test_a_two_task_gloo_job_gets_ranks_from_slurm_and_all_reduces(slurm_cluster, tmp_path):
    script = tmp_path / "ddp.py"
    script.write_text(DISTRIBUTED)
    folder = tmp_path / "ddp"
    job_id = submit_distributed([sys.executable, str(script), str(folder)], folder,
                                SlurmOptions(time=5, nodes=1, gpus_per_node=0),
                                tasks_per_node=2, log_folder=tmp_path / "log", env={"PYTHONPATH": str(ROOT)})
    assert (wait_for_jobs({job_id: folder}, timeout_s=WAIT_S, poll_s=0.5)
            == {job_id: "done"}), (folder / f"slurm-{job_id}.err").read_text()
    records = [json.loads((folder / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    for rank, record in enumerate(records):
        assert (record["rank"], record["world_size"], record["local_rank"]) == (rank, 2, rank)
        assert record["sum"] == 3.0  # 1 + 2
        assert (record["env"]["RANK"] == str(rank) and record["env"]["WORLD_SIZE"] == "2"
                and record["env"]["LOCAL_WORLD_SIZE"] == "2")
    assert records[0]["env"]["MASTER_ADDR"] == records[1]["env"]["MASTER_ADDR"] == slurm_cluster.node
    assert records[0]["env"]["MASTER_PORT"] == records[1]["env"]["MASTER_PORT"]
    assert (folder / f"slurm-{job_id}.rank1.out").exists()


def test_options_reach_sbatch_and_a_refusal_is_one_slurm_error(slurm_cluster, tmp_path):
    from mugcp.launch.slurm import SlurmError

    folder = tmp_path / "opts"
    options = SlurmOptions(partition=slurm_cluster.partition, time="0:03:00", cpus_per_run=1, mem="100M",
                           setup=["export MUGCP_SETUP_MARK=from-setup"])
    command = [sys.executable, "-c",
               "import os; print(os.environ.get('MUGCP_SETUP_MARK'), os.environ['SLURM_CPUS_PER_TASK'])"]
    [job_id] = submit_commands([command], [folder], options, name="opts", log_folder=tmp_path / "log")
    shown = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True, check=True).stdout
    assert "JobName=opts" in shown and "TimeLimit=00:03:00" in shown and f"Partition={slurm_cluster.partition}" in shown
    assert "MinMemoryNode=100M" in shown
    assert wait_for_jobs({job_id: folder}, timeout_s=WAIT_S, poll_s=0.3) == {job_id: "done"}
    assert (folder / f"slurm-{job_id}.out").read_text() == "from-setup 1\n"
    with pytest.raises(SlurmError, match="sbatch refused the job: .*[Pp]artition"):
        submit_commands([command], [tmp_path / "nowhere"], SlurmOptions(partition="no-such-partition"),
                        log_folder=tmp_path / "log")
