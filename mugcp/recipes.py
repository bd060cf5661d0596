"""The released training recipe of a method for a protocol, dataset and number of shots.

Each baseline's authors released launch scripts and trainer configs that set, per protocol (and
sometimes per dataset or per K), the learning rate, epochs, batch size, prompt shape and the epoch
whose checkpoint is evaluated. ``configs/recipes/<method>/<protocol>.yaml`` restates each in this
project's config keys, with the released files it comes from; ``recipe_for`` resolves one run's
settings from it. MuGCP released no recipes: its files ``follow`` MaPLe's.

A recipe file::

    # header comment naming the released files (repo:path), and what could not be restated
    method: maple
    protocol: base2new
    released: true            # false: the authors released nothing for this protocol; `note` says what is used
    trains: true              # false: evaluation only (zero-shot CLIP)
    sources: [muzairkhattak/multimodal-prompt-learning:configs/trainers/MaPLe/vit_b16_c2_ep5_batch4_2ctx.yaml]
    eval_epoch: 5             # the released --load-epoch; `last`: tested right after training
    datasets: [imagenet]      # optional: the training datasets the released scripts run (else every one)
    shots: [16]               # optional: the K the released scripts run (else every K)
    config: {method: {...}, data: {...}, optim: {...}}   # our config keys, nested as in a run config
    per_shots: {1: {optim: {epochs: 50}}}                # applied over `config` for that K
    per_dataset: {imagenet: {optim: {epochs: 50}}}      # applied last: a dataset's setting wins over K's
    follows: maple            # start from that method's recipe for the same protocol (then released: false)
    note: "..."               # what a run using this recipe should be told

This module sits at the config layer (it reads YAML and checks keys against ``DEFAULTS``); method
options are checked where the method registry is known (``mugcp.methods.registry.resolve_options``).
"""
from __future__ import annotations

import copy
import difflib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from mugcp.config import CONFIG_DIR, DEFAULTS, ConfigError, merge, read_yaml

RECIPE_DIR = CONFIG_DIR / "recipes"
RECIPE_PROTOCOLS = ("base2new", "cross_dataset", "domain_generalization", "fewshot")
# The released repositories and the commits audited for these recipes.
AUDITED_COMMITS = {
    "KaiyangZhou/CoOp": "ff61507c790454bce7c5052c3ac39e60772f1f89",
    "muzairkhattak/multimodal-prompt-learning": "69bce21ae8eda80ad6187534b2dce09cf6c59e17",
    "muzairkhattak/PromptSRC": "bb95c77b634d63488f2cad81ff4a72d53bdd06d5",
    "htyao89/KgCoOp": "c43ccc32c8739f64b165cfa205fcc6c0f5bb5b17",
    "BeierZhu/Prompt-align": "1b762036cbe97ecf504e17bb94d89191679e4e6e",
    "htyao89/Textual-based_Class-aware_prompt_tuning": "bd97bec6bd4901baaf318e9e8f073f618d12066e",
    "ZjjConan/Multi-Modal-Adapter": "547ee345a4dc5d60d43d3aa54e8eee50a107f591",
    "Koorye/DePT": "d4ff41684bac42da30ebb6898496772dec3157f2",
}
FILE_KEYS = ("method", "protocol", "released", "trains", "sources", "eval_epoch", "datasets", "shots",
             "config", "per_shots", "per_dataset", "follows", "note")
_REQUIRED = ("method", "protocol", "sources")


@dataclass(frozen=True)
class Recipe:
    """One run's released settings: ``overrides`` in our nested config form, and where they come from."""

    method: str
    protocol: str
    dataset: Optional[str]
    shots: Optional[int]
    overrides: dict
    sources: tuple
    # The released scripts run this protocol, dataset and K so. Never for a ``follows`` file: its method's authors
    # released nothing; the settings are borrowed from the followed method's (``follows`` names it).
    released: bool
    trains: bool
    eval_epoch: Optional[int]  # the epoch whose checkpoint the released code evaluates; None: nothing is trained
    path: Path
    follows: Optional[str] = None
    note: str = ""

    def dotted(self) -> dict:
        """``{"optim": {"lr": 1}}`` → ``{"optim.lr": 1}``, the form of a sweep's overrides."""
        return _flatten(self.overrides)


def _flatten(tree: Mapping, prefix: str = "") -> dict:
    flat: dict = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(_flatten(value, dotted + "."))
        else:
            flat[dotted] = copy.deepcopy(value)
    return flat


def recipe_methods() -> list[str]:
    """Methods that have a folder of recipes."""
    if not RECIPE_DIR.is_dir():
        return []
    return sorted(path.name for path in RECIPE_DIR.iterdir() if path.is_dir())


