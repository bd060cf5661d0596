"""Deployment cost (issue 23): onnxruntime on an exported prompt vs PyTorch eager, on the CPU.

    pytest benchmarks/test_bench_export.py --benchmark-only
    MUGCP_BENCH_EXPORT_BATCHES=1,32 pytest benchmarks/test_bench_export.py --benchmark-only   # the full measurement

ViT-B/16 with random weights (``pretrained: none``; the arithmetic is the same as with real weights),
CoOp (the image encoder and one matmul) and MaPLe (the prompted image encoder and one matmul), 100
classes. Each test exports the model once, then times onnxruntime (the benchmark) and PyTorch eager
on the same batch in the same process, alternating within each round (the benchmark's own time is
the round), and records both images/s at the median time, their ratio, and the peak memory of one
more call of each. Both use the
same number of threads (torch's). The default batch (1) keeps the suite to a few minutes on
a small CI machine; batch 32 is the environment variable above.

Peak memory is the peak resident set (``VmHWM``) of a fresh process per runtime that loads the
model and classifies one batch (``process_peak_mb``): the eager process holds torch and the whole
CLIP, the onnxruntime one only onnxruntime and the graph (image encoder and class weights).
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mugcp.methods import create_model

BACKBONE = "ViT-B-16"
CLASSNAMES = [f"class number {i}" for i in range(100)]
BATCHES = [int(b) for b in os.environ.get("MUGCP_BENCH_EXPORT_BATCHES", "1").split(",")]
ROUNDS = int(os.environ.get("MUGCP_BENCH_EXPORT_ROUNDS", "3"))
METHOD_OPTIONS = {"coop": {}, "maple": {}}


PROBE = """
import sys, numpy as np
runtime, method, batch, path = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
if runtime == "onnxruntime":
    from mugcp.inference.onnx_runner import OnnxClassifier
    classifier = OnnxClassifier(path)
    size = classifier.metadata.image_size
    run = lambda images: classifier.logits(images)
else:
    import torch
    from mugcp.methods import create_model
    classnames = [f"class number {i}" for i in range(int(path))]
    learner = create_model(method, classnames, backbone="ViT-B-16", pretrained=None).eval()
    size = learner.clip.image_size
    def run(images):
        with torch.no_grad():
            return learner(torch.from_numpy(images))
images = np.random.default_rng(0).standard_normal((batch, 3, size, size), dtype=np.float32)
run(images)
print("peak_kb", [line.split()[1] for line in open("/proc/self/status") if line.startswith("VmHWM:")][0])
"""


def process_peak_mb(runtime: str, method: str, batch: int, path: Path) -> float:
    """Peak resident set (``VmHWM``) of a fresh process that loads the model and classifies one batch, in MiB:
    what deploying it takes (runtime, weights, activations). onnxruntime allocates outside torch, so
    torch's allocator counters would not see it; a process of its own measures both alike."""
    argument = str(path) if runtime == "onnxruntime" else str(len(CLASSNAMES))
    done = subprocess.run([sys.executable, "-c", PROBE, runtime, method, str(batch), argument], capture_output=True,
                          text=True, timeout=1800, cwd=Path(__file__).resolve().parent.parent)
    assert done.returncode == 0, done.stderr[-2000:]
    return round(int(done.stdout.split("peak_kb")[-1].split()[0]) / 1024, 1)


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
            made[method] = learner, OnnxClassifier(path, threads=torch.get_num_threads()), path
        return made[method]

    return get


@pytest.mark.parametrize("batch", BATCHES, ids=[f"batch{b}" for b in BATCHES])
@pytest.mark.parametrize("method", list(METHOD_OPTIONS))
def test_onnxruntime_vs_pytorch_eager(benchmark, exported, clip, method, batch):
    from conftest import machine_info

    learner, classifier, path = exported(method)
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
            "onnxruntime_process_peak_mb": process_peak_mb("onnxruntime", method, batch, path),
            "eager_process_peak_mb": process_peak_mb("eager", method, batch, path),
        }
    )
    print(
        f"\n{method} batch {batch}: onnxruntime {batch / onnx_median:.2f} img/s, "
        f"eager {batch / eager_median:.2f} img/s, "
        f"ratio {eager_median / onnx_median:.2f}, "
        f"process peak {benchmark.extra_info['onnxruntime_process_peak_mb']} / "
        f"{benchmark.extra_info['eager_process_peak_mb']} MiB, largest logit difference {difference:.2g}"
    )
    assert difference < 1e-3
