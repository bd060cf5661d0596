"""Saving matplotlib figures at an exact pixel size, atomically, with the Agg backend."""
from __future__ import annotations

import warnings
from pathlib import Path

from mugcp.utils import atomic_write

DPI = 100


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend (no display is ever needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def new_figure(size: tuple[int, int], **subplots):
    """``(plt, fig, axes)`` for a figure of ``size`` = (width, height) pixels."""
    plt = pyplot()
    fig, axes = plt.subplots(figsize=(size[0] / DPI, size[1] / DPI), dpi=DPI, **subplots)
    return plt, fig, axes


def save_figure(fig, path: str | Path, size: tuple[int, int]) -> Path:
    """Write ``fig`` as a PNG of exactly ``size`` pixels (no tight bounding box: it would change the size)."""
    plt = pyplot()
    fig.set_size_inches(size[0] / DPI, size[1] / DPI)
    with warnings.catch_warnings():
        # A crowded figure that cannot be tightened further is still readable; say nothing.
        warnings.simplefilter("ignore")
        try:
            fig.tight_layout()
        except (ValueError, RuntimeError):
            pass
    path = Path(path)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=DPI))
    plt.close(fig)
    return path
