"""Issue 21.5: Slurm's error paths. A refused or unreachable submission is one line with the fix, said once, and
leaves nothing behind; ``--status`` of a finished sweep needs no controller; a task cancelled while pending says
so; a bad ``slurm:`` key fails ``--dry-run``; a rerun with nothing to submit says that nothing was submitted.

The tests marked ``slurm_cluster`` use the private cluster (tests/slurm_cluster.py); the others need at most
Slurm's commands on PATH and submitit (the controller they meet is none, or a dead one).
"""
import json
import subprocess
import sys
import time

import pytest
import yaml

from mugcp.cli import run_cli
from mugcp.launch.slurm import SlurmError, SlurmOptions, job_states, slurm_available, submit_commands
from mugcp.sweep import main as sweep_main

WAIT_S = 45
HINT = "check that SLURM_CONF names the cluster's slurm.conf and that `sinfo` lists its partitions."
needs_slurm_commands = pytest.mark.skipif(slurm_available() is not None, reason=str(slurm_available()))


def write_sweep(tmp_path, name="grid.yaml", **extra):
    fields = dict(protocol="grid", datasets=["dtd"], seeds=[1, 2], methods=["zsclip"], shots=[1],
                  overrides={"data.root": str(tmp_path)}, **extra)
    path = tmp_path / name
    path.write_text(yaml.safe_dump(fields, sort_keys=False))
    return path


def one_line_error(argv, capsys) -> str:
    with pytest.raises(SystemExit) as stop:
        run_cli(lambda: sweep_main(argv))
    out, err = capsys.readouterr()
    assert stop.value.code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def finish_runs(tmp_path, sweep, root):
    """The sweep's runs as finished (metrics.json), with a record of the Slurm jobs that ran them."""
    from mugcp.sweeps import load_sweep, plan

    jobs = plan(load_sweep(sweep), root)
    records = {}
    for index, job in enumerate(jobs):
        job.folder.mkdir(parents=True)
        (job.folder / "metrics.json").write_text(json.dumps({
            "method": "zsclip", "dataset": "dtd", "protocol": "all", "shots": 1, "backbone": "ViT-B-32",
            "seed": index + 1, "pretrained": False, "all": {"accuracy": 50.0}}))
        records[job.name] = {"job_id": f"4242_{index}", "folder": str(job.folder), "mode": "new", "submitted": "then"}
    (root / "slurm_jobs.json").write_text(json.dumps({"version": 1, "jobs": records}))
    return jobs


# ---- without a cluster --------------------------------------------------------------------------

@pytest.mark.parametrize("section, message", [
    ({"timee": 5}, "slurm: unknown key(s) timee (did you mean time?); valid keys: partition, time,"),
    ({"time": "abc"}, "slurm.time: cannot read the time limit 'abc'; use minutes (90), MM:SS"),
])
def test_a_bad_slurm_section_fails_dry_run_in_one_line(tmp_path, capsys, section, message):
    sweep = write_sweep(tmp_path, slurm=section)
    err = one_line_error([str(sweep), "--root", str(tmp_path / "runs"), "--dry-run"], capsys)
    assert err.startswith(f"error: {sweep}: {message}") and not (tmp_path / "runs").exists()


@needs_slurm_commands
@pytest.mark.parametrize("conf", [None, pytest.param("dead", marks=pytest.mark.slow)])  # dead: ~9 s of sbatch retries
def test_without_a_reachable_controller_sbatch_is_said_once_with_the_fix_and_nothing_is_left(tmp_path, capsys,
                                                                                             monkeypatch, conf):
    if conf is None:
        monkeypatch.delenv("SLURM_CONF", raising=False)
        said = "no Slurm controller answered (SLURM_CONF is unset)"
    else:  # a cluster that is stopped: nothing listens on its controller's port
        dead = tmp_path / "slurm.conf"
        dead.write_text("ClusterName=gone\nSlurmctldHost=localhost(127.0.0.1)\nSlurmctldPort=9\n"
                        "NodeName=localhost CPUs=1\nPartitionName=p Nodes=localhost Default=YES\n")
        monkeypatch.setenv("SLURM_CONF", str(dead))
        said = f"no Slurm controller answered (SLURM_CONF={dead})"
    sweep = write_sweep(tmp_path)
    err = one_line_error([str(sweep), "--root", str(tmp_path / "runs"), "--launcher", "slurm"], capsys)
    assert err.startswith(f"error: sbatch could not submit: {said}; {HINT} sbatch said: sbatch: ")
    assert not (tmp_path / "runs").exists()  # no run folders, no .submitit pickles or script, no lock file


