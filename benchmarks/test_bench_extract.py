"""Extraction throughput (images/s) against batch size, and the cache reader's lookup cost.

Runs on the CPU with the tiny random LLaVA from ``tests/tiny_mllm.py`` (2-layer CLIP tower, 2-layer
Llama, d_m = 32): the numbers measure the pipeline's own overhead (processor, generate loop,
hidden-state slicing, shard writes), not a real MLLM's cost. Run with

    python -m pytest benchmarks/test_bench_extract.py --benchmark-columns=mean,stddev,rounds
"""
from __future__ import annotations

import os
import platform
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mugcp.semantics import SemanticCache, write_cache
from mugcp.semantics.cache_manifest import new_manifest, write_manifest
from mugcp.semantics.cache_writer import CacheWriter
from mugcp.semantics.extraction import Extractor
from mugcp.semantics.extraction_setup import ExtractionSettings
from mugcp.semantics.mllm import MLLM
from mugcp.semantics.sources import image_dir_source
from tests.tiny_mllm import build_tiny_mllm, one_thread  # noqa: F401  (autouse fixture)

IMAGES = 32
MAX_NEW_TOKENS = 8


def machine() -> dict:
    return {
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    model_dir = build_tiny_mllm(tmp_path_factory.mktemp("tiny_mllm"))
    images = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i in range(IMAGES):
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(images / f"{i:03d}.png")
    mllm = MLLM(str(model_dir), max_new_tokens=MAX_NEW_TOKENS, dtype=torch.float32, device="cpu")
    return model_dir, image_dir_source(images), mllm


@pytest.mark.parametrize("batch_size", [1, 4, 16, 32])
def test_extraction_throughput(benchmark, tiny, batch_size):
    model_dir, source, mllm = tiny
    settings = ExtractionSettings(mllm=str(model_dir), out=Path("unused"), max_new_tokens=MAX_NEW_TOKENS,
                                  batch_size=batch_size, progress=False)
    scratch = []

    def fresh_cache():
        out = Path(tempfile.mkdtemp(prefix="bench_extract_"))
        scratch.append(out)
        write_manifest(out, new_manifest({"mllm": str(model_dir)}))
        return (Extractor(source, settings, mllm, CacheWriter(out)),), {}

    def run(extractor):
        with extractor.writer:
            extractor.run(source.keys, show_progress=False)
        assert extractor.writer.written == IMAGES

    benchmark.pedantic(run, setup=fresh_cache, rounds=3, iterations=1, warmup_rounds=1)
    for out in scratch:
        shutil.rmtree(out, ignore_errors=True)
    benchmark.extra_info.update(
        machine(),
        images=IMAGES,
        batch_size=batch_size,
        max_new_tokens=MAX_NEW_TOKENS,
        images_per_s=round(IMAGES / benchmark.stats.stats.mean, 2),
        model="tiny random LLaVA (CLIP 2x16, Llama 2x32), fp32",
    )


def test_reader_lookup(benchmark, tmp_path):
    """One ``cache[key]`` (index lookup + memory-mapped slice) in a 4096-entry cache of 7B-sized rows."""
    generator = torch.Generator().manual_seed(0)
    rows = torch.randn(24, 4096, generator=generator)
    write_cache(tmp_path, {f"class_{i % 100}/img_{i}.jpg": (f"text {i}", rows) for i in range(4096)},
                {"mllm": "bench"})
    cache = SemanticCache(tmp_path)
    keys = sorted(cache.keys())
    order = np.random.default_rng(0).permutation(len(keys))
    position = iter(np.tile(order, 1000))

    def lookup():
        return cache[keys[next(position)]]

    result = benchmark(lookup)
    assert result.shape == (24, 4096) and result.dtype == torch.float16
    benchmark.extra_info.update(machine(), entries=len(keys), row_shape=[24, 4096],
                                lookups_per_s=round(1 / benchmark.stats.stats.mean))
