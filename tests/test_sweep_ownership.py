"""Sweeps run what they say and own what they run: released recipes and resolved configs (--dry-run --json),
schema checks up front, changed runs, run-folder locks, two sweeps on one root, signals to the sweep alone.

The process tests start real sweeps whose runs use a 3-layer CLIP (registered in every child by a
``sitecustomize`` on PYTHONPATH), so a run costs its interpreter start and little else."""
import json
import multiprocessing
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from fixtures import make_coop_dataset
from released_reference import TINY_CLIP, TINY_CONFIG, tiny_clip

from mugcp.cli import user_errors
from mugcp.config import ConfigError
from mugcp.recipes import recipe_for
from mugcp.runs import run_setup
from mugcp.runs.run_lock import PROBE_GRACE_S, RunFolderBusy, RunLock, empty_run_folder, holder
from mugcp.sweep import main as sweep_main

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ["red_fox", "blue_whale", "snow_owl", "sand_cat"]
TINY = {"model.pretrained": "none", "data.batch_size": 2, "data.eval_batch_size": 8, "data.max_eval_per_class": 1,
        "optim.epochs": 2, "optim.warmup_epochs": 0, "train.tensorboard": False}


def write_sweep(path, **fields):
    path.write_text(yaml.safe_dump(fields, sort_keys=False))
    return path


@pytest.fixture
def small_clip(monkeypatch):
    clip = tiny_clip()
    monkeypatch.setattr(run_setup, "load_clip", lambda *args, **kwargs: clip)
    return clip


def in_process(job, env, log_path):
    """A job's exact command line, run in this process (sharing the test's small backbone)."""
    from mugcp.evaluate import main as evaluate_main
    from mugcp.train import main as train_main

    try:
        return {"mugcp.train": train_main, "mugcp.evaluate": evaluate_main}[job.module](job.command()[3:]) or 0
    except user_errors() as err:
        log_path.write_text(f"error: {err}\n")
        return 2


def dry_run_json(argv, capsys) -> list[dict]:
    assert sweep_main([*argv, "--dry-run", "--json"]) == 0
    out, err = capsys.readouterr()
    return [json.loads(line) for line in out.splitlines()], err


def test_every_run_gets_its_released_recipe_and_dry_run_json_is_what_config_yaml_holds(tmp_path, small_clip, capsys):
    data = make_coop_dataset(tmp_path, "dtd", CLASSES)
    sweep = write_sweep(tmp_path / "b2n.yaml", protocol="base2new", datasets=["dtd"], seeds=[1, 2],
                        methods=["coop", "kgcoop"], shots=[1],
                        overrides={"data.root": str(data), **TINY, "data.batch_size": 4},
                        method_overrides={"coop": {"optim.lr": 0.01}})
    argv = [str(sweep), "--root", str(tmp_path / "runs"), "--no-progress"]
    runs, err = dry_run_json(argv, capsys)
    assert [(r["method"], r["dataset"], r["seed"], r["shots"], r["mode"]) for r in runs] == [
        ("coop", "dtd", 1, 1, "new"), ("coop", "dtd", 2, 1, "new"), ("kgcoop", "dtd", 1, 1, "new"),
        ("kgcoop", "dtd", 2, 1, "new")]
    coop, kgcoop = runs[0]["config"], runs[2]["config"]
    # The recipe's values, restated from the released scripts, where the sweep sets nothing ...
    released = recipe_for("coop", "base2new", "dtd", 1).overrides
    assert coop["method"]["n_ctx"] == released["method"]["n_ctx"] == 4 and coop["method"]["ctx_init"] == "a photo of a"
    assert kgcoop["method"]["kg_weight"] == recipe_for("kgcoop", "base2new").overrides["method"]["kg_weight"] == 8.0
    # ... and the sweep's own settings over them: overrides, then method_overrides.
    assert coop["data"]["batch_size"] == kgcoop["data"]["batch_size"] == 4 and released["data"]["batch_size"] == 32
    assert coop["optim"]["lr"] == 0.01 and kgcoop["optim"]["lr"] == 0.002 and coop["optim"]["epochs"] == 2
    assert (runs[0]["recipe"]["path"].endswith("configs/recipes/coop/base2new.yaml")
            and runs[0]["recipe"]["released"] is False)
    assert runs[0]["command"][:4] == ["python", "-m", "mugcp.train", "--config"]
    # The released scripts run K = 16: said once per method, not once per run.
    assert err.count("recipe: coop (base2new): The released scripts do not run K = 1") == 1
    assert err.count("recipe: kgcoop (base2new):") == 1

    one_run = write_sweep(tmp_path / "one.yaml", protocol="base2new", datasets=["dtd"], seeds=[1], methods=["coop"],
                          shots=[1], overrides={"data.root": str(data), **TINY, "data.batch_size": 4},
                          method_overrides={"coop": {"optim.lr": 0.01}})
    argv = [str(one_run), "--root", str(tmp_path / "runs"), "--no-progress"]
    assert sweep_main(argv, launcher=in_process) == 0
    capsys.readouterr()
    assert yaml.safe_load((tmp_path / "runs" / "coop_dtd_k1_s1" / "config.yaml").read_text()) == coop
    from mugcp.train import main as train_main

    other = tmp_path / "elsewhere"
    assert train_main([*runs[1]["command"][3:], "--output", str(other), "--print-config"]) == 0  # creates nothing
    assert yaml.safe_load(capsys.readouterr().out) == runs[1]["config"] and not other.exists()
    assert dry_run_json(argv, capsys)[0][0]["mode"] == "done"  # the same config: nothing changed


