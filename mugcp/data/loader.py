"""Images to batches: ``ImageDataset``, ``collate`` and a loader whose order is a function of (seed, epoch).

Resuming exactly: the shuffled order *and* the augmentation of epoch ``e`` depend only on
``(seed, e)``. Each training sample arrives with its own augmentation seed, and the transform runs
under that seed, so neither the number of workers nor the global torch RNG changes the batches.
To resume in the middle of epoch ``e`` after ``k`` batches::

    set_loader_epoch(loader, e, start_batch=k)   # then iterate: batches k.. of epoch e

After a complete pass the sampler moves to the next epoch by itself; calling ``set_loader_epoch``
at the start of every epoch is the explicit way and gives the same order.
"""
from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from mugcp.data.dataset import BadImageError, DatasetError, DatasetSplits, Datum

log = logging.getLogger(__name__)
BAD_IMAGE_POLICIES = ("error", "skip")
EXTRACT_HINT = "python -m mugcp.extract --config CONFIG --out CACHE"


@dataclass(frozen=True)
class SkippedImage:
    """Stands in for an unreadable image under ``on_bad_image="skip"``; ``collate`` drops it."""

    key: str
    reason: str


class ImageDataset(Dataset):
    """``items`` (already relabelled) as tensors: {"image", "label", "key", "index"[, "semantic"]}.

    ``semantic`` is any mapping with ``key in semantic`` and ``semantic[key] -> Tensor (T, d)``
    (e.g. ``mugcp.semantics.SemanticCache``); every key is checked here, before training starts.
    """

    def __init__(
        self,
        items: Sequence[Datum],
        dataset: DatasetSplits,
        transform,
        on_bad_image: str = "error",
        semantic: Any = None,
    ):
        if on_bad_image not in BAD_IMAGE_POLICIES:
            raise DatasetError(f"data.on_bad_image must be error or skip, got '{on_bad_image}'.")
        if dataset is None:
            raise DatasetError("ImageDataset needs the DatasetSplits that can open the images (got None).")
        self.items = list(items)
        self.dataset = dataset
        self.transform = transform
        self.on_bad_image = on_bad_image
        self.semantic = semantic
        if semantic is not None:
            self._check_semantic_keys()

    def _check_semantic_keys(self) -> None:
        keys = list(dict.fromkeys(item.key for item in self.items))
        missing = [key for key in keys if key not in self.semantic]
        if missing:
            shown = ", ".join(missing[:10]) + (" ..." if len(missing) > 10 else "")
            where = getattr(self.semantic, "path", None) or type(self.semantic).__name__
            raise DatasetError(
                f"{len(missing)} of {len(keys)} images of dataset '{self.dataset.name}' have no semantic "
                f"features in {where}: {shown}. Extract them with `{EXTRACT_HINT}` for this dataset and split."
            )

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, request: int | tuple[int, int]) -> dict | SkippedImage:
        index, augment_seed = request if isinstance(request, tuple) else (request, None)
        item = self.items[index]
        try:
            image = self.dataset.open_image(item.key)
        except BadImageError as err:
            if self.on_bad_image == "error":
                raise
            log.warning("skipping unreadable image %s: %s", self.dataset.describe(item.key), err)
            return SkippedImage(item.key, str(err))
        if augment_seed is None:
            tensor = self.transform(image)
        else:
            # torchvision draws from the global CPU generator: seed it for this sample only, and
            # leave the CUDA generators (which torch.manual_seed would also reset) alone.
            with torch.random.fork_rng(devices=[]):
                torch.default_generator.manual_seed(augment_seed)
                tensor = self.transform(image)
        sample = {"image": tensor, "label": item.label, "key": item.key, "index": index}
        if self.semantic is not None:
            features = torch.as_tensor(self.semantic[item.key])
            if features.ndim != 2:
                raise DatasetError(
                    f"semantic features of '{item.key}' have shape {tuple(features.shape)}; expected (T, d)."
                )
            sample["semantic"] = features
        return sample


