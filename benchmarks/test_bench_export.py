"""Deployment cost (issue 23): onnxruntime on an exported prompt vs PyTorch eager, on the CPU.

    pytest benchmarks/test_bench_export.py --benchmark-only
    MUGCP_BENCH_EXPORT_BATCHES=1,32 pytest benchmarks/test_bench_export.py --benchmark-only   # the full measurement

ViT-B/16 with random weights (``pretrained: none``; the arithmetic is the same as with real weights),
CoOp (the image encoder and one matmul) and MaPLe (the prompted image encoder and one matmul), 100
classes. Each test exports the model once, then times onnxruntime (the benchmark) and PyTorch eager
on the same batch in the same process, alternating within each round (the benchmark's own time is
the round), and records both images/s at the median time, their ratio, and the peak memory of one
more call of each. Both use the
same number of threads (torch's). The default batches (1 and 8) keep the suite to a few minutes on
a small CI machine; batch 32 is the environment variable above.

Peak memory here is the rise of the process's resident-set high-water mark (``VmHWM``, reset through
``/proc/self/clear_refs``) during one call: onnxruntime allocates outside torch, so torch's own
allocator counters would not see it; the same probe serves both.
"""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path

import pytest
import torch

from mugcp.methods import create_model

BACKBONE = "ViT-B-16"
CLASSNAMES = [f"class number {i}" for i in range(100)]
BATCHES = [int(b) for b in os.environ.get("MUGCP_BENCH_EXPORT_BATCHES", "1,8").split(",")]
ROUNDS = int(os.environ.get("MUGCP_BENCH_EXPORT_ROUNDS", "3"))
METHOD_OPTIONS = {"coop": {}, "maple": {}}


def _status_kb(field: str) -> int:
    with open("/proc/self/status", encoding="utf-8") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def peak_rss_rise_mb(fn) -> float:
    """How far the resident set rose above its level before ``fn()`` at its peak during the call, in MiB."""
    with open("/proc/self/clear_refs", "w", encoding="utf-8") as refs:
        refs.write("5")  # resets VmHWM to the current VmRSS
    before = _status_kb("VmRSS")
    fn()
    return round((_status_kb("VmHWM") - before) / 1024, 1)


@pytest.fixture(scope="module")
def clip():
    from mugcp.backbones import load_clip

    return load_clip(BACKBONE, pretrained=None)


@pytest.fixture(scope="module")
def exported(clip, tmp_path_factory):
    """method -> (PyTorch learner, onnxruntime classifier), exported once per method."""
    from mugcp.data.transforms import OPENAI_MEAN, OPENAI_STD
    from mugcp.inference.export import deployed_module, onnx_model, write_onnx
    from mugcp.inference.onnx_runner import ExportMetadata, OnnxClassifier

    made = {}

    def get(method: str):
        if method not in made:
            learner = create_model(method, CLASSNAMES, backbone=clip, **METHOD_OPTIONS[method]).eval()
            path = Path(tmp_path_factory.mktemp("export")) / f"{method}.onnx"
            metadata = ExportMetadata(
                list(learner.classnames),
                method,
                BACKBONE,
                "none",
                clip.image_size,
                OPENAI_MEAN,
                OPENAI_STD,
                "bicubic",
                "fp32",
                "benchmark",
            )
            write_onnx(onnx_model(deployed_module(learner), clip.image_size), metadata, path)
            made[method] = learner, OnnxClassifier(path, threads=torch.get_num_threads())
        return made[method]

    return get


@pytest.mark.parametrize("batch", BATCHES, ids=[f"batch{b}" for b in BATCHES])
@pytest.mark.parametrize("method", list(METHOD_OPTIONS))
def test_onnxruntime_vs_pytorch_eager(benchmark, exported, clip, method, batch):
    from conftest import machine_info

    learner, classifier = exported(method)
    images = torch.randn(batch, 3, clip.image_size, clip.image_size, generator=torch.Generator().manual_seed(0))
    array = images.numpy()

    def eager():
        with torch.no_grad():
            return learner(images)

    eager()  # the text features are computed once and cached for every later call
    onnx_times, eager_times = [], []

    def timed():
        """One round: onnxruntime, then eager on the same batch (alternating keeps a busy machine's drift
        out of the ratio)."""
        started = time.perf_counter()
        classifier.logits(array)
        middle = time.perf_counter()
        eager()
        onnx_times.append(middle - started)
        eager_times.append(time.perf_counter() - middle)

    benchmark.pedantic(timed, rounds=ROUNDS, iterations=1, warmup_rounds=1)
    onnx_median = statistics.median(onnx_times[1:])  # the first round was the warm-up
    eager_median = statistics.median(eager_times[1:])
    difference = float(abs(classifier.logits(array) - eager().numpy()).max())
    benchmark.extra_info.update(machine_info(torch.device("cpu")))
    benchmark.extra_info.update(
        {
            "method": method,
            "backbone": BACKBONE,
            "batch": batch,
            "classes": len(CLASSNAMES),
            "rounds": ROUNDS,
            "onnxruntime_threads": torch.get_num_threads(),
            "onnxruntime_images_per_s": round(batch / onnx_median, 2),
            "eager_images_per_s": round(batch / eager_median, 2),
            "speedup": round(eager_median / onnx_median, 3),
            "largest_logit_difference": difference,
            "onnxruntime_peak_rss_mb": peak_rss_rise_mb(lambda: classifier.logits(array)),
            "eager_peak_rss_mb": peak_rss_rise_mb(eager),
        }
    )
    print(
        f"\n{method} batch {batch}: onnxruntime {batch / onnx_median:.2f} img/s, "
        f"eager {batch / eager_median:.2f} img/s, "
        f"ratio {eager_median / onnx_median:.2f}, peak RSS rise {benchmark.extra_info['onnxruntime_peak_rss_mb']} / "
        f"{benchmark.extra_info['eager_peak_rss_mb']} MiB, largest logit difference {difference:.2g}"
    )
    assert difference < 1e-3
