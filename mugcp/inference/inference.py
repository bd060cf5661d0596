"""A trained run ready for new images: ``load_run`` → ``TrainedModel`` (logits, top-k predictions) and ``Preprocess``.

    model, preprocess = mugcp.load_run("runs/coop_dtd", classnames=["cat", "dog"])
    model.predict([PIL.Image.open("cat.jpg")])        # [Prediction(classes=[...], probs=[...])]
    logits = model(preprocess(image)[None])           # (1, 2)
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn
from PIL import Image

from mugcp.config import ConfigError
from mugcp.inference.image_files import Prediction, key_candidates  # noqa: F401 (also imported from here)
from mugcp.inference.semantic_inputs import SemanticInputs


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
                f"A tensor that is already preprocessed, shape (B, 3, {self.image_size}, {self.image_size}), goes to "
                "the model directly."
            )
        return self.transform(image.convert("RGB"))

    def __repr__(self) -> str:
        return f"Preprocess(image_size={self.image_size}, {self.transform})"


def open_image(path: str | Path) -> Image.Image:
    """The image at ``path`` as RGB; anything unreadable is a BadImageError naming the file."""
    from mugcp.data.dataset import open_image_file

    return open_image_file(path)


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
        from mugcp.runs.runtime import autocast

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

    def predict(self, images, top_k: int = 5, keys: Optional[Sequence[str]] = None,
                batch_size: int = 32) -> list[Prediction]:
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
            part_keys = (keys[first:first + batch_size] if keys is not None
                         else [str(i) if isinstance(i, (str, Path)) else "" for i in part])
            candidates = [key_candidates(k) for k in part_keys]
            batch = torch.stack([self.preprocess(image) for image in pil])
            predictions = self.classify(batch, candidates, lambda: [image.convert("RGB") for image in pil], top_k)
            for prediction, original in zip(predictions, part):
                prediction.path = str(original) if isinstance(original, (str, Path)) else None
            results.extend(predictions)
        return results


def _tensor_has_no_pil():
    raise ConfigError("running the MLLM needs the images themselves: call model.predict with PIL images or paths, not "
                      "a tensor.")


def load_run(run, classnames: Optional[Sequence[str]] = None, device: str = "cpu", semantic_cache=None,
             mllm: Optional[str] = None):
    """``model, preprocess = load_run(RUN, classnames=[...])``: a trained run ready for new images.

    ``classnames`` default to the run's own (from its ``splits.json``). ``preprocess`` turns a PIL
    image of any size and mode into the model's input; ``model(batch)`` gives logits and
    ``model.predict(images)`` the top-k classes. MuGCP runs trained on MLLM answers need
    ``semantic_cache`` (a cache from ``mugcp.extract``) or ``mllm`` (a model to run now).
    """
    from mugcp.runs.run_setup import SemanticContext, build_run_model
    from mugcp.runs.runtime import resolve_device, resolve_precision
    from mugcp.runs.trained_run import read_trained_run

    trained = read_trained_run(run)
    names = trained.resolve_classnames(classnames)
    torch_device = resolve_device(device)
    # The checkpoint's method options already carry its semantic source and width: build exactly that model.
    learner = build_run_model(trained.cfg, names, torch_device, SemanticContext(),
                              dataset_name=trained.cfg["data"]["dataset"])
    learner.load_adapter_state(trained.tensors, source=str(trained.checkpoint))
    learner.eval()
    preprocess = Preprocess(trained.cfg["data"]["image_size"] or learner.clip.image_size)
    semantics = SemanticInputs(trained, learner, cache=semantic_cache, mllm=mllm, device=torch_device)
    precision = resolve_precision(trained.cfg["train"]["precision"] if torch_device.type == "cuda" else "fp32",
                                  torch_device)
    return TrainedModel(learner, trained, preprocess, semantics, precision), preprocess
