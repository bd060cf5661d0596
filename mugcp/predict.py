"""``python -m mugcp.predict --checkpoint RUN [--classes "a,b,c" | --classes-file F] IMAGE_OR_DIR ...``

Classifies images with a trained prompt: one row per image with its top-k classes and
probabilities, printed as a table, or written to ``--out preds.csv`` / ``preds.jsonl``. Folders are
searched recursively for image files; unreadable images are named, skipped and counted.
Without ``--classes`` the run's own classes are used (training and evaluation classes from its
``splits.json``). MuGCP runs trained on MLLM answers need them for the new images too:
``--semantic-cache DIR`` (made by ``python -m mugcp.extract --images IMAGE_DIR``) or ``--mllm MODEL``.

From Python::

    model, preprocess = mugcp.load_run("runs/coop_dtd", classnames=["cat", "dog"])
    model.predict([PIL.Image.open("cat.jpg")])        # [Prediction(classes=[...], probs=[...])]
    logits = model(preprocess(image)[None])           # (1, 2)
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
import torch.nn as nn
from PIL import Image

from mugcp.cli import run_cli
from mugcp.config import ConfigError
from mugcp.data.classnames import read_classnames_file, validate_classnames
from mugcp.data.dataset import IMAGE_EXTENSIONS
from mugcp.utils import atomic_write_text

OUTPUT_FORMATS = (".csv", ".jsonl")


@dataclass
class Prediction:
    """The top-k classes of one image, most probable first (``probs`` are softmax probabilities)."""

    classes: list[str]
    probs: list[float]
    indices: list[int]
    path: Optional[str] = None


class Preprocess:
    """PIL image (any mode: grayscale, RGBA, palette...) or image path → normalised ``(3, S, S)`` tensor."""

    def __init__(self, image_size: int):
        from mugcp.data import build_transform

        self.image_size = int(image_size)
        self.transform = build_transform(self.image_size, train=False)

    def __call__(self, image) -> torch.Tensor:
        if isinstance(image, (str, Path)):
            image = open_image(image)
        if not isinstance(image, Image.Image):
            raise TypeError(
                f"preprocess takes a PIL image or an image path, got {type(image).__name__}. "
                f"A tensor that is already preprocessed, shape (B, 3, {self.image_size}, {self.image_size}), goes to the model directly."
            )
        return self.transform(image.convert("RGB"))

    def __repr__(self) -> str:
        return f"Preprocess(image_size={self.image_size}, {self.transform})"


def open_image(path: str | Path) -> Image.Image:
    """The image at ``path`` as RGB; anything unreadable is a BadImageError naming the file."""
    from mugcp.data import open_image_file

    return open_image_file(path)


# ------------------------------------------------------------------------------------ semantics
class _Answers(dict):
    """key → (caption text, hidden states): what a semantic cache holds, for the images at hand."""

    def text(self, key: str) -> str:
        return self[key][0]


class SemanticInputs:
    """Per-image MLLM semantics for a MuGCP run trained on them: from a cache, or an MLLM run now."""

    def __init__(self, run, learner, cache=None, mllm=None, device: Optional[torch.device] = None):
        options = learner.options
        self.needed = options.get("semantic_source") == "mllm"
        self.kind = options.get("semantic_features", "caption")
        self.dim = options.get("semantic_dim")
        self.run, self.learner = run, learner
        self.cache = self.mllm = None
        if not self.needed:
            if cache is not None or mllm is not None:
                raise ConfigError(
                    f"checkpoint {run.checkpoint} ({run.method}, semantic source "
                    f"{options.get('semantic_source', 'none')!r}) takes no MLLM semantics; drop --semantic-cache / --mllm."
                )
            return
        if cache is not None and mllm is not None:
            raise ConfigError("give either --semantic-cache or --mllm, not both.")
        if cache is not None:
            from mugcp.semantics import SemanticCache

            self.cache = cache if isinstance(cache, SemanticCache) else SemanticCache(cache)
            if self.kind == "hidden" and self.cache.dim != self.dim:
                raise ConfigError(
                    f"semantic cache {cache} holds {self.cache.dim}-d hidden states but checkpoint {run.checkpoint} was "
                    f"trained on {self.dim}-d ones; use a cache made with the run's MLLM ({self.run_mllm() or 'see its config.yaml'})."
                )
        elif mllm is not None:
            self.mllm = self._load_mllm(mllm, device or torch.device("cpu"))

    # ---- what the run was trained with
    def run_cache_manifest(self) -> Optional[dict]:
        from mugcp.semantics import read_manifest
        from mugcp.semantics.cache import CacheError

        path = self.run.cfg["semantic"].get("cache")
        try:
            return read_manifest(path) if path and Path(path).is_dir() else None
        except CacheError:
            return None

    def run_mllm(self) -> Optional[str]:
        return (self.run_cache_manifest() or {}).get("mllm")

    def missing_message(self, python: bool = False) -> str:
        mllm = self.run_mllm() or "MODEL"
        if python:
            fix = ("pass semantic_cache=DIR (made by `python -m mugcp.extract --mllm "
                   f"{mllm} --images IMAGE_DIR --out DIR`) or mllm='{mllm}' to mugcp.load_run, then call model.predict(...) "
                   "with image paths (cache keys) or PIL images (MLLM), or call model(images, semantic=..., semantic_mask=...).")
        else:
            fix = (f"pass --semantic-cache DIR, made first with `python -m mugcp.extract --mllm {mllm} --images IMAGE_DIR "
                   f"--out DIR` (its keys are paths relative to IMAGE_DIR), or --mllm {mllm} to run the MLLM on these images now.")
        return (f"checkpoint {self.run.checkpoint} is MuGCP trained on MLLM answers (semantic_source=mllm, "
                f"semantic_features={self.kind}), so every image needs its MLLM answer: {fix}")

    def _load_mllm(self, name: str, device: torch.device):
        from mugcp.semantics.extraction import resolve_dtype
        from mugcp.semantics.mllm import DEFAULT_PROMPT, MLLM

        from mugcp.semantics.mllm import MLLMError, resolve_model_name

        manifest = self.run_cache_manifest() or {}
        try:
            # Ask what the run's cache asked, so answers look like the ones the prompts were trained on.
            mllm = MLLM(resolve_model_name(name), prompt=manifest.get("prompt", DEFAULT_PROMPT), layer=manifest.get("layer", -1),
                        max_new_tokens=manifest.get("max_new_tokens", 64), dtype=resolve_dtype("auto", device), device=device)
        except MLLMError as err:
            raise ConfigError(str(err)) from None
        if self.kind == "hidden" and mllm.hidden_dim != self.dim:
            raise ConfigError(
                f"--mllm {name} has {mllm.hidden_dim}-d hidden states but checkpoint {self.run.checkpoint} was trained "
                f"on {self.dim}-d ones; use the run's MLLM ({self.run_mllm() or 'see its semantic cache'})."
            )
        return mllm

    # ---- per batch
    def cache_key(self, candidates: Sequence[str]) -> Optional[str]:
        return next((key for key in candidates if key in self.cache), None)

    def answers(self, keys: Sequence[Sequence[str]], images) -> _Answers:
        """Answers for a batch; ``keys[i]`` lists cache-key candidates of image i, ``images()`` opens the PIL images."""
        if self.cache is not None:
            if any(candidates == [""] for candidates in keys):
                raise ConfigError("images without a name cannot be looked up in the semantic cache: pass image paths, or "
                                  "keys=[the cache key of each image] to model.predict.")
            found = [self.cache_key(candidates) for candidates in keys]
            missing = [candidates[0] for candidates, key in zip(keys, found) if key is None]
            if missing:
                raise ConfigError(self.missing_keys_message(missing, len(keys)))
            return _Answers({str(i): (self.cache.text(key), self.cache[key]) for i, key in enumerate(found)})
        if self.mllm is not None:
            return _Answers({str(i): (a.text, a.hidden) for i, a in enumerate(self.mllm.describe(images()))})
        raise ConfigError(self.missing_message(python=True))

    def missing_keys_message(self, missing: Sequence[str], total: int) -> str:
        shown = ", ".join(missing[:10]) + (" ..." if len(missing) > 10 else "")
        return (f"{len(missing)} of {total} images have no entry in semantic cache {self.cache.path}: {shown}. "
                f"Add them with `python -m mugcp.extract --mllm {self.run_mllm() or 'MODEL'} --images IMAGE_DIR --out "
                f"{self.cache.path}` (keys are paths relative to IMAGE_DIR, as predict looks them up).")

    def batch(self, keys: Sequence[Sequence[str]], images) -> dict:
        """``{"semantic": (B, T, d), "semantic_mask": (B, T)}`` for the model, or {} when it needs none."""
        if not self.needed:
            return {}
        from mugcp.data.loader import _pad_semantic

        answers = self.answers(keys, images)
        order = [str(i) for i in range(len(keys))]
        if self.kind == "caption":
            from mugcp.methods.mugcp import CaptionFeatures

            features = CaptionFeatures.from_texts(self.learner.clip, answers, keys=order)
            rows = [features[key] for key in order]
        else:
            rows = [torch.as_tensor(answers[key][1]) for key in order]
        semantic, mask = _pad_semantic(rows)
        return {"semantic": semantic, "semantic_mask": mask}


# ------------------------------------------------------------------------------------ the model
class TrainedModel(nn.Module):
    """A trained prompt learner ready for new images: ``model(batch)`` → logits, ``model.predict(images)``."""

    def __init__(self, learner, run, preprocess: Preprocess, semantics: SemanticInputs, precision: str = "fp32"):
        super().__init__()
        self.learner = learner
        self.run = run
        self.preprocess = preprocess
        self.semantics = semantics
        self.precision = precision
        learner.eval()

    @property
    def classnames(self) -> list[str]:
        return list(self.learner.classnames)

    @property
    def device(self) -> torch.device:
        return self.learner.clip.device

    def set_classnames(self, classnames: Sequence[str]) -> None:
        self.learner.set_classnames(self.run.resolve_classnames(classnames))

    def check_images(self, images) -> torch.Tensor:
        size = self.preprocess.image_size
        expected = f"(B, 3, {size}, {size})"
        if not torch.is_tensor(images):
            raise TypeError(f"the model takes a tensor of preprocessed images {expected}, got {type(images).__name__}; "
                            "use model.predict(images) for PIL images or paths, or model(preprocess(image)[None]).")
        if images.dim() == 3 and tuple(images.shape) == (3, size, size):
            hint = "this is one image: add the batch dimension, model(preprocess(image)[None])."
        else:
            hint = "make them with preprocess(image) (it takes PIL images of any size and mode) and stack them."
        if images.dim() != 4 or tuple(images.shape[1:]) != (3, size, size) or not images.is_floating_point():
            raise ValueError(f"expected a float tensor of preprocessed images with shape {expected}, "
                             f"got {images.dtype} of shape {tuple(images.shape)}; {hint}")
        return images.to(self.device)

    def forward(self, images: torch.Tensor, **semantic) -> torch.Tensor:
        """Logits ``(B, C)`` over ``classnames`` for a preprocessed batch ``(B, 3, S, S)``."""
        from mugcp.engine.runtime import autocast

        images = self.check_images(images)
        if self.semantics.needed and "semantic" not in semantic:
            raise ConfigError(self.semantics.missing_message(python=True))
        with torch.no_grad(), autocast(self.precision, self.device):
            return self.learner(images, **semantic).float()

    def classify(self, images: torch.Tensor, keys: Sequence[Sequence[str]], opener, top_k: int) -> list[Prediction]:
        semantic = self.semantics.batch(keys, opener)
        probs = self(images, **semantic).softmax(dim=-1)
        values, indices = probs.topk(min(top_k, probs.shape[1]), dim=-1)
        names = self.classnames
        return [Prediction([names[i] for i in row_i.tolist()], [round(float(v), 6) for v in row_v], row_i.tolist())
                for row_v, row_i in zip(values, indices)]

    def predict(self, images, top_k: int = 5, keys: Optional[Sequence[str]] = None, batch_size: int = 32) -> list[Prediction]:
        """Top-k predictions for PIL images, image paths, or a preprocessed batch ``(B, 3, S, S)``.

        ``keys`` name the images in ``semantic_cache`` (MuGCP on MLLM answers); image paths are
        their own keys. Probabilities are a softmax over ``classnames``.
        """
        if top_k < 1:
            raise ValueError(f"top_k must be at least 1, got {top_k}.")
        if torch.is_tensor(images):
            if keys is None and self.semantics.needed and self.semantics.cache is not None:
                raise ConfigError("predict on a tensor with a semantic cache needs keys=[one cache key per image].")
            batch = self.check_images(images)
            candidates = [[key] for key in (keys or [""] * len(batch))]
            return self.classify(batch, candidates, lambda: _tensor_has_no_pil(), top_k)
        if isinstance(images, (str, Path, Image.Image)):
            images = [images]
        images = list(images)
        if keys is not None and len(keys) != len(images):
            raise ValueError(f"keys has {len(keys)} entries for {len(images)} images.")
        results: list[Prediction] = []
        for first in range(0, len(images), batch_size):
            part = images[first:first + batch_size]
            pil = [open_image(i) if isinstance(i, (str, Path)) else i for i in part]
            part_keys = keys[first:first + batch_size] if keys is not None else [str(i) if isinstance(i, (str, Path)) else "" for i in part]
            candidates = [key_candidates(k) for k in part_keys]
            batch = torch.stack([self.preprocess(image) for image in pil])
            predictions = self.classify(batch, candidates, lambda: [image.convert("RGB") for image in pil], top_k)
            for prediction, original in zip(predictions, part):
                prediction.path = str(original) if isinstance(original, (str, Path)) else None
            results.extend(predictions)
        return results


def _tensor_has_no_pil():
    raise ConfigError("running the MLLM needs the images themselves: call model.predict with PIL images or paths, not a tensor.")


def key_candidates(path: str, relative: Optional[str] = None) -> list[str]:
    """Where an image may sit in a semantic cache: relative to the folder given (as ``extract --images``
    keys it), the path as given, absolute, or its bare file name."""
    if not path:
        return [""]
    candidates = [relative] if relative else []
    candidates += [path, str(Path(path).resolve()), Path(path).name]
    return list(dict.fromkeys(candidates))


def load_run(run, classnames: Optional[Sequence[str]] = None, device: str = "cpu", semantic_cache=None, mllm: Optional[str] = None):
    """``model, preprocess = load_run(RUN, classnames=[...])``: a trained run ready for new images.

    ``classnames`` default to the run's own (from its ``splits.json``). ``preprocess`` turns a PIL
    image of any size and mode into the model's input; ``model(batch)`` gives logits and
    ``model.predict(images)`` the top-k classes. MuGCP runs trained on MLLM answers need
    ``semantic_cache`` (a cache from ``mugcp.extract``) or ``mllm`` (a model to run now).
    """
    from mugcp.engine.run_setup import SemanticContext, build_run_model
    from mugcp.engine.runtime import resolve_device, resolve_precision
    from mugcp.engine.trained_run import read_trained_run

    trained = read_trained_run(run)
    names = trained.resolve_classnames(classnames)
    torch_device = resolve_device(device)
    # The checkpoint's method options already carry its semantic source and width: build exactly that model.
    learner = build_run_model(trained.cfg, names, torch_device, SemanticContext(), dataset_name=trained.cfg["data"]["dataset"])
    learner.load_adapter_state(trained.tensors, source=str(trained.checkpoint))
    learner.eval()
    preprocess = Preprocess(trained.cfg["data"]["image_size"] or learner.clip.image_size)
    semantics = SemanticInputs(trained, learner, cache=semantic_cache, mllm=mllm, device=torch_device)
    precision = resolve_precision(trained.cfg["train"]["precision"] if torch_device.type == "cuda" else "fp32", torch_device)
    return TrainedModel(learner, trained, preprocess, semantics, precision), preprocess


# ------------------------------------------------------------------------------------ command line
def read_classes(args) -> Optional[list[str]]:
    if args.classes is not None:
        names = [name.strip() for name in args.classes.split(",")]
        if not all(names):
            raise ConfigError(f"--classes {args.classes!r}: give comma-separated non-empty names, e.g. --classes \"cat,dog\".")
        return validate_classnames(names, "--classes", [f"--classes name {i + 1}" for i in range(len(names))])
    if args.classes_file is not None:
        return read_classnames_file(args.classes_file)
    return None


@dataclass
class ImageFile:
    path: str  # as shown and written
    relative: Optional[str] = None  # relative to the folder argument it was found in
    candidates: list[str] = field(default_factory=list)


def collect_images(arguments: Sequence[str]) -> list[ImageFile]:
    """Files as given, and the image files under folders (recursively, sorted, hidden ones skipped)."""
    found: list[ImageFile] = []
    for argument in arguments:
        path = Path(argument)
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
                           and not any(part.startswith(".") for part in p.relative_to(path).parts))
            if not files:
                raise ConfigError(f"{argument}: no image files in this folder (extensions: {', '.join(sorted(IMAGE_EXTENSIONS))}).")
            found += [ImageFile(str(p), p.relative_to(path).as_posix()) for p in files]
        elif path.exists():
            found.append(ImageFile(str(path)))
        else:
            raise ConfigError(f"{argument}: no such file or folder. Pass image files or folders of images.")
    for image in found:
        image.candidates = key_candidates(image.path, image.relative)
    return found


def rows_csv(predictions: Sequence[Prediction], top_k: int) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["path", *(f"{column}_{rank}" for rank in range(1, top_k + 1) for column in ("class", "prob"))])
    for p in predictions:
        cells = [p.path]
        for rank in range(top_k):
            cells += [p.classes[rank], f"{p.probs[rank]:.6f}"] if rank < len(p.classes) else ["", ""]
        writer.writerow(cells)
    return buffer.getvalue()


def rows_jsonl(predictions: Sequence[Prediction]) -> str:
    return "".join(json.dumps({"path": p.path, "classes": p.classes, "probs": p.probs}) + "\n" for p in predictions)


def table(predictions: Sequence[Prediction]) -> str:
    cells = [[p.path, *(f"{c} ({100 * q:.1f}%)" for c, q in zip(p.classes, p.probs))] for p in predictions]
    width = max((len(row) for row in cells), default=1)
    header = ["image", *(f"top-{rank}" for rank in range(1, width))]
    rows = [header] + [row + [""] * (width - len(row)) for row in cells]
    widths = [max(len(row[i]) for row in rows) for i in range(width)]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mugcp.predict", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("images", nargs="+", metavar="IMAGE_OR_DIR", help="image files and folders of images (searched recursively)")
    parser.add_argument("--checkpoint", required=True, help="run folder (or its checkpoint/ folder)")
    names = parser.add_mutually_exclusive_group()
    names.add_argument("--classes", help='comma-separated class names, e.g. "cat,dog,owl" (default: the run\'s own classes)')
    names.add_argument("--classes-file", help="a text file with one class name per line")
    parser.add_argument("--top-k", type=int, default=5, help="classes per image [5]")
    parser.add_argument("--out", help="write predictions to a .csv or .jsonl file (default: print a table)")
    parser.add_argument("--batch-size", type=int, default=32, help="images per forward pass [32]")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N [auto]")
    parser.add_argument("--semantic-cache", metavar="DIR", help="MuGCP: a semantic cache holding these images (python -m mugcp.extract --images)")
    parser.add_argument("--mllm", metavar="PATH_OR_ID", help="MuGCP: run this MLLM on the images now (its answers are not stored)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)

    if args.top_k < 1:
        raise ConfigError(f"--top-k must be at least 1, got {args.top_k}.")
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be at least 1, got {args.batch_size}.")
    out = Path(args.out) if args.out else None
    if out is not None and out.suffix.lower() not in OUTPUT_FORMATS:
        raise ConfigError(f"--out {out}: the file name must end in {' or '.join(OUTPUT_FORMATS)} (it picks the format).")
    classnames = read_classes(args)
    files = collect_images(args.images)
    model, preprocess = load_run(args.checkpoint, classnames, device=args.device, semantic_cache=args.semantic_cache, mllm=args.mllm)
    if model.semantics.needed and model.semantics.cache is None and model.semantics.mllm is None:
        raise ConfigError(model.semantics.missing_message())
    predictions, skipped = predict_files(model, preprocess, files, args.top_k, args.batch_size, progress=not args.no_progress)

    if out is not None:
        text = rows_csv(predictions, min(args.top_k, len(model.classnames))) if out.suffix.lower() == ".csv" else rows_jsonl(predictions)
        atomic_write_text(out, text)
    else:
        print(table(predictions))
    summary = f"{len(predictions)} images classified over {len(model.classnames)} classes"
    summary += f"; predictions: {out}" if out is not None else ""
    if skipped:
        summary += f"; {len(skipped)} unreadable image{'s' if len(skipped) > 1 else ''} skipped:"
    print(summary, file=sys.stderr if out is None else sys.stdout)
    for path, reason in skipped:
        print(f"  skipped {path}: {reason}", file=sys.stderr)
    return 0


def predict_files(model: TrainedModel, preprocess: Preprocess, files: Sequence[ImageFile], top_k: int, batch_size: int,
                  progress: bool = True) -> tuple[list[Prediction], list[tuple[str, str]]]:
    """Batched predictions for image files; unreadable ones are returned as (path, reason), not raised."""
    from tqdm.auto import tqdm

    from mugcp.data import DatasetSplits, Datum, ImageDataset, build_loader

    by_path = {f.path: f for f in files}
    files = list(by_path.values())
    dataset = DatasetSplits("images", None, [], [], [], [])
    items = [Datum(f.path, 0, "") for f in files]
    skipped: list[tuple[str, str]] = []
    semantics = model.semantics
    if semantics.cache is not None:
        # Check every image up front (not after an hour of batches); one missing because it cannot be read is skipped.
        missing = [f for f in files if semantics.cache_key(f.candidates) is None]
        unreadable = []
        for f in missing:
            try:
                open_image(f.path)
            except ConfigError as err:
                unreadable.append(f.path)
                skipped.append((f.path, bad_image_reason(err)))
        if len(unreadable) < len(missing):
            raise ConfigError(semantics.missing_keys_message([f.path for f in missing if f.path not in unreadable], len(files)))
        unreadable_set = set(unreadable)
        items = [item for item in items if item.key not in unreadable_set]
    loader = build_loader(ImageDataset(items, dataset, preprocess, on_bad_image="skip"), batch_size, train=False, seed=0)
    predictions: list[Prediction] = []
    bar = tqdm(total=len(items), unit="img", desc="predict", disable=not progress, dynamic_ncols=True)
    loader_log = logging.getLogger("mugcp.data.loader")
    level = loader_log.level
    loader_log.setLevel(logging.ERROR)  # its per-image warning suggests a training option; the summary names them instead
    with bar:
        for batch in loader:
            for key in batch["skipped_keys"]:
                skipped.append((key, _reason(dataset, key)))
            if batch["keys"]:
                keys = batch["keys"]
                results = model.classify(batch["images"], [by_path[k].candidates for k in keys], lambda: [open_image(k) for k in keys], top_k)
                for result, key in zip(results, keys):
                    result.path = key
                predictions.extend(results)
            bar.update(len(batch["keys"]) + batch["n_skipped"])
            if skipped:
                bar.set_postfix(skipped=len(skipped))
    loader_log.setLevel(level)
    return predictions, skipped


def _reason(dataset, key: str) -> str:
    try:
        dataset.open_image(key)
    except ConfigError as err:
        return bad_image_reason(err)
    return "unreadable"


def bad_image_reason(err: Exception) -> str:
    """The reason part of a BadImageError ("cannot read image 'k' (path): REASON. Replace or remove ...")."""
    found = re.search(r"\): (.*?)\. Replace or remove", str(err))
    return found.group(1) if found else str(err)


if __name__ == "__main__":
    run_cli(main)
