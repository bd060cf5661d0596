"""Released recipes (configs/recipes/): every file resolves to settings our schema and the method accept,
names the released files it restates, and says what the authors' scripts set (values restated here
from the scripts and trainer configs of the audited commits, recipes.AUDITED_COMMITS)."""
import re
from pathlib import Path

import pytest

from mugcp import recipes
from mugcp.config import ConfigError, load_config, merge, split_variant
from mugcp.data.registry import DATASET_NAMES
from mugcp.methods.registry import list_methods, list_variants
from mugcp.recipes import RECIPE_PROTOCOLS, list_recipes, read_recipe_file, recipe_for
from mugcp.runs.run_setup import check_run_config

ROOT = Path(__file__).resolve().parents[1]
ALL = list_recipes()


def header(path: Path) -> str:
    lines = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        lines.append(line)
    return "\n".join(lines)


def variants(method, protocol):
    """Every per-dataset and per-K block of a recipe, and the plain one."""
    data = recipes._resolved_file(method, protocol)
    pairs = [(None, None), ("imagenet", 16)]
    pairs += [(name, None) for name in data["per_dataset"]] + [(None, k) for k in data["per_shots"]]
    return pairs


def test_every_registered_method_and_variant_has_one_recipe_per_protocol():
    assert list_variants() == ["cocoop+dept", "coop+dept", "kgcoop+dept", "maple+dept"]
    assert sorted(ALL) == sorted((m, p) for m in list_methods() + list_variants() for p in RECIPE_PROTOCOLS)


@pytest.mark.parametrize("method, protocol", ALL)
def test_recipe_passes_the_schema_over_the_methods_config(method, protocol):
    for dataset, shots in variants(method, protocol):
        recipe = recipe_for(method, protocol, dataset, shots)
        base, switches = split_variant(method)  # coop+dept: CoOp's config with method.dept on
        cfg = merge(load_config(f"methods/{base}", [f"method={method}"]), recipe.overrides, str(recipe.path))
        if dataset:
            cfg["data"]["dataset"] = dataset
        check_run_config(cfg)  # schema values, method options (names and types), dataset name
        assert cfg["method"]["name"] == base and all(cfg["method"][key] is True for key in switches)
        assert all(recipe.overrides["method"][key] is True for key in switches)  # a variant's recipe says so itself
        if recipe.trains:
            assert recipe.eval_epoch == cfg["optim"]["epochs"]
        else:
            assert recipe.eval_epoch is None and "optim" not in recipe.overrides


@pytest.mark.parametrize("method, protocol", ALL)
def test_recipe_header_names_its_released_sources(method, protocol):
    recipe = recipe_for(method, protocol)
    text = header(recipe.path)
    assert recipe.sources, recipe.path
    for source in recipe.sources:
        repo, _, path = source.partition(":")
        assert repo in recipes.AUDITED_COMMITS and path, source
        assert source in text, f"{recipe.path}: header does not name {source}"
    data = read_recipe_file(method, protocol)
    if data.get("released") is False:
        assert "NOT RELEASED" in text and data.get("note")
    if method == "mugcp":
        assert f"configs/recipes/maple/{protocol}.yaml" in text and "MuGCP released no code and no recipes" in text


@pytest.mark.parametrize("method, protocol", ALL)
def test_dataset_names_in_recipes_are_ours(method, protocol):
    data = recipes._resolved_file(method, protocol)
    assert set(data["per_dataset"]) <= set(DATASET_NAMES)
    assert set(data["datasets"] or []) <= set(DATASET_NAMES)


