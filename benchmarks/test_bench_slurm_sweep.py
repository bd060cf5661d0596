"""What the Slurm launcher costs: the tiny 2 methods × 1 dataset × 2 seeds sweep of tests/test_slurm_sweep.py,
run to the end locally (``--jobs 1`` and ``--jobs 2``) and on the private single-node Slurm cluster
(``--launcher slurm --wait``: submit, follow, report), each in a fresh root per round.

    pytest benchmarks/test_bench_slurm_sweep.py --benchmark-only --benchmark-columns=median,min,max,rounds

Each sweep is run as its own ``python -m mugcp.sweep`` process, as a user runs it. The cluster's node
is this machine, so the Slurm runs compete for the same cores as the local ones.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
ROUNDS = int(os.environ.get("MUGCP_BENCH_ROUNDS", "3"))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    from slurm_cluster import cluster_or_skip

    with cluster_or_skip(tmp_path_factory.mktemp("slurm")) as running:
        yield running


@pytest.fixture(scope="module")
def tiny_sweep(tmp_path_factory):
    from fixtures import make_coop_dataset
    from released_reference import TINY_CLIP, TINY_CONFIG

    base = tmp_path_factory.mktemp("bench")
    site = base / "site"
    (site / "models").mkdir(parents=True)
    (site / "models" / f"{TINY_CLIP}.json").write_text(json.dumps(TINY_CONFIG))
    (site / "sitecustomize.py").write_text("import pathlib, open_clip\n"
                                           "open_clip.add_model_config(pathlib.Path(__file__).parent / 'models')\n")
    data = make_coop_dataset(base, "dtd", ["red_fox", "blue_whale", "snow_owl", "sand_cat"])
    sweep = base / "grid.yaml"
    sweep.write_text(yaml.safe_dump({
        "datasets": ["dtd"], "seeds": [1, 2], "methods": ["zsclip", "coop"], "shots": [1],
        "overrides": {"data.root": str(data), "model.pretrained": "none", "model.backbone": TINY_CLIP,
                      "data.batch_size": 4, "data.eval_batch_size": 8, "data.max_eval_per_class": 1,
                      "data.protocol": "all", "optim.epochs": 2, "optim.warmup_epochs": 0, "train.tensorboard": False},
        "method_overrides": {"coop": {"method.n_ctx": 2}}}))
    return base, sweep, {"PYTHONPATH": f"{site}{os.pathsep}{ROOT}", "HF_HUB_OFFLINE": "1"}


def _bench_sweep(benchmark, tiny_sweep, label: str, flags: list[str]) -> None:
    base, sweep, env = tiny_sweep
    roots = iter(base / f"{label}-{index}" for index in range(100))

    def setup():
        return ([sys.executable, "-m", "mugcp.sweep", str(sweep), "--root", str(next(roots)), "--no-progress",
                 *flags],), {}

    def run(command):
        # os.environ now: the cluster fixture sets SLURM_CONF once its node is up
        done = subprocess.run(command, capture_output=True, text=True, env=dict(os.environ, **env), cwd=ROOT,
                              timeout=900)
        assert done.returncode == 0, done.stdout + done.stderr

    benchmark.extra_info.update({"sweep": "2 methods (zsclip, coop) x 1 dataset x 2 seeds, tiny CLIP, CPU",
                                 "launcher": label, "cpus": os.cpu_count(), "load_average_before": os.getloadavg()[0]})
    benchmark.pedantic(run, setup=setup, rounds=ROUNDS, iterations=1)


def test_tiny_sweep_local_one_at_a_time(benchmark, tiny_sweep):
    _bench_sweep(benchmark, tiny_sweep, "local-jobs1", [])


def test_tiny_sweep_local_two_at_a_time(benchmark, tiny_sweep):
    _bench_sweep(benchmark, tiny_sweep, "local-jobs2", ["--jobs", "2"])


def test_tiny_sweep_on_slurm(benchmark, tiny_sweep, cluster):
    _bench_sweep(benchmark, tiny_sweep, "slurm", ["--launcher", "slurm", "--wait"])


def test_tiny_sweep_on_slurm_one_at_a_time(benchmark, tiny_sweep, cluster):
    _bench_sweep(benchmark, tiny_sweep, "slurm-parallelism1",
                 ["--launcher", "slurm", "--wait", "--slurm-array-parallelism", "1"])
