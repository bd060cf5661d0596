"""CPU training-step time, memory and trainable parameters of every registered baseline method.

    python benchmarks/methods_step.py                   # all methods, Markdown table
    python benchmarks/methods_step.py --json out.json   # also keep the numbers
    python benchmarks/methods_step.py --methods coop maple --params-backbone none

Setting (the demo's): ViT-B-32 with random weights, fp32, B=4 images of 224², 5 classes, each method
with the options of its ``configs/methods/NAME.yaml``. A step is ``training_step`` + the method's backward + SGD
step (zsclip has nothing to train: forward only). Time: median of ``--steps`` steps after one
warm-up. Memory, in a fresh process per method so one method's allocations never count for
another: the resident set size right after building the model and its peak during the steps
(sampled every 2 ms), and the peak of tensor allocations within one step (torch profiler, as in
``benchmarks/conftest.py``; allocator caching aside, the step's own working memory). Trainable parameters are
counted on ``--params-backbone`` (ViT-B-16, random
weights: the published setting). The CPU load average is printed because other processes on a
shared machine slow every number down.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

METHODS = ["zsclip", "coop", "cocoop", "ivlp", "maple", "kgcoop", "prograd", "promptsrc", "tcp", "mugcp"]
CLASSNAMES = ["t-shirt", "trouser", "pullover", "dress", "coat"]


def rss_mb() -> float:
    with open("/proc/self/statm", encoding="ascii") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


# Exit status of a process that ``PeakRss(limit_mb=...)`` stopped for growing past its memory limit.
RSS_LIMIT_EXIT = 75


class PeakRss:
    """Samples this process's resident set size in a thread while the ``with`` block runs.

    With ``limit_mb`` the process exits with ``RSS_LIMIT_EXIT`` as soon as a sample exceeds it, so a
    configuration that does not fit stops before it can push a shared machine into swap.
    """

    def __init__(self, interval_s: float = 0.002, limit_mb: float | None = None):
        self.interval_s = interval_s
        self.limit_mb = limit_mb
        self.peak = 0.0
        self._stop = threading.Event()

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_mb())
            if self.limit_mb is not None and self.peak > self.limit_mb:
                print(f"resident memory {self.peak:.0f} MB passed the limit of {self.limit_mb:.0f} MB: stopped",
                      file=sys.stderr, flush=True)
                os._exit(RSS_LIMIT_EXIT)
            time.sleep(self.interval_s)

    def __enter__(self):
        self.peak = rss_mb()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_mb())


def describe_cpu() -> str:
    model = "unknown CPU"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            model = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), model)
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} cores"


def method_options(name: str) -> dict:
    """The options of ``configs/methods/NAME.yaml``; a variant (``coop+dept``) is its method's with the switch on."""
    from mugcp.config import load_config, split_variant
    from mugcp.methods import get_method

    name, switches = split_variant(name)
    config = get_method(name).config
    if not config:
        return switches
    options = {k: v for k, v in load_config(config.removeprefix("configs/"))["method"].items() if k != "name"}
    options.update(switches)
    if name == "mugcp":
        options["semantic_source"] = "clip"  # the demo's setting without an MLLM cache: frozen CLIP tokens as SCP input
    return options


