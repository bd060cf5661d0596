"""The report's tables as Markdown and CSV: one row per group, or a paper's layout.

``markdown`` / ``csv_text``: one row per (dataset, method, protocol, shots, backbone) group.
The papers' layouts: ``base2new_markdown`` (per dataset base / new / HM per method and the average
over datasets), ``fewshot_markdown`` (accuracy per K), ``transfer_markdown`` (source and targets).
"""
from __future__ import annotations

import csv
import io

from mugcp.reports.results import GROUP_KEYS, in_paper_order, mean
from mugcp.utils import harmonic_mean

LAYOUTS = ("groups", "base2new", "fewshot", "cross_dataset", "domain_generalization")


# The group table's columns after the seeds: (header, how a row's cell reads).
HM_OF_MEANS_HEADER = "HM of means"
PER_SEED_HM_HEADER = "per-seed HM"


def _columns(rows: list[dict]) -> list[tuple[str, str]]:
    """(header, row key) of every result some row has, in the table's order."""
    columns = [(m, m) for m in ("base", "new") if any(m in r for r in rows)]
    if any("hm_of_means" in r for r in rows):
        columns += [(HM_OF_MEANS_HEADER, "hm_of_means"), (PER_SEED_HM_HEADER, "hm_per_seed")]
    return columns + [("all", "all")] * any("all" in r for r in rows)


