"""Sweep files: a published protocol or a grid of methods × datasets × shots × seeds, read and checked.

A sweep file names a protocol and the grid to run (``configs/sweeps/*.yaml`` are the published
ones); ``load_sweep`` returns a checked :class:`Sweep`, every problem naming the file, the key and
what is allowed. What each run of it executes is :mod:`mugcp.sweeps.jobs`'s business.
"""
from __future__ import annotations

import difflib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from mugcp.config import CONFIG_DIR, ConfigError, parse_value, read_yaml, resolve_config_path
from mugcp.config_schema import check_value
from mugcp.data.registry import IMAGENET_VARIANTS, STANDARD_DATASETS

# What each protocol means when the sweep file leaves it out (the published setting).
PROTOCOLS: dict[str, dict] = {
    "base2new": {"datasets": list(STANDARD_DATASETS), "shots": [16], "train_protocol": "base2new"},
    "fewshot": {"datasets": list(STANDARD_DATASETS), "shots": [1, 2, 4, 8, 16], "train_protocol": "all"},
    "cross_dataset": {"source": "imagenet", "targets": list(STANDARD_DATASETS[1:]), "shots": [16],
                      "train_protocol": "all"},
    "domain_generalization": {"source": "imagenet", "targets": list(IMAGENET_VARIANTS), "shots": [16],
                              "train_protocol": "all"},
    "grid": {"shots": [16], "train_protocol": None},  # data.protocol from the config / overrides
}
TRANSFER_PROTOCOLS = ("cross_dataset", "domain_generalization")
SWEEP_KEYS = {"protocol", "datasets", "source", "targets", "seeds", "methods", "shots", "config", "overrides",
              "method_overrides", "eval_overrides", "method_eval_overrides", "recipes", "slurm"}


@dataclass
class Sweep:
    path: Path
    protocol: str
    datasets: list[str]
    targets: list[str]
    seeds: list[int]
    methods: list[str]
    shots: list[int]
    config: Optional[str]
    overrides: dict
    method_overrides: dict
    eval_overrides: dict
    method_eval_overrides: dict
    train_protocol: Optional[str] = None
    recipes: bool = True  # each run starts from its method's released recipe for the protocol (mugcp.recipes)
    # the `slurm:` section as written; checked by --launcher slurm (experiments.slurm_sweep)
    slurm: Optional[dict] = None


def _as_list(value, key: str, where: str, kind=str) -> list:
    if value is None:
        return []
    items = value if isinstance(value, list) else [value]
    try:
        return [kind(item) for item in items]
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: '{key}' must be a list of {kind.__name__}s, got {value!r}.") from None


def _as_overrides(value, key: str, where: str) -> dict:
    """``{"optim.lr": 0.01}`` or ``["optim.lr=0.01"]`` → ``{"optim.lr": 0.01}``."""
    if value is None:
        return {}
    if isinstance(value, dict):
        return {str(k): v for k, v in value.items()}
    if isinstance(value, list) and all(isinstance(item, str) and "=" in item for item in value):
        return {item.split("=", 1)[0]: parse_value(item.split("=", 1)[1]) for item in value}
    raise ConfigError(f"{where}: '{key}' must map dotted keys to values (e.g. optim.lr: 0.01) or list key=value "
                      f"strings; got {value!r}.")


def load_sweep(path: str | os.PathLike) -> Sweep:
    """Read and check a sweep file; every problem names the file, the key and what is allowed."""
    path = _sweep_path(path)
    data = read_yaml(path)
    where = str(path)
    unknown = sorted(set(data) - SWEEP_KEYS)
    if unknown:
        raise ConfigError(f"{where}: unknown sweep key(s) {', '.join(unknown)}; "
                          f"allowed: {', '.join(sorted(SWEEP_KEYS))}.")
    protocol = data.get("protocol", "grid")
    if protocol not in PROTOCOLS:
        raise ConfigError(f"{where}: protocol '{protocol}' is not one of {', '.join(PROTOCOLS)}.")
    defaults = PROTOCOLS[protocol]
    transfer = protocol in TRANSFER_PROTOCOLS
    datasets, targets = _datasets(data, protocol, where)
    seeds = _as_list(data.get("seeds", [1, 2, 3]), "seeds", where, int)
    shots = _as_list(data.get("shots", defaults["shots"]), "shots", where, int)
    methods = _methods(data, where)
    for key, values in (("seeds", seeds), ("shots", shots), ("methods", methods)):
        if not values or len(set(values)) != len(values):
            raise ConfigError(f"{where}: '{key}' must be a non-empty list without repeats, got {values}.")
    for key, config_key, values in (("shots", "data.shots", shots), ("seeds", "train.seed", seeds)):
        for value in values:
            try:  # each value becomes that key of a run: the sweep file's key is named, not the recipe it picks
                check_value(config_key, value)
            except ConfigError as err:
                raise ConfigError(f"{where}: '{key}' lists {value}, but {err}") from None
    per_method = {}
    for key in ("method_overrides", "method_eval_overrides"):
        given = data.get(key) or {}
        if not isinstance(given, dict) or set(given) - set(methods):
            raise ConfigError(f"{where}: '{key}' maps methods of this sweep ({', '.join(methods)}) to overrides; "
                              f"got {given!r}.")
        per_method[key] = {m: _as_overrides(v, f"{key}.{m}", where) for m, v in given.items()}
    if not transfer and (data.get("eval_overrides") or data.get("method_eval_overrides")):
        raise ConfigError(f"{where}: eval_overrides apply to the evaluations of the cross_dataset / "
                          f"domain_generalization protocols; protocol {protocol} has none.")
    config = _base_config(data.get("config"), path)
    recipes = data.get("recipes", True)
    if not isinstance(recipes, bool):
        raise ConfigError(f"{where}: 'recipes' must be true (every run gets its method's released recipe for the "
                          f"protocol) or false (the method configs as they are); got {recipes!r}.")
    return Sweep(
        path=path, protocol=protocol, datasets=datasets, targets=targets, seeds=seeds, methods=methods, shots=shots,
        config=config, overrides=_as_overrides(data.get("overrides"), "overrides", where),
        method_overrides=per_method["method_overrides"],
        eval_overrides=_as_overrides(data.get("eval_overrides"), "eval_overrides", where),
        method_eval_overrides=per_method["method_eval_overrides"],
        train_protocol=defaults["train_protocol"], recipes=recipes, slurm=data.get("slurm"),
    )


