"""Training step time and peak memory as the number of classes grows: the text path before and after issue 9.

    python benchmarks/text_scaling.py                                  # table + plot, all methods, C = 50 200 1000
    python benchmarks/text_scaling.py --methods mugcp --classes 50     # a part of it
    python benchmarks/text_scaling.py --profile 50                     # torch.profiler by op, FLOPs, matmul peak
    python benchmarks/text_scaling.py --calibrate                      # the cost/memory constants of text_buckets.py

Setting: ViT-B-16 with random weights, fp32, B = 4 images of 224², the first C of open_clip's 1000
ImageNet class names, each method with the options of its ``configs/methods/NAME.yaml`` (MuGCP's SCP
source ``clip``, as in ``methods_step.py``). A step is ``training_step`` + backward + SGD step. Paths:
``plain`` (``model.text_bucketing: false``: one pass cut at the batch's last EOT, every graph kept —
the path before issue 9) and ``bucketed`` (length buckets, EOT-only last block, chunks over the
``train.text_memory_mb`` budget recomputed in backward; budget ``auto`` unless ``--memory-mb``).
Every (method, C, path) runs in a fresh process: median s/step of ``--steps`` steps after one
warm-up, and the process's peak resident set size (``ru_maxrss``: building included). A process
whose resident memory passes ``--max-rss-gb`` is stopped and reported as not fitting, and one whose
peak RSS, extrapolated linearly in C from the two smaller C of the same method and path, would pass
it is not started; their rows hold that extrapolation, marked so.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.methods_step import RSS_LIMIT_EXIT, PeakRss, describe_cpu, method_options  # noqa: E402

# Every method this script can measure; the default run is the text path's four (issue 9). The baselines of
# issue 24 (ProGrad, TCP, MMA, the DePT variants) run with --methods ... --paths bucketed --ratio-to coop.
METHODS = ["coop", "cocoop", "maple", "mugcp", "kgcoop", "prograd", "tcp", "mma",
           "coop+dept", "cocoop+dept", "kgcoop+dept", "maple+dept"]
DEFAULT_METHODS = ["coop", "cocoop", "maple", "mugcp"]
CLASSES = [50, 200, 1000]
PATHS = ["plain", "bucketed"]
BACKBONE = "ViT-B-16"
BATCH = 4


def imagenet_classnames(count: int) -> list[str]:
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

    return list(IMAGENET_CLASSNAMES[:count])


def build_step(method: str, classes: int, path: str, memory_mb: float | None, batch: int = BATCH):
    """(model, step function) for one configuration; the step trains once with SGD."""
    import torch

    from mugcp.backbones import load_clip
    from mugcp.config import split_variant
    from mugcp.methods import create_model
    from mugcp.runs.run_setup import configure_text_path

    torch.manual_seed(0)
    clip = load_clip(BACKBONE, pretrained=None)
    configure_text_path(clip, path == "bucketed", "auto" if memory_mb is None else memory_mb)
    names = imagenet_classnames(classes)
    model = create_model(split_variant(method)[0], names, backbone=clip, **method_options(method))
    model.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3, momentum=0.9)
    generator = torch.Generator().manual_seed(1)
    data = {
        "images": torch.randn(batch, 3, clip.image_size, clip.image_size, generator=generator),
        "labels": torch.randint(0, classes, (batch,), generator=generator),
    }

    def step() -> None:
        loss, _, _ = model.training_step(data)
        optimizer.zero_grad(set_to_none=True)
        model.backward(loss, lambda value: value, lambda params: None)  # as the trainer (ProGrad: two passes)
        optimizer.step()

    return model, step


def measure_one(method: str, classes: int, path: str, steps: int, memory_mb: float | None, max_rss_mb: float) -> dict:
    """Runs in its own process (see ``main``)."""
    import torch

    with PeakRss(interval_s=0.005, limit_mb=max_rss_mb):
        model, step = build_step(method, classes, path, memory_mb)
        step()  # warm-up: first-call allocations, lazily computed frozen features
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
    budget = model.clip.auto_text_memory_bytes
    return {
        "method": method, "classes": classes, "path": path, "batch": BATCH, "backbone": BACKBONE,
        "median_step_s": statistics.median(times), "step_times_s": times,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "text_memory_mb": memory_mb if memory_mb is not None else (None if budget is None else budget / 2**20),
        "torch_threads": torch.get_num_threads(),
    }


def extrapolate(rows: list[dict], row: dict) -> None:
    """Fill a stopped row's time and RSS linearly in C from the two smaller C of its method and path."""
    known = sorted((r for r in rows if r["method"] == row["method"] and r["path"] == row["path"]
                    and r["classes"] < row["classes"] and not r.get("stopped")), key=lambda r: r["classes"])[-2:]
    if len(known) < 2:
        return
    (c0, a), (c1, b) = [(r["classes"], r) for r in known]
    for key in ("median_step_s", "peak_rss_mb"):
        row[key] = b[key] + (b[key] - a[key]) * (row["classes"] - c1) / (c1 - c0)
    row["extrapolated"] = True


