"""Per-class accuracy across seeds: mean ± std per class, sorted by the gain over zero-shot CLIP.

Reads the ``per_class/<subset>.csv`` every evaluation writes in its run folder; ``mugcp.report``
calls :func:`write_per_class_report` with the runs it found. Runs group like the report's rows
(dataset, method, protocol, shots, backbone) and then by evaluated subset.
"""
from __future__ import annotations

import csv
import io
import re
import statistics
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

from mugcp.analysis.figures import new_figure, save_figure, use_fonts_for_labels
from mugcp.runs.layout import PER_CLASS_DIR
from mugcp.utils import atomic_write_text

GROUP_KEYS = ("dataset", "method", "protocol", "shots", "backbone")
PLOT_LIMIT = 40  # classes drawn per plot: the largest gains and the largest losses, half each


def read_per_class(run_folder: str | Path) -> dict[str, list[dict]]:
    """``{subset: [{"class", "count", "accuracy", "zeroshot_accuracy"?}, ...]}`` from a run folder ({} when it
    has none)."""
    found: dict[str, list[dict]] = {}
    for path in sorted((Path(run_folder) / PER_CLASS_DIR).glob("*.csv")):
        with open(path, newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle))
        found[path.stem] = [
            {"class": row["class"], "count": int(row["count"]), "accuracy": _number(row.get("accuracy")),
             "zeroshot_accuracy": _number(row.get("zeroshot_accuracy"))}
            for row in rows
        ]
    return found


def _number(text: Optional[str]) -> Optional[float]:
    return None if text in (None, "") else float(text)


def _stat(values: list[float]) -> tuple[float, float, int]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0, len(values)


def aggregate_per_class(runs: Sequence[dict], keys: Sequence[str] = GROUP_KEYS) -> list[dict]:
    """One row per (group, subset, class): accuracy mean/std/n over the runs' seeds, zero-shot mean and the gain.

    ``runs`` are ``metrics.json`` contents with ``_path`` (their folder), as ``mugcp.report`` finds them.
    Within each (group, subset) rows are sorted by gain over zero-shot, largest first (by accuracy when
    there is no zero-shot result).
    """
    values: dict[tuple, dict[str, dict[str, list[float]]]] = defaultdict(
        lambda: defaultdict(lambda: {"acc": [], "zs": []}))
    seeds: dict[tuple, list] = defaultdict(list)
    for run in runs:
        for subset, rows in read_per_class(run["_path"]).items():
            group = (*(run.get(k) for k in keys), subset)
            seeds[group].append(run.get("seed"))
            for row in rows:
                cell = values[group][row["class"]]
                if row["accuracy"] is not None:
                    cell["acc"].append(row["accuracy"])
                if row["zeroshot_accuracy"] is not None:
                    cell["zs"].append(row["zeroshot_accuracy"])
    result = []
    for group in sorted(values, key=lambda g: tuple(str(v) for v in g)):
        rows = []
        for name, cell in values[group].items():
            if not cell["acc"]:
                continue
            mean, std, n = _stat(cell["acc"])
            row = {**dict(zip(keys, group[:-1])), "subset": group[-1], "class": name, "mean": mean, "std": std, "n": n,
                   "seeds": sorted(seeds[group], key=lambda s: (s is None, s or 0))}
            if cell["zs"]:
                row["zeroshot"] = statistics.fmean(cell["zs"])
                row["gain"] = mean - row["zeroshot"]
            rows.append(row)
        rows.sort(key=lambda r: (-(r["gain"] if "gain" in r else r["mean"]), r["class"]))
        result.extend(rows)
    return result


def _groups(rows: Sequence[dict], keys: Sequence[str]) -> dict[tuple, list[dict]]:
    grouped: dict[tuple, list[dict]] = defaultdict(list)
    for row in rows:
        grouped[(*(row[k] for k in keys), row["subset"])].append(row)
    return grouped


