"""``mugcp.sweep --launcher slurm`` / ``--status`` against a real single-node Slurm (the ``slurm_cluster`` fixture).

Runs use a 3-layer CLIP registered in every child by a ``sitecustomize`` on PYTHONPATH (as in
test_sweep_ownership), so a run costs its interpreter start and little else; Slurm tasks inherit the
environment the sweep was submitted from. The tests without the cluster come first.
"""
import json
import os
import re
import subprocess
import sys
import threading
import time
from argparse import Namespace
from pathlib import Path

import pytest
import yaml
from fixtures import make_coop_dataset
from released_reference import TINY_CLIP, TINY_CONFIG

from mugcp.launch.slurm import SlurmError
from mugcp.sweep import main as sweep_main
from mugcp.sweeps import load_sweep

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ["red_fox", "blue_whale", "snow_owl", "sand_cat"]
TINY = {"model.pretrained": "none", "model.backbone": TINY_CLIP, "data.batch_size": 4, "data.eval_batch_size": 8,
        "data.max_eval_per_class": 1, "data.protocol": "all", "optim.epochs": 2, "optim.warmup_epochs": 0,
        "train.tensorboard": False, "train.log_every": 1}
WAIT_S = 240


def write_sweep(path, **fields):
    path.write_text(yaml.safe_dump(fields, sort_keys=False))
    return path


def grid(tmp_path, methods, seeds, name="grid.yaml", data=None, **overrides):
    data = data or make_coop_dataset(tmp_path, "dtd", CLASSES)
    return write_sweep(tmp_path / name, datasets=["dtd"], seeds=seeds, methods=methods, shots=[1],
                       overrides={"data.root": str(data), **TINY, **overrides},
                       method_overrides={"coop": {"method.n_ctx": 2}} if "coop" in methods else {})


@pytest.fixture
def tiny_env(tmp_path, monkeypatch):
    """Every child (local or Slurm task) sees the 3-layer CLIP as an open_clip model."""
    site = tmp_path / "site"
    (site / "models").mkdir(parents=True)
    (site / "models" / f"{TINY_CLIP}.json").write_text(json.dumps(TINY_CONFIG))
    (site / "sitecustomize.py").write_text("import pathlib, open_clip\n"
                                           "open_clip.add_model_config(pathlib.Path(__file__).parent / 'models')\n")
    monkeypatch.setenv("PYTHONPATH", f"{site}{os.pathsep}{ROOT}")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("mugcp.launch.slurm_sweep.POLL_S", 0.5)
    return dict(os.environ)


def metrics_of(folder: Path) -> dict:
    cost = ("time_s", "memory_mb", "images_per_s")  # how long, how much: not what

    def what(entry):
        if not isinstance(entry, dict):
            return entry
        return {key: what(value) for key, value in entry.items() if not key.endswith(cost)}

    return what(json.loads((folder / "metrics.json").read_text()))


def same_weights(first: Path, second: Path) -> bool:
    from safetensors.torch import load_file

    weights = [load_file(str(folder / "checkpoint" / "adapter_model.safetensors")) for folder in (first, second)]
    return (weights[0].keys() == weights[1].keys()
            and all((weights[0][key] == weights[1][key]).all() for key in weights[0]))


def recorded(root: Path) -> dict:
    return json.loads((root / "slurm_jobs.json").read_text())["jobs"]


# ---- without the cluster ----------------------------------------------------------------------

def test_slurm_section_and_flags_make_the_options(tmp_path):
    from mugcp.launch.slurm_sweep import sweep_options

    sweep = load_sweep(grid(tmp_path, ["coop"], [1], data=tmp_path))
    assert sweep.slurm is None
    path = write_sweep(tmp_path / "s.yaml", **yaml.safe_load(sweep.path.read_text()),
                       slurm={"partition": "gpu", "time": "1:30:00", "gpus-per-run": 1, "mem": "16G"})
    flags = Namespace(slurm_partition=None, slurm_time="20", slurm_cpus_per_run=4)
    options = sweep_options(load_sweep(path), flags)
    assert ((options.partition, options.time, options.gpus_per_run, options.mem, options.cpus_per_run)
            == ("gpu", 20, 1, "16G", 4))
    bad = write_sweep(tmp_path / "bad.yaml", **yaml.safe_load(sweep.path.read_text()), slurm={"gpus": 1})
    with pytest.raises(SlurmError, match=rf"^{re.escape(str(bad))}: slurm: unknown key\(s\) gpus; "
                                         r"valid keys: partition, time, gpus_per_run"):
        sweep_options(load_sweep(bad), Namespace())


