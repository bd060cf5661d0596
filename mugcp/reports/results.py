"""Runs' results as written on disk: every ``metrics.json`` under some folders, grouped over seeds.

Reads the ``metrics.json`` every run writes (never log text): training runs, and the evaluations of
their checkpoints on other datasets (``mugcp.evaluate``), and aggregates seeds to mean ± std.
"""
from __future__ import annotations

import json
import statistics
from collections import defaultdict
from pathlib import Path

from mugcp.config import ConfigError
from mugcp.runs.layout import FINAL_METRICS_FILE, SUPERSEDED_FILE
from mugcp.utils import harmonic_mean

GROUP_KEYS = ("dataset", "method", "protocol", "shots", "backbone")


# Accuracies averaged over seeds as mean ± std. The HM is not among them: a group's HM is the HM of its
# seed-averaged base and new accuracies (``hm_of_means``, as the papers report it; one number, no spread),
# and the per-seed HMs are kept apart as ``hm_per_seed`` (mean ± std), which is a different, smaller number.
METRICS = ("base", "new", "all")


def _all_metrics(folders) -> list[dict]:
    found = []
    for folder in folders:
        folder = Path(folder)
        if not folder.exists():
            raise FileNotFoundError(f"runs folder not found: {folder}")
        for path in sorted(folder.rglob(FINAL_METRICS_FILE)):
            try:
                metrics = json.loads(path.read_text(encoding="utf-8"))
            except json.JSONDecodeError as err:
                raise ConfigError(f"{path} is not valid JSON ({err}); delete or fix that run.") from None
            # rerun with a changed config: its successor counts
            if "method" in metrics and not is_superseded(path.parent):
                metrics["_path"] = str(path.parent)
                found.append(metrics)
    return found


def find_runs(folders) -> list[dict]:
    """Training runs (``metrics.json`` of ``mugcp.train``), not evaluations of their checkpoints."""
    return [m for m in _all_metrics(folders) if "checkpoint" not in m]


def find_evaluations(folders) -> list[dict]:
    """``mugcp.evaluate`` results, each with ``_source``: the metrics of the training run it evaluated."""
    evaluations = []
    for metrics in _all_metrics(folders):
        if "checkpoint" not in metrics:
            continue
        source = Path(metrics["checkpoint"]).parent / FINAL_METRICS_FILE
        metrics["_source"] = json.loads(source.read_text(encoding="utf-8")) if source.is_file() else {}
        evaluations.append(metrics)
    return evaluations


def value(metrics: dict, name: str):
    entry = metrics.get(name)
    if isinstance(entry, dict):
        return entry.get("accuracy")
    return entry


def grouped(runs: list[dict]) -> list[tuple[tuple, list[dict]]]:
    """(the GROUP_KEYS values, the runs that share them: one per seed), in a stable order."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for run in runs:
        groups[tuple(run.get(k) for k in GROUP_KEYS)].append(run)
    return sorted(groups.items(), key=lambda item: tuple(str(v) for v in item[0]))


def aggregate(runs: list[dict]) -> list[dict]:
    rows = []
    for key, members in grouped(runs):
        row = dict(zip(GROUP_KEYS, key))
        row["seeds"] = sorted((m.get("seed") for m in members),
                              key=lambda seed: (seed is None, seed if seed is not None else 0))
        row["pretrained"] = all(m.get("pretrained") for m in members)
        for name in METRICS:
            values = [v for v in (value(m, name) for m in members) if v is not None]
            if values:
                row[name] = _stat(values)
        per_seed_hms = [h for h in (_run_hm(m) for m in members) if h is not None]
        if per_seed_hms:
            row["hm_per_seed"] = _stat(per_seed_hms)
        if "base" in row and "new" in row:
            row["hm_of_means"] = harmonic_mean(row["base"][0], row["new"][0])
        rows.append(row)
    return rows


def aggregate_transfer(evaluations: list[dict]) -> list[dict]:
    """One row per (method, source dataset, shots, backbone): source accuracy and each target's, over seeds."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for ev in evaluations:
        source = ev["_source"]
        key = (ev.get("method"), source.get("dataset"), source.get("shots"), ev.get("backbone"))
        groups[key].append(ev)
    rows = []
    for (method, source, shots, backbone), members in sorted(groups.items(),
                                                             key=lambda item: tuple(str(v) for v in item[0])):
        row = {"method": method, "source": source, "shots": shots, "backbone": backbone, "dataset": source,
               "pretrained": all(m.get("pretrained") for m in members), "targets": {}}
        sources = {m["_source"].get("_path") or m["checkpoint"]: m["_source"] for m in members}
        source_values = [value(s, "all") for s in sources.values() if value(s, "all") is not None]
        if source_values:
            row["source_acc"] = _stat(source_values)
        row["seeds"] = sorted({s.get("seed") for s in sources.values()}, key=lambda x: (x is None, x or 0))
        for target in in_paper_order(m["dataset"] for m in members):
            values = [value(m, "all") for m in members if m["dataset"] == target and value(m, "all") is not None]
            if values:
                row["targets"][target] = _stat(values)
        rows.append(row)
    return rows


def _run_hm(metrics: dict):
    """One run's HM: the one it recorded, else the HM of its base and new accuracies (None without them)."""
    if metrics.get("hm") is not None:
        return metrics["hm"]
    base, new = value(metrics, "base"), value(metrics, "new")
    return harmonic_mean(base, new) if base is not None and new is not None else None


def _stat(values: list[float]) -> tuple[float, float, int]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0, len(values)


def mean(values: list[float]) -> float:
    return statistics.fmean(values)


def in_paper_order(names) -> list[str]:
    """Datasets in the order the papers' tables list them; other names after them, sorted."""
    from mugcp.data.registry import IMAGENET_VARIANTS, STANDARD_DATASETS

    order = {name: i for i, name in enumerate((*STANDARD_DATASETS, *IMAGENET_VARIANTS))}
    return sorted(dict.fromkeys(names), key=lambda name: (order.get(name, len(order)), str(name)))


def is_superseded(run_folder: Path) -> bool:
    """A finished run rerun with a changed config (``mugcp.sweep --rerun-changed``): its successor counts in reports."""
    return (run_folder / SUPERSEDED_FILE).is_file() or (run_folder.parent / SUPERSEDED_FILE).is_file()
