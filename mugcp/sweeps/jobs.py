"""A sweep's jobs: one ``mugcp.train`` per run and, for transfer protocols, one ``mugcp.evaluate`` per target.

``plan(sweep, root)`` lists them in a stable order, each in its own folder under ``root`` and marked
new / resume / overwrite / done from what that folder holds, so rerunning a sweep continues it.
"""
from __future__ import annotations

import json
import os
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from mugcp.config import ConfigError, parse_value, split_variant
from mugcp.runs.layout import (
    CHECKPOINT_DIR,
    EVALUATION_DIR_PREFIX,
    FINAL_METRICS_FILE,
    PREVIOUS_SUFFIX,
    TRAINER_STATE_FILE,
)
from mugcp.sweeps.run_configs import (
    check_keys,
    config_changes,
    next_version,
    recorded_config,
    resolve_run,
    run_versions,
)
from mugcp.sweeps.sweep_file import Sweep

PLACEHOLDERS = ("dataset", "method", "seed", "shots")



@dataclass
class Job:
    """One command of the sweep: a training run, or the evaluation of a trained run on a target."""

    name: str
    folder: Path
    module: str  # mugcp.train | mugcp.evaluate
    args: list[str]
    depends_on: Optional[Job] = None
    mode: str = "new"  # new | resume | overwrite | done | changed (training); new | overwrite | done (evaluation)
    status: str = "pending"
    seconds: float = 0.0
    message: str = ""
    fields: dict = field(default_factory=dict)  # method, dataset, seed, shots (dataset: the target of an evaluation)
    config: Optional[dict] = None  # training: the resolved config, what its config.yaml will hold
    recipe: Any = None  # training: the mugcp.recipes.Recipe it follows, or None
    changes: dict = field(default_factory=dict)  # key: (value in the finished run, value now), when they differ
    supersedes: Optional[Path] = None  # --rerun-changed: the changed run this one replaces

    def command(self, python: str = "python") -> list[str]:
        flag = {"resume": ["--resume"], "overwrite": ["--overwrite"]}.get(self.mode, [])
        return [python, "-m", self.module, *self.args[:2], *flag, *self.args[2:]]


def _render(value) -> str:
    """A value as the command line's ``key=value`` text that parses back to it."""
    if isinstance(value, str) and parse_value(value) == value and value.strip() == value and value:
        return value
    return json.dumps(value)


def _fill(value, fields: dict, where: str):
    """Expand $VARS and {dataset}-style placeholders in strings (recursively in lists)."""
    if isinstance(value, list):
        return [_fill(v, fields, where) for v in value]
    if not isinstance(value, str):
        return value
    expanded = os.path.expandvars(value)
    leftover = [part for part in expanded.split("$")[1:] if part[:1] == "{" or part[:1].isalpha() or part[:1] == "_"]
    if leftover:
        name = leftover[0].lstrip("{").split("}")[0].split("/")[0]
        raise ConfigError(f"{where}: '{value}' uses ${name}, which is not set; export {name}=... before the sweep.")
    try:
        names = {name for _, name, _, _ in string.Formatter().parse(expanded) if name}
    except ValueError as err:
        raise ConfigError(f"{where}: '{value}': {err}.") from None
    unknown = names - set(fields)
    if unknown:
        raise ConfigError(f"{where}: '{value}' uses {{{sorted(unknown)[0]}}}; "
                          f"placeholders are {', '.join('{' + p + '}' for p in PLACEHOLDERS)}.")
    return expanded.format(**fields) if names else expanded


def _override_args(overrides: dict, fields: dict, where: str) -> list[str]:
    return [f"{key}={_render(_fill(value, fields, f'{where}: {key}'))}" for key, value in overrides.items()]


def run_name(method: str, dataset: str, shots: Optional[int], seed: int) -> str:
    """``coop_dtd_k16_s1``; a run whose K is unused (zero-shot CLIP in a few-shot sweep) has no ``_k``."""
    return f"{method}_{dataset}_s{seed}" if shots is None else f"{method}_{dataset}_k{shots}_s{seed}"


def recipe_of(sweep: Sweep, method: str, dataset: str, shots: int):
    """The released recipe of a run, or None: a ``grid`` sweep, ``recipes: false``, or a method without recipes."""
    from mugcp.recipes import recipe_for, recipe_methods

    if sweep.protocol == "grid" or not sweep.recipes or method not in recipe_methods():
        return None
    return recipe_for(method, sweep.protocol, dataset, shots)


