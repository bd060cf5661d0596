"""Confusion matrices that stay readable from 2 to 1000 classes.

Classes are ordered by average-linkage agglomerative clustering of the symmetric confusion rates,
each merge joining the two orderings at the ends that are most confused with each other, so classes
that are mistaken for one another sit side by side. Up to ``FULL_LIMIT`` classes the figure is the
whole labelled matrix; above it, the whole matrix unlabelled (its block structure) beside the
labelled sub-matrix of the classes in the most confused pairs. The pairs are also written as CSV.
"""
from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from mugcp.analysis.figures import new_figure, save_figure, use_fonts_for_labels
from mugcp.utils import atomic_write_text

FULL_LIMIT = 40  # classes up to which every row and column is labelled
ANNOTATE_LIMIT = 15  # classes up to which every cell shows its count
TOP_PAIRS = 20
SUBMATRIX_LIMIT = 30


def confusion_rates(counts: np.ndarray) -> np.ndarray:
    """Row-normalised confusion (the share of each true class predicted as each class); empty rows stay 0."""
    counts = np.asarray(counts, dtype=np.float64)
    totals = counts.sum(axis=1, keepdims=True)
    return np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0)


def cluster_order(counts: np.ndarray) -> list[int]:
    """An ordering of the classes that puts mutually confused ones next to each other.

    Similarity of classes i, j is the symmetric confusion rate r_ij + r_ji. Clusters merge by highest
    average similarity; when no two clusters are confused at all, the rest follow by size, then index.
    """
    rates = confusion_rates(counts)
    similarity = rates + rates.T
    np.fill_diagonal(similarity, 0.0)
    n = similarity.shape[0]
    between = similarity.copy()  # summed similarity between clusters
    sizes = np.ones(n)
    orders: dict[int, list[int]] = {i: [i] for i in range(n)}
    active = np.ones(n, dtype=bool)
    average = between.copy()
    np.fill_diagonal(average, -1.0)
    for _ in range(n - 1):
        first, second = np.unravel_index(int(np.argmax(average)), average.shape)
        if average[first, second] <= 0:
            break
        orders[first] = _join(orders[first], orders.pop(second), similarity)
        between[first] += between[second]
        between[:, first] += between[:, second]
        sizes[first] += sizes[second]
        active[second] = False
        # Only the merged cluster's averages change; the absorbed one leaves the search.
        row = between[first] / (sizes[first] * sizes)
        row[~active] = -1.0
        row[first] = -1.0
        average[first] = average[:, first] = row
        average[second] = average[:, second] = -1.0
    rest = sorted(orders.values(), key=lambda order: (-len(order), min(order)))
    return [index for order in rest for index in order]


def _join(left: list[int], right: list[int], similarity: np.ndarray) -> list[int]:
    """``left`` and ``right`` concatenated, each possibly reversed, so that the two classes meeting at the seam
    are the most confused."""
    options = [(left, right), (left, right[::-1]), (left[::-1], right), (left[::-1], right[::-1])]
    best = max(options, key=lambda pair: similarity[pair[0][-1], pair[1][0]])
    return best[0] + best[1]