def test_mugcps_borrowed_recipe_is_not_released_and_said_once_per_method(tmp_path, capsys):
    sweep = write_sweep(tmp_path / "b2n.yaml", protocol="base2new", datasets=["dtd", "eurosat"], seeds=[1, 2],
                        methods=["mugcp", "maple"], shots=[16], overrides={"data.root": str(tmp_path)})
    runs, err = dry_run_json([str(sweep), "--root", str(tmp_path / "runs")], capsys)
    mugcp = [r["recipe"] for r in runs if r["method"] == "mugcp"]
    assert len(mugcp) == 4 and all((r["released"], r["follows"]) == (False, "maple") for r in mugcp)
    assert all((r["recipe"]["released"], r["recipe"]["follows"]) == (True, None) for r in runs
               if r["method"] == "maple")
    assert err.count("recipe: mugcp (base2new): mugcp has no released recipes and follows maple's.\n") == 1
    assert "recipe: maple" not in err


def test_recipes_false_and_grid_sweeps_run_the_method_config_as_it_is(tmp_path, capsys):
    common = dict(datasets=["dtd"], seeds=[1], methods=["coop"], shots=[1], overrides={"data.root": str(tmp_path)})
    for name, fields in (("off", dict(protocol="base2new", recipes=False)), ("grid", dict(protocol="grid"))):
        runs, err = dry_run_json([str(write_sweep(tmp_path / f"{name}.yaml", **fields, **common)), "--root",
                                  str(tmp_path / name)], capsys)
        assert (runs[0]["recipe"] is None and "recipe:" not in err
                and "no released recipes: the method configs as they are" in err)
        assert (runs[0]["config"]["method"]["n_ctx"] == 16
                and runs[0]["config"]["data"]["batch_size"] == 32)  # configs/methods/coop.yaml
    with pytest.raises(ConfigError, match=r"'recipes' must be true .* or false"):
        sweep_main([str(write_sweep(tmp_path / "bad.yaml", recipes="no", **common)), "--dry-run"])


