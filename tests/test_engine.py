"""Training runs end to end: outputs, exact resume, NaN handling, evaluation and CLI errors."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from fixtures import make_imagefolder, write_corrupt_image
from safetensors.torch import load_file

from mugcp.config import load_config
from mugcp.runs import run_setup
from mugcp.training import TrainingDiverged, train, trainer

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ["red fox", "blue whale", "snow owl", "sand cat"]


@pytest.fixture
def shared_backbone(vit_b32, monkeypatch):
    """Runs reuse the session's frozen ViT-B-32 instead of building a new one each time."""
    monkeypatch.setattr(run_setup, "load_clip", lambda *args, **kwargs: vit_b32)
    return vit_b32


@pytest.fixture(scope="module")
def dataset_root(tmp_path_factory):
    return make_imagefolder(tmp_path_factory.mktemp("data"), CLASSES, per_class={"train": 4, "test": 2})


def small_config(root, *extra):
    method = next((e.split("=", 1)[1] for e in extra if e.startswith("method=")), "coop")
    return load_config(None, [
        "data.dataset=imagefolder", f"data.root={root}", "data.shots=2", "data.batch_size=2", "data.eval_batch_size=8",
        f"method={method}", *(["method.n_ctx=2"] if method == "coop" else []), "model.pretrained=none",
        "optim.epochs=2", "optim.lr=0.01",
        "optim.warmup_epochs=0", "train.progress=false", "train.tensorboard=false", *extra,
    ])


def test_run_writes_config_metrics_log_and_small_checkpoint(tmp_path, dataset_root, shared_backbone):
    out = tmp_path / "run"
    metrics = train(small_config(dataset_root), out)
    on_disk = json.loads((out / "metrics.json").read_text())
    assert on_disk == json.loads(json.dumps(metrics))
    assert on_disk["base"]["total"] == 4 and on_disk["new"]["total"] == 4
    assert on_disk["base"]["classes"] == 2 and on_disk["new"]["classes"] == 2
    expected_hm = (2 * on_disk["base"]["accuracy"] * on_disk["new"]["accuracy"]
                   / max(1e-9, on_disk["base"]["accuracy"] + on_disk["new"]["accuracy"]))
    assert on_disk["hm"] == pytest.approx(expected_hm, abs=1e-3)
    assert on_disk["pretrained"] is False and on_disk["method"] == "coop" and on_disk["steps"] == 4
    resolved = load_config(out / "config.yaml")
    assert resolved["data"]["root"] == str(dataset_root) and resolved["method"]["n_ctx"] == 2
    assert "epoch 2 step 4/4" in (out / "log.txt").read_text()
    tensors = load_file(str(out / "checkpoint" / "adapter_model.safetensors"))
    assert list(tensors) == ["ctx"] and tuple(tensors["ctx"].shape) == (2, 512)
    assert (out / "checkpoint" / "adapter_model.safetensors").stat().st_size < 500_000
    adapter = json.loads((out / "checkpoint" / "adapter_config.json").read_text())
    assert adapter["method"] == "coop" and adapter["backbone"] == "ViT-B-32" and adapter["method_options"]["n_ctx"] == 2
    assert "red fox" not in (out / "checkpoint" / "adapter_config.json").read_text().split('"run_config"')[0]
    splits = json.loads((out / "splits.json").read_text())
    assert len(splits["train"]["items"]) == 4 and splits["train"]["classnames"] == ["blue whale", "red fox"]


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(tmp_path, dataset_root, shared_backbone, monkeypatch):
    cfg = small_config(dataset_root, "data.augment=true")
    train(cfg, tmp_path / "straight")

    real_save = trainer.save_checkpoint

    def save_then_crash(*args, **kwargs):
        real_save(*args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer, "save_checkpoint", save_then_crash)
    with pytest.raises(KeyboardInterrupt, match=r"The checkpoint of epoch 1 is kept in .*interrupted/checkpoint; "
                                                r"continue with python -m mugcp\.train"):
        train(cfg, tmp_path / "interrupted")
    monkeypatch.setattr(trainer, "save_checkpoint", real_save)
    state = torch.load(tmp_path / "interrupted" / "checkpoint" / "trainer_state.pt", weights_only=True)
    assert state["epoch"] == 1
    train(cfg, tmp_path / "interrupted", resume=True)

    straight = load_file(str(tmp_path / "straight" / "checkpoint" / "adapter_model.safetensors"))
    resumed = load_file(str(tmp_path / "interrupted" / "checkpoint" / "adapter_model.safetensors"))
    assert torch.equal(straight["ctx"], resumed["ctx"])


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, dataset_root, shared_backbone, monkeypatch):
    from mugcp.methods.coop import CoOp

    real_step = CoOp.training_step
    calls = {"n": 0}

    def step_that_diverges(self, batch):
        calls["n"] += 1
        loss, logits, terms = real_step(self, batch)
        return (loss * float("nan") if calls["n"] == 3 else loss), logits, terms

    monkeypatch.setattr(CoOp, "training_step", step_that_diverges)
    out = tmp_path / "nan"
    with pytest.raises(TrainingDiverged,
                       match=r"loss became nan at epoch 2, step 3.*last good checkpoint is kept in .*checkpoint"):
        train(small_config(dataset_root), out)
    state = torch.load(out / "checkpoint" / "trainer_state.pt", weights_only=True)
    assert state["epoch"] == 1 and state["step"] == 2
    assert torch.isfinite(load_file(str(out / "checkpoint" / "adapter_model.safetensors"))["ctx"]).all()
    assert not (out / "metrics.json").exists()