@needs_slurm_commands
def test_a_refused_submission_removes_only_what_it_created(tmp_path, monkeypatch):
    monkeypatch.delenv("SLURM_CONF", raising=False)
    log, kept, new = tmp_path / "log", tmp_path / "kept", tmp_path / "new"
    (log / "1234").mkdir(parents=True)
    (log / "earlier.pkl").write_text("an earlier submission's")
    kept.mkdir()
    (kept / "notes.txt").write_text("mine")
    command = [sys.executable, "-c", "pass"]
    with pytest.raises(SlurmError, match="^sbatch could not submit: no Slurm controller answered"):
        submit_commands([command, command], [kept, new], SlurmOptions(), log_folder=log)
    assert (sorted(p.name for p in log.iterdir()) == ["1234", "earlier.pkl"]
            and (kept / "notes.txt").read_text() == "mine")
    assert not new.exists()


@needs_slurm_commands
def test_status_of_a_finished_sweep_needs_no_controller(tmp_path, capsys, monkeypatch):
    sweep, root = write_sweep(tmp_path), tmp_path / "runs"
    finish_runs(tmp_path, sweep, root)
    monkeypatch.delenv("SLURM_CONF", raising=False)  # squeue could answer nothing
    assert sweep_main([str(sweep), "--root", str(root), "--status"]) == 0
    out = capsys.readouterr().out
    assert [line.split()[:3] for line in out.splitlines()[2:4]] == [["zsclip_dtd_k1_s1", "4242_0", "done"],
                                                                    ["zsclip_dtd_k1_s2", "4242_1", "done"]]
    assert "status: 2 done" in out and (root / "report" / "results.md").is_file()


@needs_slurm_commands
def test_a_rerun_with_nothing_to_submit_says_so(tmp_path, capsys):
    sweep, root = write_sweep(tmp_path), tmp_path / "runs"
    finish_runs(tmp_path, sweep, root)
    (root / "slurm_jobs.json").unlink()  # finished by a local sweep: no Slurm job to ask about
    assert sweep_main([str(sweep), "--root", str(root), "--launcher", "slurm"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[-1] == "slurm: nothing submitted: 2 finished" and "Follow with" not in out


# ---- on the cluster -----------------------------------------------------------------------------

@pytest.mark.parametrize("flag, value, words", [
    ("--slurm-partition", "no-such-partition", "invalid partition"),
    ("--slurm-mem", "900T", "memory"),
    ("--slurm-gpus-per-run", "3", "gres"),
])
def test_a_refusal_by_the_controller_is_said_once_and_leaves_nothing(slurm_cluster, tmp_path, capsys,
                                                                     flag, value, words):
    sweep = write_sweep(tmp_path)
    err = one_line_error([str(sweep), "--root", str(tmp_path / "runs"), "--launcher", "slurm", flag, value], capsys)
    assert err.startswith("error: sbatch refused the job: sbatch: error: ") and words in err.lower()
    assert err.count("sbatch: error: Batch job submission failed") <= 1
    assert not (tmp_path / "runs").exists()


def test_a_task_cancelled_before_it_started_is_cancelled_not_interrupted(slurm_cluster, tmp_path):
    folders = [tmp_path / "first", tmp_path / "second"]
    started = "import pathlib, sys, time; pathlib.Path(sys.argv[1], 'started').touch(); time.sleep(60)"
    commands = [[sys.executable, "-c", started, str(folder)] for folder in folders]
    ids = submit_commands(commands, folders, SlurmOptions(time=5, array_parallelism=1), log_folder=tmp_path / "log")
    deadline = time.monotonic() + WAIT_S
    while not (folders[0] / "started").exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert job_states(dict(zip(ids, folders))) == {ids[0]: "running", ids[1]: "pending"}
    subprocess.run(["scancel", ids[0].split("_")[0]], check=True)
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        states = job_states(dict(zip(ids, folders)))
        if states[ids[0]] != "running":
            break
        time.sleep(0.3)
    assert states == {ids[0]: "interrupted", ids[1]: "cancelled"}
    assert not (folders[1] / "started").exists()
