"""``python -m mugcp.train --print-config``: the config the run's config.yaml would hold, and nothing created."""
from __future__ import annotations

import os

import yaml
from fixtures import make_imagefolder

from mugcp.runs import run_setup
from mugcp.train import main as train_main

CLASSES = ["red fox", "blue whale", "snow owl", "sand cat"]


def test_print_config_is_the_runs_config_yaml_and_creates_nothing(tmp_path, vit_b32, monkeypatch, capsys):
    monkeypatch.setattr(run_setup, "load_clip", lambda *args, **kwargs: vit_b32)
    monkeypatch.chdir(tmp_path)
    root = make_imagefolder(tmp_path / "data", CLASSES, per_class={"train": 4, "test": 1})
    args = [f"data.root={root}", "data.dataset=imagefolder", "data.shots=2", "data.batch_size=2", "method=coop",
            "method.n_ctx=2", "model.pretrained=none", "optim.epochs=1", "optim.max_steps=1",
            "data.max_eval_per_class=1",
            "train.progress=false", "train.tensorboard=false", "--output", str(tmp_path / "run")]
    before = sorted(os.listdir(tmp_path))
    assert train_main(["--print-config", *args]) == 0
    printed = capsys.readouterr().out
    assert sorted(os.listdir(tmp_path)) == before  # no run folder, no runs/
    assert train_main(args) == 0
    assert printed == (tmp_path / "run" / "config.yaml").read_text()


def test_print_config_resolves_the_semantic_source(tmp_path, capsys):
    assert train_main(["--print-config", "method=mugcp", "semantic.source=auto"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["semantic"]["source"] == "clip"  # auto without a cache: CLIP's tokens, as the run records it
    assert printed["optim"]["scheduler"] == "released" and printed["data"]["fewshot_file"] == "auto"
