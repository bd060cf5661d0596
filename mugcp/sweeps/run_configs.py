"""What each run of a sweep will train with, checked before anything runs, and compared with what a run did.

A run's config is resolved exactly as ``python -m mugcp.train`` resolves its command line
(``mugcp.config.load_config``), so ``--dry-run --json`` shows what the run's ``config.yaml`` will
hold. Every value is checked against the schema and the method's options up front: a bad key in a
sweep file is one line naming the file and the place that set it, not a failure per run.

A finished (or interrupted) run whose ``config.yaml`` differs from what the sweep would run now is
*changed*: it is neither reused as if it were the same experiment nor overwritten. Rerunning it
goes to a fresh folder, ``<name>_v2`` (``_v3``...); once that run finishes, the old folder gets a
``superseded.json`` naming its successor, and reports leave it out.
"""
from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Optional

from mugcp.config import DEFAULTS, ConfigError, load_config, merge, read_yaml
from mugcp.config_schema import check_value, flatten, show_value
from mugcp.runs.layout import CONFIG_FILE, SUPERSEDED_FILE
from mugcp.utils import atomic_write_json

_VERSION = re.compile(r"_v(\d+)$")


def check_keys(overrides: Mapping[str, Any], where: str) -> None:
    """Every dotted key names a config key (method options are checked with the method)."""
    for key, value in overrides.items():
        path = ["method", "name"] if key == "method" else key.split(".")
        tree = value
        for part in reversed(path):
            tree = {part: tree}
        merge(DEFAULTS, tree, where)  # raises: unknown config key 'optim.max_step'. Did you mean: max_steps?


def resolve_run(config: str, overrides: Sequence[str], origins: Sequence[tuple[str, Mapping]], sweep_path) -> dict:
    """The run's config as ``mugcp.train --config CONFIG OVERRIDES`` resolves it, its values checked.

    ``origins``: (name, dotted overrides) of each part of the sweep that sets keys, in merge order;
    an error names the sweep file and the last part that set the bad key.
    """
    from mugcp.data.registry import check_data_config
    from mugcp.methods import resolve_options

    def origin_of(key: str) -> str:
        for name, part in reversed(origins):
            if any(key == set_key or key.startswith(f"{set_key}.") or (key == "method.name" and set_key == "method")
                   for set_key in part):
                return name
        return f"config {config}"

    cfg = load_config(config, overrides)
    flat = flatten(cfg)
    for key, value in flat.items():
        try:
            if key.startswith("method.") and key != "method.name":
                resolve_options(cfg["method"]["name"], {key.split(".", 1)[1]: value}, source="method", together=False)
            else:
                check_value(key, value)
        except ConfigError as err:
            raise ConfigError(f"{sweep_path}: {origin_of(key)}: {err}") from None
    try:  # the options together (n_ctx against ctx_init...): named after the last part that set one of them
        resolve_options(cfg["method"]["name"], cfg["method"], source="method")
    except ConfigError as err:
        method_keys = [key for key in flat if key.startswith("method.") and key != "method.name"]
        setters = [name for name, part in origins if any(key in part for key in method_keys)]
        origin = setters[-1] if setters else f"config {config}"
        raise ConfigError(f"{sweep_path}: {origin}: {err}") from None
    try:  # paths too (data.root, data.fewshot_file): a wrong one is one line here, not a failure in every job
        check_data_config(cfg["data"])
    except ConfigError as err:
        raise ConfigError(f"{sweep_path}: {origin_of(getattr(err, 'key', 'data.dataset'))}: {err}") from None
    return with_resolved_semantics(cfg)


def with_resolved_semantics(cfg: dict) -> dict:
    """``cfg`` with ``semantic.source`` as the run will record it (what ``auto`` becomes), quietly: the run
    itself says why when it starts."""
    from mugcp.runs.run_setup import resolve_semantics, resolved_run_config

    engine_log = logging.getLogger("mugcp")
    level = engine_log.level
    engine_log.setLevel(logging.ERROR)
    try:
        return resolved_run_config(cfg, resolve_semantics(cfg))
    except ConfigError:  # e.g. semantic.source mllm with its cache not extracted yet: the run records mllm, and says so
        return cfg
    finally:
        engine_log.setLevel(level)


def config_changes(before: Mapping, now: Mapping) -> dict[str, tuple[Any, Any]]:
    """``{dotted key: (value in the run, value now)}`` for every key that differs."""
    old, new = flatten(before), flatten(now)
    changes = {}
    for key in sorted(set(old) | set(new)):
        was, will = old.get(key, "(absent)"), new.get(key, "(absent)")
        if key == "semantic.source" and will == "auto" and was in ("mllm", "clip", "none", None):
            continue  # an older run's config.yaml recorded what `auto` became, not `auto` itself
        if was != will:
            changes[key] = (was, will)
    return changes


def describe_changes(changes: Mapping[str, tuple[Any, Any]]) -> str:
    return "; ".join(f"{key}: {show_value(was)} → {show_value(will)}" for key, (was, will) in changes.items())


def run_versions(root: Path, name: str) -> list[Path]:
    """``name``, ``name_v2``, ``name_v3``... that exist under ``root``, oldest first."""
    found = [(1, root / name)] if (root / name).exists() else []
    for path in root.glob(f"{name}_v*"):
        match = _VERSION.search(path.name)
        if match and path.name == f"{name}_v{match.group(1)}" and int(match.group(1)) >= 2:
            found.append((int(match.group(1)), path))
    return [path for _, path in sorted(found)]


def next_version(root: Path, name: str) -> Path:
    versions = run_versions(root, name)
    if not versions:
        return root / name
    last = _VERSION.search(versions[-1].name) if versions[-1].name != name else None
    return root / f"{name}_v{int(last.group(1)) + 1 if last else 2}"


def recorded_config(folder: Path) -> Optional[dict]:
    path = folder / CONFIG_FILE
    return read_yaml(path) if path.is_file() else None


def mark_superseded(old: Path, new: Path, changes: Mapping[str, tuple[Any, Any]]) -> None:
    """Tell reports (and people) that ``old`` was rerun into ``new`` with a changed config."""
    atomic_write_json(old / SUPERSEDED_FILE, {
        "by": str(new), "changes": {key: {"run": was, "now": will} for key, (was, will) in changes.items()}})


def to_json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, default=str)