def test_without_slurm_the_launcher_says_so_in_one_line(tmp_path):
    sweep = grid(tmp_path, ["coop"], [1], data=tmp_path)
    done = subprocess.run([sys.executable, "-m", "mugcp.sweep", str(sweep), "--launcher", "slurm"],
                          capture_output=True, text=True, cwd=ROOT, timeout=120,
                          env=dict(os.environ, PATH=str(tmp_path / "nowhere")))
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.splitlines() == ["error: --launcher slurm: sbatch not found: --launcher slurm runs where "
                                        "Slurm's commands are on PATH (a cluster's login node)"]


def test_launcher_flags_that_do_not_fit_are_parser_errors(tmp_path, capsys):
    sweep = grid(tmp_path, ["coop"], [1], data=tmp_path)
    for argv, message in (([str(sweep), "--wait"], "--wait follows Slurm jobs"),
                          ([str(sweep), "--launcher", "slurm", "--jobs", "2"], "--jobs is for the local launcher")):
        with pytest.raises(SystemExit) as stop:
            sweep_main(argv)
        assert stop.value.code == 2 and message in capsys.readouterr().err


# ---- on the cluster -----------------------------------------------------------------------------

@pytest.mark.slow  # 4 local + 4 Slurm runs: ~100 s measured on the 2 shared cores at load 4-7
def test_a_sweep_on_slurm_gives_the_local_metrics_and_reruns_skip_it(slurm_cluster, tmp_path, tiny_env, capsys):
    sweep = grid(tmp_path, ["zsclip", "coop"], [1, 2])
    local, cluster = tmp_path / "local", tmp_path / "slurm"
    assert sweep_main([str(sweep), "--root", str(local), "--no-progress"]) == 0
    capsys.readouterr()

    assert sweep_main([str(sweep), "--root", str(cluster), "--launcher", "slurm"]) == 0
    out = capsys.readouterr().out
    ids = {name: record["job_id"] for name, record in recorded(cluster).items()}
    names = [f"{method}_dtd_k1_s{seed}" for method in ("zsclip", "coop") for seed in (1, 2)]
    assert sorted(ids) == sorted(names) and len({job_id.split("_")[0] for job_id in ids.values()}) == 1  # one array
    for name in names:
        assert f"submitted {name} (new) as Slurm job {ids[name]}" in out
    assert "slurm: 4 submitted. Follow with: python -m mugcp.sweep" in out

    assert sweep_main([str(sweep), "--root", str(cluster), "--launcher", "slurm", "--wait", "--no-progress"]) == 0
    out = capsys.readouterr().out
    # All four are queued, running or finished already.
    assert ("slurm: nothing submitted: 4 already queued or running (left alone)" in out
            and not re.search("^submitted ", out, re.M))
    assert "sweep done: 4 done" in out and (cluster / "report" / "results.md").is_file()
    for name in names:
        assert metrics_of(cluster / name) == metrics_of(local / name)
        assert name.startswith("zsclip") or same_weights(cluster / name, local / name)
        assert (cluster / name / f"slurm-{ids[name]}.err").is_file()  # the run's Slurm output sits in its folder
        assert re.search(rf"^{name}\s+{ids[name]}\s+done\s+\S", out, re.M)
    local_table = (local / "report" / "results.md").read_text()
    cluster_table = (cluster / "report" / "results.md").read_text()
    # the times differ, the results not
    accuracy = [table.split("\n## Cost")[0] for table in (cluster_table, local_table)]
    assert accuracy[0] == accuracy[1].replace(str(local), str(cluster)) and "## Cost" in cluster_table

    assert sweep_main([str(sweep), "--root", str(cluster), "--launcher", "slurm"]) == 0  # nothing left to do
    out = capsys.readouterr().out
    assert "slurm: nothing submitted: 4 finished" in out and "Follow with" not in out
    assert {name: record["job_id"] for name, record in recorded(cluster).items()} == ids