def _sweep_path(path: str | os.PathLike) -> Path:
    """A sweep file's path, or a published protocol's name (``configs/sweeps/<name>.yaml``)."""
    path = resolve_config_path(path)
    if not path.is_file() and (CONFIG_DIR / "sweeps" / f"{path}.yaml").is_file():
        path = CONFIG_DIR / "sweeps" / f"{path}.yaml"
    if not path.is_file():
        raise ConfigError(f"sweep file not found: {path}. Give a YAML file, or a published protocol: "
                          f"{', '.join(sorted(p.stem for p in (CONFIG_DIR / 'sweeps').glob('*.yaml')))}.")
    return path


def _datasets(data: dict, protocol: str, where: str) -> tuple[list, list]:
    """(datasets trained on, targets evaluated on): ``source``/``targets`` (transfer protocols), else ``datasets``."""
    from mugcp.data.registry import DATASET_NAMES

    defaults = PROTOCOLS[protocol]
    if protocol in TRANSFER_PROTOCOLS:
        if "datasets" in data:
            raise ConfigError(f"{where}: protocol {protocol} trains on 'source' and evaluates on 'targets'; "
                              "drop 'datasets'.")
        datasets = _as_list(data.get("source", defaults["source"]), "source", where)
        if len(datasets) != 1:
            raise ConfigError(f"{where}: 'source' is one dataset, got {datasets}.")
        targets = _as_list(data.get("targets", defaults["targets"]), "targets", where)
    else:
        for key in ("source", "targets"):
            if key in data:
                raise ConfigError(f"{where}: '{key}' belongs to the cross_dataset / domain_generalization protocols; "
                                  f"protocol {protocol} uses 'datasets'.")
        datasets = _as_list(data.get("datasets", defaults.get("datasets")), "datasets", where)
        targets = []
    for name in [*datasets, *targets]:
        if name not in DATASET_NAMES:
            raise ConfigError(f"{where}: unknown dataset '{name}'; known: {', '.join(DATASET_NAMES)}.")
    if not datasets:
        raise ConfigError(f"{where}: 'datasets' is empty; list the datasets to run.")
    return datasets, targets


def _methods(data: dict, where: str) -> list:
    from mugcp.methods import list_methods, list_variants

    methods = _as_list(data.get("methods"), "methods", where)
    if not methods:
        raise ConfigError(f"{where}: 'methods' is missing; list the methods to run (e.g. methods: [coop, mugcp]).")
    known = list_methods()
    for name in methods:
        if name not in known and name not in list_variants():
            close = difflib.get_close_matches(str(name), known + list_variants(), n=3, cutoff=0.5)
            hint = f" Did you mean: {', '.join(close)}?" if close else ""
            raise ConfigError(f"{where}: unknown method '{name}'.{hint} Methods: {', '.join(known)}; "
                              f"variants (a method with a plug-in on): {', '.join(list_variants())}.")
    return methods


def _base_config(config, path: Path) -> Optional[str]:
    """The sweep's ``config``: a path beside the sweep file, or a name under configs/ (None when not given)."""
    if config is None:
        return None
    beside = path.parent / str(config)
    config_path = beside if beside.is_file() else resolve_config_path(str(config))
    if not config_path.is_file():
        raise ConfigError(f"{path}: config '{config}' not found "
                          "(a path relative to the sweep file, or a name under configs/).")
    return str(config_path)
