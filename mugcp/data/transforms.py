"""CLIP preprocessing and CoOp's training augmentation.

Evaluation: bicubic resize of the short side to ``image_size``, center crop, OpenAI mean/std.
Training with augmentation (Dassl's ``random_resized_crop`` + ``random_flip``): a random crop of
8%-100% of the area resized bicubically to ``image_size``, then a horizontal flip with p = 0.5.
The random draws use torch's global generator, which ``ImageDataset`` seeds per sample.
"""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from torchvision import transforms as T

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
RANDOM_CROP_SCALE = (0.08, 1.0)


class ToNormalizedTensor:
    """``ToTensor`` + ``Normalize`` in one single-threaded numpy pass (equal to within 1e-6).

    One image is too small to gain from torch's intra-op threads, and on a busy machine waiting
    for those threads costs far more than the arithmetic.
    """

    def __init__(self, mean=OPENAI_MEAN, std=OPENAI_STD):
        std = np.asarray(std, dtype=np.float32)
        self.mean, self.std = tuple(mean), tuple(float(s) for s in std)
        self._scale = 1.0 / (255.0 * std)
        self._shift = np.asarray(mean, dtype=np.float32) / std

    def __call__(self, image: Image.Image) -> torch.Tensor:
        pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
        normalised = pixels * self._scale - self._shift
        return torch.from_numpy(np.ascontiguousarray(normalised.transpose(2, 0, 1)))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(mean={self.mean}, std={self.std})"


def build_transform(image_size: int, train: bool, augment: bool = True) -> T.Compose:
    image_size = int(image_size)
    if image_size <= 0:
        raise ValueError(f"image_size must be positive, got {image_size}.")
    bicubic = T.InterpolationMode.BICUBIC
    if train and augment:
        geometry = [
            T.RandomResizedCrop(image_size, scale=RANDOM_CROP_SCALE, interpolation=bicubic),
            T.RandomHorizontalFlip(),
        ]
    else:
        geometry = [T.Resize(image_size, interpolation=bicubic), T.CenterCrop(image_size)]
    return T.Compose([*geometry, ToNormalizedTensor(OPENAI_MEAN, OPENAI_STD)])