# ----------------------------------------------------------------- report
def markdown_table(rows: list[dict]) -> str:
    lines = ["| method | C | path | s/step | peak RSS (GB) | time ratio (plain ÷ bucketed) "
             "| RSS ratio (bucketed ÷ plain) |",
             "|---|---:|---|---:|---:|---:|---:|"]
    index = {(r["method"], r["classes"], r["path"]): r for r in rows}

    def cell(r: dict, key: str, scale: float, digits: int) -> str:
        if r.get("median_step_s") is None:
            return f"> {r['limit_gb']:.0f} GB" if key == "peak_rss_mb" else "did not fit"
        value = f"{r[key] / scale:.{digits}f}"
        return f"~{value} (extrapolated: over {r['limit_gb']:.0f} GB)" if r.get("extrapolated") else value

    for r in rows:
        ratios = ["", ""]
        plain, new = index.get((r["method"], r["classes"], "plain")), index.get((r["method"], r["classes"], "bucketed"))
        if r["path"] == "bucketed" and plain and new and plain.get("median_step_s") and new.get("median_step_s"):
            mark = "~" if plain.get("extrapolated") else ""
            ratios = [f"{mark}{plain['median_step_s'] / new['median_step_s']:.2f}x",
                      f"{mark}{new['peak_rss_mb'] / plain['peak_rss_mb']:.2f}"]
        lines.append(f"| {r['method']} | {r['classes']} | {r['path']} | {cell(r, 'median_step_s', 1, 2)} "
                     f"| {cell(r, 'peak_rss_mb', 1024, 2)} | {ratios[0]} | {ratios[1]} |")
    return "\n".join(lines)