def shots_of(sweep: Sweep, method: str, dataset: str) -> list:
    """The K a method runs at: every K of the sweep, or ``[None]`` (once, ``data.shots: null``) for a method whose
    recipe trains nothing in a few-shot sweep: zero-shot CLIP's accuracy is the same at every K."""
    if sweep.protocol == "fewshot":
        recipe = recipe_of(sweep, method, dataset, None)
        if recipe is not None and not recipe.trains:
            return [None]
    return list(sweep.shots)


def plan(sweep: Sweep, root: Path, rerun_changed: bool = False) -> list[Job]:
    """Every job of the sweep in a stable order, each marked new / resume / overwrite / done / changed from what
    ``root`` holds.

    Each run's config merges, in order: the method's config (or the sweep's ``config``), the
    released recipe of its method, protocol, dataset and K, the sweep's ``overrides``, then its
    ``method_overrides``; so what a user sets explicitly wins. Every run's config is resolved and
    checked here (ConfigError naming the sweep file and the part that set a bad key).
    ``rerun_changed``: a finished run whose config differs from this one is planned anew in a fresh folder.
    """
    jobs: list[Job] = []
    recipes: dict = {}
    check_keys(sweep.overrides, f"{sweep.path}: overrides")
    for method, overrides in sweep.method_overrides.items():
        check_keys(overrides, f"{sweep.path}: method_overrides.{method}")
    for dataset in sweep.datasets:
        for method in sweep.methods:
            for shots in shots_of(sweep, method, dataset):
                for seed in sweep.seeds:
                    fields = {"dataset": dataset, "method": method, "seed": seed, "shots": shots}
                    name = run_name(method, dataset, shots, seed)
                    # coop+dept: CoOp's config, then method=coop+dept sets the switch
                    base, switches = split_variant(method)
                    config = sweep.config or f"methods/{base}"
                    overrides = [f"method={method}"] if sweep.config or switches else []
                    overrides += [f"data.dataset={dataset}", f"data.shots={_render(shots)}", f"train.seed={seed}"]
                    if sweep.train_protocol:
                        overrides.append(f"data.protocol={sweep.train_protocol}")
                    if (method, dataset, shots) not in recipes:
                        recipes[(method, dataset, shots)] = recipe_of(sweep, method, dataset, shots)
                    recipe = recipes[(method, dataset, shots)]
                    recipe_overrides = recipe.dotted() if recipe is not None else {}
                    overrides += [f"{key}={_render(value)}" for key, value in recipe_overrides.items()]
                    overrides += _override_args(sweep.overrides, fields, f"{sweep.path}: overrides")
                    method_overrides = sweep.method_overrides.get(method, {})
                    overrides += _override_args(method_overrides, fields, f"{sweep.path}: method_overrides.{method}")
                    origins = [("the sweep's grid", {"method": method, "data.dataset": dataset, "data.shots": shots,
                                                     "train.seed": seed, "data.protocol": sweep.train_protocol}),
                               (f"recipe {recipe.path}" if recipe else "recipe", recipe_overrides),
                               ("overrides", sweep.overrides),
                               (f"method_overrides.{method}", method_overrides)]
                    resolved = resolve_run(config, overrides, origins, sweep.path)
                    folder, mode, changes, supersedes = _place(root, name, resolved, rerun_changed)
                    # --config comes first: command() puts --resume / --overwrite right after it.
                    train_job = Job(name, folder, "mugcp.train",
                                    ["--config", config, "--output", str(folder), *overrides], mode=mode, fields=fields,
                                    config=resolved, recipe=recipe, changes=changes, supersedes=supersedes)
                    jobs.append(train_job)
                    for target in sweep.targets:
                        jobs.append(_evaluation(sweep, train_job, method, target, fields))
    return jobs


