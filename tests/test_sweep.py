"""The protocol runner: a tiny base-to-novel sweep end to end (a failure, an interrupt, a resume), the
paper-layout tables it ends with, transfer evaluations, parallel subprocess runs and sweep-file errors."""
import json
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from fixtures import make_coop_dataset

from mugcp.cli import user_errors
from mugcp.config import ConfigError
from mugcp.runs import run_setup
from mugcp.sweep import main as sweep_main
from mugcp.sweeps import load_sweep, plan
from mugcp.training import trainer

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ["red_fox", "blue_whale", "snow_owl", "sand_cat"]
TINY = {"model.pretrained": "none", "model.backbone": "ViT-B-32", "data.batch_size": 2, "data.eval_batch_size": 8,
        "data.max_eval_per_class": 1, "optim.epochs": 2, "optim.warmup_epochs": 0, "train.progress": False,
        "train.tensorboard": False}


@pytest.fixture
def shared_clip(vit_b32, monkeypatch):
    monkeypatch.setattr(run_setup, "load_clip", lambda *args, **kwargs: vit_b32)
    return vit_b32


def in_process(job, env, log_path):
    """Runs a job's exact command line in this process (sharing the test's backbone) instead of a subprocess."""
    from mugcp.evaluate import main as evaluate_main
    from mugcp.train import main as train_main

    argv = job.command()[3:]
    try:
        return {"mugcp.train": train_main, "mugcp.evaluate": evaluate_main}[job.module](argv) or 0
    except user_errors() as err:
        log_path.write_text(f"error: {err}\n")
        return 2


def write_sweep(path, **fields):
    path.write_text(yaml.safe_dump(fields, sort_keys=False))
    return path


def metrics_of(root, name):
    return json.loads((root / name / "metrics.json").read_text())


