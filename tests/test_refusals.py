"""Issue 21: no command overwrites a run, and bad output paths are one line (exit status 2) before anything loads.

The commands run in-process through ``run_cli`` (as ``python -m`` runs them) so that they see the tiny
CLIP registered here; a run folder's files are compared byte for byte before and after.
"""
import json
import re
import shutil
from pathlib import Path

import pytest
from fixtures import make_imagefolder
from released_reference import register_tiny_clip

from mugcp.cli import run_cli
from mugcp.config import load_config
from mugcp.training import train

CLASSES = ["red fox", "blue whale", "snow owl", "sand cat"]


def tiny_config(root, *extra):
    return load_config(None, [
        "data.dataset=imagefolder", f"data.root={root}", "data.shots=1", "data.batch_size=2", "method=coop",
        "method.n_ctx=2", f"model.backbone={register_tiny_clip()}", "model.pretrained=none", "optim.epochs=1",
        "train.progress=false", "train.tensorboard=false", *extra,
    ])


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return make_imagefolder(tmp_path_factory.mktemp("data"), CLASSES, per_class={"train": 2, "test": 1})


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, data_root):
    """A finished run, trained once for the module; tests copy it before doing anything to it."""
    run = tmp_path_factory.mktemp("runs") / "coop1"
    train(tiny_config(data_root), run)
    return run


@pytest.fixture
def run_copy(trained_run, tmp_path):
    copy = tmp_path / "runs" / "coop1"
    shutil.copytree(trained_run, copy, ignore=shutil.ignore_patterns(".lock"))
    return copy


def cli(main, argv, capsys):
    """Exit status and stderr of a command's ``main(argv)`` run as ``python -m`` runs it."""
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: main(argv))
    return exit_info.value.code, capsys.readouterr().err.strip()