def ratio_table(rows: list[dict], reference: str) -> str:
    """Each measured row's step time and peak RSS over ``reference``'s at the same C and path (one run)."""
    index = {(r["method"], r["classes"], r["path"]): r for r in rows
             if r.get("median_step_s") and not r.get("extrapolated")}
    lines = [f"| method | C | path | s/step | peak RSS (GB) | time ÷ {reference} | RSS ÷ {reference} |",
             "|---|---:|---|---:|---:|---:|---:|"]
    for r in rows:
        base = index.get((reference, r["classes"], r["path"]))
        if (r["method"], r["classes"], r["path"]) not in index or base is None:
            stopped = r.get("stopped", "not measured")
            lines.append(f"| {r['method']} | {r['classes']} | {r['path']} | {stopped} | | | |")
            continue
        lines.append(f"| {r['method']} | {r['classes']} | {r['path']} | {r['median_step_s']:.2f} "
                     f"| {r['peak_rss_mb'] / 1024:.2f} "
                     f"| {r['median_step_s'] / base['median_step_s']:.2f} "
                     f"| {r['peak_rss_mb'] / base['peak_rss_mb']:.2f} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mugcp.utils import atomic_write

    figure, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for method in sorted({r["method"] for r in rows}, key=METHODS.index):
        for path_name, style in (("plain", "--"), ("bucketed", "-")):
            points = sorted((r for r in rows
                             if r["method"] == method and r["path"] == path_name and r.get("median_step_s")),
                            key=lambda r: r["classes"])
            if not points:
                continue
            colour = plt.get_cmap("tab20")(METHODS.index(method) % 20)  # 12 methods: more than the 10 C0..C9
            for axis, key, scale in ((axes[0], "median_step_s", 1), (axes[1], "peak_rss_mb", 1024)):
                xs, ys = [r["classes"] for r in points], [r[key] / scale for r in points]
                axis.plot(xs, ys, style, color=colour, marker="o", label=f"{method} {path_name}")
                for x, y, r in zip(xs, ys, points):
                    if r.get("extrapolated"):
                        axis.plot([x], [y], marker="x", color="k", markersize=9)
    for axis, label in ((axes[0], "s / training step"), (axes[1], "peak RSS (GB)")):
        axis.set_xscale("log")
        axis.set_yscale("log")
        axis.set_xlabel("classes C (ImageNet names)")
        axis.set_ylabel(label)
        axis.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=7, ncol=2)
    import textwrap

    axes[1].plot([], [], "x", color="k", markersize=9, label="extrapolated (over the RSS limit, not run)")
    axes[1].legend(fontsize=7)
    figure.suptitle("\n".join(textwrap.wrap(title, 150)), fontsize=8)
    figure.tight_layout()
    atomic_write(path, lambda temporary: figure.savefig(temporary, format="png", dpi=110))


# ----------------------------------------------------------------- profile and calibration
def matmul_peak_gflops(size: int = 2048, repeats: int = 5) -> float:
    """fp32 matmul throughput of this process (best of ``repeats``): the machine's practical peak."""
    import torch

    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e9


def profile(method: str, classes: int, memory_mb: float | None, rows: int, paths: list[str]) -> None:
    """Per-op time of one step on each path (torch.profiler), the step's FLOPs (FlopCounterMode) and
    the achieved fraction of the measured fp32 matmul peak."""
    import torch
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile
    from torch.utils.flop_counter import FlopCounterMode

    peak = matmul_peak_gflops()
    print(f"fp32 matmul peak (2048², best of 5): {peak:.1f} GFLOP/s on {torch.get_num_threads()} threads; "
          f"{describe_cpu()}; load average {os.getloadavg()[0]:.1f}")
    for path in paths:
        model, step = build_step(method, classes, path, memory_mb)
        step()
        counter = FlopCounterMode(display=False)
        with counter:
            step()
        flops = counter.get_total_flops()
        start = time.perf_counter()
        step()
        seconds = time.perf_counter() - start
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            step()
        table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)
        matmul_ops = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")
        averages = prof.key_averages()
        total = sum(e.self_cpu_time_total for e in averages)
        matmul = sum(e.self_cpu_time_total for e in averages if e.key in matmul_ops)
        print(f"\n## {method}, C={classes}, path {path}: {seconds:.2f} s/step, {flops / 1e9:.1f} GFLOP counted "
              f"({flops / seconds / 1e9:.1f} GFLOP/s = {100 * flops / seconds / 1e9 / peak:.0f}% of the matmul peak); "
              f"matmul ops {100 * matmul / total:.0f}% of the profiled op time")
        print(table)
        del model, step


