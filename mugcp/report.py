"""``python -m mugcp.report RUNS_DIR [...] [--out DIR] [--layout L]``: seeds → mean ± std tables and a plot.

Reads the ``metrics.json`` every run writes (never log text), groups runs by dataset, method,
protocol, shots and backbone, and writes ``results.md``, ``results.csv`` and ``results.png``.
``--layout`` picks the table: ``groups`` (one row per group, the default) or a paper's layout:
``base2new`` (per dataset base / new / HM per method, and the average over datasets), ``fewshot``
(accuracy per number of shots K), ``cross_dataset`` / ``domain_generalization`` (source accuracy
and the accuracy on every target dataset evaluated with ``mugcp.evaluate``, and their average).
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
LAYOUTS = ("groups", "base2new", "fewshot", "cross_dataset", "domain_generalization")
# What a paper's layout tabulates, so a root without it is refused in one line instead of an empty table.
LAYOUT_NEEDS = {"base2new": (("base", "new"), "base and new accuracies (protocol base2new)"),
                "fewshot": (("all",), "an accuracy on all classes (protocol fewshot or all)")}
PROTOCOL_LAYOUT = {"base2new": "base2new", "fewshot": "fewshot", "all": "fewshot"}


def _all_metrics(folders) -> list[dict]:
    found = []
    for folder in folders:
        folder = Path(folder)
        if not folder.exists():
            raise FileNotFoundError(f"runs folder not found: {folder}")
        for path in sorted(folder.rglob("metrics.json")):
            try:
                metrics = json.loads(path.read_text(encoding="utf-8"))
            except json.JSONDecodeError as err:
                raise ConfigError(f"{path} is not valid JSON ({err}); delete or fix that run.") from None
            if "method" in metrics:
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
        source = Path(metrics["checkpoint"]).parent / "metrics.json"
        metrics["_source"] = json.loads(source.read_text(encoding="utf-8")) if source.is_file() else {}
        evaluations.append(metrics)
    return evaluations


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
                row[name] = _stat(values)
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
    plt = _pyplot()
    metric = "hm" if any("hm" in r for r in rows) else "all"
    shown = [r for r in rows if metric in r]
    labels = [f"{r['method']}\n{r['dataset']}" for r in shown]
    fig, ax = plt.subplots(figsize=(max(4, 1.2 * len(shown)), 3.5))
    ax.bar(range(len(shown)), [r[metric][0] for r in shown], yerr=[r[metric][1] for r in shown], capsize=4, color="#4C72B0")
    ax.set_xticks(range(len(shown)), labels, fontsize=8)
    ax.set_ylabel({"hm": "harmonic mean (base, new) %", "all": "accuracy %"}[metric])
    ax.set_title("mean ± std over seeds")
    _save(fig, plt, path)


# ------------------------------------------------------------------ the papers' layouts
def _mean(values: list[float]) -> float:
    return statistics.fmean(values)


def _cell(stat) -> str:
    return f"{stat[0]:.2f} ± {stat[1]:.2f}" if stat else ""


def _labels(rows: list[dict], keys=("shots", "backbone")) -> dict[int, str]:
    """A method label per row: the method, plus shots / backbone where the rows differ in them."""
    varying = [k for k in keys if len({r[k] for r in rows}) > 1]
    labels = {}
    for row in rows:
        extra = [f"{row['shots']} shots" if k == "shots" else str(row[k]) for k in varying]
        label = row["method"] + (f" ({', '.join(extra)})" if extra else "")
        labels[id(row)] = label + ("" if row["pretrained"] else " (random weights)")
    return labels


def _in_paper_order(names) -> list[str]:
    """Datasets in the order the papers' tables list them; other names after them, sorted."""
    from mugcp.sweep import IMAGENET_VARIANTS, STANDARD_DATASETS

    order = {name: i for i, name in enumerate((*STANDARD_DATASETS, *IMAGENET_VARIANTS))}
    return sorted(dict.fromkeys(names), key=lambda name: (order.get(name, len(order)), str(name)))