def snapshot(folder: Path) -> dict:
    """Every file under ``folder`` (but the lock) with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != ".lock"}


# ---------------------------------------------------------------- 1. evaluate never writes into a training run
def test_evaluate_refuses_another_runs_folder_and_changes_nothing_there(run_copy, tmp_path, capsys):
    from mugcp.evaluate import main

    other = tmp_path / "runs" / "other"
    shutil.copytree(run_copy, other)
    before = snapshot(other)
    code, err = cli(main, ["--checkpoint", str(run_copy), "--output", str(other), "data.max_eval_per_class=1"], capsys)
    assert code == 2
    assert err == (f"error: --output {other} holds a training run (checkpoint, splits.json, metrics.jsonl, "
                   "metrics.json); evaluate never writes into a run's folder. Leave out --output (the evaluation "
                   "goes to RUN/eval_<dataset>_<time>/) or choose a new folder.")
    assert snapshot(other) == before


def test_evaluate_refuses_the_runs_own_folder_and_its_checkpoint(run_copy, capsys):
    from mugcp.evaluate import main

    before = snapshot(run_copy)
    code, err = cli(main, ["--checkpoint", str(run_copy), "--output", str(run_copy)], capsys)
    assert code == 2 and err.startswith(f"error: --output {run_copy} holds a training run (checkpoint,")
    code, err = cli(main, ["--checkpoint", str(run_copy), "--output", str(run_copy / "checkpoint" / "eval")], capsys)
    assert code == 2
    assert err == (f"error: --output {run_copy / 'checkpoint' / 'eval'} is inside the run {run_copy}'s checkpoint; "
                   "choose a new folder, e.g. the default RUN/eval_<dataset>_<time>/.")
    assert snapshot(run_copy) == before


def test_evaluate_goes_to_a_folder_of_its_own_inside_the_run_by_default(run_copy, capsys):
    from mugcp.evaluate import main

    before = snapshot(run_copy)
    code, _ = cli(main, ["--checkpoint", str(run_copy), "data.max_eval_per_class=1"], capsys)
    assert code == 0
    [evaluation] = [p for p in run_copy.iterdir() if p.name.startswith("eval_imagefolder_")]
    after = snapshot(run_copy)
    assert {k: v for k, v in after.items() if not k.startswith(evaluation.name)} == before
    metrics = json.loads((evaluation / "metrics.json").read_text())
    assert metrics["checkpoint"] == str(run_copy / "checkpoint")
    from mugcp.reports.results import find_evaluations, find_runs

    assert [m["_path"] for m in find_runs([run_copy])] == [str(run_copy)]
    assert [m["_path"] for m in find_evaluations([run_copy])] == [str(evaluation)]
    assert cli(main, ["--checkpoint", str(run_copy), "data.max_eval_per_class=1"], capsys)[0] == 0
    again = sorted(p.name for p in run_copy.iterdir() if p.name.startswith("eval_imagefolder_"))
    assert len(again) == 2 and again[0] == evaluation.name  # a folder of its own, even within the same second


def test_evaluate_replaces_a_finished_evaluation_only_with_overwrite(run_copy, tmp_path, capsys):
    from mugcp.evaluate import main

    out = tmp_path / "eval_new"
    argv = ["--checkpoint", str(run_copy), "--output", str(out), "data.max_eval_per_class=1"]
    assert cli(main, argv, capsys)[0] == 0
    (out / "predictions" / "stale.csv").write_text("from an earlier evaluation\n")
    before = snapshot(out)
    code, err = cli(main, argv, capsys)
    assert code == 2
    assert err == (f"error: --output {out} holds a finished evaluation (of {run_copy / 'checkpoint'}); "
                   "pass --overwrite to replace it, or choose another --output.")
    assert snapshot(out) == before
    assert cli(main, [*argv, "--overwrite"], capsys)[0] == 0
    assert not (out / "predictions" / "stale.csv").exists() and (out / "metrics.json").is_file()


def test_evaluate_continues_an_unfinished_evaluation(run_copy, tmp_path, capsys):
    from mugcp.evaluate import main

    out = tmp_path / "eval_failed"
    out.mkdir()
    (out / "config.yaml").write_text("{}\n")
    (out / "log.txt").write_text("an evaluation that failed\n")
    assert cli(main, ["--checkpoint", str(run_copy), "--output", str(out), "data.max_eval_per_class=1"], capsys)[0] == 0
    assert json.loads((out / "metrics.json").read_text())["checkpoint"] == str(run_copy / "checkpoint")


# ---------------------------------------------------------------- 2. an output path that is a file
@pytest.fixture
def nothing_loads(monkeypatch):
    """Loading a model, data, a run or a report fails the test: the output path is checked first."""
    from mugcp import reports
    from mugcp.inference import inference, inspection
    from mugcp.runs import run_setup
    from mugcp.training import evaluate_checkpoint, trainer

    def forbidden(*args, **kwargs):
        raise AssertionError("something was loaded before the output path was checked")

    for module, name in ((run_setup, "load_clip"), (trainer, "build_protocol"),
                         (evaluate_checkpoint, "read_checkpoint"), (inference, "load_run"),
                         (inspection, "inspect_run"), (reports, "write_report")):
        monkeypatch.setattr(module, name, forbidden)


@pytest.mark.parametrize("command, argv, flag", [
    ("train", ["--output", "{file}", "model.pretrained=none"], "--output"),
    ("evaluate", ["--checkpoint", "{run}", "--output", "{file}"], "--output"),
    ("report", ["{run}", "--out", "{file}"], "--out"),
    ("inspect", ["{run}", "--out", "{file}"], "--out"),
])
def test_an_output_folder_that_is_a_file_is_one_line(command, argv, flag, tmp_path, capsys, nothing_loads):
    import importlib

    afile = tmp_path / "afile"
    afile.write_text("keep me\n")
    main = importlib.import_module(f"mugcp.{command}").main
    code, err = cli(main, [arg.format(file=afile, run=tmp_path) for arg in argv], capsys)
    assert (code, err) == (2, f"error: {flag} {afile}: {afile} is a file, not a folder. "
                              f"Choose another {flag} (a folder), or move that file away.")
    assert afile.read_text() == "keep me\n" and sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


def test_predict_out_under_a_file_is_one_line(tmp_path, capsys, nothing_loads):
    from mugcp.predict import main

    afile = tmp_path / "afile"
    afile.write_text("keep me\n")
    code, err = cli(main, ["--checkpoint", str(tmp_path), "--out", str(afile / "x.csv"), str(tmp_path)], capsys)
    assert (code, err) == (2, f"error: --out {afile / 'x.csv'}: {afile} is a file, not a folder. "
                              "Choose another --out, or move that file away.")
    (tmp_path / "d.csv").mkdir()
    code, err = cli(main, ["--checkpoint", str(tmp_path), "--out", str(tmp_path / "d.csv"), str(tmp_path)], capsys)
    assert (code, err) == (2, f"error: --out {tmp_path / 'd.csv'} is a folder, not a file. "
                              f"Choose a file name, e.g. {tmp_path / 'd.csv' / 'predictions.csv'}.")


def test_a_sweep_reevaluates_a_stale_transfer_evaluation_with_overwrite(tmp_path):
    """A run that trains again (here: resumes) makes its finished evaluation stale: the sweep passes --overwrite,
    which evaluate needs to replace it, and the stale metrics never count as done."""
    import yaml
    from fixtures import make_coop_dataset

    from mugcp.sweeps import load_sweep, plan
    from mugcp.sweeps.jobs import refresh_mode

    data = make_coop_dataset(tmp_path, "dtd", ["red_fox", "blue_whale"])
    sweep_file = tmp_path / "transfer.yaml"
    sweep_file.write_text(yaml.safe_dump({"protocol": "cross_dataset", "source": "dtd", "targets": ["eurosat"],
                                          "seeds": [1], "methods": ["coop"], "shots": [1],
                                          "overrides": {"data.root": str(data)}}))
    root = tmp_path / "runs"
    (root / "coop_dtd_k1_s1" / "checkpoint").mkdir(parents=True)
    (root / "coop_dtd_k1_s1" / "checkpoint" / "trainer_state.pt").write_bytes(b"")
    (root / "coop_dtd_k1_s1" / "eval_eurosat").mkdir()
    (root / "coop_dtd_k1_s1" / "eval_eurosat" / "metrics.json").write_text('{"checkpoint": "x"}')
    training, evaluation = plan(load_sweep(sweep_file), root)
    assert (training.mode, evaluation.mode) == ("resume", "overwrite")
    assert evaluation.command()[3:6] == ["--checkpoint", str(root / "coop_dtd_k1_s1"), "--overwrite"]
    assert refresh_mode(evaluation) == "overwrite"


# ---------------------------------------------------------------- 6. paths and sweep values checked up front
def write_fewshot_sweep(path, **overrides):
    import yaml

    fields = {"protocol": "fewshot", "datasets": ["dtd"], "methods": ["coop"], "shots": overrides.pop("shots", [1]),
              "seeds": [1]}
    path.write_text(yaml.safe_dump({**fields, "overrides": overrides}, sort_keys=False))
    return path


@pytest.mark.parametrize("overrides, line", [
    ({"data.root": "{tmp}/nope"}, "overrides: data.root='{tmp}/nope' does not exist. Point it at the dataset's folder; "
                                  "python -m mugcp.data check --dataset dtd --root ROOT checks a layout."),
    ({"data.root": "{tmp}", "data.fewshot_file": "{tmp}/nope.pkl"},
     "overrides: data.fewshot_file='{tmp}/nope.pkl': no such file. Point it at a released "
     "split_fewshot/shot_<K>-seed_<S>.pkl, or set it to auto or none."),
    ({"data.root": "{tmp}", "shots": [0]},
     "'shots' lists 0, but data.shots=0 is not allowed: expected an integer >= 1, or null (every training image). "
     "The default is 16."),
])
def test_a_sweeps_bad_path_or_shots_is_one_line_at_dry_run_naming_the_sweep_file(overrides, line, tmp_path, capsys):
    from mugcp.sweep import main

    overrides = {k: (v.format(tmp=tmp_path) if isinstance(v, str) else v) for k, v in overrides.items()}
    sweep = write_fewshot_sweep(tmp_path / "sweep.yaml", **overrides)
    code, err = cli(main, [str(sweep), "--root", str(tmp_path / "runs"), "--dry-run"], capsys)
    assert (code, err) == (2, f"error: {sweep}: {line.format(tmp=tmp_path)}")
    assert not (tmp_path / "runs").exists()


def test_a_default_root_auto_fewshot_file_and_an_empty_root_pass_the_dry_run(tmp_path, capsys):
    """null: the dataset's default location; auto: look beside the data; an existing folder is not read at dry run."""
    from mugcp.sweep import main

    (tmp_path / "empty").mkdir()
    for overrides in ({}, {"data.fewshot_file": "auto"},
                      {"data.root": str(tmp_path / "empty"), "data.fewshot_file": "none"}):
        sweep = write_fewshot_sweep(tmp_path / "sweep.yaml", **overrides)
        assert cli(main, [str(sweep), "--root", str(tmp_path / "runs"), "--dry-run"], capsys)[0] == 0