def markdown(rows: list[dict]) -> str:
    columns = _columns(rows)
    header = ["dataset", "method", "protocol", "shots", "backbone", "seeds", *(h for h, _ in columns)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [str(row[k]) for k in GROUP_KEYS] + [",".join(map(str, row["seeds"]))]
        cells += [_hm_of_means_cell(row) if key == "hm_of_means" else _cell(row.get(key)) for _, key in columns]
        if not row["pretrained"]:
            cells[1] += " (random weights)"
        lines.append("| " + " | ".join(cells) + " |")
    if any("hm_of_means" in r for r in rows):
        lines += ["", f"{HM_OF_MEANS_HEADER}: the harmonic mean of the seed-averaged base and new accuracies, as the "
                  f"papers report it (one number, no spread). {PER_SEED_HM_HEADER}: mean ± std of each seed's own HM."]
    return "\n".join(lines) + "\n"


def csv_text(rows: list[dict]) -> str:
    """One line per group: each accuracy's mean/std/n, ``hm_of_means`` (no spread) and the per-seed HMs' stats."""
    def stat_header(name):
        return [f"{name}_{s}" for s in ("mean", "std", "n")]

    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow([*GROUP_KEYS, "seeds", "pretrained", *stat_header("base"), *stat_header("new"), "hm_of_means",
                     *stat_header("hm_per_seed"), *stat_header("all")])
    for row in rows:
        stats = {name: row.get(name) or ("", "", "") for name in ("base", "new", "hm_per_seed", "all")}
        writer.writerow([*(row[k] for k in GROUP_KEYS), " ".join(map(str, row["seeds"])), row["pretrained"],
                         *stats["base"], *stats["new"], row.get("hm_of_means", ""), *stats["hm_per_seed"],
                         *stats["all"]])
    return buffer.getvalue()


def _hm_of_means_cell(row: dict) -> str:
    return f"{row['hm_of_means']:.2f}" if "hm_of_means" in row else ""


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


def base2new_markdown(rows: list[dict]) -> str:
    """Per dataset: methods × base / new (mean ± std over seeds) / HM of those means; first, the average
    over datasets.

    The average row takes the mean of each dataset's mean base and new accuracy and, as the papers
    do, the HM of those two averages.
    """
    rows = [r for r in rows if "base" in r and "new" in r]
    labels = _labels(rows)
    datasets = in_paper_order(r["dataset"] for r in rows)
    methods = list(dict.fromkeys(labels[id(r)] for r in rows))
    lines = ["## Base-to-novel generalisation", "",
             "Accuracy (%) on the base classes (trained on) and the new classes (never seen), mean ± std over seeds; "
             "HM of means = 2·base·new/(base+new) of those seed-averaged accuracies, as the papers report it "
             "(one number: it has no spread over seeds).", "", f"### Average over {len(datasets)} datasets", "",
             "| method | base | new | HM of means | datasets |", "|---|---|---|---|---|"]
    for method in methods:
        mine = [r for r in rows if labels[id(r)] == method]
        base, new = mean([r["base"][0] for r in mine]), mean([r["new"][0] for r in mine])
        lines.append(f"| {method} | {base:.2f} | {new:.2f} | {harmonic_mean(base, new):.2f} | "
                     f"{len(mine)} of {len(datasets)} |")
    for dataset in datasets:
        lines += ["", f"### {dataset}", "", "| method | base | new | HM of means | seeds |", "|---|---|---|---|---|"]
        for row in (r for r in rows if r["dataset"] == dataset):
            lines.append(f"| {labels[id(row)]} | {_cell(row['base'])} | {_cell(row['new'])} | "
                         f"{_hm_of_means_cell(row)} | "
                         f"{','.join(map(str, row['seeds']))} |")
    return "\n".join(lines) + "\n"


def fewshot_ks(rows: list[dict]) -> list:
    """The K columns of a few-shot table: every K some run trained with (a run without K, zero-shot CLIP,
    shows on each)."""
    shots = sorted({r["shots"] for r in rows if r["shots"] is not None})
    return shots or [None]


def at_k(row: dict, k) -> bool:
    """A run shows at K: trained with K shots, or without K (``shots: null``: nothing trained, the same at every K)."""
    return row["shots"] == k or row["shots"] is None


def fewshot_markdown(rows: list[dict]) -> str:
    """Per dataset: methods × K (accuracy on all classes, mean ± std over seeds); first, the average over datasets."""
    rows = [r for r in rows if "all" in r]
    shots = fewshot_ks(rows)
    labels = _labels(rows, keys=("backbone",))  # K is the column, not part of the method label
    methods = list(dict.fromkeys(labels[id(r)] for r in rows))
    datasets = in_paper_order(r["dataset"] for r in rows)
    header = "| method | " + " | ".join(f"K={k}" for k in shots) + " |"
    rule = "|---|" + "---|" * len(shots)
    lines = ["## Few-shot learning", "",
             "Accuracy (%) on all classes with K training images per class; mean ± std over seeds.",
             "", f"### Average over {len(datasets)} datasets", "", header, rule]
    for method in methods:
        cells = []
        for k in shots:
            values = [r["all"][0] for r in rows if labels[id(r)] == method and at_k(r, k)]
            cells.append(f"{mean(values):.2f}" if values else "")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    for dataset in datasets:
        lines += ["", f"### {dataset}", "", header, rule]
        for method in methods:
            mine = [r for r in rows if r["dataset"] == dataset and labels[id(r)] == method]
            if mine:
                by_k = [next((r for r in mine if at_k(r, k)), None) for k in shots]
                lines.append(f"| {method} | " + " | ".join(_cell(r["all"]) if r else "" for r in by_k) + " |")
    return "\n".join(lines) + "\n"


def transfer_markdown(rows: list[dict], layout: str) -> str:
    """Methods × (source, every target, average of the targets): the cross-dataset / domain-generalisation tables."""
    title = {"cross_dataset": "Cross-dataset transfer", "domain_generalization": "Domain generalisation"}[layout]
    targets = in_paper_order(t for r in rows for t in r["targets"])
    labels = _labels(rows)
    lines = [f"## {title}", "",
             "Accuracy (%) on the source dataset the prompts were trained on and on each target dataset (all classes, "
             "evaluated with mugcp.evaluate); mean ± std over seeds; Average = mean over the targets.", ""]
    for source in dict.fromkeys(r["source"] for r in rows):
        lines += [f"| method | source: {source} | " + " | ".join(targets) + " | Average |",
                  "|---|---|" + "---|" * (len(targets) + 1)]
        for row in (r for r in rows if r["source"] == source):
            present = [row["targets"][t][0] for t in targets if t in row["targets"]]
            average = (f"{mean(present):.2f}" if len(present) == len(targets)
                       else (f"{mean(present):.2f} ({len(present)} of {len(targets)})" if present else ""))
            lines.append(f"| {labels[id(row)]} | {_cell(row.get('source_acc'))} | "
                         + " | ".join(_cell(row["targets"].get(t)) for t in targets) + f" | {average} |")
        lines.append("")
    return "\n".join(lines)


def transfer_csv(rows: list[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["method", "source", "shots", "backbone", "seeds", "pretrained", "dataset", "role", "mean",
                     "std", "n"])
    for row in rows:
        common = [row["method"], row["source"], row["shots"], row["backbone"], " ".join(map(str, row["seeds"])),
                  row["pretrained"]]
        if "source_acc" in row:
            writer.writerow([*common, row["source"], "source", *row["source_acc"]])
        for target, stat in row["targets"].items():
            writer.writerow([*common, target, "target", *stat])
    return buffer.getvalue()