def calibrate() -> None:
    """Time and memory of one text group pass against its size: the constants of text_buckets.py."""
    import torch

    from benchmarks.conftest import peak_memory_bytes
    from mugcp.backbones import load_clip
    from mugcp.backbones.text_buckets import encode_group

    torch.manual_seed(0)
    clip = load_clip(BACKBONE, pretrained=None)
    width, layers, length = clip.text_width, clip.text_layers, 12

    def group(count: int, grad: bool):
        tokens = torch.zeros(count, clip.context_length, dtype=torch.long)
        tokens[:, length - 1] = 1  # EOT (argmax) at the last position
        embeddings = torch.randn(count, length, width, requires_grad=grad)

        def run():
            with torch.set_grad_enabled(grad):
                out = encode_group(clip, tokens, None, embeddings, torch.arange(count), length, 1)
                if grad:
                    out.sum().backward()
        return run

    sizes, times = [1, 8, 32, 128], []
    for count in sizes:
        run = group(count, True)
        run()
        samples = []
        for _ in range(5):
            start = time.perf_counter()
            run()
            samples.append(time.perf_counter() - start)
        times.append(statistics.median(samples))
        print(f"{count:4d} sequences × {length}: {1e3 * times[-1]:.1f} ms forward+backward")
    per_token = (times[-1] - times[-2]) / ((sizes[-1] - sizes[-2]) * length)
    fixed = times[-1] - per_token * sizes[-1] * length
    print(f"fit: {1e3 * fixed:.1f} ms per pass + {1e3 * per_token:.3f} ms per token -> GROUP_OVERHEAD_TOKENS ≈ "
          f"{fixed / per_token:.0f}")
    count = 128
    tokens = torch.zeros(count, clip.context_length, dtype=torch.long)
    tokens[:, length - 1] = 1
    embeddings = torch.randn(count, length, width, requires_grad=True)
    kept = {}
    graph = peak_memory_bytes(lambda: kept.setdefault("out", encode_group(clip, tokens, None, embeddings,
                                                                          torch.arange(count), length, 1)),
                              torch.device("cpu"))
    unit = count * length * width * embeddings.element_size()
    print(f"forward with graph: peak {graph / unit / layers:.1f} widths per token per layer "
          "(GRAPH_WIDTHS_PER_TOKEN_LAYER)")
    kept.clear()
    with torch.no_grad():
        forward = peak_memory_bytes(lambda: encode_group(clip, tokens, None, embeddings, torch.arange(count),
                                                         length, 1),
                                    torch.device("cpu"))
    print(f"forward without graph: peak {forward / unit:.1f} widths per token (FORWARD_WIDTHS_PER_TOKEN)")