@pytest.mark.slow  # ~12 s: eight tiny runs, one interrupted and resumed
def test_tiny_base2new_sweep_fails_is_interrupted_resumes_and_reports(tmp_path, shared_clip, monkeypatch, capsys):
    data = make_coop_dataset(tmp_path, "dtd", CLASSES)
    sweep = write_sweep(tmp_path / "tiny.yaml", protocol="base2new", datasets=["dtd", "eurosat"], seeds=[1, 2],
                        methods=["zsclip", "coop"], shots=[1], overrides={"data.root": str(data), **TINY},
                        method_overrides={"coop": {"method.n_ctx": 2, "method.ctx_init": ""}})
    root = tmp_path / "runs"
    argv = [str(sweep), "--root", str(root), "--no-progress"]

    # 1. EuroSAT is not there yet: its 4 runs fail, named, and the others still run.
    assert sweep_main(argv, launcher=in_process) == 1
    out, err = capsys.readouterr()
    assert re.search(r"\[5/8\] failed zsclip_eurosat_k1_s1 in [\d.]+s — exit 2: "
                     r"error: dataset 'eurosat': .*not found", out)
    assert "sweep done: 4 ok, 4 failed" in out and "4 job(s) did not finish" in err
    assert sorted(p.parent.name for p in root.glob("*/metrics.json")) == [
        "coop_dtd_k1_s1", "coop_dtd_k1_s2", "zsclip_dtd_k1_s1", "zsclip_dtd_k1_s2"]

    # 2. With EuroSAT in place, Ctrl-C arrives after the first epoch of the first CoOp run on it.
    make_coop_dataset(tmp_path, "eurosat", CLASSES)
    real_save = trainer.save_checkpoint
    calls = {"n": 0}

    def save_then_interrupt(folder, *args, **kwargs):
        real_save(folder, *args, **kwargs)
        if "coop_eurosat_k1_s1" in str(folder):
            calls["n"] += 1
            raise KeyboardInterrupt

    monkeypatch.setattr(trainer, "save_checkpoint", save_then_interrupt)
    assert sweep_main(argv, launcher=in_process) == 130
    out, err = capsys.readouterr()
    assert ("[7/8] interrupted coop_eurosat_k1_s1 in" in out
            and f"its last epoch checkpoint is in {root / 'coop_eurosat_k1_s1' / 'checkpoint'}; "
                "a rerun resumes from it" in out)
    assert "4 skipped" in err and "1 not started" in err
    assert "rerun the same command to continue" in err
    interrupted = root / "coop_eurosat_k1_s1"
    assert (interrupted / "checkpoint" / "trainer_state.pt").is_file() and not (interrupted / "metrics.json").exists()
    assert not (root / "coop_eurosat_k1_s2" / "checkpoint").exists()  # its folder holds only the failed first try's log
    monkeypatch.setattr(trainer, "save_checkpoint", real_save)

    # 3. The dry run shows what a rerun does; the rerun skips, resumes and finishes.
    assert sweep_main([*argv, "--dry-run"], launcher=in_process) == 0
    listing = capsys.readouterr().out
    assert listing.count(" done ") == 6
    assert re.search(r"\[7/8\] resume\s+coop_eurosat_k1_s1\n\s+"
                     r"python -m mugcp.train --config methods/coop --resume --output "
                     + re.escape(str(interrupted)), listing)
    assert re.search(r"\[8/8\] new\s+coop_eurosat_k1_s2", listing)
    assert sweep_main(argv, launcher=in_process) == 0
    out, _ = capsys.readouterr()
    assert "[7/8] resume coop_eurosat_k1_s1" in out and "sweep done: 2 ok, 6 skipped" in out
    assert metrics_of(root, "coop_eurosat_k1_s1")["steps"] == metrics_of(root, "coop_eurosat_k1_s2")["steps"] == 2
    assert "resumed from" in (interrupted / "log.txt").read_text()

    # 4. The table: per dataset and method, base / new mean ± std over the two seeds, the HM of those means, and the
    # average.
    table = (root / "report" / "results.md").read_text()
    assert (root / "report" / "results.png").read_bytes()[:4] == b"\x89PNG"
    for dataset in ("dtd", "eurosat"):
        section = table.split(f"### {dataset}\n")[1].split("###")[0]
        for method in ("zsclip", "coop"):
            runs = [metrics_of(root, f"{method}_{dataset}_k1_s{seed}") for seed in (1, 2)]
            base, new = ([r[subset]["accuracy"] for r in runs] for subset in ("base", "new"))
            cells = [f"{statistics.fmean(v):.2f} ± {statistics.stdev(v):.2f}" for v in (base, new)]
            hm_of_means = statistics.harmonic_mean([statistics.fmean(base), statistics.fmean(new)])
            assert f"| {method} (random weights) | {cells[0]} | {cells[1]} | {hm_of_means:.2f} | 1,2 |" in section
    for method in ("zsclip", "coop"):
        runs = [metrics_of(root, f"{method}_{d}_k1_s{s}") for d in ("dtd", "eurosat") for s in (1, 2)]
        base = statistics.fmean(statistics.fmean(r["base"]["accuracy"] for r in runs[i:i + 2]) for i in (0, 2))
        new = statistics.fmean(statistics.fmean(r["new"]["accuracy"] for r in runs[i:i + 2]) for i in (0, 2))
        hm = 2 * base * new / (base + new) if base + new else 0.0
        average = table.split("### Average over 2 datasets\n")[1].split("###")[0]
        assert f"| {method} (random weights) | {base:.2f} | {new:.2f} | {hm:.2f} | 2 of 2 |" in average