@pytest.mark.parametrize("fields, message", [
    ({"overrides": {"optim.max_step": 3}}, "overrides: unknown config key 'optim.max_step'. Did you mean: max_steps?"),
    ({"overrides": {"optim.max_steps": -3}}, "overrides: optim.max_steps=-3 is not allowed: expected"),
    ({"method_overrides": {"maple": {"optim.lr": "fast"}}}, "method_overrides.maple: optim.lr='fast' is not allowed"),
    ({"method_overrides": {"coop": {"method.n_ctxx": 2}}},
     "method_overrides.coop: method: method 'coop' has no option 'n_ctxx'"),
    ({"overrides": {"optim": {"lr": -1}}}, "overrides: optim.lr=-1 is not allowed: expected a number > 0"),
])
def test_dry_run_checks_every_run_against_the_schema_in_one_line(tmp_path, fields, message):
    sweep = write_sweep(tmp_path / "bad.yaml", protocol="base2new", datasets=["dtd", "eurosat"], seeds=[1, 2, 3],
                        methods=["coop", "maple"], shots=[16], **fields)
    with pytest.raises(ConfigError) as error:
        sweep_main([str(sweep), "--root", str(tmp_path / "runs"), "--dry-run"])
    assert str(error.value).startswith(f"{sweep}: ") and message in str(error.value) and "\n" not in str(error.value)
    assert not (tmp_path / "runs").exists()


def test_a_changed_run_is_reported_not_reused_and_rerun_into_a_fresh_folder(tmp_path, small_clip, capsys):
    data = make_coop_dataset(tmp_path, "dtd", CLASSES)
    fields = dict(datasets=["dtd"], seeds=[1], methods=["zsclip"], shots=[1],
                  overrides={"data.root": str(data), **TINY, "data.protocol": "all"})
    root = tmp_path / "runs"
    argv = [str(write_sweep(tmp_path / "grid.yaml", **fields)), "--root", str(root), "--no-progress"]
    assert sweep_main(argv, launcher=in_process) == 0
    first = root / "zsclip_dtd_k1_s1"
    before = (first / "metrics.json").read_bytes()

    fields["overrides"]["data.max_eval_per_class"] = 2
    write_sweep(tmp_path / "grid.yaml", **fields)
    capsys.readouterr()
    assert sweep_main(argv, launcher=in_process) == 1
    out, err = capsys.readouterr()
    assert "changed: zsclip_dtd_k1_s1 finished with another config: data.max_eval_per_class: 1 → 2" in err
    assert "Pass --rerun-changed" in err and "sweep done: 1 changed" in out
    assert (first / "metrics.json").read_bytes() == before and not (root / "zsclip_dtd_k1_s1_v2").exists()
    assert dry_run_json(argv, capsys)[0][0]["changes"] == {"data.max_eval_per_class": {"run": 1, "now": 2}}

    assert sweep_main([*argv, "--rerun-changed"], launcher=in_process) == 0
    out, _ = capsys.readouterr()
    fresh = root / "zsclip_dtd_k1_s1_v2"
    assert f"start zsclip_dtd_k1_s1 in {fresh.name} (config changed: data.max_eval_per_class: 1 → 2)" in out
    assert yaml.safe_load((fresh / "config.yaml").read_text())["data"]["max_eval_per_class"] == 2
    assert (first / "metrics.json").read_bytes() == before
    assert json.loads((first / "superseded.json").read_text())["by"] == str(fresh)
    fresh_metrics = json.loads((fresh / "metrics.json").read_text())
    assert fresh_metrics["all"]["total"] == 8  # 2 test images of each of the 4 classes
    table = (root / "report" / "results.md").read_text()
    assert (f"{fresh_metrics['all']['accuracy']:.2f} ± 0.00 |" in table
            and "| 1 |" in table)  # one run, seed 1, not both folders

    assert sweep_main(argv, launcher=in_process) == 0  # the fresh folder is now the run: finished, same config
    assert "sweep done: 1 skipped" in capsys.readouterr().out


def _hold(folder, held, release):
    lock = RunLock(folder).acquire()
    held.set()
    release.wait(60)
    lock.release()


def _filled_run(folder: Path, outside: Path) -> Path:
    (folder / "checkpoint").mkdir(parents=True)
    (folder / "checkpoint" / "trainer_state.pt").write_bytes(b"state")
    (folder / "metrics.json").write_text("{}")
    outside.mkdir()
    (outside / "keep.txt").write_text("not the run's")
    (folder / "data").symlink_to(outside, target_is_directory=True)
    return folder


