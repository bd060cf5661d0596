"""Method options are declared once, beside their method (``register_method(options=...)``: default, type,
range, help), and every file under configs/ is checked against those declarations (issues 21.3, 22.4)."""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest
import yaml
from fixtures import make_imagefolder
from safetensors.torch import load_file

from mugcp.cli import run_cli
from mugcp.config import CONFIG_DIR, ConfigError, load_config, merge, split_variant
from mugcp.config_schema import Option, integer, option, show_value
from mugcp.methods import create_model, get_method, list_methods, register_method, resolve_options
from mugcp.recipes import _resolved_file, recipe_for
from mugcp.runs import run_setup
from mugcp.runs.run_setup import check_run_config
from mugcp.sweep import main as sweep_main
from mugcp.sweeps import load_sweep, plan
from mugcp.train import main as train_main

CLASSES = ["red fox", "blue whale", "snow owl", "sand cat"]
CONFIG_FILES = sorted(CONFIG_DIR.rglob("*.yaml"))


# ---------------------------------------------------------------- the declarations
def test_every_option_is_declared_with_a_spec_that_accepts_its_default_and_a_one_line_help():
    for name in list_methods():
        spec = get_method(name)
        assert spec.options, name
        for key, declared in spec.options.items():
            assert isinstance(declared, Option), (name, key)
            assert declared.spec.accepts(declared.default), (name, key)
            assert declared.help.strip() and "\n" not in declared.help, (name, key)
        assert spec.defaults == {key: declared.default for key, declared in spec.options.items()}
        assert spec.cls.default_options == spec.defaults


def test_a_declaration_that_contradicts_itself_is_refused_at_import():
    with pytest.raises(ValueError, match=r"^option default -1 is not an integer >= 1\.$"):
        option(-1, integer(1), "learned tokens")
    with pytest.raises(ValueError, match="one non-empty line"):
        option(1, integer(1), "two\nlines")
    with pytest.raises(TypeError, match=r"^method 'broken': declare option 'n_ctx' with config_schema\.option"):
        register_method("broken", options={"n_ctx": 16})


@pytest.mark.parametrize("method, key, value, allowed", [
    ("coop", "n_ctx", -1, "an integer in [1, 73]"),
    ("coop", "n_ctx", 0, "an integer in [1, 73]"),
    ("coop", "class_token_position", "start", "one of end, middle, front"),
    ("cocoop", "meta_reduction", 0, "an integer >= 1"),
    ("kgcoop", "kg_weight", -5, "a number >= 0"),
    ("maple", "depth", 0, "an integer >= 1"),
    ("ivlp", "n_ctx_vision", 0, "an integer >= 1"),
    ("promptsrc", "gpa_std", 0, "a number > 0"),
    ("mugcp", "n_semantic", 0, "an integer >= 1"),
    ("mugcp", "semantic_dim", 0, "an integer >= 1, or null (the CLIP text width for captions)"),
    ("zsclip", "templates", 3, "a string or a list of strings"),
])
def test_out_of_range_values_are_refused_naming_the_key_value_and_range(method, key, value, allowed):
    default = get_method(method).options[key].default
    with pytest.raises(ConfigError) as err:
        resolve_options(method, {key: value})
    assert str(err.value) == (f"method.{key}={value!r} is not allowed: expected {allowed} for method '{method}'. "
                              f"The default is {show_value(default)}.")


# ---------------------------------------------------------------- n_ctx against ctx_init
@pytest.mark.parametrize("method", ["coop", "cocoop", "kgcoop"])
def test_coop_family_refuses_an_n_ctx_other_than_ctx_inits_word_count(method):
    with pytest.raises(ConfigError, match=r"^method\.n_ctx=100 is not allowed"):
        resolve_options(method, {"n_ctx": 100, "ctx_init": "a photo of a"})
    disagree = r"^method\.n_ctx=8 disagrees with method\.ctx_init='a photo of a' \(4 words\)"
    with pytest.raises(ConfigError, match=disagree):
        resolve_options(method, {"n_ctx": 8, "ctx_init": "a photo of a"})
    assert resolve_options(method, {"n_ctx": 8, "ctx_init": ""})["n_ctx"] == 8
    assert resolve_options(method, {"n_ctx": 2, "ctx_init": "a_photo"})["n_ctx"] == 2  # "_" is a space, as released