def test_print_config_refuses_a_missing_fewshot_file(tmp_path, capsys):
    from mugcp.train import main

    code, err = cli(main, ["--config", "methods/coop", "data.dataset=dtd", f"data.root={tmp_path}",
                           f"data.fewshot_file={tmp_path / 'nope.pkl'}", "--print-config"], capsys)
    assert (code, err) == (2, f"error: data.fewshot_file='{tmp_path / 'nope.pkl'}': no such file. Point it at a "
                              "released split_fewshot/shot_<K>-seed_<S>.pkl, or set it to auto or none.")


# ---------------------------------------------------------------- 10. resume, signals, help, warnings
def test_resume_on_a_finished_run_says_so_and_reevaluates_only_when_asked(run_copy, capsys):
    from mugcp.analysis.curves import read_metrics
    from mugcp.train import main

    before = snapshot(run_copy)
    assert main(["--output", str(run_copy), "--resume"]) == 0
    assert capsys.readouterr().out.strip() == (
        f"{run_copy} is a finished run (metrics.json): nothing to resume, nothing changed. "
        f"To evaluate its checkpoint again: python -m mugcp.train --output {run_copy} --resume --reevaluate")
    assert snapshot(run_copy) == before

    records = read_metrics(run_copy / "metrics.jsonl")
    assert main(["--output", str(run_copy), "--resume", "--reevaluate"]) == 0
    again = read_metrics(run_copy / "metrics.jsonl")
    # replaced, not doubled
    assert [r["kind"] for r in again] == [r["kind"] for r in records] == ["train", "eval", "eval"]
    assert again == records  # the same checkpoint on the same images: the same accuracies
    assert "resumed from" in (run_copy / "log.txt").read_text()


