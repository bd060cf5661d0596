"""Failing fast: bad config is one line and exit status 2 before any data, model or folder; failed runs tell the
truth."""
import argparse
import logging

import pytest
import torch
from fixtures import make_imagefolder

from mugcp.cli import run_cli
from mugcp.config import DEFAULTS, ConfigError, load_config
from mugcp.config_schema import CLASS_SUBSETS, PRECISIONS, PROTOCOLS, SCHEMA, check_values, flatten
from mugcp.runs import run_setup
from mugcp.runs.checkpoint import CheckpointError, read_trainer_state
from mugcp.runs.run_setup import RunInterrupted, check_run_config
from mugcp.train import main as train_main
from mugcp.training import trainer
from mugcp.training.evaluate_checkpoint import evaluation_config

CLASSES = ["red fox", "blue whale", "snow owl", "sand cat"]


def small_config(root, *extra):
    return load_config(None, [
        "data.dataset=imagefolder", f"data.root={root}", "data.shots=2", "data.batch_size=2", "data.eval_batch_size=8",
        "method=coop", "method.n_ctx=2", "model.pretrained=none", "optim.epochs=2", "optim.lr=0.01",
        "optim.warmup_epochs=0", "train.progress=false", "train.tensorboard=false", *extra,
    ])


@pytest.fixture(scope="module")
def dataset_root(tmp_path_factory):
    return make_imagefolder(tmp_path_factory.mktemp("data"), CLASSES, per_class={"train": 4, "test": 2})


@pytest.fixture
def shared_backbone(vit_b32, monkeypatch):
    monkeypatch.setattr(run_setup, "load_clip", lambda *args, **kwargs: vit_b32)
    return vit_b32


@pytest.fixture
def nothing_loads(monkeypatch):
    """Any attempt to read data or build a model fails the test: validation must come first."""
    def forbidden(*args, **kwargs):
        raise AssertionError("data or model loaded before the config was checked")

    monkeypatch.setattr(run_setup, "load_clip", forbidden)
    monkeypatch.setattr(trainer, "build_protocol", forbidden)


def cli(main, argv, capsys):
    """Run a command-line main as ``python -m`` would; returns (exit status, stderr)."""
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: main(argv))
    return exit_info.value.code, capsys.readouterr().err.strip()


# ---------------------------------------------------------------- the schema
def test_every_default_key_has_a_schema_entry_that_accepts_the_default():
    keys = [key for key in flatten(DEFAULTS) if not key.startswith("method.") or key == "method.name"]
    assert [key for key in keys if key not in SCHEMA] == []
    for key in keys:
        assert SCHEMA[key].accepts(flatten(DEFAULTS)[key]), key


def test_schema_choices_match_the_code_that_reads_them():
    from mugcp.data.protocol import ALL_CLASS_PROTOCOLS, BASE2NEW, SUBSETS
    from mugcp.runs import runtime

    assert PRECISIONS == ("auto", *runtime.PRECISIONS)
    assert PROTOCOLS == (BASE2NEW, *ALL_CLASS_PROTOCOLS)
    assert set(CLASS_SUBSETS) == set(SUBSETS)


def test_every_shipped_config_passes_the_schema():
    from mugcp.config import CONFIG_DIR

    # configs/sweeps/ holds sweep files and configs/recipes/ released recipes, not run configs:
    # tests/test_sweep.py and tests/test_recipes.py load those.
    not_run_configs = {"sweeps", "recipes"}
    run_configs = [path for path in sorted(CONFIG_DIR.rglob("*.yaml"))
                   if not not_run_configs & set(path.relative_to(CONFIG_DIR).parts)]
    assert len(run_configs) >= 9
    for path in run_configs:
        check_run_config(load_config(path))


