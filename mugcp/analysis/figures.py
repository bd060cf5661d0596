"""Saving matplotlib figures at an exact pixel size, atomically, with the Agg backend; fonts for any script."""
from __future__ import annotations

import logging
import warnings
from collections.abc import Iterable
from pathlib import Path

from mugcp.utils import atomic_write

DPI = 100
# Fonts tried first for characters the default font lacks (CJK class names above all); any other installed font
# that has the glyphs comes after them.
PREFERRED_FALLBACKS = ("Noto Sans CJK JP", "Noto Sans CJK SC", "Noto Sans CJK TC", "Noto Sans CJK KR",
                       "Droid Sans Fallback", "WenQuanYi Zen Hei", "Noto Sans", "Noto Sans Arabic",
                       "Noto Sans Devanagari", "Noto Sans Thai")
# matplotlib's own last resort: it "has" every glyph, as a box. A font that draws boxes is not a fallback.
BOX_FONTS = ("Last Resort",)

log = logging.getLogger(__name__)
_charmaps: dict[str, frozenset] = {}
_warned_about_glyphs = False


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


def _charmap(path: str) -> frozenset:
    """The code points a font file has glyphs for (cached; an unreadable file has none)."""
    if path not in _charmaps:
        from matplotlib.ft2font import FT2Font

        try:
            _charmaps[path] = frozenset(FT2Font(path).get_charmap())
        except (OSError, RuntimeError, ValueError):
            _charmaps[path] = frozenset()
    return _charmaps[path]


def font_family_for(texts: Iterable[str]) -> list[str]:
    """Font families that draw every character of ``texts``: the default family, then installed fonts with the
    glyphs it lacks (matplotlib takes each glyph from the first family that has it). When no installed font has
    some of them they would be drawn as boxes: that is logged once per process, with the fix."""
    global _warned_about_glyphs
    from matplotlib import font_manager, rcParams

    family = list(rcParams["font.family"])
    missing = {ord(c) for text in texts for c in str(text) if not c.isspace()}
    missing -= _charmap(font_manager.findfont(font_manager.FontProperties(family=family)))
    if not missing:
        return family
    preference = {name: i for i, name in enumerate(PREFERRED_FALLBACKS)}
    candidates = sorted((f for f in font_manager.fontManager.ttflist if not f.name.startswith(BOX_FONTS)),
                        key=lambda f: (preference.get(f.name, len(preference)), f.name, f.fname))
    for font in candidates:
        covered = missing & _charmap(font.fname)
        if covered and font.name not in family:
            family.append(font.name)
            missing -= covered
        if not missing:
            return family
    if not _warned_about_glyphs:
        _warned_about_glyphs = True
        example = "".join(sorted(map(chr, missing))[:5])
        log.warning("no installed font has the glyphs of %d character(s) in the class names (e.g. %r); figures draw "
                    "them as boxes. Install a font that has them (e.g. fonts-noto-cjk for Chinese, Japanese, Korean) "
                    "and delete matplotlib's font cache (~/.cache/matplotlib) to see them.", len(missing), example)
    return family


def use_fonts_for_labels(ax, labels: Iterable[str]) -> None:
    """Tick labels of ``ax`` drawn with fonts that have the glyphs of ``labels`` (class names in any script)."""
    ax.tick_params(labelfontfamily=font_family_for(labels))