@pytest.mark.parametrize("method, options, context", [
    ("coop", {"n_ctx": 3, "ctx_init": ""}, lambda m: m.ctx.shape[0]),
    ("coop", {"n_ctx": 5, "ctx_init": "a photograph of an ocelot"}, lambda m: m.ctx.shape[0]),
    ("cocoop", {}, lambda m: m.ctx.shape[0]),
    ("kgcoop", {"n_ctx": 2, "ctx_init": ""}, lambda m: m.ctx.shape[0]),
    # n_ctx > 4: the released rule leaves ctx_init unused and keeps n_ctx
    ("maple", {"n_ctx": 6, "depth": 1}, lambda m: m.text_prompts.layers[0].shape[0]),
    ("ivlp", {"n_ctx_text": 3, "text_depth": 1, "vision_depth": 0}, lambda m: m.text_prompts.layers[0].shape[0]),
])
def test_the_options_a_model_accepts_are_the_shapes_it_trains(vit_b32, method, options, context):
    resolved = resolve_options(method, options)
    model = create_model(method, CLASSES, backbone=vit_b32, **options)
    assert context(model) == resolved.get("n_ctx", resolved.get("n_ctx_text"))


def one_line_exit_2(main, argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: main(argv))
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err.strip()


REPORTED = [  # issue 21.3's four cases, each before anything is read or written
    (["method=coop", "method.n_ctx=-1"],
     "error: method.n_ctx=-1 is not allowed: expected an integer in [1, 73] for method 'coop'."),
    (["method=coop", "method.n_ctx=0"],
     "error: method.n_ctx=0 is not allowed: expected an integer in [1, 73] for method 'coop'."),
    (["method=kgcoop", "method.kg_weight=-5"],
     "error: method.kg_weight=-5 is not allowed: expected a number >= 0 for method 'kgcoop'."),
    (["method=cocoop", "method.n_ctx=100"],
     "error: method.n_ctx=100 is not allowed: expected an integer in [1, 73] for method 'cocoop'."),
]


@pytest.mark.parametrize("flags", [["--print-config"], []], ids=["print-config", "train"])
@pytest.mark.parametrize("overrides, message", REPORTED, ids=[" ".join(case[0]) for case in REPORTED])
def test_reported_cases_are_one_line_exit_2_and_write_nothing(tmp_path, monkeypatch, capsys, flags, overrides, message):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(run_setup, "load_clip", lambda *a, **k: pytest.fail("a model was loaded before the check"))
    status, out, err = one_line_exit_2(train_main, [*flags, "--output", str(tmp_path / "run"), *overrides], capsys)
    assert (status, out) == (2, "")
    assert "\n" not in err and err.startswith(message)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("n_ctx, message", [
    (-1, "method.n_ctx=-1 is not allowed: expected an integer in [1, 73] for method 'cocoop'. The default is 4."),
    (8, "method.n_ctx=8 disagrees with method.ctx_init='a photo of a' (4 words)"),
])
def test_sweep_dry_run_refuses_in_one_line_naming_the_file_and_the_part(tmp_path, capsys, n_ctx, message):
    sweep = tmp_path / "grid.yaml"
    sweep.write_text(yaml.safe_dump({"datasets": ["dtd"], "seeds": [1], "methods": ["cocoop"], "shots": [1],
                                     "overrides": {"data.root": str(tmp_path)},
                                     "method_overrides": {"cocoop": {"method.n_ctx": n_ctx}}}))
    status, out, err = one_line_exit_2(sweep_main, [str(sweep), "--root", str(tmp_path / "runs"), "--dry-run"], capsys)
    assert (status, out) == (2, "")
    assert "\n" not in err and err.startswith(f"error: {sweep}: method_overrides.cocoop: {message}")
    assert sorted(os.listdir(tmp_path)) == ["grid.yaml"]