def test_existing_run_is_not_overwritten(tmp_path, dataset_root, shared_backbone):
    out = tmp_path / "run"
    train(small_config(dataset_root, "optim.epochs=1"), out)
    with pytest.raises(Exception, match=r"already holds a run.*--resume.*--overwrite"):
        train(small_config(dataset_root, "optim.epochs=1"), out)


def test_corrupt_images_are_skipped_and_counted(tmp_path, shared_backbone):
    root = make_imagefolder(tmp_path, CLASSES, per_class={"train": 4, "test": 2})
    write_corrupt_image(root / "test" / "snow owl" / "broken.png")  # "snow owl" is a new class
    metrics = train(small_config(root, "data.on_bad_image=skip", "optim.epochs=1"), tmp_path / "skip")
    assert metrics["new"]["skipped"] == 1 and metrics["new"]["total"] == 4
    with pytest.raises(Exception, match=r"broken\.png"):
        train(small_config(root, "optim.epochs=1"), tmp_path / "error")


# ---------------------------------------------------------------- command line
def run_cli(*args, cwd=None):
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", *args],
                          capture_output=True, text=True, cwd=cwd or ROOT, env=env, timeout=600)


def test_cli_missing_config_is_one_clear_line(tmp_path):
    result = run_cli("mugcp.train", "--config", str(tmp_path / "nope.yaml"))
    assert result.returncode == 2
    assert result.stderr.strip() == (f"error: config file not found: {tmp_path / 'nope.yaml'}. "
                                     "Pass an existing YAML file with --config.")


def test_cli_unknown_key_names_it():
    result = run_cli("mugcp.train", "optim.lerning_rate=3")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "unknown config key 'optim.lerning_rate'" in result.stderr