def _hm(base: float, new: float) -> float:
    return 2 * base * new / (base + new) if base + new > 0 else 0.0


def base2new_markdown(rows: list[dict]) -> str:
    """Per dataset: methods × base / new / HM (mean ± std over seeds); first, the average over datasets.

    The average row takes the mean of each dataset's mean base and new accuracy and, as the papers
    do, the HM of those two averages.
    """
    rows = [r for r in rows if "base" in r and "new" in r]
    labels = _labels(rows)
    datasets = _in_paper_order(r["dataset"] for r in rows)
    methods = list(dict.fromkeys(labels[id(r)] for r in rows))
    lines = ["## Base-to-novel generalisation", "",
             "Accuracy (%) on the base classes (trained on) and the new classes (never seen), HM = 2·base·new/(base+new); "
             "mean ± std over seeds.", "", f"### Average over {len(datasets)} datasets", "",
             "| method | base | new | HM | datasets |", "|---|---|---|---|---|"]
    for method in methods:
        mine = [r for r in rows if labels[id(r)] == method]
        base, new = _mean([r["base"][0] for r in mine]), _mean([r["new"][0] for r in mine])
        lines.append(f"| {method} | {base:.2f} | {new:.2f} | {_hm(base, new):.2f} | {len(mine)} of {len(datasets)} |")
    for dataset in datasets:
        lines += ["", f"### {dataset}", "", "| method | base | new | HM | seeds |", "|---|---|---|---|---|"]
        for row in (r for r in rows if r["dataset"] == dataset):
            lines.append(f"| {labels[id(row)]} | {_cell(row['base'])} | {_cell(row['new'])} | {_cell(row.get('hm'))} | "
                         f"{','.join(map(str, row['seeds']))} |")
    return "\n".join(lines) + "\n"


def fewshot_markdown(rows: list[dict]) -> str:
    """Per dataset: methods × K (accuracy on all classes, mean ± std over seeds); first, the average over datasets."""
    rows = [r for r in rows if "all" in r]
    shots = sorted({r["shots"] for r in rows}, key=lambda k: (k is None, k or 0))
    labels = _labels(rows, keys=("backbone",))  # K is the column, not part of the method label
    methods = list(dict.fromkeys(labels[id(r)] for r in rows))
    datasets = _in_paper_order(r["dataset"] for r in rows)
    header = "| method | " + " | ".join(f"K={k}" for k in shots) + " |"
    rule = "|---|" + "---|" * len(shots)
    lines = ["## Few-shot learning", "", "Accuracy (%) on all classes with K training images per class; mean ± std over seeds.",
             "", f"### Average over {len(datasets)} datasets", "", header, rule]
    for method in methods:
        cells = []
        for k in shots:
            values = [r["all"][0] for r in rows if labels[id(r)] == method and r["shots"] == k]
            cells.append(f"{_mean(values):.2f}" if values else "")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    for dataset in datasets:
        lines += ["", f"### {dataset}", "", header, rule]
        for method in methods:
            by_k = {r["shots"]: r for r in rows if r["dataset"] == dataset and labels[id(r)] == method}
            if by_k:
                lines.append(f"| {method} | " + " | ".join(_cell(by_k[k]["all"]) if k in by_k else "" for k in shots) + " |")
    return "\n".join(lines) + "\n"


