"""Shared helpers for the benchmark suites: where to run, how to time, and how to measure peak memory.

Run a suite with ``pytest benchmarks/<file> --benchmark-only``. Every benchmark stores its machine,
sizes, throughput and peak memory in ``benchmark.extra_info`` (kept by ``--benchmark-json``).
"""
from __future__ import annotations

import os
import platform
from collections.abc import Callable
from typing import Any

import pytest
import torch


def bench_device() -> torch.device:
    """The GPU when there is one, else the CPU."""
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_bytes(fn: Callable[[], Any], device: torch.device) -> int:
    """Peak bytes allocated while ``fn()`` runs, above what was allocated before it started.

    CUDA: the caching allocator's peak counter. CPU: torch's profiler records every allocation and
    free with a timestamp; the running sum's maximum is the peak (allocator caching aside, exact).
    """
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
        fn()
    events = sorted(
        (event for event in profiler.profiler.kineto_results.events() if event.name() == "[memory]"),
        key=lambda event: event.start_ns(),
    )
    live = peak = 0
    for event in events:
        live += event.nbytes()
        peak = max(peak, live)
    return peak


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: torch.device) -> dict[str, Any]:
    info = {
        "device": str(device),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


@pytest.fixture(scope="session")
def device() -> torch.device:
    return bench_device()


@pytest.fixture
def run_benchmark(benchmark, device):
    """Time ``fn`` (synchronised on CUDA) for ``rounds`` rounds after one warm-up, record throughput
    (``work``: units of work per call, e.g. ``{"sequences": B*C}`` gives ``sequences_per_s`` at the
    median time), then measure peak memory in one more, untimed call."""

    def run(fn: Callable[[], Any], rounds: int, work: dict[str, float] | None = None, **extra_info: Any):
        def timed():
            result = fn()
            synchronize(device)
            return result

        result = benchmark.pedantic(timed, rounds=rounds, iterations=1, warmup_rounds=1)
        benchmark.extra_info.update(machine_info(device))
        benchmark.extra_info.update(extra_info)
        median = benchmark.stats.stats.median
        for unit, amount in (work or {}).items():
            benchmark.extra_info[f"{unit}_per_s"] = amount / median
        benchmark.extra_info["peak_memory_mb"] = round(peak_memory_bytes(fn, device) / 2**20, 2)
        return result

    return run