def test_cli_missing_checkpoint_is_named(tmp_path):
    result = run_cli("mugcp.evaluate", "--checkpoint", str(tmp_path / "ckpt"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"checkpoint not found: {tmp_path / 'ckpt'} does not exist" in result.stderr


def test_cli_missing_dataset_root_names_path(tmp_path):
    result = run_cli("mugcp.train", "data.dataset=imagefolder", f"data.root={tmp_path / 'nowhere'}",
                     "model.pretrained=none", "--output", str(tmp_path / "run"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert str(tmp_path / "nowhere") in result.stderr


def test_cli_bad_precision_is_one_clear_line(tmp_path):
    result = run_cli("mugcp.train", "train.precision=fp8", "--output", str(tmp_path / "run"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip() == (
        "error: train.precision='fp8' is not allowed: expected one of auto, fp32, amp_bf16, amp_fp16. "
        "Did you mean: fp32? The default is auto."
    )
    assert not (tmp_path / "run").exists()


def test_cli_unreadable_semantic_cache_is_one_clear_line(tmp_path, dataset_root):
    (tmp_path / "cache").mkdir()
    result = run_cli("mugcp.train", "method=mugcp", "data.dataset=imagefolder", f"data.root={dataset_root}",
                     f"semantic.cache={tmp_path / 'cache'}", "model.pretrained=none", "--output", str(tmp_path / "run"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"error: {tmp_path / 'cache'}" in result.stderr and "mugcp.extract" in result.stderr


@pytest.mark.slow
def test_cli_train_then_evaluate_new_classes_and_refuse_other_method(tmp_path, dataset_root):
    out = tmp_path / "run"
    common = ["data.dataset=imagefolder", f"data.root={dataset_root}", "data.shots=2", "data.batch_size=2",
              "method=coop", "method.n_ctx=2", "model.pretrained=none", "optim.epochs=1", "train.progress=false"]
    result = run_cli("mugcp.train", "--output", str(out), *common)
    assert result.returncode == 0, result.stderr
    assert "HM" in result.stdout

    result = run_cli("mugcp.evaluate", "--checkpoint", str(out),
                     "--output", str(tmp_path / "eval"), "data.eval_subsets=[new]")
    assert result.returncode == 0, result.stderr
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert set(metrics) >= {"new", "checkpoint"} and "base" not in metrics and metrics["new"]["total"] == 4
    trained = json.loads((out / "metrics.json").read_text())
    assert metrics["new"]["accuracy"] == trained["new"]["accuracy"]

    result = run_cli("mugcp.evaluate", "--checkpoint", str(out), "method=maple")
    assert result.returncode == 2
    assert "method 'coop' (checkpoint) vs 'maple' (requested)" in result.stderr
    result = run_cli("mugcp.evaluate", "--checkpoint", str(out), "model.backbone=ViT-B-16")
    assert "backbone 'ViT-B-32' (checkpoint) vs 'ViT-B-16' (requested)" in result.stderr


# ---------------------------------------------------------------- MuGCP with a semantic cache
def write_semantic_cache(path, root, skip=()):
    from mugcp.data import build_dataset
    from mugcp.semantics import write_cache

    dataset = build_dataset({"dataset": "imagefolder", "root": root, "val_fraction": 0.2, "val_seed": 0})
    generator = torch.Generator().manual_seed(0)
    entries = {}
    for item in dataset.train + dataset.val + dataset.test:
        if item.key in skip or item.key in entries:
            continue
        length = 3 + len(item.key) % 4  # answers of different lengths exercise padding
        entries[item.key] = (f"a small {['round', 'striped', 'bright'][len(item.key) % 3]} object",
                             torch.randn(length, 24, generator=generator))
    write_cache(path, entries, manifest_extra={"mllm": "test-mllm", "prompt": "describe"})
    return sorted(entries)


@pytest.mark.parametrize("features", ["caption", "hidden"])
def test_mugcp_trains_from_the_semantic_cache(tmp_path, dataset_root, shared_backbone, features):
    write_semantic_cache(tmp_path / "cache", dataset_root)
    cfg = small_config(dataset_root, "method=mugcp", "method.depth=2", f"method.semantic_features={features}",
                       "semantic.source=mllm", f"semantic.cache={tmp_path / 'cache'}", "optim.epochs=1")
    metrics = train(cfg, tmp_path / "run")
    assert metrics["semantic_source"] == "mllm" and metrics["steps"] == 2
    adapter = json.loads((tmp_path / "run" / "checkpoint" / "adapter_config.json").read_text())
    assert adapter["method_options"]["semantic_source"] == "mllm"
    assert adapter["method_options"]["semantic_dim"] == (24 if features == "hidden" else None)


def test_mugcp_without_cache_uses_clip_tokens_and_says_so(tmp_path, dataset_root, shared_backbone, caplog):
    cfg = small_config(dataset_root, "method=mugcp", "method.depth=1", "optim.epochs=1")
    with caplog.at_level("WARNING", logger="mugcp"):
        metrics = train(cfg, tmp_path / "run")
    assert metrics["semantic_source"] == "clip"
    assert "an ablation" in (tmp_path / "run" / "log.txt").read_text()


def test_missing_cache_entries_are_counted_and_named(tmp_path, dataset_root, shared_backbone):
    from mugcp.data import build_protocol

    splits = build_protocol(small_config(dataset_root)["data"], seed=1)
    absent = splits.train[0].key
    write_semantic_cache(tmp_path / "cache", dataset_root, skip={absent})
    cfg = small_config(dataset_root, "method=mugcp", "method.depth=1", "semantic.source=mllm",
                       f"semantic.cache={tmp_path / 'cache'}", "method.semantic_features=hidden")
    with pytest.raises(Exception, match=rf"1 of \d+ images .* no semantic .*{absent}.*mugcp\.extract"):
        train(cfg, tmp_path / "run")


def test_non_conditional_text_features_are_computed_once_per_evaluation(tmp_path, dataset_root, vit_b32, monkeypatch):
    from mugcp.data import build_protocol
    from mugcp.methods import create_model
    from mugcp.training.evaluation import evaluate

    cfg = small_config(dataset_root, "data.eval_batch_size=1", "data.eval_subsets=[all]", "data.protocol=all")
    splits = build_protocol(cfg["data"], seed=1)
    items, classnames = splits.eval["all"]
    model = create_model("coop", classnames, backbone=vit_b32, n_ctx=2)
    calls = {"n": 0}
    real = type(model).compute_text_features

    def counting(self):
        calls["n"] += 1
        return real(self)

    monkeypatch.setattr(type(model), "compute_text_features", counting)
    result = evaluate(model, items, classnames, splits.dataset, cfg["data"], torch.device("cpu"), "fp32",
                      progress=False)
    assert result["total"] == len(items) == 8 and calls["n"] == 1
    evaluate(model, items, classnames, splits.dataset, cfg["data"], torch.device("cpu"), "fp32", progress=False)
    assert calls["n"] == 2  # a new evaluation recomputes (the prompts may have been trained in between)


def test_training_cut_by_max_steps_still_ends_training(tmp_path, dataset_root, shared_backbone, monkeypatch):
    from mugcp.methods.promptsrc import PromptSRC

    ended = []
    monkeypatch.setattr(PromptSRC, "on_train_end", lambda self: ended.append(True))
    metrics = train(small_config(dataset_root, "method=promptsrc", "method.text_depth=1", "method.vision_depth=1",
                                 "optim.epochs=3", "optim.max_steps=3"), tmp_path / "run")
    assert metrics["steps"] == 3 and ended == [True]


@pytest.mark.parametrize("method", ["zsclip", "coop", "cocoop", "ivlp", "maple", "kgcoop", "prograd",
                                    "promptsrc", "tcp", "mugcp"])
def test_every_method_trains_and_evaluates_by_name(tmp_path, dataset_root, shared_backbone, method):
    from mugcp.evaluate import main as evaluate_main

    metrics = train(small_config(dataset_root, f"method={method}", "optim.epochs=1", "optim.max_steps=1"),
                    tmp_path / "run")
    assert metrics["method"] == method and metrics["steps"] == (0 if method == "zsclip" else 1)
    assert evaluate_main(["--checkpoint", str(tmp_path / "run"),
                          "--output", str(tmp_path / "eval"), "data.eval_subsets=[new]"]) == 0
    evaluated = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert evaluated["new"]["accuracy"] == metrics["new"]["accuracy"]


def test_cli_resume_without_config_continues_the_run_config(tmp_path, monkeypatch):
    from mugcp.config import dump_config
    from mugcp.train import main as train_main

    out = tmp_path / "run"
    out.mkdir()
    dump_config(load_config("methods/maple", ["data.dataset=dtd", "train.seed=2"]), out / "config.yaml")
    seen = {}

    def fake_train(cfg, output, resume=False, overwrite=False, stop=None):
        seen.update(cfg=cfg, resume=resume)
        return {"wall_time_s": 0.0, "pretrained": False}

    monkeypatch.setattr(trainer, "train", fake_train)
    assert train_main(["--output", str(out), "--resume"]) == 0
    assert seen["resume"] and seen["cfg"]["method"]["name"] == "maple"
    assert seen["cfg"]["data"]["dataset"] == "dtd" and seen["cfg"]["train"]["seed"] == 2


def test_resume_from_the_command_line_reuses_the_runs_config(tmp_path, dataset_root, shared_backbone):
    from mugcp.train import main as train_main

    out = tmp_path / "run"
    first = train(small_config(dataset_root, "optim.epochs=1"), out)
    # a finished run: resumed only to re-evaluate
    assert train_main(["--output", str(out), "--resume", "--reevaluate"]) == 0
    again = json.loads((out / "metrics.json").read_text())
    assert again["dataset"] == "imagefolder" and again["steps"] == first["steps"] == 2


def test_resume_and_overwrite_together_are_refused(tmp_path, capsys):
    from mugcp.train import main as train_main

    with pytest.raises(SystemExit) as exit_info:
        train_main(["--output", str(tmp_path / "run"), "--resume", "--overwrite"])
    assert exit_info.value.code == 2
    assert "--overwrite deletes it: pass one of them" in capsys.readouterr().err