# ----------------------------------------------------------------- main
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=DEFAULT_METHODS, choices=METHODS)
    parser.add_argument("--classes", nargs="+", type=int, default=CLASSES)
    parser.add_argument("--paths", nargs="+", default=PATHS, choices=PATHS)
    parser.add_argument("--steps", type=int, default=2, help="timed steps after one warm-up (default 2)")
    parser.add_argument("--memory-mb", type=float, help="train.text_memory_mb of the bucketed path (default: auto)")
    parser.add_argument("--max-rss-gb", type=float, default=20.0,
                        help="stop a configuration whose RSS passes this (default 20)")
    parser.add_argument("--timeout-s", type=float, default=1800,
                        help="stop a configuration after this long (default 1800)")
    parser.add_argument("--json", help="write all numbers to this file")
    parser.add_argument("--plot", default=str(ROOT / "benchmarks" / "text_scaling.png"),
                        help="PNG to draw ('none' to skip)")
    parser.add_argument("--profile", type=int, metavar="C",
                        help="profile one step of --methods[0] at C classes on both paths")
    parser.add_argument("--profile-rows", type=int, default=25)
    parser.add_argument("--calibrate", action="store_true",
                        help="measure the constants of mugcp/backbones/text_buckets.py")
    parser.add_argument("--ratio-to", metavar="METHOD",
                        help="also print each row's time and RSS over this method's (same C, path)")
    parser.add_argument("--replot", metavar="JSON",
                        help="redraw the table and plot from a --json file of an earlier run")
    parser.add_argument("--one", nargs=3, help=argparse.SUPPRESS)  # internal: method classes path
    args = parser.parse_args(argv)

    if args.replot:
        saved = json.loads(Path(args.replot).read_text(encoding="utf-8"))
        print(f"\n{saved['header']}\n")
        print(markdown_table(saved["rows"]))
        if args.plot.lower() != "none":
            plot(saved["rows"], args.plot, saved["header"])
        return 0

    if args.calibrate:
        calibrate()
        return 0
    if args.profile:
        profile(args.methods[0], args.profile, args.memory_mb, args.profile_rows, args.paths)
        return 0
    if args.one:
        method, classes, path = args.one
        print(json.dumps(measure_one(method, int(classes), path, args.steps, args.memory_mb, args.max_rss_gb * 1024)))
        return 0

    load_start = os.getloadavg()
    rows = []
    for method in args.methods:
        for classes in sorted(args.classes):
            for path in args.paths:
                command = [sys.executable, __file__, "--one", method, str(classes), path, "--steps", str(args.steps),
                           "--max-rss-gb", str(args.max_rss_gb)]
                if args.memory_mb is not None:
                    command += ["--memory-mb", str(args.memory_mb)]
                row = {"method": method, "classes": classes, "path": path, "limit_gb": args.max_rss_gb}
                predicted = dict(row)
                extrapolate(rows, predicted)
                if predicted.get("extrapolated") and predicted["peak_rss_mb"] > args.max_rss_gb * 1024:
                    # Never start what would pass the limit on a shared machine: report the extrapolation.
                    row.update(predicted, stopped=f"predicted {predicted['peak_rss_mb'] / 1024:.1f} GB > "
                                                  f"{args.max_rss_gb:.0f} GB: not run")
                    rows.append(row)
                    print(f"{method} C={classes} {path}: {row['stopped']} "
                          f"(extrapolated {row['median_step_s']:.1f} s/step)", file=sys.stderr, flush=True)
                    continue
                try:
                    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=args.timeout_s)
                except subprocess.TimeoutExpired:
                    row.update(stopped=f"ran past {args.timeout_s:.0f} s")
                else:
                    if done.returncode == RSS_LIMIT_EXIT:
                        row.update(stopped=f"resident memory passed {args.max_rss_gb:.0f} GB")
                    elif done.returncode:
                        print(done.stderr, file=sys.stderr)
                        raise SystemExit(f"measuring {method} C={classes} {path} failed (exit {done.returncode})")
                    else:
                        row.update(json.loads(done.stdout.strip().splitlines()[-1]))
                if row.get("stopped"):
                    extrapolate(rows, row)
                rows.append(row)
                shown = (f"{row['median_step_s']:.2f} s/step, {row['peak_rss_mb'] / 1024:.2f} GB"
                         if row.get("median_step_s") else row["stopped"])
                print(f"{method} C={classes} {path}: {shown}{' (extrapolated)' if row.get('extrapolated') else ''}",
                      file=sys.stderr, flush=True)
    load_end = os.getloadavg()
    header = (f"{BACKBONE} (random weights), fp32, B={BATCH}, ImageNet class names, median of {args.steps} steps after "
              f"a warm-up, fresh process per row; {describe_cpu()}; load average {load_start[0]:.1f} -> "
              f"{load_end[0]:.1f}; bucketed budget {'auto' if args.memory_mb is None else f'{args.memory_mb:.0f} MiB'}")
    print(f"\n{header}\n")
    print(markdown_table(rows))
    if args.ratio_to:
        print(f"\n{ratio_table(rows, args.ratio_to)}")
    if args.plot.lower() != "none":
        plot(rows, args.plot, header)
        print(f"\nplot: {args.plot}")
    if args.json:
        from mugcp.utils import atomic_write_json

        atomic_write_json(args.json, {"rows": rows, "header": header, "load_average": [load_start, load_end]})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