@pytest.mark.parametrize("signum, code", [("SIGINT", 130), ("SIGTERM", 143)])
def test_ctrl_c_saves_the_step_in_flight_as_sigterm_does(signum, code, tmp_path, monkeypatch, capsys):
    import os
    import signal

    from mugcp.config import dump_config
    from mugcp.methods.coop import CoOp
    from mugcp.runs.checkpoint import read_trainer_state
    from mugcp.train import main

    config = tmp_path / "config.yaml"
    data_root = make_imagefolder(tmp_path, CLASSES, per_class={"train": 2, "val": 1, "test": 1},
                                 splits=("train", "val", "test"))
    # 2 base classes x 2 images: 4 steps
    dump_config(tiny_config(data_root, "data.shots=2", "data.batch_size=1"), config)
    real_step, calls = CoOp.training_step, []

    def step_then_signal(self, batch):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), getattr(signal, signum))  # arrives during the second step
        return real_step(self, batch)

    monkeypatch.setattr(CoOp, "training_step", step_then_signal)
    out = tmp_path / "run"
    status, err = cli(main, ["--config", str(config), "--output", str(out)], capsys)
    assert status == code and len(calls) == 2
    state = read_trainer_state(out / "checkpoint")
    assert (state["step"], state["epoch"], state["batch"]) == (2, 0, 2)
    assert err.splitlines()[-1] == (
        f"run stopped by {signum} after step 2 of 4 (epoch 1, batch 2). The checkpoint of step 2 (epoch 1, batch 2) "
        f"is kept in {out / 'checkpoint'}; continue with python -m mugcp.train --output {out} --resume. "
        f"The log, with the traceback, is {out / 'log.txt'}.")
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handlers are put back


