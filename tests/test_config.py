"""Config loading: defaults, files with bases, dotted overrides, strict keys with suggestions."""
import pytest

from mugcp.config import DEFAULTS, ConfigError, load_config, parse_overrides
from mugcp.methods import resolve_options


def test_defaults_without_file():
    cfg = load_config()
    assert cfg == DEFAULTS and cfg is not DEFAULTS


def test_overrides_are_yaml_typed():
    tree = parse_overrides(["optim.lr=1e-3", "data.shots=4", "train.progress=false", "data.eval_subsets=[new]",
                            "method=maple"])
    assert tree == {"optim": {"lr": 1e-3}, "data": {"shots": 4, "eval_subsets": ["new"]}, "train": {"progress": False},
                    "method": {"name": "maple"}}


def test_file_with_base_and_overrides(tmp_path):
    (tmp_path / "base.yaml").write_text("optim:\n  lr: 0.1\n  epochs: 3\n")
    (tmp_path / "run.yaml").write_text("_base_: base.yaml\noptim:\n  epochs: 7\nmethod:\n  name: coop\n  n_ctx: 8\n")
    cfg = load_config(tmp_path / "run.yaml", ["optim.lr=0.5"])
    assert cfg["optim"]["lr"] == 0.5 and cfg["optim"]["epochs"] == 7
    assert cfg["method"] == {"name": "coop", "n_ctx": 8}


def test_unknown_key_names_file_key_and_close_match(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("optim:\n  learning_rate: 0.1\n  lr_: 1\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: unknown config key 'optim\.learning_rate'") as err:
        load_config(path)
    assert "Valid keys here" in str(err.value)
    with pytest.raises(ConfigError, match=r"command line: unknown config key 'data\.shot'\. Did you mean: shots"):
        load_config(None, ["data.shot=4"])


def test_missing_config_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"config file not found: .*missing\.yaml"):
        load_config(tmp_path / "missing.yaml")


def test_malformed_override_explains_the_form():
    with pytest.raises(ConfigError, match=r"override 'optim\.lr' must look like section\.key=value"):
        load_config(None, ["optim.lr"])


def test_method_options_are_checked_against_the_method():
    assert resolve_options("coop", {"n_ctx": 4})["n_ctx"] == 4
    with pytest.raises(ConfigError, match=r"method 'coop' has no option 'n_cxt'\. Did you mean: n_ctx\?"):
        resolve_options("coop", {"n_cxt": 4})


def test_unknown_method_suggests_names():
    with pytest.raises(ConfigError, match=r"unknown method 'cop'\. Did you mean: coop"):
        resolve_options("cop", {})


def test_switching_method_on_the_command_line_drops_the_files_options(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("method:\n  name: coop\n  n_ctx: 4\n  class_token_position: front\n")
    cfg = load_config(path, ["method=maple", "method.depth=3"])
    assert cfg["method"]["name"] == "maple" and cfg["method"]["depth"] == 3
    assert "class_token_position" not in cfg["method"]
    assert load_config(path, ["method=coop"])["method"]["class_token_position"] == "front"


def test_an_older_runs_scheduler_name_still_loads_as_what_it_meant(tmp_path):
    """Runs written before the released schedule was the default say `cosine` for the per-step cosine."""
    from mugcp.config import load_config
    from mugcp.config_schema import check_values

    old_run = tmp_path / "config.yaml"
    old_run.write_text("optim:\n  scheduler: cosine\n")
    cfg = load_config(old_run)
    assert cfg["optim"]["scheduler"] == "cosine_per_step"
    check_values(cfg)
    assert load_config(None, ["optim.scheduler=cosine"])["optim"]["scheduler"] == "cosine_per_step"