def list_recipes() -> list[tuple[str, str]]:
    """Every (method, protocol) with a recipe file, sorted."""
    return [(method, protocol) for method in recipe_methods() for protocol in RECIPE_PROTOCOLS
            if (RECIPE_DIR / method / f"{protocol}.yaml").is_file()]


def recipe_path(method: str, protocol: str) -> Path:
    """The file of a method and protocol; unknown names raise ConfigError naming close matches."""
    if protocol not in RECIPE_PROTOCOLS:
        close = difflib.get_close_matches(str(protocol), RECIPE_PROTOCOLS, n=2, cutoff=0.5)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise ConfigError(f"no released recipes for protocol '{protocol}'.{hint} "
                          f"Recipes exist for: {', '.join(RECIPE_PROTOCOLS)} "
                          "(a 'grid' sweep takes its settings from its own config and overrides).")
    methods = recipe_methods()
    if method not in methods:
        close = difflib.get_close_matches(str(method), methods, n=3, cutoff=0.5)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise ConfigError(f"no recipes for method '{method}' under {RECIPE_DIR}.{hint} "
                          f"Methods with recipes: {', '.join(methods) or 'none'}.")
    path = RECIPE_DIR / method / f"{protocol}.yaml"
    if not path.is_file():
        raise ConfigError(f"{path}: missing. Every method with recipes has one file per protocol "
                          f"({', '.join(RECIPE_PROTOCOLS)}); add it, with released: false and a note if the authors "
                          "released none.")
    return path


def _check_overrides(tree: Any, where: str) -> dict:
    """A block of overrides uses only our config sections and keys (method options are free-form here)."""
    if tree is None:
        return {}
    if not isinstance(tree, Mapping):
        raise ConfigError(f"{where}: needs a mapping of config sections (method, data, optim...), got {tree!r}.")
    merge(DEFAULTS, tree, where)  # raises on an unknown section or key, naming close matches
    if isinstance(tree.get("method"), Mapping) and "name" in tree["method"]:
        raise ConfigError(f"{where}: method.name is the recipe's own method; drop it.")
    return dict(tree)


def _int_list(value: Any, where: str) -> Optional[list]:
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in value):
        raise ConfigError(f"{where}: needs a list of positive integers, got {value!r}.")
    return value


def read_recipe_file(method: str, protocol: str) -> dict:
    """A recipe file as written, checked for its own keys, names and override blocks."""
    path = recipe_path(method, protocol)
    data = read_yaml(path)
    for key in data:
        if key not in FILE_KEYS:
            close = difflib.get_close_matches(str(key), FILE_KEYS, n=3, cutoff=0.5)
            hint = f" Did you mean: {', '.join(close)}?" if close else ""
            raise ConfigError(f"{path}: unknown recipe key '{key}'.{hint} Valid keys: {', '.join(FILE_KEYS)}.")
    for key in _REQUIRED:
        if key not in data and not (key == "sources" and data.get("follows")):
            raise ConfigError(f"{path}: '{key}' is missing.")
    if data["method"] != method or data["protocol"] != protocol:
        raise ConfigError(f"{path}: says method '{data['method']}', protocol '{data['protocol']}'; "
                          f"its place says {method}, {protocol}. Move the file or fix those fields.")
    sources = data.get("sources", [])
    if not isinstance(sources, list) or not all(isinstance(s, str) and ":" in s for s in sources):
        raise ConfigError(f"{path}: 'sources' needs a list of released files as 'owner/repo:path', got {sources!r}.")
    for name in ("released", "trains"):
        if name in data and not isinstance(data[name], bool):
            raise ConfigError(f"{path}: '{name}' needs true or false, got {data[name]!r}.")
    eval_epoch = data.get("eval_epoch")
    if eval_epoch is not None and eval_epoch != "last" and not (
            isinstance(eval_epoch, int) and not isinstance(eval_epoch, bool) and eval_epoch >= 1):
        raise ConfigError(f"{path}: 'eval_epoch' needs a positive integer or 'last', got {eval_epoch!r}.")
    data["config"] = _check_overrides(data.get("config"), f"{path}: config")
    per_shots = data.get("per_shots") or {}
    if not isinstance(per_shots, Mapping) or not all(isinstance(k, int) and not isinstance(k, bool) and k >= 1
                                                     for k in per_shots):
        raise ConfigError(f"{path}: 'per_shots' needs a mapping from K (a positive integer) to overrides.")
    data["per_shots"] = {k: _check_overrides(v, f"{path}: per_shots.{k}") for k, v in per_shots.items()}
    per_dataset = data.get("per_dataset") or {}
    if not isinstance(per_dataset, Mapping):
        raise ConfigError(f"{path}: 'per_dataset' needs a mapping from dataset name to overrides.")
    data["per_dataset"] = {str(k): _check_overrides(v, f"{path}: per_dataset.{k}") for k, v in per_dataset.items()}
    data["datasets"] = data.get("datasets")
    if data["datasets"] is not None and not (isinstance(data["datasets"], list)
                                             and all(isinstance(d, str) for d in data["datasets"])):
        raise ConfigError(f"{path}: 'datasets' needs a list of dataset names, got {data['datasets']!r}.")
    data["shots"] = _int_list(data.get("shots"), f"{path}: shots")
    data["path"] = path
    return data


