"""Datasets, protocols and loaders (DESIGN §5).

``build_dataset(cfg["data"])`` reads a whole dataset; ``build_protocol(cfg["data"], seed)`` picks
what one run trains and evaluates on; ``ImageDataset`` + ``build_loader`` turn items into batches.
"""
import importlib

# Names are imported on first use: the loader and transforms import torch, and `python -m mugcp.data
# check --help` (which imports this package first) must answer without it.
_EXPORTS = {
    "COOP_DATASETS": "mugcp.data.coop",
    "BadImageError": "mugcp.data.dataset",
    "DatasetError": "mugcp.data.dataset",
    "DatasetSplits": "mugcp.data.dataset",
    "Datum": "mugcp.data.dataset",
    "carve_val": "mugcp.data.dataset",
    "open_image_file": "mugcp.data.dataset",
    "FASHION_MNIST_CLASSNAMES": "mugcp.data.fashion_mnist",
    "EpochBatchSampler": "mugcp.data.loader",
    "ImageDataset": "mugcp.data.loader",
    "SkippedImage": "mugcp.data.loader",
    "build_loader": "mugcp.data.loader",
    "collate": "mugcp.data.loader",
    "set_loader_epoch": "mugcp.data.loader",
    "ProtocolSplits": "mugcp.data.protocol",
    "build_protocol": "mugcp.data.protocol",
    "cap_per_class": "mugcp.data.protocol",
    "class_subset": "mugcp.data.protocol",
    "few_shot": "mugcp.data.protocol",
    "load_splits": "mugcp.data.protocol",
    "save_splits": "mugcp.data.protocol",
    "subsample_classes": "mugcp.data.protocol",
    "DATASET_NAMES": "mugcp.data.registry",
    "build_dataset": "mugcp.data.registry",
    "canonical_dataset_name": "mugcp.data.registry",
    "OPENAI_MEAN": "mugcp.data.transforms",
    "OPENAI_STD": "mugcp.data.transforms",
    "build_transform": "mugcp.data.transforms",
}
_RENAMED = {"FASHION_MNIST_CLASSNAMES": "CLASSNAMES"}


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'mugcp.data' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), _RENAMED.get(name, name))


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


__all__ = [
    "BadImageError",
    "COOP_DATASETS",
    "DATASET_NAMES",
    "DatasetError",
    "DatasetSplits",
    "Datum",
    "EpochBatchSampler",
    "FASHION_MNIST_CLASSNAMES",
    "ImageDataset",
    "OPENAI_MEAN",
    "OPENAI_STD",
    "ProtocolSplits",
    "SkippedImage",
    "build_dataset",
    "build_loader",
    "build_protocol",
    "build_transform",
    "canonical_dataset_name",
    "cap_per_class",
    "carve_val",
    "class_subset",
    "collate",
    "few_shot",
    "load_splits",
    "save_splits",
    "set_loader_epoch",
    "subsample_classes",
]
