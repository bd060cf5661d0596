"""Slurm options: the ``slurm:`` section of a sweep or config, the ``--slurm-*`` flags, and Slurm's time formats.

Checked when given (``SlurmOptions(...)`` raises ``SlurmError`` in one line naming the key), before
anything is submitted; imported by the commands' argument parsers, so it imports neither submitit nor torch.
"""
from __future__ import annotations

import argparse
import difflib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Optional

from mugcp.launch.slurm_refusals import SlurmError

_TIME_FORMATS = "minutes (90), MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS"


def parse_time_minutes(value, where: str = "slurm.time") -> int:
    """Slurm's time formats to whole minutes (rounded up)."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise SlurmError(f"{where}: expected a time limit ({_TIME_FORMATS}), got {value!r}.")
    text = str(value).strip()
    match = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text)
    if not match:
        raise SlurmError(f"{where}: cannot read the time limit {text!r}; use {_TIME_FORMATS}.")
    days, first, second, third = match.groups()
    parts = [int(first)] + [int(p) for p in (second, third) if p is not None]
    if days is not None:  # D-HH[:MM[:SS]]
        seconds = int(days) * 86400 + sum(p * m for p, m in zip(parts, (3600, 60, 1)))
    elif len(parts) == 1:
        seconds = parts[0] * 60
    elif len(parts) == 2:  # MM:SS
        seconds = parts[0] * 60 + parts[1]
    else:
        seconds = parts[0] * 3600 + parts[1] * 60 + parts[2]
    if seconds <= 0:
        raise SlurmError(f"{where}: the time limit must be positive, got {text!r}.")
    return -(-seconds // 60)


@dataclass
class SlurmOptions:
    """Where and with what each job runs. Per-run values (an array of runs) or per-node values
    (``submit_distributed``: ``nodes`` × ``gpus_per_node``) as the field says."""

    partition: Optional[str] = None
    time: int = 60                    # minutes (any Slurm time format is accepted and converted)
    gpus_per_run: int = 0             # each array task: one run on one node
    cpus_per_run: Optional[int] = None  # per run; per task (= per GPU) in a distributed job
    mem: Optional[str] = None         # per run / per node, Slurm's --mem syntax: 32G, 64000M
    account: Optional[str] = None
    array_parallelism: Optional[int] = None  # at most this many array tasks at once
    nodes: int = 1                    # distributed jobs only
    gpus_per_node: int = 0            # distributed jobs only: one task per GPU
    tasks_per_node: Optional[int] = None  # distributed jobs without GPUs: CPU processes (gloo) per node
    setup: list = field(default_factory=list)  # shell lines run before the tasks (module load ..., source ...)

    def __post_init__(self):
        self.time = parse_time_minutes(self.time)
        for name, least in (("gpus_per_run", 0), ("cpus_per_run", 1), ("array_parallelism", 1), ("nodes", 1),
                            ("gpus_per_node", 0), ("tasks_per_node", 1)):
            value = getattr(self, name)
            if value is None and name in ("cpus_per_run", "array_parallelism", "tasks_per_node"):
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise SlurmError(f"slurm.{name}: expected a whole number >= {least}, got {value!r}.")
        for name in ("partition", "account"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise SlurmError(f"slurm.{name}: expected a name, got {value!r}.")
        if self.mem is not None:
            self.mem = str(self.mem).strip()
            if not re.fullmatch(r"\d+(\.\d+)?[KMGT]?B?", self.mem, flags=re.IGNORECASE):
                raise SlurmError(f"slurm.mem: {self.mem!r} is not a memory size; use e.g. 32G or 64000M.")
        if isinstance(self.setup, str):
            self.setup = [self.setup]
        if not isinstance(self.setup, (list, tuple)) or not all(isinstance(line, str) for line in self.setup):
            raise SlurmError(f"slurm.setup: expected a list of shell lines, got {self.setup!r}.")
        self.setup = list(self.setup)

    @classmethod
    def keys(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    @classmethod
    def from_mapping(cls, mapping: Optional[Mapping], where: str = "slurm") -> SlurmOptions:
        """From a ``slurm:`` section (keys with ``-`` or ``_``); unknown keys are named with the valid ones."""
        if mapping is None:
            return cls()
        if not isinstance(mapping, Mapping):
            raise SlurmError(f"{where}: expected a mapping of Slurm options ({', '.join(cls.keys())}), "
                             f"got {type(mapping).__name__}.")
        values = {str(key).replace("-", "_"): value for key, value in mapping.items()}
        unknown = sorted(set(values) - set(cls.keys()))
        if unknown:
            close = [match for key in unknown for match in difflib.get_close_matches(key, cls.keys(), n=1, cutoff=0.6)]
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise SlurmError(f"{where}: unknown key(s) {', '.join(unknown)}{hint}; "
                             f"valid keys: {', '.join(cls.keys())}.")
        try:
            return cls(**values)
        except SlurmError as err:
            raise SlurmError(str(err).replace("slurm.", f"{where}.", 1)) from None

    def updated_from_args(self, args: argparse.Namespace) -> SlurmOptions:
        """These options with every ``--slurm-*`` flag that was given on the command line on top."""
        values = {name: getattr(self, name) for name in self.keys()}
        for name in self.keys():
            given = getattr(args, f"slurm_{name}", None)
            if given is not None:
                values[name] = given
        return SlurmOptions(**values)


_FLAG_HELP = {
    "partition": "Slurm partition [the cluster's default]",
    "time": "time limit per job: minutes or Slurm's D-HH:MM:SS [60]",
    "gpus_per_run": "GPUs for each run [0]",
    "cpus_per_run": "CPUs for each run (for each task of a multi-GPU run) [Slurm's default]",
    "mem": "memory per run (per node of a multi-node run), e.g. 32G [Slurm's default]",
    "account": "Slurm account to charge [your default]",
    "array_parallelism": "at most this many runs at once [all]",
    "nodes": "nodes for one data-parallel run [1]",
    "gpus_per_node": "GPUs per node for one data-parallel run; one task per GPU [0]",
    "tasks_per_node": "without GPUs: CPU processes (gloo) per node for one data-parallel run "
                      "(needed when --slurm-gpus-per-node is 0)",
    "setup": "a shell line run in the job before the command (repeatable), e.g. 'module load cuda'",
}


def add_slurm_arguments(parser: argparse.ArgumentParser, only: Optional[Sequence[str]] = None) -> None:
    """Add ``--slurm-<option>`` flags (default None: not given) for ``SlurmOptions.updated_from_args``."""
    types = {"time": str, "mem": str, "partition": str, "account": str}
    group = parser.add_argument_group("Slurm (with --launcher slurm)")
    for name in only or SlurmOptions.keys():
        flag = "--slurm-" + name.replace("_", "-")
        if name == "setup":
            group.add_argument(flag, dest="slurm_setup", action="append", default=None, help=_FLAG_HELP[name])
        else:
            group.add_argument(flag, dest=f"slurm_{name}", type=types.get(name, int), default=None,
                               help=_FLAG_HELP[name])
