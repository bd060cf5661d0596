"""``write_report``: a folder of runs → ``results.md``, ``results.csv`` and ``results.png`` in a layout.

``layout`` picks the table: ``groups`` (one row per group, the default) or a paper's layout:
``base2new`` (per dataset base / new / HM per method, and the average over datasets), ``fewshot``
(accuracy per number of shots K), ``cross_dataset`` / ``domain_generalization`` (source accuracy
and the accuracy on every target dataset evaluated with ``mugcp.evaluate``, and their average).
"""
from __future__ import annotations

import sys
from pathlib import Path

from mugcp.analysis.per_class import write_per_class_report
from mugcp.config import ConfigError
from mugcp.reports.cost import aggregate_cost, cost_csv, cost_markdown, plot_cost
from mugcp.reports.plots import plot, plot_fewshot, plot_transfer
from mugcp.reports.results import GROUP_KEYS, aggregate, aggregate_transfer, find_evaluations, find_runs
from mugcp.reports.tables import (
    LAYOUTS,
    base2new_markdown,
    csv_text,
    fewshot_markdown,
    markdown,
    transfer_csv,
    transfer_markdown,
)
from mugcp.runs.layout import (
    COST_CSV_FILE,
    COST_FIGURE_FILE,
    FINAL_METRICS_FILE,
    RESULTS_CSV_FILE,
    RESULTS_FIGURE_FILE,
    RESULTS_TABLE_FILE,
)
from mugcp.utils import atomic_write_text

# What a paper's layout tabulates, so a root without it is refused in one line instead of an empty table.
LAYOUT_NEEDS = {"base2new": (("base", "new"), "base and new accuracies (protocol base2new)"),
                "fewshot": (("all",), "an accuracy on all classes (protocol fewshot or all)")}
PROTOCOL_LAYOUT = {"base2new": "base2new", "fewshot": "fewshot", "all": "fewshot"}


def write_report(folders, out, layout: str = "groups") -> str:
    """Write ``results.md``, ``results.csv`` and ``results.png`` in ``layout`` under ``out``; returns the table."""
    if layout not in LAYOUTS:
        raise ConfigError(f"--layout {layout!r}: use one of {', '.join(LAYOUTS)}.")
    folders = [str(f) for f in folders]
    runs = find_runs(folders)
    if not runs:
        raise FileNotFoundError(f"no training runs ({FINAL_METRICS_FILE}) under {', '.join(folders)}")
    rows = aggregate(runs)
    for row in rows:
        if len(set(row["seeds"])) < len(row["seeds"]):
            print(f"warning: {row['method']} on {row['dataset']} has several runs with the same seed ({row['seeds']}); "
                  "they are averaged as if independent. Pass only the runs you mean to compare.", file=sys.stderr)
    if layout in LAYOUT_NEEDS and not any(all(m in row for m in LAYOUT_NEEDS[layout][0]) for row in rows):
        protocols = sorted({str(r.get("protocol")) for r in runs})
        fits = sorted({PROTOCOL_LAYOUT[p] for p in protocols if p in PROTOCOL_LAYOUT} - {layout}) + ["groups"]
        raise ConfigError(f"--layout {layout}: none of the {len(runs)} runs under {', '.join(folders)} has "
                          f"{LAYOUT_NEEDS[layout][1]}; their protocols: {', '.join(protocols)}. "
                          f"Use --layout {' or '.join(fits)}.")
    out = Path(out)
    groups = f"{len(runs)} runs in {len(rows)} groups"
    if layout in ("cross_dataset", "domain_generalization"):
        transfer = aggregate_transfer(find_evaluations(folders))
        if not transfer:
            raise FileNotFoundError(f"no evaluations of trained runs (mugcp.evaluate {FINAL_METRICS_FILE}) "
                                    f"under {', '.join(folders)}")
        table, table_csv = transfer_markdown(transfer, layout), transfer_csv(transfer)
        plot_transfer(transfer, out / RESULTS_FIGURE_FILE)
        groups += f", {sum(len(r['targets']) for r in transfer)} target results"
    else:
        table = {"groups": markdown, "base2new": base2new_markdown, "fewshot": fewshot_markdown}[layout](rows)
        table_csv = csv_text(rows)
        (plot_fewshot if layout == "fewshot" else plot)(rows, out / RESULTS_FIGURE_FILE)
    cost = aggregate_cost(runs)
    if cost:
        table += "\n" + cost_markdown(cost)
        atomic_write_text(out / COST_CSV_FILE, cost_csv(cost))
        plot_cost(cost, out / COST_FIGURE_FILE)
    atomic_write_text(out / RESULTS_TABLE_FILE, table)
    atomic_write_text(out / RESULTS_CSV_FILE, table_csv)
    print(table)
    print(f"{groups} → {out}/{RESULTS_TABLE_FILE}, {RESULTS_CSV_FILE}, {RESULTS_FIGURE_FILE}")
    if cost:
        print(f"cost (training time, evaluation images/s, peak memory, trainable parameters) → "
              f"{out}/{RESULTS_TABLE_FILE}, {COST_CSV_FILE}, {COST_FIGURE_FILE}")
    if write_per_class_report(runs, out, GROUP_KEYS):
        print(f"per-class accuracy → {out}/per_class.md, per_class.csv, per_class/*.png")
    return table

