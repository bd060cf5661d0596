"""``inspect_run``: what a trained run learned, written to a folder (``python -m mugcp.inspect`` calls it).

Always: the nearest words of every learned text context vector (``nearest_words.md`` / ``.csv``).
With images: MuGCP's AMG maps (``amg/<image>.png``), MPF gates (``gates.png``), the SCP caption used
per image and, for CoCoOp and MuGCP, the size of the per-image conditional prompts against the
shared context (``conditional_size.csv`` / ``.md``). MuGCP runs through the kernels' reference path,
so a run trained with ``model.kernels: triton`` is inspected the same way on any machine.
"""
from __future__ import annotations

import csv
import io
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from tqdm.auto import tqdm

from mugcp.config import ConfigError
from mugcp.utils import atomic_write_text, progress_wanted

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


@dataclass
class Inspection:
    """What ``inspect_run`` wrote, by kind."""

    out: Path
    files: dict[str, list[Path]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def add(self, kind: str, path: Path) -> None:
        self.files.setdefault(kind, []).append(Path(path))


def find_images(arguments: Sequence[str]) -> list[tuple[str, list[str]]]:
    """``(path, semantic-cache key candidates)`` for image files and the image files under folders (sorted)."""
    found: list[tuple[str, list[str]]] = []
    for argument in arguments:
        path = Path(argument)
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not files:
                raise ConfigError(f"{argument}: no image files in this folder.")
            found += [(str(p), [p.relative_to(path).as_posix(), str(p), str(p.resolve()), p.name]) for p in files]
        elif path.is_file():
            found.append((str(path), [str(path), str(path.resolve()), path.name]))
        else:
            raise ConfigError(f"{argument}: no such image file or folder.")
    return [(p, list(dict.fromkeys(c))) for p, c in found]


def inspect_run(run, images: Sequence[str] = (), out="inspect", k: int = 5, classnames: Optional[Sequence[str]] = None,
                semantic_cache=None, mllm: Optional[str] = None, device: str = "cpu",
                progress: bool = True) -> Inspection:
    """Write the inspection of ``run`` (a run or checkpoint folder) for ``images`` under ``out``."""
    from mugcp.analysis.nearest_words import nearest_words, nearest_words_csv, nearest_words_markdown
    from mugcp.inference.inference import load_run

    if k < 1:
        raise ConfigError(f"--top-k must be at least 1, got {k}.")
    progress = progress_wanted(progress)  # bars only on a terminal: never into a redirected log
    files = find_images(images)
    model, preprocess = load_run(run, classnames=classnames, device=device, semantic_cache=semantic_cache, mllm=mllm)
    learner = model.learner
    # The reference path is the one whose attention weights we can read; it computes what triton computes.
    learner.kernels = "reference"
    out = Path(out)
    result = Inspection(out)
    method = learner.method_name

    rows = nearest_words(learner, k=k, progress=progress)
    atomic_write_text(out / "nearest_words.md", nearest_words_markdown(rows, method))
    atomic_write_text(out / "nearest_words.csv", nearest_words_csv(rows))
    result.add("nearest_words", out / "nearest_words.md")
    result.add("nearest_words", out / "nearest_words.csv")

    if method == "mugcp":
        from mugcp.analysis.amg import gate_values, plot_gates

        result.add("gates", plot_gates(gate_values(learner), out / "gates.png"))
    if files and method in ("mugcp", "cocoop"):
        _inspect_images(model, files, out, result, progress)
    elif files:
        result.notes.append(f"{method} has no per-image prompts: the images were not needed (per-image views are for "
                            "mugcp and cocoop).")
    return result


def _inspect_images(model, files, out: Path, result: Inspection, progress: bool) -> None:
    from mugcp.analysis.amg import (
        AMGRecorder,
        cocoop_conditional_sizes,
        display_image,
        mugcp_conditional_sizes,
        plot_map_grid,
    )
    from mugcp.backbones import OPENAI_MEAN, OPENAI_STD
    from mugcp.data import DatasetSplits

    learner = model.learner
    opener = DatasetSplits("files", None, [], [], [], [])
    sizes: list[dict] = []
    captions: list[dict] = []
    stems: dict[str, int] = {}
    for path, candidates in tqdm(files, desc="inspect", unit="img", disable=not progress):
        pil = opener.open_image(path)
        pixels = model.preprocess(pil)[None].to(model.device)
        name = _unique_stem(Path(path).stem, stems)
        if learner.method_name == "cocoop":
            for row in cocoop_conditional_sizes(learner, pixels):
                sizes.append({**row, "image": path})
            continue
        semantic, caption = _semantic_inputs(model, candidates, pil)
        captions.append({"image": path, "source": learner.semantic_source, "caption": caption})
        with torch.no_grad(), AMGRecorder(learner) as recorder:
            logits = learner(pixels, **semantic)
        predicted = learner.classnames[int(logits.argmax(dim=-1)[0])]
        maps = recorder.maps()[0]
        figure, _ = plot_map_grid(display_image(pixels[0], OPENAI_MEAN, OPENAI_STD), maps, out / "amg" / f"{name}.png",
                                  title=f"{Path(path).name}: AMG maps per prompted layer (predicted: {predicted})")
        result.add("amg", figure)
        for row in mugcp_conditional_sizes(learner, recorder):
            sizes.append({**row, "image": path})
    if captions:
        atomic_write_text(out / "captions.md", _captions_markdown(captions))
        result.add("captions", out / "captions.md")
    atomic_write_text(out / "conditional_size.csv", _sizes_csv(sizes))
    atomic_write_text(out / "conditional_size.md", _sizes_markdown(sizes, learner.method_name))
    result.add("conditional_size", out / "conditional_size.csv")
    result.add("conditional_size", out / "conditional_size.md")


def _unique_stem(stem: str, seen: dict[str, int]) -> str:
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", stem) or "image"
    seen[stem] = seen.get(stem, 0) + 1
    return stem if seen[stem] == 1 else f"{stem}_{seen[stem]}"


def _semantic_inputs(model, candidates: list[str], pil) -> tuple[dict, str]:
    """The model's semantic inputs for one image and the SCP text they come from (or what stands in for it)."""
    learner = model.learner
    source = learner.semantic_source
    if source == "clip":
        return {}, "(no caption: semantic_source=clip pools the frozen CLIP image tokens)"
    if source == "none":
        return {}, "(no caption: semantic_source=none uses learned semantic tokens)"
    semantics = model.semantics
    if semantics.cache is None and semantics.mllm is None:
        raise ConfigError(semantics.missing_message())
    answers = semantics.answers([candidates], lambda: [pil.convert("RGB")])
    # batch() would ask the MLLM again; hand it the answers already in hand.
    semantics.answers = lambda *_: answers
    try:
        batch = semantics.batch([candidates], lambda: [pil.convert("RGB")])
    finally:
        del semantics.answers
    return {k: v.to(model.device) for k, v in batch.items()}, answers.text("0")


def _captions_markdown(captions: list[dict]) -> str:
    lines = ["# SCP input per image", "", "| image | semantic source | caption / answer |", "|---|---|---|"]
    for row in captions:
        lines.append(f"| {row['image']} | {row['source']} | "
                     f"{str(row['caption']).replace('|', '/').replace(chr(10), ' ')} |")
    return "\n".join(lines) + "\n"


SIZE_COLUMNS = ("image", "layer", "prompts", "shared_norm", "conditional_norm", "ratio")


def _sizes_csv(rows: list[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(SIZE_COLUMNS)
    for row in rows:
        writer.writerow([f"{row[c]:.6f}" if isinstance(row[c], float) else row[c] for c in SIZE_COLUMNS])
    return buffer.getvalue()


def _sizes_markdown(rows: list[dict], method: str) -> str:
    what = ("the shared context ctx against the meta-net's per-image shift π(x)" if method == "cocoop" else
            "per prompted layer, the shared context (text: ctx_t^j, vision: F^j(ctx_t^j)) against the per-image part "
            "(text: σ(g_t^j)⊙S^j, vision: σ(g_v^j)⊙VCP^j)")
    lines = ["# Per-image conditional prompts against the shared context", "",
             f"Mean L2 norm per token: {what}; ratio = conditional / shared.", "",
             "| image | layer | prompts | shared | conditional | ratio |", "|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['image']} | {row['layer']} | {row['prompts']} | {row['shared_norm']:.4f} | "
                     f"{row['conditional_norm']:.4f} | {row['ratio']:.4f} |")
    return "\n".join(lines) + "\n"