def _pad_semantic(features: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    widths = {f.shape[1] for f in features}
    if len(widths) != 1:
        raise DatasetError(f"semantic features in one batch have different widths {sorted(widths)}.")
    longest = max(f.shape[0] for f in features)
    padded = torch.zeros(len(features), longest, widths.pop(), dtype=torch.float32)
    mask = torch.zeros(len(features), longest, dtype=torch.bool)
    for row, f in enumerate(features):
        padded[row, : f.shape[0]] = f.to(torch.float32)
        mask[row, : f.shape[0]] = True
    return padded, mask


def _stack_images(images: list[torch.Tensor]) -> torch.Tensor:
    if not images:
        return torch.empty(0, 3, 0, 0)
    # A single-threaded copy: torch.stack's worker threads stall when the CPU cores are busy.
    return torch.from_numpy(np.stack([image.numpy() for image in images]))


def collate(batch: Sequence[dict | SkippedImage]) -> dict:
    """Stack a batch; skipped images are dropped and counted in ``n_skipped`` (keys in ``skipped_keys``).

    A batch whose images were all skipped has ``images`` of shape (0, 3, 0, 0) and empty labels.
    ``semantic`` (B, T, d) float32 is zero-padded to the longest T; ``semantic_mask`` marks real tokens.
    """
    kept = [sample for sample in batch if not isinstance(sample, SkippedImage)]
    skipped = [sample.key for sample in batch if isinstance(sample, SkippedImage)]
    out = {
        "images": _stack_images([s["image"] for s in kept]),
        "labels": torch.tensor([s["label"] for s in kept], dtype=torch.long),
        "keys": [s["key"] for s in kept],
        "indices": torch.tensor([s["index"] for s in kept], dtype=torch.long),
        "n_skipped": len(skipped),
        "skipped_keys": skipped,
    }
    if kept and "semantic" in kept[0]:
        out["semantic"], out["semantic_mask"] = _pad_semantic([s["semantic"] for s in kept])
    return out


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """A generator for epoch ``epoch`` that depends on nothing but (seed, epoch)."""
    state = np.random.SeedSequence([int(seed) % 2**32, int(seed) // 2**32, int(epoch)]).generate_state(2)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


class EpochBatchSampler(Sampler[list]):
    """Batches of dataset requests; with ``shuffle``, each request is (index, augmentation seed)."""

    def __init__(self, n_items: int, batch_size: int, shuffle: bool, seed: int, drop_last: bool):
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}.")
        self.n_items = n_items
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = int(seed)
        self.drop_last = drop_last
        self.epoch = 0
        self.start_batch = 0

    @property
    def batches_per_epoch(self) -> int:
        if self.drop_last:
            return self.n_items // self.batch_size
        return -(-self.n_items // self.batch_size)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        if not 0 <= start_batch <= self.batches_per_epoch:
            raise ValueError(f"start_batch {start_batch} is outside 0..{self.batches_per_epoch}.")
        self.epoch = int(epoch)
        self.start_batch = int(start_batch)

    def epoch_requests(self, epoch: int) -> list:
        if not self.shuffle:
            return list(range(self.n_items))
        generator = epoch_generator(self.seed, epoch)
        order = torch.randperm(self.n_items, generator=generator).tolist()
        augment_seeds = torch.randint(0, 2**62, (self.n_items,), generator=generator).tolist()
        return list(zip(order, augment_seeds))

    def __iter__(self) -> Iterator[list]:
        epoch, start = self.epoch, self.start_batch
        requests = self.epoch_requests(epoch)
        for batch in range(start, self.batches_per_epoch):
            yield requests[batch * self.batch_size: (batch + 1) * self.batch_size]
        self.epoch, self.start_batch = epoch + 1, 0

    def __len__(self) -> int:
        """Batches left in the current epoch (all of them unless resumed with ``start_batch``)."""
        return self.batches_per_epoch - self.start_batch


def build_loader(
    dataset: ImageDataset,
    batch_size: int,
    train: bool,
    seed: int,
    num_workers: int = 0,
    pin_memory: bool = False,
) -> DataLoader:
    """Training: shuffled by (seed, epoch), per-sample augmentation seeds, last partial batch
    dropped when there is at least one full batch (as Dassl does). Evaluation: dataset order."""
    sampler = EpochBatchSampler(
        len(dataset),
        batch_size,
        shuffle=train,
        seed=seed,
        drop_last=train and len(dataset) >= batch_size,
    )
    # The loader draws a worker base seed on every iteration; a private generator keeps that
    # draw from advancing the global torch RNG the model relies on.
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=collate,
        num_workers=num_workers,
        pin_memory=pin_memory,
        generator=torch.Generator().manual_seed(int(seed)),
    )


def set_loader_epoch(loader: DataLoader, epoch: int, start_batch: int = 0) -> None:
    """Position ``loader`` at batch ``start_batch`` of epoch ``epoch`` (see the module docstring)."""
    loader.batch_sampler.set_epoch(epoch, start_batch)
