"""Training curves from the metrics file the trainer writes (``metrics.jsonl``), never from the log.

One JSON object per line: ``{"kind": "train", "step", "epoch", "loss", "lr", "terms": {name: value}}``
after every optimiser step, and ``{"kind": "eval", "step", "subset", "accuracy"}`` after every
evaluation. ``curves.png`` draws the loss terms, the learning rate and the evaluation accuracy by step.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from mugcp.analysis.figures import new_figure, save_figure
from mugcp.runs.layout import CURVES_FILE, STEP_METRICS_FILE
from mugcp.utils import atomic_write_text

CURVES_SIZE = (1500, 420)


def read_metrics(path: str | Path) -> list[dict]:
    """The records of a metrics file; a line torn by a crash mid-write (only ever the last) is dropped."""
    path = Path(path)
    if not path.is_file():
        return []
    records = []
    lines = path.read_text(encoding="utf-8").splitlines()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if number == len(lines):
                break
            raise ValueError(f"{path}, line {number}: not JSON ({line[:60]!r}); the metrics file is damaged.") from None
    return records


def _before_resume(record: dict, resume_step: int) -> bool:
    step = int(record.get("step", 0))
    return step < resume_step or (step == resume_step and record.get("kind") != "eval")


class MetricsLog:
    """Appends records to ``metrics.jsonl``, one line each, flushed as written (a crash loses at most the line in
    flight).

    A fresh run starts the file empty. A resumed run keeps only what happened up to the step of its
    checkpoint (``resume_step``), so the steps it replays are not recorded twice; the evaluation at that
    step is not kept either: the resumed run evaluates again (``--resume --reevaluate`` on a finished run).
    """

    def __init__(self, path: str | Path, resume_step: Optional[int] = None):
        self.path = Path(path)
        kept = [r for r in read_metrics(self.path) if _before_resume(r, resume_step)] if resume_step is not None else []
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        self._handle = open(self.path, "a", encoding="utf-8")

    def write(self, record: dict) -> None:
        self._handle.write(json.dumps(record) + "\n")
        self._handle.flush()

    def train_step(self, step: int, epoch: int, loss: float, lr: float, terms: dict) -> None:
        self.write({"kind": "train", "step": step, "epoch": epoch, "loss": float(loss), "lr": float(lr),
                    "terms": {k: float(v) for k, v in terms.items()}})

    def evaluation(self, step: int, metrics: dict) -> None:
        for subset, result in metrics.items():
            if isinstance(result, dict) and "accuracy" in result:
                self.write({"kind": "eval", "step": step, "subset": subset, "accuracy": float(result["accuracy"])})

    def close(self) -> None:
        if not self._handle.closed:
            self._handle.close()


def curve_series(records: list[dict]) -> dict[str, dict[str, tuple[list[int], list[float]]]]:
    """``{"loss": {name: (steps, values)}, "lr": {...}, "accuracy": {subset: ...}}`` from the records."""
    series: dict[str, dict[str, tuple[list[int], list[float]]]] = {"loss": {}, "lr": {}, "accuracy": {}}

    def add(panel: str, name: str, step: int, value: float) -> None:
        steps, values = series[panel].setdefault(name, ([], []))
        steps.append(step)
        values.append(value)

    # A single term is the loss itself; its own curve is drawn only when the loss has several terms.
    several_terms = any(len(r.get("terms", {})) > 1 for r in records if r.get("kind") == "train")
    for record in records:
        if record.get("kind") == "train":
            add("loss", "loss", record["step"], record["loss"])
            for name, value in record.get("terms", {}).items():
                if several_terms and name != "loss":
                    add("loss", name, record["step"], value)
            add("lr", "lr", record["step"], record["lr"])
        elif record.get("kind") == "eval":
            add("accuracy", record["subset"], record["step"], record["accuracy"])
    return series


def plot_curves(records: list[dict], path: str | Path, size: tuple[int, int] = CURVES_SIZE, title: str = "") -> Path:
    """Three panels: loss and its terms, learning rate, evaluation accuracy (%), each against the step."""
    from matplotlib.ticker import MaxNLocator

    series = curve_series(records)
    last_step = max((int(r.get("step", 0)) for r in records), default=0)
    plt, fig, axes = new_figure(size, ncols=3)
    for ax, (panel, label) in zip(axes, (("loss", "loss"), ("lr", "learning rate"),
                                         ("accuracy", "evaluation accuracy %"))):
        curves = series[panel]
        for name, (steps, values) in curves.items():
            style = {"marker": "o"} if panel == "accuracy" or len(steps) < 3 else {}
            ax.plot(steps, values, label=name, linewidth=1.2, **style)
        ax.set_xlabel("step", fontsize=9)
        ax.set_ylabel(label, fontsize=9)
        if not curves:
            ax.text(0.5, 0.5, "no records", ha="center", va="center", transform=ax.transAxes, fontsize=9)
        elif len(curves) > 1 or panel == "accuracy":
            ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
        if last_step:
            ax.set_xlim(0, last_step * 1.04 + 0.5)  # one step axis for the three panels
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole: no 0.5-step ticks on short runs
    if title:
        fig.suptitle(title, fontsize=10)
    return save_figure(fig, path, size)


def write_curves(run_folder: str | Path, title: str = "") -> Optional[Path]:
    """``curves.png`` of a run folder from its ``metrics.jsonl``; None when the run wrote no records."""
    run_folder = Path(run_folder)
    records = read_metrics(run_folder / STEP_METRICS_FILE)
    if not records:
        return None
    return plot_curves(records, run_folder / CURVES_FILE, title=title)