def test_a_trained_run_records_the_context_length_it_trained(tmp_path, vit_b32, monkeypatch):
    """config.yaml, adapter_config.json and the saved context agree (CoCoOp with its own n_ctx, no ctx_init)."""
    monkeypatch.setattr(run_setup, "load_clip", lambda *args, **kwargs: vit_b32)
    root = make_imagefolder(tmp_path / "data", CLASSES, per_class={"train": 2, "test": 1})
    out = tmp_path / "run"
    assert train_main([
        f"data.root={root}", "data.dataset=imagefolder", "data.shots=1", "data.batch_size=2", "method=cocoop",
        "method.n_ctx=3", "method.ctx_init=''", "model.pretrained=none", "optim.epochs=1", "optim.max_steps=1",
        "data.max_eval_per_class=1", "train.progress=false", "train.tensorboard=false", "--output", str(out),
    ]) == 0
    recorded = yaml.safe_load((out / "config.yaml").read_text())["method"]
    adapter = json.loads((out / "checkpoint" / "adapter_config.json").read_text())["method_options"]
    trained = load_file(str(out / "checkpoint" / "adapter_model.safetensors"))["ctx"].shape[0]
    assert (recorded["n_ctx"], adapter["n_ctx"], trained) == (3, 3, 3)


# ---------------------------------------------------------------- every file under configs/
def check_method_file(path: Path) -> None:
    """configs/methods/<m>.yaml: a valid run config whose method section lists every declared option at its default."""
    cfg = load_config(path)
    check_run_config(cfg)
    method = cfg["method"]["name"]
    assert path.stem == method
    written = {key: value for key, value in cfg["method"].items() if key != "name"}
    declared_in = get_method(method).cls.__module__
    assert written == get_method(method).defaults, f"{path} disagrees with the declaration in {declared_in}"


def check_recipe_file(path: Path) -> None:
    """configs/recipes/<m>/<protocol>.yaml: every per-K and per-dataset variant, over the method's file, is a valid
    run config."""
    method, protocol = path.parent.name, path.stem
    data = _resolved_file(method, protocol)
    variants = [(None, None)] + [(name, None) for name in data["per_dataset"]] + [(None, k) for k in data["per_shots"]]
    for dataset, shots in variants:
        recipe = recipe_for(method, protocol, dataset, shots)
        base, _ = split_variant(method)  # coop+dept: CoOp's file, the switch from method=coop+dept
        cfg = merge(load_config(f"methods/{base}", [f"method={method}"]), recipe.overrides, str(path))
        check_run_config(cfg)


def check_sweep_file(path: Path, root: Path) -> None:
    """configs/sweeps/<protocol>.yaml: every run it plans (one seed) resolves and passes the checks."""
    sweep = load_sweep(path)
    assert plan(dataclasses.replace(sweep, seeds=sweep.seeds[:1]), root)


@pytest.mark.parametrize("path", CONFIG_FILES, ids=[str(p.relative_to(CONFIG_DIR)) for p in CONFIG_FILES])
def test_every_file_under_configs_is_checked_against_the_declarations(path, tmp_path, monkeypatch):
    monkeypatch.setenv("DATA", str(tmp_path))
    kind = path.relative_to(CONFIG_DIR).parts
    if kind[0] == "methods":
        check_method_file(path)
    elif kind[0] == "recipes":
        check_recipe_file(path)
    elif kind[0] == "sweeps":
        check_sweep_file(path, tmp_path / "runs")
    else:
        assert len(kind) == 1, f"{path}: a new kind of config file; teach this test to check it"
        check_run_config(load_config(path))


def test_the_walk_covers_every_kind_of_shipped_config():
    kinds = {path.relative_to(CONFIG_DIR).parts[0] if len(path.relative_to(CONFIG_DIR).parts) > 1 else "run"
             for path in CONFIG_FILES}
    assert kinds == {"methods", "recipes", "sweeps", "run"}
    assert {path.stem for path in (CONFIG_DIR / "methods").glob("*.yaml")} == set(list_methods())


def test_a_method_file_that_drifts_from_its_declaration_is_caught(tmp_path, monkeypatch):
    drifted = tmp_path / "coop.yaml"
    drifted.write_text((CONFIG_DIR / "methods" / "coop.yaml").read_text().replace("init_std: 0.02", "init_std: 0.05"))
    with pytest.raises(AssertionError, match="disagrees with the declaration in mugcp.methods.coop"):
        check_method_file(drifted)
    drifted.write_text((CONFIG_DIR / "methods" / "coop.yaml").read_text().replace("n_ctx: 16", "n_ctx: -16"))
    with pytest.raises(ConfigError, match=r"^method\.n_ctx=-16 is not allowed"):
        check_method_file(drifted)