def test_empty_run_folder_refuses_while_another_process_holds_it_then_keeps_only_its_lock(tmp_path):
    run = _filled_run(tmp_path / "run", tmp_path / "outside")
    context = multiprocessing.get_context("fork")
    held, release = context.Event(), context.Event()
    owner = context.Process(target=_hold, args=(run, held, release))
    owner.start()
    try:
        assert held.wait(30)
        with pytest.raises(RunFolderBusy, match=f"in use by process {owner.pid} since "):
            empty_run_folder(run)
        assert sorted(p.name for p in run.iterdir()) == [".lock", "checkpoint", "data", "metrics.json"]  # untouched
    finally:
        release.set()
        owner.join(30)
    empty_run_folder(run)
    assert [p.name for p in run.iterdir()] == [".lock"]  # the lock file stays: the next holder locks the same file
    assert holder(run) is None  # and it is let go
    assert (tmp_path / "outside" / "keep.txt").read_text() == "not the run's"  # a link is removed, not followed


def test_empty_run_folder_waits_out_a_short_hold(tmp_path):
    """A sweep's probe (``holder``) holds the lock for an instant: RunLock's grace waits for it instead of refusing."""
    run = _filled_run(tmp_path / "run", tmp_path / "outside")
    context = multiprocessing.get_context("fork")
    held, release = context.Event(), context.Event()
    owner = context.Process(target=_hold, args=(run, held, release))
    owner.start()
    try:
        assert held.wait(30)
        threading.Timer(0.3, release.set).start()
        started = time.monotonic()
        empty_run_folder(run)
        assert 0.2 < time.monotonic() - started < PROBE_GRACE_S + 0.5
    finally:
        release.set()
        owner.join(30)
    assert [p.name for p in run.iterdir()] == [".lock"]


def test_emptying_needs_the_lock_held(tmp_path):
    run = _filled_run(tmp_path / "run", tmp_path / "outside")
    with pytest.raises(RuntimeError, match="needs the lock held"):
        RunLock(run).empty_folder()
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint", "data", "metrics.json"]


def test_slurm_overwrite_never_empties_a_folder_a_live_process_holds(tmp_path, monkeypatch):
    """``train --launcher slurm --overwrite`` empties the folder before submitting, under its lock (it once
    deleted the folder, ``.lock`` and all, under a running trainer)."""
    from mugcp.config import DEFAULTS
    from mugcp.launch import slurm_launch
    from mugcp.launch.slurm import SlurmOptions

    submitted = []
    monkeypatch.setattr(slurm_launch, "require_slurm", lambda: None)
    monkeypatch.setattr(slurm_launch, "submit_distributed", lambda *args, **kwargs: submitted.append(args) or "42")
    run = _filled_run(tmp_path / "run", tmp_path / "outside")
    options = SlurmOptions(tasks_per_node=1)
    context = multiprocessing.get_context("fork")
    held, release = context.Event(), context.Event()
    owner = context.Process(target=_hold, args=(run, held, release))
    owner.start()
    try:
        assert held.wait(30)
        with pytest.raises(RunFolderBusy):
            slurm_launch.submit_training(DEFAULTS, [], run, options, overwrite=True)
        assert sorted(p.name for p in run.iterdir()) == [".lock", "checkpoint", "data", "metrics.json"]
        assert submitted == []
    finally:
        release.set()
        owner.join(30)
    job = slurm_launch.submit_training(DEFAULTS, [], run, options, overwrite=True)
    assert job.job_id == "42" and len(submitted) == 1
    assert sorted(p.name for p in run.iterdir()) == [".lock", "slurm_state.json"]