@pytest.mark.parametrize("override, allowed", [
    ("model.quick_gelu=auto", True), ("model.quick_gelu=true", True), ("model.quick_gelu=maybe", False),
    ("train.text_memory_mb=512", True), ("train.text_memory_mb=auto", True), ("train.text_memory_mb=null", True),
    ("train.text_memory_mb=0", False), ("data.eval_subsets=new", True), ("data.eval_subsets=[]", False),
    ("optim.betas=[0.9, 1.0]", False), ("data.val_fraction=0.0", True), ("optim.lr=1e-3", True),
    ("optim.epochs=true", False),
])
def test_specs_accept_and_refuse(override, allowed):
    key, _, text = override.partition("=")
    from mugcp.config import parse_value

    assert SCHEMA[key].accepts(parse_value(text)) is allowed


# ---------------------------------------------------------------- bad config on the command line
BAD_CONFIGS = [
    ("optim.lr=abc", "error: optim.lr='abc' is not allowed: expected a number > 0. The default is 0.002."),
    ("data.shots=abc",
     "error: data.shots='abc' is not allowed: expected an integer >= 1, or null (every training image). "
     "The default is 16."),
    ("optim.epochs=abc", "error: optim.epochs='abc' is not allowed: expected an integer >= 1. The default is 5."),
    ("data.batch_size=0", "error: data.batch_size=0 is not allowed: expected an integer >= 1. The default is 4."),
    ("data.shots=-2",
     "error: data.shots=-2 is not allowed: expected an integer >= 1, or null (every training image). "
     "The default is 16."),
    ("optim.name=adamx",
     "error: optim.name='adamx' is not allowed: expected one of sgd, adam, adamw. Did you mean: adam, adamw? "
     "The default is sgd."),
    ("optim.scheduler=cosin",
     "error: optim.scheduler='cosin' is not allowed: expected one of released, cosine_per_step, constant. "
     "Did you mean: cosine_per_step? The default is released."),
    ("train.precision=bf16",
     "error: train.precision='bf16' is not allowed: expected one of auto, fp32, amp_bf16, amp_fp16. "
     "Did you mean: amp_bf16, amp_fp16? The default is auto."),
    ("method=cop",
     "error: unknown method 'cop'. Did you mean: coop, tcp, kgcoop? Available: cocoop, coop, ivlp, kgcoop, maple, "
     "mma, mugcp, prograd, promptsrc, tcp, zsclip."),
    ("method.n_ctx=abc",
     "error: method.n_ctx='abc' is not allowed: expected an integer in [1, 73] for method 'mugcp'. The default is 2."),
    # issue 21.3: every method option has a range, and options that disagree are refused before anything runs
    ("method.n_ctx=-1", "error: method.n_ctx=-1 is not allowed: expected an integer in [1, 73] for method 'mugcp'."),
    ("method=coop method.n_ctx=0",
     "error: method.n_ctx=0 is not allowed: expected an integer in [1, 73] for method 'coop'."),
    ("method=kgcoop method.kg_weight=-5",
     "error: method.kg_weight=-5 is not allowed: expected a number >= 0 for method 'kgcoop'. The default is 8."),
    ("method=cocoop method.n_ctx=100",
     "error: method.n_ctx=100 is not allowed: expected an integer in [1, 73] for method 'cocoop'."),
    ("method=cocoop method.n_ctx=8",
     "error: method.n_ctx=8 disagrees with method.ctx_init='a photo of a' (4 words): the context length is ctx_init's "
     "word count, as in the released code. Set method.n_ctx=4, or method.ctx_init='' for 8 random context tokens."),
    ("method.n_cxt=4",
     "error: method section: method 'mugcp' has no option 'n_cxt'. Did you mean: n_ctx? Its options: "),
    ("model.backbone=ViT-B-17", "error: model.backbone='ViT-B-17': unknown open_clip model 'ViT-B-17'. "
                                "Close matches: ViT-B-16, ViT-g-14, ViT-e-14. "
                                "See open_clip.list_models(); 'ViT-B/16' and 'ViT-B-16' both work."),
    ("model.pretrained=openia",
     "error: model.pretrained='openia': 'openia' is not an open_clip pretrained tag for model 'ViT-B-32'. "
     "Known tags: "),
    ("model.pretrained=/no/such/ViT-B-32.pt",
     "error: model.pretrained='/no/such/ViT-B-32.pt': pretrained weights file or folder not found: "
     "/no/such/ViT-B-32.pt"),
    ("data.dataset=caltech", "error: unknown data.dataset 'caltech'. Did you mean: caltech101? Known datasets: "),
    ("train.device=gpu", "error: train.device='gpu' is not a device; use auto, cpu, cuda or cuda:N."),
]


