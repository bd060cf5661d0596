"""Issue 21.8: figures draw class names in any script (or say once why they cannot), keep per-class error bars
within 0-100 % and the legend off the bars, step axes in whole steps; inspect draws no bars into a redirected log."""
import logging
import sys

import numpy as np
import pytest

from mugcp.analysis import confusion, curves, figures, per_class

CJK = "名"  # no font shipped with matplotlib has it
CIRCLED = "Ⓐ"  # DejaVu Sans (matplotlib's default) lacks it; matplotlib's STIXGeneral has it


@pytest.fixture
def drawn(monkeypatch):
    """The figures the analysis modules save, kept (after being written) so their artists can be read."""
    kept = []

    def keep(fig, path, size):
        kept.append(fig)
        return figures.save_figure(fig, path, size)

    for module in (confusion, per_class, curves):
        monkeypatch.setattr(module, "save_figure", keep)
    monkeypatch.setattr(figures, "_warned_about_glyphs", False)
    return kept


def fonts_with(character):
    from matplotlib import font_manager

    return sorted({f.name for f in font_manager.fontManager.ttflist
                   if not f.name.startswith(figures.BOX_FONTS) and ord(character) in figures._charmap(f.fname)})


def test_class_names_the_default_font_lacks_are_drawn_with_an_installed_font_that_has_them(drawn, tmp_path, caplog):
    names = [f"{CIRCLED}pple", "banana", "cherry"]
    assert fonts_with(CIRCLED) and "DejaVu Sans" not in fonts_with(CIRCLED)
    confusion.plot_confusion(np.array([[2, 1, 0], [0, 3, 0], [1, 0, 2]]), names, tmp_path / "c.png")
    family = drawn[0].axes[0].get_yticklabels()[0].get_fontfamily()
    assert family[0] == "sans-serif" and family[1] in fonts_with(CIRCLED)
    assert drawn[0].axes[0].get_xticklabels()[0].get_fontfamily() == family
    assert "no installed font" not in caplog.text
    assert figures.font_family_for(["plain latin"]) == ["sans-serif"]  # nothing added where nothing is missing


def test_names_no_installed_font_can_draw_are_warned_about_once(drawn, tmp_path, caplog):
    rows = [{"class": f"{CJK}{i}", "mean": 50.0, "std": 1.0, "n": 2} for i in range(3)]
    with caplog.at_level(logging.WARNING, logger="mugcp.analysis.figures"):
        per_class.plot_per_class(rows, tmp_path / "a.png", "t")
        confusion.plot_confusion(np.eye(3, dtype=int), [r["class"] for r in rows], tmp_path / "b.png")
    warnings = [r.getMessage() for r in caplog.records if "no installed font" in r.getMessage()]
    if fonts_with(CJK):  # a machine with e.g. fonts-noto-cjk: that font draws them, nothing to warn about
        assert warnings == [] and drawn[0].axes[0].get_yticklabels()[0].get_fontfamily()[1] in fonts_with(CJK)
    else:
        assert warnings == [f"no installed font has the glyphs of 1 character(s) in the class names (e.g. '{CJK}'); "
                            "figures draw them as boxes. Install a font that has them (e.g. fonts-noto-cjk for "
                            "Chinese, Japanese, Korean) and delete matplotlib's font cache (~/.cache/matplotlib) to "
                            "see them."]


def test_per_class_error_bars_stay_within_0_and_100_and_the_legend_covers_no_marker(drawn, tmp_path):
    rows = [{"class": "high", "mean": 95.0, "std": 10.0, "n": 3, "zeroshot": 99.0, "gain": -4.0},
            {"class": "low", "mean": 3.0, "std": 10.0, "n": 3, "zeroshot": 1.0, "gain": 2.0},
            {"class": "mid", "mean": 50.0, "std": 10.0, "n": 3, "zeroshot": 40.0, "gain": 10.0}]
    per_class.plot_per_class(rows, tmp_path / "p.png", "per class")
    ax = drawn[0].axes[0]
    error_bars = next(c for c in ax.containers if hasattr(c, "has_xerr"))
    spans = sorted((min(x for x, _ in seg), max(x for x, _ in seg)) for seg in error_bars.lines[2][0].get_segments())
    assert spans == [(0.0, 13.0), (40.0, 60.0), (85.0, 100.0)]
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    renderer = FigureCanvasAgg(drawn[0]).get_renderer()
    legend, axes = ax.get_legend().get_window_extent(renderer), ax.get_window_extent(renderer)
    assert legend.x0 >= axes.x1 and legend.x1 <= drawn[0].bbox.x1  # beside the plot, inside the figure


def test_curves_step_axis_has_whole_steps_only(drawn, tmp_path):
    records = [{"kind": "train", "step": s, "epoch": 1, "loss": 1.0 / s, "lr": 0.01, "terms": {"ce": 1.0 / s}}
               for s in (1, 2, 3)]
    records.append({"kind": "eval", "step": 3, "subset": "base", "accuracy": 50.0})
    curves.plot_curves(records, tmp_path / "curves.png")
    for ax in drawn[0].axes:
        ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
        assert ticks and all(float(t).is_integer() for t in ticks), ticks


def test_inspect_draws_no_progress_bars_into_a_redirected_log(tmp_path, monkeypatch):
    from fixtures import make_imagefolder
    from released_reference import register_tiny_clip
    from test_analysis_runs import TINY_MUGCP

    from mugcp.config import load_config
    from mugcp.inspect import main
    from mugcp.training import train

    data = make_imagefolder(tmp_path / "data", ["red fox", "snow owl"], per_class={"train": 2, "test": 1})
    cfg = load_config(None, ["data.dataset=imagefolder", f"data.root={data}", "data.shots=1", "data.batch_size=2",
                             *TINY_MUGCP, f"model.backbone={register_tiny_clip()}", "model.pretrained=none",
                             "optim.epochs=1", "train.progress=false", "train.tensorboard=false"])
    train(cfg, tmp_path / "run")
    log = tmp_path / "inspect.log"
    with open(log, "w") as redirected:  # as `python -m mugcp.inspect ... 2> inspect.log`
        monkeypatch.setattr(sys, "stderr", redirected)
        assert main([str(tmp_path / "run"), str(data / "test"), "--out", str(tmp_path / "inspect")]) == 0
    text = log.read_text()
    assert "\r" not in text and "it/s" not in text and "img/s" not in text and "nearest words" not in text, text
    assert (tmp_path / "inspect" / "nearest_words.md").is_file()
