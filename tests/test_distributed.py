"""Data-parallel training under torchrun: two gloo processes on the CPU learn what one process learns."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from fixtures import make_imagefolder
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]


def run_training(tmp_path, name, root, processes):
    args = ["--output", str(tmp_path / name), "data.dataset=imagefolder", f"data.root={root}", "data.shots=2",
            "data.batch_size=2", "method=coop", "method.n_ctx=2", "model.pretrained=none", "optim.epochs=2",
            "optim.lr=0.05", "optim.warmup_epochs=0", "train.progress=false", "train.tensorboard=false"]
    launcher = [sys.executable, "-m", "mugcp.train"]
    if processes > 1:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}",
                    "-m", "mugcp.train"]
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    result = subprocess.run(launcher + args, capture_output=True, text=True, cwd=ROOT, env=env, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return load_file(str(tmp_path / name / "checkpoint" / "adapter_model.safetensors"))["ctx"]


@pytest.mark.slow
def test_two_processes_learn_what_one_process_learns(tmp_path):
    root = make_imagefolder(tmp_path, ["red fox", "blue whale", "snow owl", "sand cat"],
                            per_class={"train": 4, "test": 1})
    single = run_training(tmp_path, "one", root, processes=1)
    double = run_training(tmp_path, "two", root, processes=2)
    assert not torch.equal(single, torch.zeros_like(single))
    # Same global batches and averaged gradients: equal up to the order of floating-point sums.
    assert torch.allclose(single, double, atol=1e-6, rtol=1e-5)
    assert (tmp_path / "two" / "metrics.json").is_file()