def test_spot_values_from_the_released_scripts():
    maple = recipe_for("maple", "base2new", "dtd", 16)
    flat = maple.dotted()
    assert (flat["optim.lr"], flat["optim.epochs"], flat["data.batch_size"], flat["method.depth"],
            flat["method.n_ctx"]) == (0.0035, 5, 4, 9, 2)
    assert maple.eval_epoch == 5 and maple.released
    xd = recipe_for("maple", "cross_dataset", "imagenet", 16).dotted()
    assert (xd["optim.lr"], xd["optim.epochs"], xd["method.depth"]) == (0.0026, 2, 3)

    cocoop = recipe_for("cocoop", "base2new", "eurosat", 16)
    assert (cocoop.dotted()["optim.epochs"], cocoop.dotted()["data.batch_size"], cocoop.dotted()["method.n_ctx"],
            cocoop.eval_epoch) == (10, 1, 4, 10)

    # CoOp few-shot: 50 epochs at 1 shot, 100 at 2 and 4, 200 at 8 and 16; ImageNet 50 at every K.
    for shots, epochs in {1: 50, 2: 100, 4: 100, 8: 200, 16: 200}.items():
        assert recipe_for("coop", "fewshot", "caltech101", shots).overrides["optim"]["epochs"] == epochs
        assert recipe_for("coop", "fewshot", "imagenet", shots).overrides["optim"]["epochs"] == 50
    few = recipe_for("coop", "fewshot", "dtd", 8).overrides["method"]
    assert (few["n_ctx"], few["ctx_init"], few["class_token_position"]) == (16, "", "end")
    # CoOp base-to-novel (the CoCoOp scripts' CoOp): "a photo of a", 200 epochs, ImageNet 50.
    assert recipe_for("coop", "base2new", "dtd", 16).overrides["method"]["ctx_init"] == "a photo of a"
    assert recipe_for("coop", "base2new", "imagenet", 16).eval_epoch == 50
    assert recipe_for("coop", "base2new", "dtd", 16).eval_epoch == 200

    kg = recipe_for("kgcoop", "base2new", "ucf101", 16).dotted()
    assert (kg["method.kg_weight"], kg["data.batch_size"], kg["optim.epochs"], kg["method.n_ctx"]) == (8.0, 128, 100, 4)

    src = recipe_for("promptsrc", "fewshot", "imagenet", 4).dotted()
    assert (src["optim.epochs"], src["method.gpa_mean"], src["method.gpa_std"]) == (50, 30.0, 30.0)
    assert recipe_for("promptsrc", "fewshot", "dtd", 4).overrides["method"]["gpa_mean"] == 45.0
    assert recipe_for("promptsrc", "fewshot", "dtd", 4).overrides["method"]["gpa_std"] == 5.0
    src_xd = recipe_for("promptsrc", "cross_dataset", "imagenet", 16).dotted()
    assert (src_xd["method.text_depth"], src_xd["method.gpa_mean"], src_xd["method.gpa_std"],
            src_xd["optim.epochs"]) == (3, 6.0, 10.0, 20)

    ivlp_xd = recipe_for("ivlp", "cross_dataset", "imagenet", 16).dotted()
    assert (ivlp_xd["method.n_ctx_text"], ivlp_xd["method.vision_depth"], ivlp_xd["optim.lr"]) == (2, 12, 0.0035)
    assert recipe_for("zsclip", "base2new", "dtd", 16).overrides == {"method": {"templates": "auto"}}


def test_dept_variants_restate_the_released_elp_configs():
    # Koorye/DePT configs.py + configs/trainers/ExtrasLinearProbe*/: 10 epochs, lr 0.0035 (CoCoOp 0.002), batch 4
    # (CoCoOp 1), loss weight 0.7, head at 6.5 x lr; CoOp's 16 random tokens; KgCoOp's W 2.0; MaPLe 2 tokens depth 9.
    released = {"coop+dept": (0.0035, 4, 16, ""), "cocoop+dept": (0.002, 1, 4, "a photo of a"),
                "kgcoop+dept": (0.0035, 4, 4, "a photo of a"), "maple+dept": (0.0035, 4, 2, "a photo of a")}
    for method, (lr, batch, n_ctx, ctx_init) in released.items():
        for protocol in ("base2new", "cross_dataset", "domain_generalization"):
            recipe = recipe_for(method, protocol, "imagenet", 16)
            flat = recipe.dotted()
            assert (flat["optim.lr"], flat["data.batch_size"], flat["optim.epochs"],
                    recipe.eval_epoch) == (lr, batch, 10, 10)
            assert (flat["method.n_ctx"], flat["method.ctx_init"]) == (n_ctx, ctx_init)
            assert (flat["method.dept"], flat["method.dept_weight"], flat["method.dept_lr_scale"]) == (True, 0.7, 6.5)
            assert recipe.released and "Koorye/DePT:configs.py" in recipe.sources
        few = recipe_for(method, "fewshot", "dtd", 4)
        assert not few.released and few.dotted()["optim.epochs"] == 10 and "base-to-novel" in few.note
    assert recipe_for("kgcoop+dept", "base2new", "dtd", 16).dotted()["method.kg_weight"] == 2.0
    assert recipe_for("maple+dept", "base2new", "dtd", 16).dotted()["method.depth"] == 9