@pytest.mark.parametrize("override, message", BAD_CONFIGS, ids=[case[0] for case in BAD_CONFIGS])
def test_bad_config_is_one_line_exit_2_and_no_run_folder(tmp_path, capsys, nothing_loads, override, message):
    status, stderr = cli(train_main, ["--output", str(tmp_path / "run"), *override.split()], capsys)
    assert status == 2
    assert "\n" not in stderr and stderr.startswith(message)
    assert not (tmp_path / "run").exists()


def test_missing_data_root_is_named_before_loading(tmp_path, capsys, nothing_loads):
    status, stderr = cli(train_main, ["--output", str(tmp_path / "run"), "data.dataset=dtd",
                                      f"data.root={tmp_path / 'nowhere'}"], capsys)
    assert status == 2 and not (tmp_path / "run").exists()
    assert stderr == (f"error: data.root='{tmp_path / 'nowhere'}' does not exist. Point it at the dataset's folder; "
                      "python -m mugcp.data check --dataset dtd --root ROOT checks a layout.")


def test_both_backbone_spellings_pass():
    for name in ("ViT-B/16", "ViT-B-16"):
        check_run_config(load_config(None, [f"model.backbone={name}"]))


def test_bad_config_with_overwrite_keeps_the_existing_run(tmp_path, capsys, nothing_loads):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.json").write_text("{}")
    status, _ = cli(train_main, ["--output", str(tmp_path / "run"), "--overwrite", "optim.lr=abc"], capsys)
    assert status == 2 and (tmp_path / "run" / "metrics.json").is_file()


def test_resume_on_a_missing_folder_writes_nothing(tmp_path, capsys, nothing_loads):
    status, stderr = cli(train_main, ["--output", str(tmp_path / "run"), "--resume"], capsys)
    assert status == 2
    assert stderr == (f"error: --resume: run folder {tmp_path / 'run'} does not exist. "
                      "Pass the --output of the run to continue.")
    assert not (tmp_path / "run").exists()


def test_resume_on_a_folder_without_a_run_writes_nothing(tmp_path, capsys, nothing_loads):
    (tmp_path / "run").mkdir()
    status, stderr = cli(train_main, ["--output", str(tmp_path / "run"), "--resume"], capsys)
    assert status == 2 and stderr.startswith(f"error: --resume: {tmp_path / 'run'} holds no run (no config.yaml).")
    assert list((tmp_path / "run").iterdir()) == []


def test_the_python_api_checks_too(tmp_path, nothing_loads):
    cfg = load_config(None, ["data.batch_size=0"])
    with pytest.raises(ConfigError, match=r"^data\.batch_size=0 is not allowed"):
        trainer.train(cfg, tmp_path / "run")
    with pytest.raises(ConfigError, match=r"--resume: run folder .* does not exist"):
        trainer.train(load_config(None), tmp_path / "run", resume=True)
    assert not (tmp_path / "run").exists()