def test_cross_dataset_sweep_evaluates_each_target_and_tabulates_them(tmp_path, shared_clip, capsys):
    data = make_coop_dataset(tmp_path, "dtd", CLASSES)
    make_coop_dataset(tmp_path, "eurosat", CLASSES[:3])
    sweep = write_sweep(tmp_path / "transfer.yaml", protocol="cross_dataset", source="dtd", targets=["eurosat"],
                        seeds=[1], methods=["coop"], shots=[1],
                        overrides={"data.root": str(data), "method.n_ctx": 2, "method.ctx_init": "", **TINY,
                                   "optim.epochs": 1})
    root = tmp_path / "runs"
    assert sweep_main([str(sweep), "--root", str(root), "--no-progress"], launcher=in_process) == 0
    source = metrics_of(root, "coop_dtd_k1_s1")
    target = metrics_of(root, "coop_dtd_k1_s1/eval_eurosat")
    assert source["protocol"] == "all" and target["dataset"] == "eurosat" and target["all"]["classes"] == 3
    table = (root / "report" / "results.md").read_text()
    assert "| method | source: dtd | eurosat | Average |" in table
    assert (f"| coop (random weights) | {source['all']['accuracy']:.2f} ± 0.00 "
            f"| {target['all']['accuracy']:.2f} ± 0.00 | "
            f"{target['all']['accuracy']:.2f} |") in table


def test_a_method_variant_sweeps_and_reports_under_its_own_name(tmp_path, shared_clip):
    # coop+dept: CoOp's config and DePT's recipe, the switch recorded in config.yaml, a row of its own in the report.
    data = make_coop_dataset(tmp_path, "dtd", CLASSES)
    short = {"method.n_ctx": 2, "method.ctx_init": ""}
    sweep = write_sweep(tmp_path / "dept.yaml", protocol="base2new", datasets=["dtd"], seeds=[1],
                        methods=["coop", "coop+dept"], shots=[1],
                        overrides={"data.root": str(data), **TINY, "optim.epochs": 1},
                        method_overrides={"coop": short, "coop+dept": short})
    jobs = plan(load_sweep(sweep), tmp_path / "runs")
    dept = jobs[1]
    assert (dept.name, dept.fields["method"], dept.args[:5]) == (
        "coop+dept_dtd_k1_s1", "coop+dept", ["--config", "methods/coop", "--output",
                                             str(tmp_path / "runs" / "coop+dept_dtd_k1_s1"), "method=coop+dept"])
    assert dept.recipe.path.parent.name == "coop+dept" and dept.config["optim"]["lr"] == 0.0035
    assert (dept.config["method"]["name"], dept.config["method"]["dept"],
            jobs[0].config["method"]["dept"]) == ("coop", True, False)
    assert sweep_main([str(sweep), "--root", str(tmp_path / "runs"), "--no-progress"], launcher=in_process) == 0
    assert metrics_of(tmp_path / "runs", "coop+dept_dtd_k1_s1")["method"] == "coop+dept"
    assert metrics_of(tmp_path / "runs", "coop_dtd_k1_s1")["method"] == "coop"
    recorded = yaml.safe_load((tmp_path / "runs" / "coop+dept_dtd_k1_s1" / "config.yaml").read_text())["method"]
    assert (recorded["name"], recorded["dept"]) == ("coop", True)
    table = (tmp_path / "runs" / "report" / "results.md").read_text()
    dtd = table.split("### dtd", 1)[1]
    assert "\n| coop (random weights) |" in dtd and "\n| coop+dept (random weights) |" in dtd
    assert "| dtd | coop | ViT-B-32 |" in table and "| dtd | coop+dept | ViT-B-32 |" in table  # the cost table too


def test_an_unknown_variant_names_the_known_ones(tmp_path):
    path = write_sweep(tmp_path / "bad.yaml", datasets=["dtd"], seeds=[1], methods=["ivlp+dept"], shots=[1])
    with pytest.raises(ConfigError, match=r"unknown method 'ivlp\+dept'\. Did you mean: .*"
                                          r"variants \(a method with a plug-in on\): "
                                          r"cocoop\+dept, coop\+dept, kgcoop\+dept, maple\+dept"):
        load_sweep(path)