def test_train_and_evaluate_refuse_a_folder_another_process_holds(tmp_path, small_clip, capsys):
    from mugcp.evaluate import main as evaluate_main
    from mugcp.train import main as train_main

    data = [f"data.root={make_coop_dataset(tmp_path, 'dtd', CLASSES)}", "data.dataset=dtd", "data.protocol=all",
            "model.pretrained=none",
            "data.max_eval_per_class=1", "train.tensorboard=false", f"model.backbone={TINY_CLIP}"]
    trained = tmp_path / "trained"
    assert train_main(["--output", str(trained), "method=zsclip", *data]) == 0
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.json").write_text('{"checkpoint": "elsewhere"}')  # a finished evaluation's folder
    context = multiprocessing.get_context("fork")
    held, release = context.Event(), context.Event()
    owner = context.Process(target=_hold, args=(run, held, release))
    owner.start()
    try:
        assert held.wait(30)
        assert holder(run)["pid"] == owner.pid
        for main, argv in ((train_main, ["--output", str(run), "--overwrite", *data]),
                           (evaluate_main, ["--checkpoint", str(trained), "--output", str(run), "--overwrite"])):
            with pytest.raises(RunFolderBusy) as refused:
                main(argv)
            assert str(refused.value).startswith(f"run folder {run} is in use by process {owner.pid} since ")
            assert sorted(p.name for p in run.iterdir()) == [".lock",
                                                             "metrics.json"]  # nothing touched, nothing deleted
    finally:
        release.set()
        owner.join(30)
    assert holder(run) is None  # released with its process
    assert train_main(["--output", str(run), "--overwrite", "method=zsclip", *data]) == 0  # now it is free


def test_a_sweep_leaves_a_run_another_process_holds_to_it(tmp_path, capsys):
    sweep = write_sweep(tmp_path / "grid.yaml", datasets=["dtd"], seeds=[1], methods=["zsclip"], shots=[1],
                        overrides={"data.root": str(tmp_path), "data.protocol": "all"})
    run = tmp_path / "runs" / "zsclip_dtd_k1_s1"
    run.mkdir(parents=True)
    context = multiprocessing.get_context("fork")
    held, release = context.Event(), context.Event()
    owner = context.Process(target=_hold, args=(run, held, release))
    owner.start()
    try:
        assert held.wait(30)
        launched = []
        assert sweep_main([str(sweep), "--root", str(tmp_path / "runs"), "--no-progress"],
                          launcher=lambda *job: launched.append(job)) == 0
    finally:
        release.set()
        owner.join(30)
    out, err = capsys.readouterr()
    assert (launched == []
            and f"[1/1] elsewhere zsclip_dtd_k1_s1 — its folder is in use by process {owner.pid} since " in out)
    assert "sweep done: 1 running elsewhere" in out and "they were left to it" in err
    assert sorted(p.name for p in run.iterdir()) == [".lock"]


# ---- real processes: signals to the sweep's pid alone, two sweeps on one root, logs without \r ----

@pytest.fixture
def process_env(tmp_path):
    """Children see the 3-layer CLIP as an open_clip model (a sitecustomize registers it at start)."""
    site = tmp_path / "site"
    (site / "models").mkdir(parents=True)
    (site / "models" / f"{TINY_CLIP}.json").write_text(json.dumps(TINY_CONFIG))
    (site / "sitecustomize.py").write_text("import pathlib, open_clip\n"
                                           "open_clip.add_model_config(pathlib.Path(__file__).parent / 'models')\n")
    return dict(os.environ, PYTHONPATH=f"{site}{os.pathsep}{ROOT}", HF_HUB_OFFLINE="1")


def tiny_sweep(tmp_path, seeds, epochs):
    data = make_coop_dataset(tmp_path, "dtd", CLASSES)
    return write_sweep(tmp_path / "grid.yaml", datasets=["dtd"], seeds=seeds, methods=["coop"], shots=[1],
                       overrides={"data.root": str(data), "data.protocol": "all", **TINY, "model.backbone": TINY_CLIP,
                                  "data.batch_size": 4, "optim.epochs": epochs, "method.n_ctx": 2, "train.log_every": 1,
                                  "train.progress": True})


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as stat:  # reaped or not: a zombie has finished
        return stat.read().split(")")[-1].split()[0] != "Z"


