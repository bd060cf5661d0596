"""One training run stopped by SIGTERM (Slurm's stop) and resumed, and one data-parallel run under Slurm.

Both are held to the same uninterrupted one-process run: the resumed run to the bit, the 2-task gloo
run under Slurm within the float tolerance of tests/test_distributed.py (the order of its sums differs).
"""
from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
import torch
from fixtures import make_imagefolder
from safetensors.torch import load_file

from mugcp.cli import run_cli
from mugcp.methods import get_method
from mugcp.runs.checkpoint import read_trainer_state
from mugcp.train import main

ROOT = Path(__file__).resolve().parents[1]


def train_args(root: Path, output: Path) -> list[str]:
    # 2 base classes x 2 shots, global batch 2: 2 steps per epoch, 4 in all.
    return ["--output", str(output), "data.dataset=imagefolder", f"data.root={root}", "data.shots=2",
            "data.batch_size=2", "data.max_eval_per_class=1", "method=coop", "method.n_ctx=2", "model.pretrained=none",
            "model.backbone=ViT-S-32", "optim.epochs=2",
            "optim.lr=0.05", "optim.warmup_epochs=0", "train.progress=false", "train.tensorboard=false"]


def ctx(output: Path) -> torch.Tensor:
    return load_file(str(output / "checkpoint" / "adapter_model.safetensors"))["ctx"]


def accuracies(output: Path) -> dict:
    metrics = json.loads((output / "metrics.json").read_text())
    return {name: metrics[name]["accuracy"] for name in ("base", "new")}


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    return make_imagefolder(tmp_path_factory.mktemp("data"), ["red fox", "blue whale", "snow owl", "sand cat"],
                            per_class={"train": 4, "test": 1})


@pytest.fixture(scope="module")
def uninterrupted(data_root, tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("runs") / "uninterrupted"
    assert main(train_args(data_root, output)) == 0
    assert json.loads((output / "metrics.json").read_text())["steps"] == 4
    return output


def test_sigterm_saves_the_step_in_flight_and_resume_ends_as_an_uninterrupted_run(data_root, uninterrupted, tmp_path,
                                                                                   monkeypatch, capsys):
    coop = get_method("coop").cls
    real_step, calls = coop.training_step, []

    def terminated_during_first_step(self, batch):
        calls.append(1)
        if len(calls) == 1:
            os.kill(os.getpid(), signal.SIGTERM)  # as scancel or the Slurm task's requeue sends it
        return real_step(self, batch)

    monkeypatch.setattr(coop, "training_step", terminated_during_first_step)
    output = tmp_path / "run"
    with pytest.raises(SystemExit) as stopped:
        run_cli(lambda: main(train_args(data_root, output)))
    assert stopped.value.code == 143 and len(calls) == 1  # 128 + SIGTERM; the first step was finished, no other begun
    err = capsys.readouterr().err
    assert "run stopped by SIGTERM after step 1 of 4 (epoch 1, batch 1)." in err
    assert f"The checkpoint of step 1 (epoch 1, batch 1) is kept in {output / 'checkpoint'}; continue with " \
           f"python -m mugcp.train --output {output} --resume" in err
    state = read_trainer_state(output / "checkpoint")
    assert (state["epoch"], state["batch"], state["step"]) == (0, 1, 1)
    assert not (output / "metrics.json").exists()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the command put the previous handler back

    monkeypatch.setattr(coop, "training_step", real_step)
    assert main(train_args(data_root, output) + ["--resume"]) == 0
    assert json.loads((output / "metrics.json").read_text())["steps"] == 4
    # The rest of epoch 1 (its batch order, augmentation and generators) and epoch 2 as if never stopped.
    assert torch.equal(ctx(output), ctx(uninterrupted))
    assert accuracies(output) == accuracies(uninterrupted)


@pytest.mark.slow  # two fresh processes import torch and open_clip and train: ~30-60 s on 2 busy cores
def test_a_two_task_gloo_run_under_slurm_learns_what_one_process_learns(slurm_cluster, data_root, uninterrupted,
                                                                        tmp_path, monkeypatch, capsys):
    from mugcp.launch.slurm import job_states

    monkeypatch.chdir(ROOT)  # tasks run from here, so `python -m mugcp.train` imports this checkout
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # exported to the job (sbatch passes the environment on)
    output = tmp_path / "ddp"
    slurm = ["--launcher", "slurm", "--slurm-nodes", "1", "--slurm-tasks-per-node", "2", "--slurm-time", "10"]
    started = time.monotonic()
    assert main(train_args(data_root, output) + slurm) == 0
    # Without --wait: the job id, and back at once (long before two processes could have trained).
    printed = capsys.readouterr().out
    assert printed.startswith("submitted job ") and "2 processes into" in printed
    job_id = printed.split()[2].rstrip(":")
    assert time.monotonic() - started < 20
    assert job_states({job_id: output})[job_id] in ("pending", "running")

    # The same command with --wait follows that job instead of submitting a second one.
    assert main(train_args(data_root, output) + slurm + ["--wait"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith(f"job {job_id} (") and "already trains" in printed
    assert f"job {job_id}: done" in printed and "done in " in printed and f"run folder: {output}" in printed
    assert job_states({job_id: output})[job_id] == "done"

    # Same global batches and averaged gradients: equal up to the order of floating-point sums.
    assert torch.allclose(ctx(output), ctx(uninterrupted), atol=1e-6, rtol=1e-5)
    assert not torch.equal(ctx(uninterrupted), torch.zeros_like(ctx(uninterrupted)))
    assert accuracies(output) == accuracies(uninterrupted)
    metrics = json.loads((output / "metrics.json").read_text())
    assert metrics["steps"] == 4
    assert (output / f"slurm-{job_id}.rank1.err").exists()  # a second task of the same step ran