def aggregate_transfer(evaluations: list[dict]) -> list[dict]:
    """One row per (method, source dataset, shots, backbone): source accuracy and each target's, over seeds."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for ev in evaluations:
        source = ev["_source"]
        key = (ev.get("method"), source.get("dataset"), source.get("shots"), ev.get("backbone"))
        groups[key].append(ev)
    rows = []
    for (method, source, shots, backbone), members in sorted(groups.items(), key=lambda item: tuple(str(v) for v in item[0])):
        row = {"method": method, "source": source, "shots": shots, "backbone": backbone, "dataset": source,
               "pretrained": all(m.get("pretrained") for m in members), "targets": {}}
        sources = {m["_source"].get("_path") or m["checkpoint"]: m["_source"] for m in members}
        source_values = [value(s, "all") for s in sources.values() if value(s, "all") is not None]
        if source_values:
            row["source_acc"] = _stat(source_values)
        row["seeds"] = sorted({s.get("seed") for s in sources.values()}, key=lambda x: (x is None, x or 0))
        for target in _in_paper_order(m["dataset"] for m in members):
            values = [value(m, "all") for m in members if m["dataset"] == target and value(m, "all") is not None]
            if values:
                row["targets"][target] = _stat(values)
        rows.append(row)
    return rows


def _stat(values: list[float]) -> tuple[float, float, int]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0, len(values)


def transfer_markdown(rows: list[dict], layout: str) -> str:
    """Methods × (source, every target, average of the targets): the cross-dataset / domain-generalisation tables."""
    title = {"cross_dataset": "Cross-dataset transfer", "domain_generalization": "Domain generalisation"}[layout]
    targets = _in_paper_order(t for r in rows for t in r["targets"])
    labels = _labels(rows)
    lines = [f"## {title}", "",
             "Accuracy (%) on the source dataset the prompts were trained on and on each target dataset (all classes, "
             "evaluated with mugcp.evaluate); mean ± std over seeds; Average = mean over the targets.", ""]
    for source in dict.fromkeys(r["source"] for r in rows):
        lines += [f"| method | source: {source} | " + " | ".join(targets) + " | Average |", "|---|---|" + "---|" * (len(targets) + 1)]
        for row in (r for r in rows if r["source"] == source):
            present = [row["targets"][t][0] for t in targets if t in row["targets"]]
            average = f"{_mean(present):.2f}" if len(present) == len(targets) else (f"{_mean(present):.2f} ({len(present)} of {len(targets)})" if present else "")
            lines.append(f"| {labels[id(row)]} | {_cell(row.get('source_acc'))} | "
                         + " | ".join(_cell(row["targets"].get(t)) for t in targets) + f" | {average} |")
        lines.append("")
    return "\n".join(lines)


def transfer_csv(rows: list[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["method", "source", "shots", "backbone", "seeds", "pretrained", "dataset", "role", "mean", "std", "n"])
    for row in rows:
        common = [row["method"], row["source"], row["shots"], row["backbone"], " ".join(map(str, row["seeds"])), row["pretrained"]]
        if "source_acc" in row:
            writer.writerow([*common, row["source"], "source", *row["source_acc"]])
        for target, stat in row["targets"].items():
            writer.writerow([*common, target, "target", *stat])
    return buffer.getvalue()


def plot_fewshot(rows: list[dict], path: Path) -> None:
    plt = _pyplot()
    rows = [r for r in rows if "all" in r]
    datasets = _in_paper_order(r["dataset"] for r in rows)
    methods = list(dict.fromkeys(r["method"] for r in rows))
    panels = ["Average", *datasets] if len(datasets) > 1 else datasets
    columns = min(4, len(panels))
    fig, axes = plt.subplots((len(panels) + columns - 1) // columns, columns, figsize=(3.2 * columns, 2.6 * ((len(panels) + columns - 1) // columns)), squeeze=False)
    for ax, panel in zip(axes.flat, panels):
        for method in methods:
            mine = [r for r in rows if r["method"] == method and (panel == "Average" or r["dataset"] == panel)]
            shots = sorted({r["shots"] for r in mine})
            means = [_mean([r["all"][0] for r in mine if r["shots"] == k]) for k in shots]
            ax.plot(shots, means, marker="o", label=method)
        ax.set_title(panel, fontsize=9)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("shots per class (K)", fontsize=8)
        ax.set_ylabel("accuracy %", fontsize=8)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    _save(fig, plt, path)


def plot_transfer(rows: list[dict], path: Path) -> None:
    plt = _pyplot()
    targets = _in_paper_order(t for r in rows for t in r["targets"])
    fig, ax = plt.subplots(figsize=(max(4, 0.9 * len(targets) * max(1, len(rows)) / 2 + 2), 3.5))
    width = 0.8 / max(1, len(rows))
    for i, row in enumerate(rows):
        xs = [t + i * width for t in range(len(targets))]
        stats = [row["targets"].get(t, (0.0, 0.0, 0)) for t in targets]
        ax.bar(xs, [s[0] for s in stats], width, yerr=[s[1] for s in stats], capsize=3, label=f"{row['method']} ({row['source']})")
    ax.set_xticks([t + 0.4 - width / 2 for t in range(len(targets))], targets, fontsize=8, rotation=30)
    ax.set_ylabel("accuracy %")
    ax.set_title("accuracy on the target datasets, mean ± std over seeds")
    ax.legend(fontsize=7)
    _save(fig, plt, path)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, plt, path: Path) -> None:
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    plt.close(fig)


def write_report(folders, out, layout: str = "groups") -> str:
    """Write ``results.md``, ``results.csv`` and ``results.png`` in ``layout`` under ``out``; returns the table."""
    if layout not in LAYOUTS:
        raise ConfigError(f"--layout {layout!r}: use one of {', '.join(LAYOUTS)}.")
    folders = [str(f) for f in folders]
    runs = find_runs(folders)
    if not runs:
        raise FileNotFoundError(f"no training runs (metrics.json) under {', '.join(folders)}")
    rows = aggregate(runs)
    for row in rows:
        if len(set(row["seeds"])) < len(row["seeds"]):
            print(f"warning: {row['method']} on {row['dataset']} has several runs with the same seed ({row['seeds']}); "
                  "they are averaged as if independent. Pass only the runs you mean to compare.", file=sys.stderr)
    if layout in LAYOUT_NEEDS and not any(all(m in row for m in LAYOUT_NEEDS[layout][0]) for row in rows):
        protocols = sorted({str(r.get("protocol")) for r in runs})
        fits = sorted({PROTOCOL_LAYOUT[p] for p in protocols if p in PROTOCOL_LAYOUT} - {layout}) + ["groups"]
        raise ConfigError(f"--layout {layout}: none of the {len(runs)} runs under {', '.join(folders)} has {LAYOUT_NEEDS[layout][1]}; "
                          f"their protocols: {', '.join(protocols)}. Use --layout {' or '.join(fits)}.")
    out = Path(out)
    groups = f"{len(runs)} runs in {len(rows)} groups"
    if layout in ("cross_dataset", "domain_generalization"):
        transfer = aggregate_transfer(find_evaluations(folders))
        if not transfer:
            raise FileNotFoundError(f"no evaluations of trained runs (mugcp.evaluate metrics.json) under {', '.join(folders)}")
        table, table_csv = transfer_markdown(transfer, layout), transfer_csv(transfer)
        plot_transfer(transfer, out / "results.png")
        groups += f", {sum(len(r['targets']) for r in transfer)} target results"
    else:
        table = {"groups": markdown, "base2new": base2new_markdown, "fewshot": fewshot_markdown}[layout](rows)
        table_csv = csv_text(rows)
        (plot_fewshot if layout == "fewshot" else plot)(rows, out / "results.png")
    atomic_write_text(out / "results.md", table)
    atomic_write_text(out / "results.csv", table_csv)
    print(table)
    print(f"{groups} → {out}/results.md, results.csv, results.png")
    return table


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mugcp.report", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="folders searched recursively for runs (metrics.json)")
    parser.add_argument("--out", default="report", help="output folder (default: report/)")
    parser.add_argument("--layout", default="groups", choices=LAYOUTS, help="table layout (default: groups)")
    args = parser.parse_args(argv)
    write_report(args.runs, args.out, args.layout)
    return 0


if __name__ == "__main__":
    run_cli(main)