def test_method_options_are_checked_against_their_declarations():
    from mugcp.methods import resolve_options

    with pytest.raises(ConfigError,
                       match=r"^method\.class_specific='yes' is not allowed: expected true or false for method 'coop'"):
        resolve_options("coop", {"class_specific": "yes"})
    with pytest.raises(ConfigError,
                       match=r"^method\.kg_weight='x' is not allowed: expected a number >= 0 for method 'kgcoop'"):
        resolve_options("kgcoop", {"kg_weight": "x"})
    assert resolve_options("kgcoop", {"kg_weight": 2})["kg_weight"] == 2  # an integer is a number
    assert resolve_options("zsclip", {"templates": ["a {}.", "an {}."]})["templates"] == ["a {}.", "an {}."]


def test_check_values_names_the_first_bad_key():
    with pytest.raises(ConfigError, match=r"^data\.image_size=0 is not allowed: expected an integer >= 1, or null "
                                          r"\(the backbone's\)\. The default is null\.$"):
        check_values(load_config(None, ["data.image_size=0"]))


# ---------------------------------------------------------------- runs that fail after starting
class Collect(logging.Handler):
    def __init__(self):
        super().__init__()
        self.records = []

    def emit(self, record):
        self.records.append(record)


def test_failure_before_the_run_starts_leaves_no_folder(tmp_path, shared_backbone):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError, match=r"imagefolder: .*train not found"):
        trainer.train(small_config(empty), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_failure_after_start_logs_the_traceback_and_tells_the_console(tmp_path, dataset_root, shared_backbone,
                                                                      monkeypatch):
    from mugcp.methods.coop import CoOp

    calls = {"n": 0}
    real_step = CoOp.training_step

    def step_that_fails(self, batch):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("boom")
        return real_step(self, batch)

    monkeypatch.setattr(CoOp, "training_step", step_that_fails)
    console = Collect()
    logging.getLogger("mugcp").addHandler(console)
    try:
        with pytest.raises(RuntimeError, match="boom"):
            trainer.train(small_config(dataset_root), tmp_path / "run")
    finally:
        logging.getLogger("mugcp").removeHandler(console)
    out = tmp_path / "run"
    log_text = (out / "log.txt").read_text()
    expected = (f"run failed: RuntimeError: boom. The checkpoint of epoch 1 is kept in {out / 'checkpoint'}; "
                f"continue with python -m mugcp.train --output {out} --resume. The log, with the traceback, is "
                f"{out / 'log.txt'}.")
    assert expected in log_text and "Traceback (most recent call last)" in log_text and "step_that_fails" in log_text
    failure = [r for r in console.records if r.levelno == logging.ERROR]
    assert [r.getMessage() for r in failure] == [expected] and failure[0].exc_info is None  # one line, no traceback
    assert (out / "config.yaml").is_file() and not (out / "metrics.json").exists()


def test_interrupt_in_the_first_epoch_says_no_checkpoint_exists(tmp_path, dataset_root, shared_backbone, monkeypatch,
                                                                capsys):
    from mugcp.config import dump_config
    from mugcp.methods.coop import CoOp

    out = tmp_path / "run"
    config = tmp_path / "config.yaml"
    dump_config(small_config(dataset_root), config)
    real_step = CoOp.training_step

    def interrupt(self, batch):
        raise KeyboardInterrupt

    monkeypatch.setattr(CoOp, "training_step", interrupt)
    status, stderr = cli(train_main, ["--config", str(config), "--output", str(out)], capsys)
    assert status == 130
    assert stderr.splitlines()[-1] == (f"run interrupted. No checkpoint was saved yet, so nothing can be resumed; "
                                       f"python -m mugcp.train --output {out} --resume starts the training over. "
                                       f"The log, with the traceback, is {out / 'log.txt'}.")
    assert not (out / "checkpoint").exists() and "KeyboardInterrupt" in (out / "log.txt").read_text()

    monkeypatch.setattr(CoOp, "training_step", real_step)
    assert train_main(["--output", str(out), "--resume"]) == 0  # as the message says: starts over, and finishes
    assert "holds no checkpoint yet" in (out / "log.txt").read_text() and (out / "metrics.json").is_file()


def test_interrupt_before_the_run_starts_removes_the_folder(tmp_path, dataset_root, monkeypatch):
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(run_setup, "load_clip", interrupt)
    with pytest.raises(RunInterrupted, match=r"^interrupted before the run started; .* was removed\.$"):
        trainer.train(small_config(dataset_root), tmp_path / "run")
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------- trainer_state.pt
@pytest.fixture
def finished_run(tmp_path, dataset_root, shared_backbone):
    out = tmp_path / "run"
    trainer.train(small_config(dataset_root, "optim.epochs=1"), out)
    return out


def test_trainer_state_is_safe_to_load_and_bad_ones_are_named(finished_run, dataset_root):
    path = finished_run / "checkpoint" / "trainer_state.pt"
    state = torch.load(path, weights_only=True)  # tensors and plain containers only
    assert state["epoch"] == 1 and read_trainer_state(finished_run / "checkpoint")["step"] == state["step"]

    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CheckpointError,
                       match=rf"^{path} is damaged and cannot be read \(.*\)\. Resuming needs it: restore the file"):
        trainer.train(small_config(dataset_root, "optim.epochs=1"), finished_run, resume=True)

    torch.save(dict(state, args=argparse.Namespace(lr=0.1)), path)  # an old-style state that needs full unpickling
    with pytest.raises(CheckpointError, match=r"holds Python objects that only load with full unpickling, which can "
                                              r"run code; mugcp refuses"):
        read_trainer_state(finished_run / "checkpoint")