def per_class_markdown(rows: Sequence[dict], keys: Sequence[str] = GROUP_KEYS) -> str:
    lines = ["# Per-class accuracy", "",
             "Accuracy (%) per class, mean ± std over seeds; zero-shot CLIP on the same backbone (when the runs were "
             "evaluated with data.compare_zeroshot) and the gain over it. Sorted by gain, largest first.", ""]
    for group, members in _groups(rows, keys).items():
        title = ", ".join(f"{k} {v}" for k, v in zip(keys, group[:-1])) + f", subset {group[-1]}"
        with_zs = any("gain" in r for r in members)
        lines += [f"## {title}", "", f"Seeds: {', '.join(map(str, members[0]['seeds']))}", "",
                  "| class | accuracy | " + ("zero-shot | gain |" if with_zs else ""),
                  "|---|---|" + ("---|---|" if with_zs else "")]
        for row in members:
            cells = [row["class"].replace("|", "/"), f"{row['mean']:.2f} ± {row['std']:.2f}"]
            if with_zs:
                cells += [f"{row['zeroshot']:.2f}" if "zeroshot" in row else "",
                          f"{row['gain']:+.2f}" if "gain" in row else ""]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def per_class_csv(rows: Sequence[dict], keys: Sequence[str] = GROUP_KEYS) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow([*keys, "subset", "class", "mean", "std", "n", "zeroshot", "gain"])
    for row in rows:
        writer.writerow([*(row[k] for k in keys), row["subset"], row["class"], f"{row['mean']:.4f}",
                         f"{row['std']:.4f}", row["n"],
                         f"{row['zeroshot']:.4f}" if "zeroshot" in row else "",
                         f"{row['gain']:.4f}" if "gain" in row else ""])
    return buffer.getvalue()


def plot_size(classes: int) -> tuple[int, int]:
    shown = min(classes, PLOT_LIMIT)
    return (1000, int(max(320, 120 + 18 * shown)))


def plot_per_class(members: Sequence[dict], path: str | Path, title: str) -> tuple[Path, tuple[int, int]]:
    """Horizontal bars (mean ± std over seeds) per class, in gain order, zero-shot as a marker."""
    shown = list(members)
    if len(shown) > PLOT_LIMIT:
        half = PLOT_LIMIT // 2
        shown = shown[:half] + shown[-half:]
        title += f" ({half} largest and {half} smallest gains of {len(members)} classes)"
    size = plot_size(len(members))
    plt, fig, ax = new_figure(size)
    positions = list(range(len(shown)))[::-1]
    means = [r["mean"] for r in shown]
    # The spread over seeds, cut at 0 and 100 %: an accuracy cannot leave them.
    spread = [[min(r["std"], r["mean"]) for r in shown], [min(r["std"], 100.0 - r["mean"]) for r in shown]]
    ax.barh(positions, means, xerr=spread, color="#4C72B0", capsize=2, label="prompted (mean ± std)")
    zero = [(p, r["zeroshot"]) for p, r in zip(positions, shown) if "zeroshot" in r]
    if zero:
        ax.scatter([z for _, z in zero], [p for p, _ in zero], marker="|", s=120, color="#DD8452", zorder=3,
                   label="zero-shot")
    names = [r["class"] for r in shown]
    ax.set_yticks(positions, names, fontsize=7 if len(shown) > 20 else 8)
    use_fonts_for_labels(ax, names)
    ax.set_xlabel("accuracy %", fontsize=9)
    ax.set_xlim(0, 100)
    ax.set_title(title, fontsize=9)
    # Outside the axes, to their right: inside, it would cover some class's bar or zero-shot marker.
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    return save_figure(fig, path, size), size


def write_per_class_report(runs: Sequence[dict], out: str | Path, keys: Sequence[str] = GROUP_KEYS) -> list[Path]:
    """``per_class.md``, ``per_class.csv`` and ``per_class/<group>.png`` under ``out``; [] when no run has
    per-class results."""
    rows = aggregate_per_class(runs, keys)
    if not rows:
        return []
    out = Path(out)
    written = [out / "per_class.md", out / "per_class.csv"]
    atomic_write_text(written[0], per_class_markdown(rows, keys))
    atomic_write_text(written[1], per_class_csv(rows, keys))
    for group, members in _groups(rows, keys).items():
        name = re.sub(r"[^A-Za-z0-9._-]+", "_", "_".join(str(v) for v in (group[1], group[0], group[-1])))
        title = (f"{group[1]} on {group[0]}, {group[-1]} classes: per-class accuracy over seeds "
                 f"{', '.join(map(str, members[0]['seeds']))}")
        written.append(plot_per_class(members, out / PER_CLASS_DIR / f"{name}.png", title)[0])
    return written
