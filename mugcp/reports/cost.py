"""What runs cost beside what they reached: the report's cost table and its time-vs-accuracy plot (DESIGN §7).

Every training run's ``metrics.json`` records its training time, evaluation speed, peak memory and
trainable parameters; :func:`aggregate_cost` averages them over seeds per group (dataset, method,
protocol, shots, backbone), with the group's HM (or accuracy on all classes) for the plot. Runs written
before a field existed leave its cell empty.
"""

from __future__ import annotations

import csv
import io
import statistics
from pathlib import Path

from mugcp.reports.results import GROUP_KEYS, grouped, value

#: (metrics.json field, column title, digits)
COST_FIELDS = (
    ("train_time_s", "training time (s)", 1),
    ("eval_images_per_s", "evaluation images/s", 1),
    ("peak_memory_mb", "peak memory (MB)", 0),
    ("trainable_parameters", "trainable parameters", 0),
)


def aggregate_cost(runs: list[dict]) -> list[dict]:
    """One row per group: the mean over its seeds of every cost field present, and ``accuracy`` (HM, else all)."""
    rows = []
    for key, members in grouped(runs):
        row = dict(zip(GROUP_KEYS, key))
        row["seeds"] = len(members)
        for field, _, _ in COST_FIELDS:
            values = [m[field] for m in members if isinstance(m.get(field), (int, float))]
            if values:
                row[field] = statistics.fmean(values)
        for metric in ("hm", "all"):
            accuracies = [v for v in (value(m, metric) for m in members) if v is not None]
            if accuracies:
                row["accuracy"], row["accuracy_metric"] = statistics.fmean(accuracies), metric
                break
        if any(field in row for field, _, _ in COST_FIELDS):
            rows.append(row)
    return rows


def _number(row: dict, field: str, digits: int) -> str:
    return f"{row[field]:,.{digits}f}" if field in row else ""


def cost_markdown(rows: list[dict]) -> str:
    header = ["dataset", "method", "backbone", "seeds", *(title for _, title, _ in COST_FIELDS)]
    lines = [
        "## Cost",
        "",
        "Mean over seeds. Training time counts from the command's start (setup included); evaluation images/s "
        "over the evaluated subsets' own passes.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for row in rows:
        cells = [str(row["dataset"]), str(row["method"]), str(row["backbone"]), str(row["seeds"])]
        cells += [_number(row, field, digits) for field, _, digits in COST_FIELDS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def cost_csv(rows: list[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow([*GROUP_KEYS, "seeds", *(field for field, _, _ in COST_FIELDS), "accuracy", "accuracy_metric"])
    for row in rows:
        writer.writerow(
            [
                *(row[k] for k in GROUP_KEYS),
                row["seeds"],
                *(_rounded(row.get(field, "")) for field, _, _ in COST_FIELDS),
                _rounded(row.get("accuracy", "")),
                row.get("accuracy_metric", ""),
            ]
        )
    return buffer.getvalue()


def _rounded(number):
    return round(number, 4) if isinstance(number, float) else number


def plot_cost(rows: list[dict], path: Path) -> bool:
    """Training time against HM (or accuracy), one colour per method, a point per dataset;
    False when there is nothing to plot."""
    from mugcp.reports.plots import _pyplot, _save

    shown = [r for r in rows if "train_time_s" in r and "accuracy" in r]
    if not shown:
        return False
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for method in dict.fromkeys(r["method"] for r in shown):
        mine = [r for r in shown if r["method"] == method]
        ax.scatter([r["train_time_s"] for r in mine], [r["accuracy"] for r in mine], label=method)
        for r in mine:
            ax.annotate(
                str(r["dataset"]),
                (r["train_time_s"], r["accuracy"]),
                fontsize=6,
                xytext=(3, 3),
                textcoords="offset points",
            )
    metrics = {r["accuracy_metric"] for r in shown}
    ax.set_xlabel("training time (s), mean over seeds")
    ax.set_ylabel("harmonic mean (base, new) %" if metrics == {"hm"} else "HM or accuracy on all classes %")
    ax.set_title("what a method costs and what it reaches")
    ax.legend(fontsize=7)
    _save(fig, plt, path)
    return True