def test_every_training_recipe_uses_the_released_warmup():
    for method, protocol in ALL:
        recipe = recipe_for(method, protocol)
        if recipe.trains:
            optim = recipe.overrides["optim"]
            warmup = 0 if method == "mma" else 1  # MMA's released configs have WARMUP_EPOCH: 0
            expected = ("released", warmup, 1.0e-5)
            assert (optim["scheduler"], optim["warmup_epochs"], optim["warmup_lr"]) == expected, recipe.path


@pytest.mark.parametrize("protocol", RECIPE_PROTOCOLS)
def test_mugcp_follows_maple(protocol):
    mugcp, maple = recipe_for("mugcp", protocol, "imagenet", 16), recipe_for("maple", protocol, "imagenet", 16)
    assert mugcp.overrides == maple.overrides and mugcp.sources == maple.sources
    # Borrowed settings are not released ones (issue 21.7: it used to say released: true).
    assert (mugcp.released, mugcp.eval_epoch, mugcp.follows) == (False, maple.eval_epoch, "maple")
    assert mugcp.note.startswith("mugcp has no released recipes and follows maple's.")


@pytest.mark.parametrize("method", list_methods() + list_variants())
def test_domain_generalization_trains_the_cross_dataset_model(method):
    # Every released repository evaluates one ImageNet model on both transfer protocols.
    xd, dg = (recipe_for(method, "cross_dataset", "imagenet", 16),
              recipe_for(method, "domain_generalization", "imagenet", 16))
    assert (xd.overrides, xd.eval_epoch, xd.released) == (dg.overrides, dg.eval_epoch, dg.released)


def test_settings_the_authors_did_not_run_are_flagged():
    assert recipe_for("kgcoop", "fewshot", "dtd", 4).released
    off = recipe_for("kgcoop", "fewshot", "dtd", 16)
    assert (not off.released and "K = 4 only" in off.note
            and off.overrides == recipe_for("kgcoop", "fewshot", "dtd", 4).overrides)
    other_source = recipe_for("cocoop", "cross_dataset", "dtd", 16)
    assert not other_source.released and "train on imagenet only" in other_source.note
    unreleased = recipe_for("maple", "fewshot", "dtd", 16)
    assert not unreleased.released and "no few-shot recipe" in unreleased.note


@pytest.mark.parametrize("args, message", [
    (("mapel", "base2new"), r"no recipes for method 'mapel' under .*recipes\. Did you mean: maple, maple\+dept, mma\? "
                               r"Methods with recipes: cocoop, cocoop\+dept, coop, coop\+dept,"),
    (("maple", "base2novel"), r"no released recipes for protocol 'base2novel'\. Did you mean: base2new\?"),
    (("maple", "grid"), r"protocol 'grid'.*a 'grid' sweep takes its settings from its own config"),
])
def test_unknown_method_or_protocol_is_a_config_error(args, message):
    with pytest.raises(ConfigError, match=message):
        recipe_for(*args)


GOOD = """# a header naming x/y:a.yaml
method: coop
protocol: base2new
sources: [x/y:a.yaml]
eval_epoch: 3
config:
  optim: {epochs: 3, lr: 0.01}
"""


@pytest.mark.parametrize("edit, message", [
    (("sources:", "source:"), r"unknown recipe key 'source'\. Did you mean: sources\?"),
    (("lr: 0.01", "lrr: 0.01"), r"unknown config key 'optim\.lrr'\. Did you mean: lr"),
    (("eval_epoch: 3", "eval_epoch: 2"), r"eval_epoch 2 differs from optim\.epochs 3"),
    (("method: coop", "method: cocoop"), r"says method 'cocoop', protocol 'base2new'; its place says coop, base2new"),
    (("config:", "config:\n  method: {name: maple}"), r"method\.name is the recipe's own method"),
    (("eval_epoch: 3", "eval_epoch: 3\nper_shots: {one: {optim: {epochs: 1}}}"), r"'per_shots' needs a mapping from K"),
])
def test_a_malformed_recipe_file_names_the_file_and_the_fix(tmp_path, monkeypatch, edit, message):
    (tmp_path / "coop").mkdir()
    (tmp_path / "coop" / "base2new.yaml").write_text(GOOD.replace(*edit))
    monkeypatch.setattr(recipes, "RECIPE_DIR", tmp_path)
    with pytest.raises(ConfigError, match=message) as err:
        recipe_for("coop", "base2new")
    assert str(tmp_path / "coop" / "base2new.yaml") in str(err.value)