def test_the_old_scheduler_name_is_said_once(monkeypatch):
    import logging

    from mugcp import config

    monkeypatch.setattr(config, "_RENAMES_SAID", set())
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("mugcp").addHandler(handler)
    try:
        for _ in range(3):  # a sweep resolves many configs: one line, not one per config
            cfg = load_config(None, ["optim.scheduler=cosine"])
    finally:
        logging.getLogger("mugcp").removeHandler(handler)
    assert cfg["optim"]["scheduler"] == "cosine_per_step"
    assert [(r.levelname, r.getMessage()) for r in records] == [
        ("WARNING", "optim.scheduler=cosine (command line) is the old name of optim.scheduler=cosine_per_step; "
                    "cosine_per_step is used.")]


def test_open_clips_no_weights_warning_is_silenced_and_ours_says_random(run_copy, caplog, capsys):
    """open_clip warns through the root logger on every model built without weights; we say RANDOM ourselves."""
    import logging

    from mugcp.backbones import load_clip
    from mugcp.evaluate import main

    with caplog.at_level(logging.WARNING):
        clip = load_clip(register_tiny_clip(), pretrained=None)
        assert main(["--checkpoint", str(run_copy), "data.max_eval_per_class=1"]) == 0
    assert clip.pretrained is None
    assert [r.getMessage() for r in caplog.records if "pretrained weights" in r.getMessage()] == []
    assert " (RANDOM weights); metrics: " in capsys.readouterr().out
    open_clip_log = logging.getLogger()
    assert not any(type(f).__name__ == "_OpenClipNoWeightsNote" for f in open_clip_log.filters)  # the filter is removed


def test_every_example_of_evaluate_help_runs(run_copy, tmp_path, capsys):
    import shlex

    from fixtures import make_coop_dataset

    from mugcp.evaluate import main

    with pytest.raises(SystemExit):
        main(["--help"])
    help_text = capsys.readouterr().out
    examples = [line.strip() for line in help_text.splitlines() if line.strip().startswith("python -m mugcp.evaluate ")]
    assert len(examples) == 2
    # The overrides' own example (argparse may wrap it): keys evaluate accepts, not training keys it refuses.
    overrides = " ".join(help_text.split("dotted overrides, e.g.")[1].split())
    assert overrides.startswith("data.eval_subsets=new data.max_eval_per_class=10")
    examples.append(f"python -m mugcp.evaluate --checkpoint RUN {overrides.split()[0]} {overrides.split()[1]}")
    data = make_coop_dataset(tmp_path, "caltech101")
    for example in examples:
        argv = shlex.split(example.replace("RUN", str(run_copy)).replace("$DATA", str(data)))[3:]
        assert main([*argv, "data.max_eval_per_class=1"]) == 0, example
    evaluations = sorted(p.name for p in run_copy.iterdir() if p.name.startswith("eval_"))
    # eval_<dataset>_<time>, and _2... for a second evaluation started in the same second
    stems = [re.sub(r"_\d{8}-\d{6}(_\d+)?$", "", name) for name in evaluations]
    assert stems == ["eval_caltech101", "eval_imagefolder", "eval_imagefolder"]