# a sweep of two runs, stopped and rerun, as real processes: 65-115 s measured on the 2 shared cores at load 4-15
@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads process states from /proc")
def test_sigint_to_the_sweep_alone_stops_its_runs_which_save_and_the_rerun_resumes(tmp_path, process_env):
    sweep = tiny_sweep(tmp_path, seeds=[1, 2], epochs=30)
    root = tmp_path / "runs"
    command = [sys.executable, "-m", "mugcp.sweep", str(sweep), "--root", str(root), "--jobs", "2", "--no-progress"]
    # Its own session: the signal below goes to the sweep's pid and nothing else, as a scheduler or a parent script
    # sends it.
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=process_env,
                               cwd=tmp_path, start_new_session=True)
    runs = [root / f"coop_dtd_k1_s{seed}" for seed in (1, 2)]
    deadline = time.time() + 240
    while (not all((run / "checkpoint" / "trainer_state.pt").is_file() for run in runs) and time.time() < deadline
           and process.poll() is None):
        time.sleep(0.1)
    trainers = [holder(run)["pid"] for run in runs]
    assert all(trainers) and process.pid not in trainers
    os.kill(process.pid, signal.SIGINT)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 130, out + err
    assert "SIGINT: no new jobs; the running ones save their checkpoint and stop" in err
    assert not any(alive(pid) for pid in trainers)  # no orphan
    for run in runs:
        assert holder(run) is None and not (run / "metrics.json").exists()
        assert re.search(rf"interrupted {run.name} in [\d.]+s — its last epoch checkpoint is in "
                         rf"{run / 'checkpoint'}", out)
        # SIGINT is handled as SIGTERM: the step in flight ends (here the epoch's only one) and its checkpoint is saved.
        assert re.search(r"run stopped by SIGINT after step \d+ of 30, the end of epoch \d+\. "
                         r"The checkpoint of epoch \d+ is kept",
                         (run / "log.txt").read_text())

    again = subprocess.run(command, capture_output=True, text=True, env=process_env, cwd=tmp_path, timeout=240)
    assert again.returncode == 0, again.stdout + again.stderr
    for run in runs:
        assert f"resume {run.name}" in again.stdout and "resumed from" in (run / "log.txt").read_text()
        assert json.loads((run / "metrics.json").read_text())["steps"] == 30  # one step an epoch, each epoch once
    logs = list((root / "logs").glob("*.txt"))
    assert len(logs) == 2 and all(b"\r" not in log.read_bytes() for log in logs)
    # The rerun's log: its last training step, or (a run that had trained every step when the signal came and was
    # stopped before its evaluation) the resume at the last step with nothing left to train.
    assert all(b"epoch 30 step 30/30" in log.read_bytes() or b"(step 30)" in log.read_bytes() for log in logs)


@pytest.mark.slow  # two concurrent sweeps of two runs: 55-94 s measured on the 2 shared cores at load 4-15
def test_two_sweeps_on_one_root_train_every_run_once(tmp_path, process_env):
    sweep = tiny_sweep(tmp_path, seeds=[1, 2], epochs=3)
    root = tmp_path / "runs"
    command = [sys.executable, "-m", "mugcp.sweep", str(sweep), "--root", str(root), "--no-progress"]
    sweeps = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=process_env,
                               cwd=tmp_path)
              for _ in range(2)]
    outputs = [process.communicate(timeout=300) for process in sweeps]
    assert [process.returncode for process in sweeps] == [0, 0], outputs
    for seed in (1, 2):
        name = f"coop_dtd_k1_s{seed}"
        started = [out for out, _ in outputs if re.search(rf"\] (start|resume|restart) {name}\b", out)]
        assert len(started) == 1, outputs  # one sweep ran it; the other left it to that one or found it finished
        other = next(out for out, _ in outputs if out is not started[0])
        assert re.search(rf"\] (elsewhere {name} — another sweep runs it \(process \d+|skipped {name} — finished by "
                         rf"another process|elsewhere {name} — its folder is in use by process \d+)", other), outputs
        log = (root / name / "log.txt").read_text()
        assert log.count("method coop on") == 1 and "resumed" not in log  # one training, in one process
        assert json.loads((root / name / "metrics.json").read_text())["steps"] == 3