def _evaluation(sweep: Sweep, train_job: Job, method: str, target: str, fields: dict) -> Job:
    eval_folder = train_job.folder / f"{EVALUATION_DIR_PREFIX}{target}"
    eval_fields = dict(fields, dataset=target)
    eval_args = ["--checkpoint", str(train_job.folder), "--output", str(eval_folder), f"data.dataset={target}",
                 "data.protocol=all"]
    eval_args += _override_args(sweep.eval_overrides, eval_fields, f"{sweep.path}: eval_overrides")
    eval_args += _override_args(sweep.method_eval_overrides.get(method, {}), eval_fields,
                                f"{sweep.path}: method_eval_overrides.{method}")
    finished = (eval_folder / FINAL_METRICS_FILE).is_file()
    # A finished evaluation of a run that trains again is stale: evaluate replaces it only when told (--overwrite).
    mode = ("done" if train_job.mode == "done" else "overwrite") if finished else "new"
    return Job(f"{train_job.name}/{EVALUATION_DIR_PREFIX}{target}", eval_folder, "mugcp.evaluate", eval_args,
               depends_on=train_job, mode=mode, fields=eval_fields)


def _place(root: Path, name: str, resolved: dict, rerun_changed: bool) -> tuple[Path, str, dict, Optional[Path]]:
    """The run's folder (its newest version), its mode, and how its recorded config differs from ``resolved``."""
    versions = run_versions(root, name)
    folder = versions[-1] if versions else root / name
    mode = _train_mode(folder)
    recorded = recorded_config(folder) if mode in ("done", "resume") else None
    changes = config_changes(recorded, resolved) if recorded is not None else {}
    if not changes:
        return folder, mode, {}, None
    if rerun_changed:
        return next_version(root, name), "new", changes, folder
    return folder, "changed", changes, None


def _train_mode(folder: Path) -> str:
    if (folder / FINAL_METRICS_FILE).is_file():
        return "done"
    if (folder / CHECKPOINT_DIR / TRAINER_STATE_FILE).is_file():
        return "resume"
    if (folder / CHECKPOINT_DIR).exists() or (folder / (CHECKPOINT_DIR + PREVIOUS_SUFFIX)).exists():
        return "overwrite"  # a checkpoint with nothing to resume from (e.g. zero-shot CLIP): start again
    return "new"


def refresh_mode(job: Job) -> str:
    """The job's mode from what its folder holds now: another process may have run it since ``plan``."""
    if job.module == "mugcp.train":
        if job.mode in ("new", "resume", "overwrite"):
            job.mode = _train_mode(job.folder)
    # An evaluation planned as "overwrite" is stale (made before its run trained again): its metrics do not count.
    elif job.mode != "overwrite" and (job.folder / FINAL_METRICS_FILE).is_file():
        job.mode = "done"
    return job.mode


def recipe_notes(jobs: list[Job], protocol: str) -> list[str]:
    """One line per method whose runs do not all follow a released recipe: what is used instead."""
    from mugcp.recipes import recipe_for

    notes = []
    by_method: dict[str, list[Job]] = {}
    for job in jobs:
        if job.module == "mugcp.train" and job.recipe is not None:
            by_method.setdefault(job.fields["method"], []).append(job)
    for method, runs in by_method.items():
        if all(job.recipe.released for job in runs):
            continue
        base = recipe_for(method, protocol)
        if not base.released:
            notes.append(f"{method} ({protocol}): {base.note}")
            continue
        datasets = sorted({job.fields["dataset"] for job in runs
                           if not recipe_for(method, protocol, job.fields["dataset"]).released})
        shots = sorted({job.fields["shots"] for job in runs
                        if not recipe_for(method, protocol, None, job.fields["shots"]).released})
        parts = []
        if datasets:
            parts.append(f"The released scripts do not train on {', '.join(datasets)}; "
                         "the same settings are used there.")
        if shots:
            parts.append(f"The released scripts do not run K = {', '.join(map(str, shots))}; "
                         "the same settings are used.")
        notes.append(f"{method} ({protocol}): {' '.join(parts)}")
    return notes


def describe_job(job: Job) -> dict:
    """A training run as ``--dry-run --json`` prints it: what it is, its command and its resolved config."""
    recipe = job.recipe
    return {
        "name": job.name, "folder": str(job.folder), "mode": job.mode, **job.fields, "command": job.command(),
        "recipe": None if recipe is None else {"path": str(recipe.path), "released": recipe.released,
                                               "follows": recipe.follows, "sources": list(recipe.sources),
                                               "note": recipe.note},
        "changes": {key: {"run": was, "now": now} for key, (was, now) in job.changes.items()},
        "supersedes": str(job.supersedes) if job.supersedes else None,
        "config": job.config,
    }
