"""``python -m mugcp.report RUNS_DIR [...] [--out DIR]``: seeds → mean ± std tables and a plot.

Reads the ``metrics.json`` every run writes (never log text), groups runs by dataset, method,
protocol, shots and backbone, and writes ``results.md``, ``results.csv`` and ``results.png``.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

from mugcp.cli import run_cli
from mugcp.config import ConfigError
from mugcp.utils import atomic_write, atomic_write_text

GROUP_KEYS = ("dataset", "method", "protocol", "shots", "backbone")
METRICS = ("base", "new", "hm", "all")


def find_runs(folders) -> list[dict]:
    runs = []
    for folder in folders:
        folder = Path(folder)
        if not folder.exists():
            raise FileNotFoundError(f"runs folder not found: {folder}")
        for path in sorted(folder.rglob("metrics.json")):
            try:
                metrics = json.loads(path.read_text(encoding="utf-8"))
            except json.JSONDecodeError as err:
                raise ConfigError(f"{path} is not valid JSON ({err}); delete or fix that run.") from None
            if "method" in metrics and "checkpoint" not in metrics:  # training runs, not re-evaluations
                metrics["_path"] = str(path.parent)
                runs.append(metrics)
    return runs


def value(metrics: dict, name: str):
    entry = metrics.get(name)
    if isinstance(entry, dict):
        return entry.get("accuracy")
    return entry


def aggregate(runs: list[dict]) -> list[dict]:
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for run in runs:
        groups[tuple(run.get(k) for k in GROUP_KEYS)].append(run)
    rows = []
    for key, members in sorted(groups.items(), key=lambda item: tuple(str(v) for v in item[0])):
        row = dict(zip(GROUP_KEYS, key))
        row["seeds"] = sorted((m.get("seed") for m in members), key=lambda seed: (seed is None, seed if seed is not None else 0))
        row["pretrained"] = all(m.get("pretrained") for m in members)
        for name in METRICS:
            values = [v for v in (value(m, name) for m in members) if v is not None]
            if values:
                row[name] = (statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0, len(values))
        rows.append(row)
    return rows


def markdown(rows: list[dict]) -> str:
    present = [m for m in METRICS if any(m in r for r in rows)]
    header = ["dataset", "method", "protocol", "shots", "backbone", "seeds", *present]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [str(row[k]) for k in GROUP_KEYS] + [",".join(map(str, row["seeds"]))]
        cells += [f"{row[m][0]:.2f} ± {row[m][1]:.2f}" if m in row else "" for m in present]
        if not row["pretrained"]:
            cells[1] += " (random weights)"
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def csv_text(rows: list[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow([*GROUP_KEYS, "seeds", "pretrained", *(f"{m}_{s}" for m in METRICS for s in ("mean", "std", "n"))])
    for row in rows:
        writer.writerow([*(row[k] for k in GROUP_KEYS), " ".join(map(str, row["seeds"])), row["pretrained"],
                         *(x for m in METRICS for x in (row[m] if m in row else ("", "", "")))])
    return buffer.getvalue()


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = "hm" if any("hm" in r for r in rows) else "all"
    shown = [r for r in rows if metric in r]
    labels = [f"{r['method']}\n{r['dataset']}" for r in shown]
    fig, ax = plt.subplots(figsize=(max(4, 1.2 * len(shown)), 3.5))
    ax.bar(range(len(shown)), [r[metric][0] for r in shown], yerr=[r[metric][1] for r in shown], capsize=4, color="#4C72B0")
    ax.set_xticks(range(len(shown)), labels, fontsize=8)
    ax.set_ylabel({"hm": "harmonic mean (base, new) %", "all": "accuracy %"}[metric])
    ax.set_title("mean ± std over seeds")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mugcp.report", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="folders searched recursively for runs (metrics.json)")
    parser.add_argument("--out", default="report", help="output folder (default: report/)")
    args = parser.parse_args(argv)
    runs = find_runs(args.runs)
    if not runs:
        raise FileNotFoundError(f"no training runs (metrics.json) under {', '.join(args.runs)}")
    rows = aggregate(runs)
    for row in rows:
        if len(set(row["seeds"])) < len(row["seeds"]):
            print(f"warning: {row['method']} on {row['dataset']} has several runs with the same seed ({row['seeds']}); "
                  "they are averaged as if independent. Pass only the runs you mean to compare.", file=sys.stderr)
    out = Path(args.out)
    table = markdown(rows)
    atomic_write_text(out / "results.md", table)
    atomic_write_text(out / "results.csv", csv_text(rows))
    plot(rows, out / "results.png")
    print(table)
    print(f"{len(runs)} runs in {len(rows)} groups → {out}/results.md, results.csv, results.png")
    return 0


if __name__ == "__main__":
    run_cli(main)
