"""A sweep's jobs: one ``mugcp.train`` per run and, for transfer protocols, one ``mugcp.evaluate`` per target.

``plan(sweep, root)`` lists them in a stable order, each in its own folder under ``root`` and marked
new / resume / overwrite / done from what that folder holds, so rerunning a sweep continues it.
"""
from __future__ import annotations

import json
import os
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from mugcp.config import ConfigError, parse_value
from mugcp.experiments.sweep_file import Sweep

PLACEHOLDERS = ("dataset", "method", "seed", "shots")
METRICS_FILE = "metrics.json"



@dataclass
class Job:
    """One command of the sweep: a training run, or the evaluation of a trained run on a target."""

    name: str
    folder: Path
    module: str  # mugcp.train | mugcp.evaluate
    args: list[str]
    depends_on: Optional["Job"] = None
    mode: str = "new"  # new | resume | overwrite | done (training); new | done (evaluation)
    status: str = "pending"
    seconds: float = 0.0
    message: str = ""

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
        raise ConfigError(f"{where}: '{value}' uses {{{sorted(unknown)[0]}}}; placeholders are {', '.join('{%s}' % p for p in PLACEHOLDERS)}.")
    return expanded.format(**fields) if names else expanded


def _override_args(overrides: dict, fields: dict, where: str) -> list[str]:
    return [f"{key}={_render(_fill(value, fields, f'{where}: {key}'))}" for key, value in overrides.items()]


def run_name(method: str, dataset: str, shots: int, seed: int) -> str:
    return f"{method}_{dataset}_k{shots}_s{seed}"


def plan(sweep: Sweep, root: Path) -> list[Job]:
    """Every job of the sweep in a stable order, each marked new / resume / overwrite / done from what ``root`` holds."""
    jobs: list[Job] = []
    for dataset in sweep.datasets:
        for method in sweep.methods:
            for shots in sweep.shots:
                for seed in sweep.seeds:
                    fields = {"dataset": dataset, "method": method, "seed": seed, "shots": shots}
                    name = run_name(method, dataset, shots, seed)
                    folder = root / name
                    config = sweep.config or f"methods/{method}"
                    # --config comes first: command() puts --resume / --overwrite right after it.
                    args = ["--config", config, "--output", str(folder)]
                    if sweep.config:
                        args.append(f"method={method}")
                    args += [f"data.dataset={dataset}", f"data.shots={shots}", f"train.seed={seed}"]
                    if sweep.train_protocol:
                        args.append(f"data.protocol={sweep.train_protocol}")
                    args += _override_args(sweep.overrides, fields, f"{sweep.path}: overrides")
                    args += _override_args(sweep.method_overrides.get(method, {}), fields, f"{sweep.path}: method_overrides.{method}")
                    train_job = Job(name, folder, "mugcp.train", args, mode=_train_mode(folder))
                    jobs.append(train_job)
                    for target in sweep.targets:
                        eval_folder = folder / f"eval_{target}"
                        eval_fields = dict(fields, dataset=target)
                        eval_args = ["--checkpoint", str(folder), "--output", str(eval_folder), f"data.dataset={target}", "data.protocol=all"]
                        eval_args += _override_args(sweep.eval_overrides, eval_fields, f"{sweep.path}: eval_overrides")
                        eval_args += _override_args(sweep.method_eval_overrides.get(method, {}), eval_fields,
                                                    f"{sweep.path}: method_eval_overrides.{method}")
                        done = (eval_folder / METRICS_FILE).is_file()
                        jobs.append(Job(f"{name}/eval_{target}", eval_folder, "mugcp.evaluate", eval_args, depends_on=train_job,
                                        mode="done" if done else "new"))
    return jobs


def _train_mode(folder: Path) -> str:
    if (folder / METRICS_FILE).is_file():
        return "done"
    if (folder / "checkpoint" / "trainer_state.pt").is_file():
        return "resume"
    if (folder / "checkpoint").exists() or (folder / "checkpoint.previous").exists():
        return "overwrite"  # a checkpoint with nothing to resume from (e.g. zero-shot CLIP): start again
    return "new"