def test_follows_merges_over_the_followed_recipe_and_refuses_cycles(tmp_path, monkeypatch):
    monkeypatch.setattr(recipes, "RECIPE_DIR", tmp_path)
    for method in ("coop", "kgcoop"):
        (tmp_path / method).mkdir()
    (tmp_path / "coop" / "base2new.yaml").write_text(GOOD + "per_shots: {1: {optim: {lr: 0.5}}}\n")
    (tmp_path / "kgcoop" / "base2new.yaml").write_text("method: kgcoop\nprotocol: base2new\nfollows: coop\n"
                                                       "config: {method: {kg_weight: 2.0}}\n")
    recipe = recipe_for("kgcoop", "base2new", "dtd", 1)
    assert recipe.overrides == {"optim": {"epochs": 3, "lr": 0.5}, "method": {"kg_weight": 2.0}}
    assert recipe.sources == ("x/y:a.yaml",) and recipe.follows == "coop" and recipe.eval_epoch == 3
    (tmp_path / "coop" / "base2new.yaml").write_text("method: coop\nprotocol: base2new\nfollows: kgcoop\n")
    with pytest.raises(ConfigError, match=r"makes a cycle \(kgcoop -> coop -> kgcoop\)"):
        recipe_for("kgcoop", "base2new")


RECIPES_PAGE = ROOT / "docs" / "sweeps-and-recipes.md"  # the released-recipes table and its example


def test_docs_table_states_each_recipes_key_values():
    page = RECIPES_PAGE.read_text(encoding="utf-8")
    section = page.split("## Released recipes", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 4 and cells[0].startswith("`"):
            for protocol in re.findall(r"[a-z_0-9]+", cells[1]):
                rows[(cells[0].strip("`"), protocol)] = line
    for method, protocol in ALL:
        if method == "mugcp":
            line = rows[("mugcp", "all")]
            assert "MaPLe" in line
            continue
        line = rows.get((method, protocol)) or rows[(method, "all")]
        recipe = recipe_for(method, protocol, "caltech101", 16)
        if recipe.trains:
            flat = recipe.dotted()
            for text in (f"lr {flat['optim.lr']}", f"batch {flat['data.batch_size']}", f"{flat['optim.epochs']} ep"):
                assert re.search(r"(?<![\d.])" + re.escape(text) + r"(?![\d])", line), (method, protocol, text)
            assert ("not released" in line) == (not read_recipe_file(method, protocol).get("released", True))
        paths = [source.partition(":")[2] for source in recipe.sources]
        named = [path for path in paths
                 if path.startswith(("configs/trainers/", "KgCoOp/configs/trainers/"))] or paths[:1]
        for path in named:
            assert Path(path).stem in line, (method, protocol, path)


def test_docs_recipe_example_runs_and_shows_what_it_returns():
    section = RECIPES_PAGE.read_text(encoding="utf-8").split("## Released recipes", 1)[1].split("| method |", 1)[0]
    block = re.findall(r"```python\n(.*?)```", section, flags=re.S)[0]
    namespace: dict = {}
    exec(compile(block, str(RECIPES_PAGE), "exec"), namespace)
    shown = re.search(r"recipe\.dotted\(\)\s+# (\{.*?), \.\.\.\}", block).group(1) + "}"
    assert eval(shown) == {key: namespace["recipe"].dotted()[key] for key in eval(shown)}
    assert namespace["recipe"].sources[:2] == ("KaiyangZhou/CoOp:scripts/coop/main.sh", "KaiyangZhou/CoOp:COOP.md")


@pytest.mark.parametrize("shots", [0, "16", True])
def test_shots_must_be_a_positive_integer(shots):
    with pytest.raises(ConfigError, match=r"recipe for coop, fewshot: shots=.* must be a positive integer or None"):
        recipe_for("coop", "fewshot", "dtd", shots)