def _until(condition, what: str, timeout: float = WAIT_S):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


@pytest.mark.slow  # 3 Slurm runs of 12 epochs: ~55 s measured at load 4-7
def test_a_run_cancelled_mid_training_resumes_on_rerun_to_the_uninterrupted_weights(slurm_cluster, tmp_path,
                                                                                    tiny_env, capsys):
    sweep = grid(tmp_path, ["coop"], [1], **{"optim.epochs": 12})
    stopped, whole = tmp_path / "stopped", tmp_path / "whole"
    for root in (stopped, whole):
        assert sweep_main([str(sweep), "--root", str(root), "--launcher", "slurm"]) == 0
    run = stopped / "coop_dtd_k1_s1"
    [first] = [record["job_id"] for record in recorded(stopped).values()]
    _until(lambda: (run / "checkpoint" / "trainer_state.pt").is_file(), "the first epoch checkpoint")
    subprocess.run(["scancel", first], check=True)
    capsys.readouterr()
    _until(lambda: sweep_main([str(sweep), "--root", str(stopped), "--status"]) == 1, "the run to end interrupted",
           timeout=60)
    out = capsys.readouterr().out
    assert re.search(rf"^coop_dtd_k1_s1\s+{first}\s+interrupted\b", out, re.M), out
    assert not (run / "metrics.json").exists()

    assert sweep_main([str(sweep), "--root", str(stopped), "--launcher", "slurm", "--wait", "--no-progress"]) == 0
    out = capsys.readouterr().out
    [second] = [record["job_id"] for record in recorded(stopped).values()]
    assert second != first and f"submitted coop_dtd_k1_s1 (resume) as Slurm job {second}" in out
    assert "resumed from" in (run / "log.txt").read_text()
    assert json.loads((run / "slurm_state.json").read_text())["command"][5] == "--resume"
    assert sweep_main([str(sweep), "--root", str(whole), "--launcher", "slurm", "--wait", "--no-progress"]) == 0
    assert same_weights(run, whole / "coop_dtd_k1_s1")
    assert metrics_of(run) == metrics_of(whole / "coop_dtd_k1_s1")


@pytest.mark.slow  # 2 Slurm runs, one failing at once: ~50 s measured at load 4-7
def test_a_failing_run_is_reported_by_status_and_resubmitted_by_a_rerun(slurm_cluster, tmp_path, tiny_env, capsys):
    (tmp_path / "data").mkdir()  # there, but empty: planning passes, the run fails reading it
    sweep = grid(tmp_path, ["zsclip"], [1], data=tmp_path / "data")
    root = tmp_path / "runs"
    argv = [str(sweep), "--root", str(root)]
    assert sweep_main([*argv, "--launcher", "slurm", "--wait", "--no-progress"]) == 1
    capsys.readouterr()
    assert sweep_main([*argv, "--status"]) == 1
    out = capsys.readouterr().out
    [failed] = [record["job_id"] for record in recorded(root).values()]
    assert re.search(rf"^zsclip_dtd_k1_s1\s+{failed}\s+failed\s+error: .*{re.escape(str(tmp_path / 'data'))}",
                     out, re.M), out
    assert "status: 1 failed" in out and not (root / "report").exists()

    make_coop_dataset(tmp_path, "dtd", CLASSES)  # the cause fixed: the data are there now
    assert sweep_main([*argv, "--launcher", "slurm", "--wait", "--no-progress"]) == 0
    out = capsys.readouterr().out
    [again] = [record["job_id"] for record in recorded(root).values()]
    assert again != failed and f"submitted zsclip_dtd_k1_s1 (new) as Slurm job {again}" in out
    assert sweep_main([*argv, "--status"]) == 0
    out = capsys.readouterr().out
    assert "status: 1 done" in out and (root / "report" / "results.md").is_file()


