"""The report's plots (matplotlib, Agg): accuracy per group, per number of shots, per target dataset."""
from __future__ import annotations

from pathlib import Path

from mugcp.reports.results import in_paper_order, mean
from mugcp.reports.tables import at_k, fewshot_ks
from mugcp.utils import atomic_write


def plot(rows: list[dict], path: Path) -> None:
    """A bar per group: the HM of its seed-averaged base and new (no error bar: it has no spread over seeds),
    else its accuracy on all classes with the std over seeds."""
    plt = _pyplot()
    by_hm = any("hm_of_means" in r for r in rows)
    shown = [r for r in rows if ("hm_of_means" if by_hm else "all") in r]
    heights = [r["hm_of_means"] if by_hm else r["all"][0] for r in shown]
    labels = [f"{r['method']}\n{r['dataset']}" for r in shown]
    fig, ax = plt.subplots(figsize=(max(4, 1.2 * len(shown)), 3.5))
    ax.bar(range(len(shown)), heights, yerr=None if by_hm else [r["all"][1] for r in shown], capsize=4, color="#4C72B0")
    ax.set_xticks(range(len(shown)), labels, fontsize=8)
    ax.set_ylabel("HM of mean base, mean new %" if by_hm else "accuracy %")
    ax.set_title("HM of the seed-averaged base and new accuracies" if by_hm else "mean ± std over seeds", fontsize=9)
    _save(fig, plt, path)


def plot_fewshot(rows: list[dict], path: Path) -> None:
    plt = _pyplot()
    rows = [r for r in rows if "all" in r]
    datasets = in_paper_order(r["dataset"] for r in rows)
    methods = list(dict.fromkeys(r["method"] for r in rows))
    every_k = fewshot_ks(rows)
    panels = ["Average", *datasets] if len(datasets) > 1 else datasets
    columns = min(4, len(panels))
    fig, axes = plt.subplots((len(panels) + columns - 1) // columns, columns,
                             figsize=(3.2 * columns, 2.6 * ((len(panels) + columns - 1) // columns)), squeeze=False)
    for ax, panel in zip(axes.flat, panels):
        for method in methods:
            mine = [r for r in rows if r["method"] == method and (panel == "Average" or r["dataset"] == panel)]
            shots = [k for k in every_k if any(at_k(r, k) for r in mine)]
            means = [mean([r["all"][0] for r in mine if at_k(r, k)]) for k in shots]
            ax.plot(shots, means, marker="o", label=method)
        ax.set_title(panel, fontsize=9)
        if None not in every_k:
            ax.set_xscale("log", base=2)
        ax.set_xlabel("shots per class (K)", fontsize=8)
        ax.set_ylabel("accuracy %", fontsize=8)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    _save(fig, plt, path)


def plot_transfer(rows: list[dict], path: Path) -> None:
    plt = _pyplot()
    targets = in_paper_order(t for r in rows for t in r["targets"])
    fig, ax = plt.subplots(figsize=(max(4, 0.9 * len(targets) * max(1, len(rows)) / 2 + 2), 3.5))
    width = 0.8 / max(1, len(rows))
    for i, row in enumerate(rows):
        xs = [t + i * width for t in range(len(targets))]
        stats = [row["targets"].get(t, (0.0, 0.0, 0)) for t in targets]
        ax.bar(xs, [s[0] for s in stats], width, yerr=[s[1] for s in stats], capsize=3,
               label=f"{row['method']} ({row['source']})")
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

