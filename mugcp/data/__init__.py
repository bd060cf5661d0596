"""Datasets, protocols and loaders (DESIGN §5).

``build_dataset(cfg["data"])`` reads a whole dataset; ``build_protocol(cfg["data"], seed)`` picks
what one run trains and evaluates on; ``ImageDataset`` + ``build_loader`` turn items into batches.
"""
from mugcp.data.coop import COOP_DATASETS
from mugcp.data.dataset import BadImageError, DatasetError, DatasetSplits, Datum, carve_val, open_image_file
from mugcp.data.fashion_mnist import CLASSNAMES as FASHION_MNIST_CLASSNAMES
from mugcp.data.loader import (
    EpochBatchSampler,
    ImageDataset,
    SkippedImage,
    build_loader,
    collate,
    set_loader_epoch,
)
from mugcp.data.protocol import (
    ProtocolSplits,
    build_protocol,
    cap_per_class,
    class_subset,
    few_shot,
    load_splits,
    save_splits,
    subsample_classes,
)
from mugcp.data.registry import DATASET_NAMES, build_dataset, canonical_dataset_name
from mugcp.data.transforms import OPENAI_MEAN, OPENAI_STD, build_transform

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
    "open_image_file",
    "save_splits",
    "set_loader_epoch",
    "subsample_classes",
]