# ---------------------------------------------------------------- evaluate refuses what it cannot apply
def test_evaluate_refuses_settings_it_cannot_apply(tmp_path):
    run_config = load_config(None, ["method=coop", "method.n_ctx=2", "optim.lr=0.01"])
    trained_options = {"n_ctx": 2, "ctx_init": "", "class_specific": False, "class_token_position": "end",
                       "init_std": 0.02}
    with pytest.raises(ConfigError, match=r"^evaluate cannot apply method\.n_ctx=4: the prompts were trained with the "
                                          r"checkpoint's value \(the checkpoint has method\.n_ctx=2\)\. Drop it, or "
                                          r"train a new run with it\.$"):
        evaluation_config(run_config, None, ["method.n_ctx=4"], trained_options)
    with pytest.raises(ConfigError, match=r"^evaluate cannot apply optim\.lr=0\.5: it only affects training "
                                          r"\(the checkpoint has optim\.lr=0\.01\)"):
        evaluation_config(run_config, None, ["optim.lr=0.5"], trained_options)
    with pytest.raises(ConfigError, match=r"evaluate cannot apply data\.shots=4"):
        evaluation_config(run_config, None, ["data.shots=4"], trained_options)
    # What evaluation does apply, and settings equal to the checkpoint's, pass.
    cfg = evaluation_config(run_config, None, ["method.n_ctx=2", "optim.lr=0.01", "data.eval_subsets=[new]",
                                               "data.eval_batch_size=3"], trained_options)
    assert cfg["data"]["eval_subsets"] == ["new"] and cfg["data"]["eval_batch_size"] == 3


def test_evaluate_cli_refusal_creates_no_folder(finished_run, tmp_path, capsys):
    from mugcp.evaluate import main as evaluate_main

    status, stderr = cli(evaluate_main, ["--checkpoint", str(finished_run), "--output", str(tmp_path / "eval"),
                                         "method.n_ctx=4"], capsys)
    assert status == 2 and stderr.startswith("error: evaluate cannot apply method.n_ctx=4")
    status, stderr = cli(evaluate_main, ["--checkpoint", str(finished_run), "--output", str(tmp_path / "eval"),
                                         "data.eval_batch_size=0"], capsys)
    assert status == 2 and stderr.startswith("error: data.eval_batch_size=0 is not allowed")
    assert not (tmp_path / "eval").exists()