def measure_one(name: str, backbone: str, batch: int, steps: int) -> dict:
    """Runs in its own process (see ``main``)."""
    import torch

    from benchmarks.conftest import peak_memory_bytes
    from mugcp.backbones import load_clip
    from mugcp.methods import create_model

    torch.manual_seed(0)
    clip = load_clip(backbone, pretrained=None)
    model = create_model(name, CLASSNAMES, backbone=clip, **method_options(name))
    model.train()
    rss_built = rss_mb()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(trainable, lr=1e-3, momentum=0.9) if trainable else None
    generator = torch.Generator().manual_seed(1)
    batch_data = {
        "images": torch.randn(batch, 3, clip.image_size, clip.image_size, generator=generator),
        "labels": torch.randint(0, len(CLASSNAMES), (batch,), generator=generator),
    }

    def step() -> None:
        if optimizer is None:
            with torch.no_grad():
                model.training_step(batch_data)
            return
        loss, _, _ = model.training_step(batch_data)
        optimizer.zero_grad(set_to_none=True)
        model.backward(loss, lambda value: value, lambda params: None)  # as the trainer (ProGrad: two passes)
        optimizer.step()

    step()  # warm-up: first-call allocations, lazily computed class features
    before = rss_mb()
    times = []
    with PeakRss() as peak:
        for _ in range(steps):
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
    allocated_peak = peak_memory_bytes(step, torch.device("cpu")) / 2**20
    return {
        "method": name,
        "backbone": backbone,
        "batch": batch,
        "classes": len(CLASSNAMES),
        "step": "forward" if optimizer is None else "forward+backward+sgd",
        "median_step_s": statistics.median(times),
        "step_times_s": times,
        "rss_after_build_mb": rss_built,
        "rss_before_steps_mb": before,
        "step_allocated_peak_mb": allocated_peak,
        "peak_rss_mb": peak.peak,
        "trainable_parameters": model.num_trainable_parameters(),
        "torch_threads": torch.get_num_threads(),
    }


def count_parameters(methods: list[str], backbone: str) -> dict[str, int]:
    from mugcp.backbones import load_clip
    from mugcp.methods import create_model

    clip = load_clip(backbone, pretrained=None)
    return {name: create_model(name, CLASSNAMES, backbone=clip, **method_options(name)).num_trainable_parameters()
            for name in methods}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=METHODS)
    parser.add_argument("--backbone", default="ViT-B-32")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--params-backbone", default="ViT-B-16",
                        help="backbone for the parameter counts ('none' to skip)")
    parser.add_argument("--json", help="write all numbers to this file")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: measure one method in this process
    args = parser.parse_args(argv)

    if args.one:
        print(json.dumps(measure_one(args.one, args.backbone, args.batch, args.steps)))
        return 0

    load_start = os.getloadavg()
    results = []
    for name in args.methods:
        command = [sys.executable, __file__, "--one", name, "--backbone", args.backbone, "--batch", str(args.batch),
                   "--steps", str(args.steps)]
        done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
        if done.returncode:
            print(done.stderr, file=sys.stderr)
            raise SystemExit(f"measuring {name} failed (exit {done.returncode})")
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(f"{name}: {results[-1]['median_step_s']:.2f} s/step", file=sys.stderr)
    counts = count_parameters(args.methods, args.params_backbone) if args.params_backbone.lower() != "none" else {}
    load_end = os.getloadavg()

    print(f"\n{args.backbone} (random weights), fp32, B={args.batch}, {len(CLASSNAMES)} classes, "
          f"median of {args.steps} steps; "
          f"{describe_cpu()}; load average {load_start[0]:.1f} -> {load_end[0]:.1f}\n")
    params_header = f" trainable params ({args.params_backbone}) |" if counts else ""
    print("| method | step | median s/step | RSS after build (MB) | peak RSS in steps (MB) | "
          f"step allocation peak (MB) |{params_header}")
    print("|---|---|---|---|---|---|" + ("---|" if counts else ""))
    for r in results:
        params = f" {counts[r['method']]:,} |" if counts else ""
        print(f"| {r['method']} | {r['step']} | {r['median_step_s']:.2f} | {r['rss_after_build_mb']:.0f} "
              f"| {r['peak_rss_mb']:.0f} "
              f"| {r['step_allocated_peak_mb']:.0f} |{params}")
    if args.json:
        from mugcp.utils import atomic_write_json

        atomic_write_json(args.json, {"results": results, "trainable_parameters": counts,
                                      "params_backbone": args.params_backbone,
                                      "load_average": [load_start, load_end], "cpu": describe_cpu()})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