def _resolved_file(method: str, protocol: str, seen: tuple = ()) -> dict:
    """A file with the one it ``follows`` merged under it (fields it leaves out come from there)."""
    data = read_recipe_file(method, protocol)
    followed = data.get("follows")
    if not followed:
        return data
    if followed in (method, *seen):
        raise ConfigError(f"{data['path']}: 'follows: {followed}' makes a cycle "
                          f"({' -> '.join((*seen, method, followed))}).")
    base = _resolved_file(followed, protocol, (*seen, method))
    out = dict(base)
    for key in ("released", "trains", "eval_epoch", "datasets", "shots", "note"):
        if key in data and data[key] is not None:
            out[key] = data[key]
    if data.get("sources"):
        out["sources"] = data["sources"]
    out["config"] = merge(base["config"], data["config"], str(data["path"]), strict=False)
    for key in ("per_shots", "per_dataset"):
        combined = {k: dict(v) for k, v in base[key].items()}
        for name, block in data[key].items():
            combined[name] = merge(combined.get(name, {}), block, str(data["path"]), strict=False)
        out[key] = combined
    out["path"], out["follows"] = data["path"], followed
    return out


def recipe_for(method: str, protocol: str, dataset: Optional[str] = None, shots: Optional[int] = None) -> Recipe:
    """The released settings of ``method`` for ``protocol`` when training on ``dataset`` with ``shots`` per class.

    ``dataset`` is the training dataset (the source of the transfer protocols); ``None`` for either
    leaves out the per-dataset or per-K part. Overrides apply in the order config, per_shots[K],
    per_dataset[dataset]. A recipe the authors did not release for this dataset or K is returned
    with ``released=False`` and a note saying what is used instead.
    """
    if shots is not None and (isinstance(shots, bool) or not isinstance(shots, int) or shots < 1):
        raise ConfigError(f"recipe for {method}, {protocol}: shots={shots!r} must be a positive integer or None.")
    if dataset is not None and not isinstance(dataset, str):
        raise ConfigError(f"recipe for {method}, {protocol}: dataset={dataset!r} must be a dataset name or None.")
    data = _resolved_file(method, protocol)
    overrides = copy.deepcopy(data["config"])
    if shots is not None and shots in data["per_shots"]:
        overrides = merge(overrides, data["per_shots"][shots], str(data["path"]), strict=False)
    if dataset is not None and dataset in data["per_dataset"]:
        overrides = merge(overrides, data["per_dataset"][dataset], str(data["path"]), strict=False)
    released = bool(data.get("released", True)) and not data.get("follows")  # borrowed settings are not released ones
    notes = [f"{method} has no released recipes and follows {data['follows']}'s."] if data.get("follows") else []
    notes += [data["note"].strip()] if data.get("note") else []
    if released and dataset is not None and data["datasets"] is not None and dataset not in data["datasets"]:
        released = False
        notes.append(f"the released scripts train on {', '.join(data['datasets'])} only; "
                     f"the same settings are used for {dataset}.")
    if released and shots is not None and data["shots"] is not None and shots not in data["shots"]:
        released = False
        notes.append(f"the released scripts run K = {', '.join(map(str, data['shots']))} only; "
                     f"the same settings are used for K = {shots}.")
    trains = bool(data.get("trains", True))
    return Recipe(
        method=method, protocol=protocol, dataset=dataset, shots=shots, overrides=overrides,
        sources=tuple(data.get("sources", ())), released=released, trains=trains,
        eval_epoch=_eval_epoch(data, overrides, trains), path=data["path"], follows=data.get("follows"),
        note=" ".join(notes),
    )


def _eval_epoch(data: dict, overrides: dict, trains: bool) -> Optional[int]:
    """The released --load-epoch, checked against the epochs trained: this project evaluates the last epoch."""
    if not trains:
        return None
    epochs = overrides.get("optim", {}).get("epochs")
    if epochs is None:
        raise ConfigError(f"{data['path']}: a training recipe must set optim.epochs.")
    stated = data.get("eval_epoch", "last")
    if stated not in (None, "last") and stated != epochs:
        raise ConfigError(f"{data['path']}: eval_epoch {stated} differs from optim.epochs {epochs}; runs here evaluate "
                          "the last epoch, so a recipe that evaluates an earlier one cannot be restated.")
    return epochs