@pytest.mark.slow  # ~14 s: two sweep subprocesses, each loading torch and a CLIP
def test_parallel_jobs_run_as_subprocesses_with_progress_lines(tmp_path):
    data = make_coop_dataset(tmp_path, "dtd", CLASSES)
    sweep = write_sweep(tmp_path / "grid.yaml", datasets=["dtd"], seeds=[1, 2], methods=["zsclip"], shots=[1],
                        overrides={"data.root": str(data), "data.protocol": "all", **TINY})
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1")
    result = subprocess.run([sys.executable, "-m", "mugcp.sweep", str(sweep), "--root", str(tmp_path / "runs"),
                             "--jobs", "2"],
                            capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    for seed in (1, 2):
        assert re.search(rf"\d\d:\d\d:\d\d \[{seed}/2\] start zsclip_dtd_k1_s{seed}", result.stdout)
        assert re.search(rf"\[{seed}/2\] ok zsclip_dtd_k1_s{seed} in [\d.]+s", result.stdout)
        child_console = (tmp_path / "runs" / "logs" / f"zsclip_dtd_k1_s{seed}.txt").read_text()
        assert "(RANDOM weights)" in child_console and "run folder:" in child_console
    assert "sweep done: 2 ok" in result.stdout
    accuracies = [metrics_of(tmp_path / "runs", f"zsclip_dtd_k1_s{seed}")["all"]["accuracy"] for seed in (1, 2)]
    cell = f"{statistics.fmean(accuracies):.2f} ± {statistics.stdev(accuracies):.2f}"
    assert (f"| dtd | zsclip (random weights) | all | 1 | ViT-B-32 | 1,2 | {cell} |"
            in (tmp_path / "runs" / "report" / "results.md").read_text())


@pytest.mark.parametrize("fields, message", [
    ({"protocol": "base2novel", "methods": ["coop"]},
     "protocol 'base2novel' is not one of base2new, fewshot, cross_dataset"),
    ({"datasets": ["dtd"], "methods": ["coop"], "seed": [1]}, "unknown sweep key(s) seed; allowed:"),
    ({"datasets": ["dtdd"], "methods": ["coop"]}, "unknown dataset 'dtdd'; known: imagenet,"),
    ({"datasets": ["dtd"], "methods": ["coopp"]}, "unknown method 'coopp'. Did you mean: coop, "),
    ({"datasets": ["dtd"]}, "'methods' is missing"),
    ({"datasets": ["dtd"], "methods": ["coop"], "seeds": [1, 1]},
     "'seeds' must be a non-empty list without repeats, got [1, 1]"),
    ({"protocol": "cross_dataset", "datasets": ["dtd"], "methods": ["coop"]},
     "protocol cross_dataset trains on 'source'"),
    ({"datasets": ["dtd"], "methods": ["coop"], "overrides": {"data.root": "$MUGCP_UNSET_VAR/x"}},
     "uses $MUGCP_UNSET_VAR, which is not set; export MUGCP_UNSET_VAR=... before the sweep"),
    ({"datasets": ["dtd"], "methods": ["coop"], "config": "nowhere.yaml"}, "config 'nowhere.yaml' not found"),
    ({"datasets": ["dtd"], "methods": ["coop"], "method_overrides": {"maple": {"method.n_ctx": 4}}},
     "'method_overrides' maps methods of this sweep (coop) to overrides"),
    ({"datasets": ["dtd"], "methods": ["coop"], "overrides": {"semantic.cache": "caches/{datset}"}},
     "uses {datset}; placeholders are {dataset}, {method}, {seed}, {shots}"),
])
def test_sweep_file_errors_name_the_key_and_what_is_allowed(tmp_path, fields, message):
    path = write_sweep(tmp_path / "bad.yaml", **fields)
    with pytest.raises(ConfigError) as error:
        plan(load_sweep(path), tmp_path / "runs")
    assert str(error.value).startswith(str(path)) and message in str(error.value)


def test_one_config_for_every_method_switches_method_on_the_command_line(tmp_path):
    (tmp_path / "base.yaml").write_text("optim:\n  epochs: 3\n")
    path = write_sweep(tmp_path / "grid.yaml", datasets=["dtd"], seeds=[4], methods=["coop", "maple"], shots=[8],
                       config="base.yaml",
                       overrides={"data.protocol": "fewshot", "method.n_ctx": 4,
                                  "semantic.cache": "caches/{dataset}-{method}-{seed}-{shots}"})
    jobs = plan(load_sweep(path), tmp_path / "runs")
    assert [job.command() for job in jobs][1] == [
        "python", "-m", "mugcp.train", "--config", str(tmp_path / "base.yaml"), "--output",
        str(tmp_path / "runs" / "maple_dtd_k8_s4"), "method=maple", "data.dataset=dtd", "data.shots=8", "train.seed=4",
        "data.protocol=fewshot", "method.n_ctx=4", "semantic.cache=caches/dtd-maple-4-8"]
    (tmp_path / "runs" / "coop_dtd_k8_s4" / "checkpoint").mkdir(parents=True)  # a checkpoint without trainer state
    assert [job.mode for job in plan(load_sweep(path), tmp_path / "runs")] == ["overwrite", "new"]


@pytest.mark.parametrize("name, runs, evaluations", [
    ("base2new", 15 * 11 * 3, 0), ("fewshot", 7 * 11 * 5 * 3 + 11 * 3, 0), ("cross_dataset", 13 * 3, 13 * 3 * 10),
    ("domain_generalization", 13 * 3, 13 * 3 * 4),
])
def test_published_protocols_plan_the_papers_runs(tmp_path, monkeypatch, name, runs, evaluations):
    (tmp_path / "datasets").mkdir()  # data.root must exist at planning (its layout is the run's to read)
    monkeypatch.setenv("DATA", str(tmp_path / "datasets"))
    sweep = load_sweep(name)
    jobs = plan(sweep, tmp_path / "runs")
    assert (sum(j.module == "mugcp.train" for j in jobs) == runs
            and sum(j.module == "mugcp.evaluate" for j in jobs) == evaluations)
    assert len({j.folder for j in jobs}) == len(jobs)  # every run its own folder
    assert sweep.seeds == [1, 2, 3] and all(f"data.root={tmp_path / 'datasets'}" in j.args for j in jobs
                                            if j.module == "mugcp.train")
    mugcp = next(j for j in jobs if j.name.startswith("mugcp_") and j.module == "mugcp.train")
    assert f"semantic.cache=caches/{mugcp.name.split('_')[1]}" in mugcp.args
    if evaluations:
        targets = {a.split("=")[1] for j in jobs if j.module == "mugcp.evaluate" for a in j.args
                   if a.startswith("data.dataset=")}
        assert targets == set(sweep.targets) and "imagenet" not in targets


def test_the_fewshot_sweep_runs_zero_shot_clip_once_per_dataset_and_seed(monkeypatch, tmp_path):
    # Issue 21.7: zero-shot CLIP trains nothing, so its K is unused; it used to run once per K (165 runs).
    (tmp_path / "datasets").mkdir()
    monkeypatch.setenv("DATA", str(tmp_path / "datasets"))
    jobs = [j for j in plan(load_sweep("fewshot"), tmp_path) if j.fields["method"] == "zsclip"]
    assert len(jobs) == 11 * 3 and {j.fields["shots"] for j in jobs} == {None}
    dtd = next(j for j in jobs if j.name == "zsclip_dtd_s1")
    assert ("data.shots=null" in dtd.args and dtd.config["data"]["shots"] is None
            and dtd.folder == tmp_path / "zsclip_dtd_s1")


def test_a_fewshot_sweeps_zero_shot_run_is_shown_at_every_k(tmp_path, shared_clip, capsys):
    data = make_coop_dataset(tmp_path, "dtd", CLASSES)
    sweep = write_sweep(tmp_path / "few.yaml", protocol="fewshot", datasets=["dtd"], seeds=[1], methods=["zsclip"],
                        shots=[1, 2], overrides={"data.root": str(data), **TINY})
    assert sweep_main([str(sweep), "--root", str(tmp_path / "runs"), "--no-progress"], launcher=in_process) == 0
    assert sorted(p.name for p in (tmp_path / "runs").iterdir() if p.name.startswith("zsclip")) == ["zsclip_dtd_s1"]
    metrics = metrics_of(tmp_path / "runs", "zsclip_dtd_s1")
    assert metrics["shots"] is None
    for k, accuracy in ((1, 40.0), (2, 60.0)):  # a trained method beside it, in another folder
        (tmp_path / "coop" / f"k{k}").mkdir(parents=True)
        (tmp_path / "coop" / f"k{k}" / "metrics.json").write_text(json.dumps({
            "method": "coop", "dataset": "dtd", "protocol": "all", "shots": k, "backbone": "ViT-B-32", "seed": 1,
            "pretrained": False, "all": {"accuracy": accuracy}}))
    from mugcp.report import main as report_main

    capsys.readouterr()
    assert report_main([str(tmp_path / "runs"), str(tmp_path / "coop"), "--out", str(tmp_path / "report"),
                        "--layout", "fewshot"]) == 0
    table = (tmp_path / "report" / "results.md").read_text()
    zero_shot = f"{metrics['all']['accuracy']:.2f}"
    assert "| method | K=1 | K=2 |" in table
    assert f"| zsclip (random weights) | {zero_shot} | {zero_shot} |" in table  # the average over datasets
    assert f"| zsclip (random weights) | {zero_shot} ± 0.00 | {zero_shot} ± 0.00 |" in table
    assert "| coop (random weights) | 40.00 ± 0.00 | 60.00 ± 0.00 |" in table


@pytest.mark.slow  # four subprocess runs, ~28 s
def test_ctrl_c_stops_a_subprocess_sweep_and_the_same_command_continues_it(tmp_path):
    import signal
    import time

    data = make_coop_dataset(tmp_path, "dtd", CLASSES)
    sweep = write_sweep(tmp_path / "grid.yaml", datasets=["dtd"], seeds=[1, 2, 3], methods=["zsclip"], shots=[1],
                        overrides={"data.root": str(data), "data.protocol": "all", **TINY})
    root = tmp_path / "runs"
    command = [sys.executable, "-m", "mugcp.sweep", str(sweep), "--root", str(root), "--no-progress"]
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1")
    # Its own session, so the signal reaches the sweep and its runs like a terminal's Ctrl-C, and nothing else.
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                               cwd=tmp_path, start_new_session=True)
    deadline = time.time() + 300
    while not (root / "logs" / "zsclip_dtd_k1_s2.txt").exists() and time.time() < deadline and process.poll() is None:
        time.sleep(0.1)
    time.sleep(1.0)  # the second run is importing torch or loading its model
    os.killpg(process.pid, signal.SIGINT)
    out, err = process.communicate(timeout=300)
    assert process.returncode == 130, out + err
    assert "[1/3] ok zsclip_dtd_k1_s1" in out and "[2/3] interrupted zsclip_dtd_k1_s2" in out
    assert "rerun the same command to continue" in err and "1 ok" in err and "1 not started" in err
    assert ("[2/3] interrupted zsclip_dtd_k1_s2 in" in out
            and "nothing to resume from yet; a rerun starts it again" in out)
    assert not (root / "zsclip_dtd_k1_s2" / "metrics.json").exists()

    again = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "sweep done: 2 ok, 1 skipped" in again.stdout
    assert all((root / f"zsclip_dtd_k1_s{seed}" / "metrics.json").is_file() for seed in (1, 2, 3))
