"""An exported prompt (``python -m mugcp.export``) run by onnxruntime alone: no torch is imported here.

The ONNX file carries what running it needs as metadata (``metadata_props``, see :data:`METADATA_KEYS`):
the class list, method, backbone and preprocessing. :func:`preprocess_image` repeats the evaluation
transform of :mod:`mugcp.data.transforms` with PIL and numpy (bicubic resize of the shorter side, center
crop, ``pixels / 255`` normalised by mean and std, in the same float32 operations), so its arrays equal
the transform's tensors.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from mugcp.config import ConfigError
from mugcp.inference.image_files import ImageFile, Prediction, bad_image_reason, open_image

METADATA_PREFIX = "mugcp."
#: metadata every export writes; values are strings (JSON for the lists)
METADATA_KEYS = (
    "classnames",
    "method",
    "backbone",
    "pretrained",
    "image_size",
    "mean",
    "std",
    "interpolation",
    "dtype",
    "run",
)


@dataclass
class ExportMetadata:
    """What an exported file says about itself (the ``mugcp.*`` entries of its ``metadata_props``)."""

    classnames: list[str]
    method: str
    backbone: str
    pretrained: str
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str
    dtype: str
    run: str

    def to_props(self) -> dict[str, str]:
        values = {key: getattr(self, key) for key in METADATA_KEYS}
        return {
            METADATA_PREFIX + key: json.dumps(list(value)) if isinstance(value, (list, tuple)) else str(value)
            for key, value in values.items()
        }

    @classmethod
    def from_props(cls, props: dict[str, str], source: str) -> ExportMetadata:
        missing = [METADATA_PREFIX + key for key in METADATA_KEYS if METADATA_PREFIX + key not in props]
        if missing:
            raise ConfigError(
                f"{source}: not an export of python -m mugcp.export (its metadata lacks {', '.join(missing)}); "
                "export the run again with python -m mugcp.export RUN --out FILE.onnx."
            )
        get = {key: props[METADATA_PREFIX + key] for key in METADATA_KEYS}
        return cls(
            classnames=list(json.loads(get["classnames"])),
            method=get["method"],
            backbone=get["backbone"],
            pretrained=get["pretrained"],
            image_size=int(get["image_size"]),
            mean=tuple(json.loads(get["mean"])),
            std=tuple(json.loads(get["std"])),
            interpolation=get["interpolation"],
            dtype=get["dtype"],
            run=get["run"],
        )


def resized_size(width: int, height: int, size: int) -> tuple[int, int]:
    """(width, height) with the shorter side ``size``, the longer scaled and truncated
    (torchvision's ``Resize(int)``)."""
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = size, int(size * long / short)
    return (new_short, new_long) if width <= height else (new_long, new_short)


def preprocess_image(image: Image.Image, size: int, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """PIL image → float32 ``(3, size, size)``: the evaluation transform of ``mugcp.data.build_transform``."""
    image = image.convert("RGB")
    new_size = resized_size(image.width, image.height, size)
    if new_size != image.size:
        image = image.resize(new_size, Image.Resampling.BICUBIC)
    top = int(round((image.height - size) / 2.0))
    left = int(round((image.width - size) / 2.0))
    image = image.crop((left, top, left + size, top + size))
    std_array = np.asarray(std, dtype=np.float32)
    scale = 1.0 / (255.0 * std_array)
    shift = np.asarray(mean, dtype=np.float32) / std_array
    pixels = np.asarray(image, dtype=np.float32)
    return np.ascontiguousarray((pixels * scale - shift).transpose(2, 0, 1))


class OnnxClassifier:
    """An exported file in an onnxruntime session: ``classifier.logits(batch)``, ``classifier.predict_files(...)``."""

    def __init__(self, path: str | Path, threads: int = 0):
        path = Path(path)
        if not path.is_file():
            raise ConfigError(
                f"--onnx {path}: no such file; make one with python -m mugcp.export RUN --out {path.name}."
            )
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        try:
            self.session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as err:  # onnxruntime raises its own types for a file that is no ONNX model
            raise ConfigError(
                f"--onnx {path}: onnxruntime cannot load it ({type(err).__name__}: {str(err).strip()[:200]})."
            ) from None
        self.metadata = ExportMetadata.from_props(self.session.get_modelmeta().custom_metadata_map, f"--onnx {path}")
        self.input_name = self.session.get_inputs()[0].name

    @property
    def classnames(self) -> list[str]:
        return list(self.metadata.classnames)

    def preprocess(self, image: Image.Image) -> np.ndarray:
        meta = self.metadata
        return preprocess_image(image, meta.image_size, meta.mean, meta.std)

    def logits(self, images: np.ndarray) -> np.ndarray:
        """Logits ``(N, C)`` float32 for preprocessed images ``(N, 3, S, S)`` float32."""
        return self.session.run(None, {self.input_name: np.asarray(images, dtype=np.float32)})[0].astype(np.float32)

    def classify(self, images: np.ndarray, top_k: int) -> list[Prediction]:
        logits = self.logits(images).astype(np.float64)
        probs = np.exp(logits - logits.max(axis=1, keepdims=True))
        probs /= probs.sum(axis=1, keepdims=True)
        k = min(top_k, probs.shape[1])
        order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
        names = self.classnames
        return [
            Prediction([names[i] for i in row], [round(float(probs[n, i]), 6) for i in row], [int(i) for i in row])
            for n, row in enumerate(order)
        ]

    def predict_files(
        self, files: Sequence[ImageFile], top_k: int, batch_size: int
    ) -> tuple[list[Prediction], list[tuple[str, str]]]:
        """Batched predictions for image files; unreadable ones are returned as (path, reason), not raised."""
        predictions: list[Prediction] = []
        skipped: list[tuple[str, str]] = []
        paths = list(dict.fromkeys(f.path for f in files))
        for first in range(0, len(paths), batch_size):
            arrays, kept = [], []
            for path in paths[first : first + batch_size]:
                try:
                    arrays.append(self.preprocess(open_image(path)))
                    kept.append(path)
                except ConfigError as err:
                    skipped.append((path, bad_image_reason(err)))
            if not kept:
                continue
            for prediction, path in zip(self.classify(np.stack(arrays), top_k), kept):
                prediction.path = path
                predictions.append(prediction)
        return predictions, skipped