@pytest.mark.slow  # 2 concurrent submissions, 2 Slurm runs: ~50-75 s measured at load 4-7
def test_two_concurrent_submissions_run_each_run_once(slurm_cluster, tmp_path, tiny_env, capsys):
    from mugcp.launch.slurm import SlurmOptions
    from mugcp.launch.slurm_sweep import submit_sweep
    from mugcp.sweeps import plan

    sweep = grid(tmp_path, ["zsclip"], [1, 2])
    root = tmp_path / "runs"
    # Both planned, then released at the same instant: without the submission lock both would read an
    # empty record and submit every run (checked: this test fails with the flock removed).
    plans = [plan(load_sweep(sweep), root) for _ in range(2)]
    start, said, errors = threading.Barrier(2), ([], []), []

    def submit(index: int) -> None:
        try:
            start.wait()
            submit_sweep(plans[index], root, SlurmOptions(time=5), say=said[index].append)
        except Exception as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=submit, args=(index,)) for index in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(WAIT_S)
    assert errors == []
    outputs = ["\n".join(lines) for lines in said]
    jobs = recorded(root)
    for seed in (1, 2):
        name = f"zsclip_dtd_k1_s{seed}"
        submitted = [out for out in outputs if f"submitted {name} (new) as Slurm job {jobs[name]['job_id']}" in out]
        assert len(submitted) == 1, outputs
        other = outputs[1 - outputs.index(submitted[0])]
        assert re.search(rf"^queued {name} — (pending|running) as Slurm job {jobs[name]['job_id']}$",
                         other, re.M), outputs
    # A local sweep on the same root leaves the runs to their Slurm jobs (or finds them finished).
    launched = []
    assert sweep_main([str(sweep), "--root", str(root), "--no-progress"],
                      launcher=lambda job, env, log: launched.append(job) or 0) == 0
    assert launched == []
    local = capsys.readouterr().out
    for seed in (1, 2):
        name = f"zsclip_dtd_k1_s{seed}"
        assert re.search(rf"\] (elsewhere {name} — queued on Slurm: (pending|running) as job {jobs[name]['job_id']}"
                         rf"|skipped {name})", local), local
    command = [sys.executable, "-m", "mugcp.sweep", str(sweep), "--root", str(root), "--launcher", "slurm"]
    done = subprocess.run([*command, "--wait", "--no-progress"],
                          capture_output=True, text=True, cwd=ROOT, env=tiny_env, timeout=WAIT_S)
    assert done.returncode == 0 and "sweep done: 2 done" in done.stdout, done.stdout + done.stderr
    for seed in (1, 2):
        run = root / f"zsclip_dtd_k1_s{seed}"
        assert (run / "log.txt").read_text().count("method zsclip on") == 1
        assert len(list(run.glob("slurm-*.out"))) == 1  # one Slurm job ever ran in it


@pytest.mark.slow  # a Slurm training, then its evaluation
def test_a_transfer_sweep_evaluates_each_target_after_its_training(slurm_cluster, tmp_path, tiny_env, capsys):
    data = make_coop_dataset(tmp_path, "dtd", CLASSES)
    make_coop_dataset(tmp_path, "eurosat", CLASSES[:3])
    sweep = write_sweep(tmp_path / "transfer.yaml", protocol="cross_dataset", source="dtd", targets=["eurosat"],
                        seeds=[1], methods=["coop"], shots=[1],
                        overrides={"data.root": str(data), **TINY, "data.protocol": "all"},
                        method_overrides={"coop": {"method.n_ctx": 2, "method.ctx_init": ""}})
    root = tmp_path / "runs"
    assert sweep_main([str(sweep), "--root", str(root), "--launcher", "slurm", "--wait", "--no-progress"]) == 0
    out = capsys.readouterr().out
    jobs = recorded(root)
    train, evaluation = jobs["coop_dtd_k1_s1"]["job_id"], jobs["coop_dtd_k1_s1/eval_eurosat"]["job_id"]
    assert f"submitted coop_dtd_k1_s1/eval_eurosat (new) as Slurm job {evaluation}" in out and evaluation != train
    states = [json.loads((root / folder / "slurm_state.json").read_text())
              for folder in ("coop_dtd_k1_s1", "coop_dtd_k1_s1/eval_eurosat")]
    assert states[1]["started"] >= states[0]["ended"]  # the evaluation waited for its training
    target = json.loads((root / "coop_dtd_k1_s1" / "eval_eurosat" / "metrics.json").read_text())
    assert target["dataset"] == "eurosat" and target["all"]["classes"] == 3
    assert "| method | source: dtd | eurosat | Average |" in (root / "report" / "results.md").read_text()