def top_pairs(counts: np.ndarray, k: int = TOP_PAIRS) -> list[tuple[int, int, int, float]]:
    """The ``k`` largest off-diagonal cells: (true, predicted, count, share of the true class), count > 0."""
    counts = np.asarray(counts)
    rates = confusion_rates(counts)
    off = counts.astype(np.int64).copy()
    np.fill_diagonal(off, 0)
    flat = np.flatnonzero(off)
    ranked = sorted(flat, key=lambda cell: (-off.flat[cell], -rates.flat[cell], cell))[:k]
    return [(int(c // off.shape[1]), int(c % off.shape[1]), int(off.flat[c]), float(rates.flat[c])) for c in ranked]


def pairs_csv(pairs: Sequence[tuple[int, int, int, float]], classnames: Sequence[str]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["true_index", "true", "predicted_index", "predicted", "count", "share_of_true_class"])
    for true, predicted, count, rate in pairs:
        writer.writerow([true, classnames[true], predicted, classnames[predicted], count, f"{rate:.4f}"])
    return buffer.getvalue()


def figure_size(classes: int) -> tuple[int, int]:
    """Pixels of the confusion figure for ``classes`` classes."""
    if classes > FULL_LIMIT:
        return (1600, 820)
    side = int(min(1200, max(420, 260 + 22 * classes)))
    return (side + 120, side)


def plot_confusion(counts: np.ndarray, classnames: Sequence[str], path: str | Path,
                   title: str = "") -> tuple[Path, tuple[int, int], list[int]]:
    """Write the figure; returns (path, its size in pixels, the class order used)."""
    counts = np.asarray(counts)
    classes = counts.shape[0]
    order = cluster_order(counts)
    size = figure_size(classes)
    rates = confusion_rates(counts)
    if classes <= FULL_LIMIT:
        plt, fig, ax = new_figure(size)
        _matrix(fig, ax, counts, rates, order, classnames, labelled=True, annotate=classes <= ANNOTATE_LIMIT)
        ax.set_title(title or f"confusion ({classes} classes, {int(counts.sum())} images)", fontsize=10)
    else:
        plt, fig, (whole, detail) = new_figure(size, ncols=2, gridspec_kw={"width_ratios": [1, 1.15]})
        # Off the diagonal only, on its own scale: at this size the diagonal would hide every confusion.
        off = rates.copy()
        np.fill_diagonal(off, 0.0)
        _matrix(fig, whole, counts, off, order, classnames, labelled=False, annotate=False,
                vmax=max(float(off.max()), 1e-9), label="share of the true class (off the diagonal)")
        whole.set_title(f"all {classes} classes, clustered order ({int(counts.sum())} images); confusions only",
                        fontsize=10)
        pairs = top_pairs(counts, TOP_PAIRS)
        involved = list(dict.fromkeys(c for pair in pairs for c in pair[:2]))[:SUBMATRIX_LIMIT]
        position = {c: i for i, c in enumerate(order)}
        involved.sort(key=position.get)
        if involved:
            sub = counts[np.ix_(involved, involved)]
            _matrix(fig, detail, sub, rates[np.ix_(involved, involved)], list(range(len(involved))),
                    [classnames[c] for c in involved], labelled=True, annotate=len(involved) <= ANNOTATE_LIMIT)
            detail.set_title(f"the {len(involved)} classes of the {len(pairs)} most confused pairs", fontsize=10)
        else:
            detail.axis("off")
            detail.set_title("no confusion", fontsize=10)
    return save_figure(fig, path, size), size, order


def _matrix(fig, ax, counts, rates, order, classnames, labelled: bool, annotate: bool, vmax: float = 1.0,
            label: str = "share of the true class") -> None:
    shown = rates[np.ix_(order, order)]
    image = ax.imshow(shown, cmap="Blues", vmin=0.0, vmax=vmax, interpolation="antialiased", aspect="auto")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.02, label=label)
    ax.set_xlabel("predicted class", fontsize=8)
    ax.set_ylabel("true class", fontsize=8)
    if labelled:
        names = [classnames[i] for i in order]
        font = 8 if len(order) <= 20 else 6
        ax.set_xticks(range(len(order)), names, rotation=90, fontsize=font)
        ax.set_yticks(range(len(order)), names, fontsize=font)
        use_fonts_for_labels(ax, names)
    else:
        ax.set_xticks([])
        ax.set_yticks([])
    if annotate:
        for row, true in enumerate(order):
            for column, predicted in enumerate(order):
                value = int(counts[true, predicted])
                if value:
                    ax.text(column, row, str(value), ha="center", va="center", fontsize=7,
                            color="white" if shown[row, column] > 0.5 * vmax else "black")


def write_confusion(folder: str | Path, subset: str, result) -> dict[str, Path]:
    """``<subset>.png`` (the figure) and ``<subset>_pairs.csv`` (most confused pairs) under ``folder``."""
    folder = Path(folder)
    counts = result.confusion().numpy()
    figure, _, _ = plot_confusion(counts, result.classnames, folder / f"{subset}.png",
                                  title=f"{subset}: confusion ({len(result.classnames)} classes, "
                                        f"{int(counts.sum())} images)")
    pairs = folder / f"{subset}_pairs.csv"
    atomic_write_text(pairs, pairs_csv(top_pairs(counts, TOP_PAIRS), result.classnames))
    return {"confusion": figure, "confused_pairs": pairs}
