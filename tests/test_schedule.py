"""The learning-rate schedule: the released trainers' (Dassl's, restated here on torch's own schedulers),
step by step, over whole runs, compressed runs and runs resumed in the middle of an epoch."""
from __future__ import annotations

import math
import types

import pytest
import torch
from fixtures import make_imagefolder
from safetensors.torch import load_file

from mugcp.config import DEFAULTS, load_config
from mugcp.runs import run_setup
from mugcp.training import train, trainer
from mugcp.training.optim import build_scheduler, learning_rate, run_length


class DasslConstantWarmup(torch.optim.lr_scheduler.LRScheduler):
    """Dassl's ConstantWarmupScheduler (dassl/optim/lr_scheduler.py), restated."""

    def __init__(self, optimizer, successor, warmup_epoch, cons_lr):
        self.successor, self.warmup_epoch, self.cons_lr = successor, warmup_epoch, cons_lr
        super().__init__(optimizer)

    def step(self, epoch=None):
        if self.last_epoch >= self.warmup_epoch:
            self.successor.step(epoch)
            self._last_lr = self.successor.get_last_lr()
        else:
            super().step(epoch)

    def get_lr(self):
        if self.last_epoch >= self.warmup_epoch:
            return self.successor.get_last_lr()
        return [self.cons_lr for _ in self.base_lrs]


def dassl_rates(lr, max_epoch, steps_per_epoch, warmup_epoch, cons_lr):
    """The rate of every optimiser step of a released trainer: cosine over MAX_EPOCH wrapped in the constant
    warm-up (when WARMUP_EPOCH > 0), sched.step() after the last batch of each epoch."""
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, float(max_epoch))
    if warmup_epoch > 0:
        scheduler = DasslConstantWarmup(optimizer, scheduler, warmup_epoch, cons_lr)
    rates = []
    for _ in range(max_epoch):
        for batch_idx in range(steps_per_epoch):
            rates.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            if batch_idx + 1 == steps_per_epoch:
                scheduler.step()
    return rates


def optim_cfg(**kw):
    return dict(DEFAULTS["optim"], **kw)


def our_rates(cfg, total_steps, resume_at=None):
    """Rates of ``total_steps`` steps of our scheduler; ``resume_at``: rebuilt from its state at that step."""
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg["lr"], momentum=0.9)
    scheduler = build_scheduler(optimizer, cfg, total_steps)
    rates = []
    for step in range(total_steps):
        if step == resume_at:
            state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}
            optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg["lr"], momentum=0.9)
            scheduler = build_scheduler(optimizer, cfg, total_steps)
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return rates


@pytest.mark.parametrize("epochs, steps_per_epoch, warmup, lr", [
    (5, 3, 1, 0.0035), (10, 1, 1, 0.002), (4, 2, 0, 0.002), (6, 2, 2, 0.0025), (2, 5, 1, 0.01), (3, 4, 3, 0.1),
])
def test_released_schedule_is_dassls_at_every_step(epochs, steps_per_epoch, warmup, lr):
    cfg = optim_cfg(scheduler="released", lr=lr, epochs=epochs, warmup_epochs=warmup, warmup_lr=1e-5)
    total = run_length(epochs, steps_per_epoch, None)
    expected = dassl_rates(lr, epochs, steps_per_epoch, warmup, 1e-5)
    assert our_rates(cfg, total) == pytest.approx(expected, rel=1e-12, abs=0)
    for resume_at in range(1, total):  # resumed after any step, mid-epoch included
        assert our_rates(cfg, total, resume_at) == pytest.approx(expected, rel=1e-12, abs=0)


def test_released_schedule_holds_one_rate_per_epoch_and_never_reaches_zero():
    cfg = optim_cfg(scheduler="released", lr=0.002, epochs=5, warmup_epochs=1, warmup_lr=1e-5)
    rates = our_rates(cfg, 5 * 4)
    per_epoch = [rates[e * 4: (e + 1) * 4] for e in range(5)]
    assert all(len(set(epoch)) == 1 for epoch in per_epoch)
    assert [epoch[0] for epoch in per_epoch] == pytest.approx(
        [1e-5] + [0.002 * (1 + math.cos(math.pi * k / 5)) / 2 for k in range(4)], rel=1e-12)
    assert rates[-1] > 0.002 * 0.2


def test_max_steps_compresses_the_whole_schedule_into_the_run():
    # 5 epochs of 100 batches cut to 10 steps: each epoch of the schedule lasts 2 steps.
    cfg = optim_cfg(scheduler="released", lr=0.002, epochs=5, warmup_epochs=1, warmup_lr=1e-5, max_steps=10)
    total = run_length(5, 100, 10)
    assert total == 10
    assert our_rates(cfg, total) == pytest.approx(dassl_rates(0.002, 5, 2, 1, 1e-5), rel=1e-12)
    # not a whole number of steps per epoch: step k is in epoch k * epochs // total
    assert [learning_rate(k, 7, cfg) for k in range(7)] == pytest.approx(
        [1e-5, 1e-5] + [0.002 * (1 + math.cos(math.pi * (k * 5 // 7 - 1) / 5)) / 2 for k in range(2, 7)], rel=1e-12)


def test_cosine_per_step_is_the_previous_schedule():
    cfg = optim_cfg(scheduler="cosine_per_step", lr=0.01, epochs=3, warmup_epochs=1, warmup_lr=1e-5)
    rates = our_rates(cfg, 12)
    assert rates[:4] == [pytest.approx(1e-5)] * 4
    assert rates[4:] == pytest.approx([0.01 * (1 + math.cos(math.pi * k / 8)) / 2 for k in range(8)], rel=1e-12)
    constant = our_rates(optim_cfg(scheduler="constant", lr=0.01, epochs=3, warmup_epochs=1, warmup_lr=1e-5), 12)
    assert constant == pytest.approx([1e-5] * 4 + [0.01] * 8, rel=1e-12)


# ---------------------------------------------------------------- whole training runs
CLASSES = ["red fox", "blue whale", "snow owl", "sand cat"]


@pytest.fixture(scope="module")
def dataset_root(tmp_path_factory):
    return make_imagefolder(tmp_path_factory.mktemp("data"), CLASSES, per_class={"train": 4, "test": 1})


@pytest.fixture
def recorded(vit_b32, monkeypatch):
    """Every run's optimiser-step rates and its TensorBoard train/lr scalars, in order."""
    monkeypatch.setattr(run_setup, "load_clip", lambda *args, **kwargs: vit_b32)
    log = {"used": [], "logged": []}
    real_build = trainer.build_optimizer

    def build_recording(params, cfg):
        optimizer = real_build(params, cfg)
        real_step = optimizer.step

        def step(self, *args, **kwargs):
            log["used"].append(self.param_groups[0]["lr"])
            return real_step(*args, **kwargs)

        optimizer.step = types.MethodType(step, optimizer)  # a bound method, as the scheduler expects to wrap
        return optimizer

    class Writer:
        def add_scalar(self, tag, value, step=None):
            if tag == "train/lr":
                log["logged"].append((step, value))

        def flush(self):
            pass

        def close(self):
            pass

    monkeypatch.setattr(trainer, "build_optimizer", build_recording)
    monkeypatch.setattr(trainer, "_tensorboard", lambda output: Writer())
    return log


def run_config(root, *extra):
    # 2 base classes x 2 shots / batch 2 = 2 steps per epoch; 3 epochs, 1 of warm-up.
    return load_config(None, [
        "data.dataset=imagefolder", f"data.root={root}", "data.shots=2", "data.batch_size=2", "data.eval_batch_size=8",
        "data.max_eval_per_class=1", "method=coop", "method.n_ctx=2", "model.pretrained=none", "optim.epochs=3",
        "optim.lr=0.01", "optim.warmup_epochs=1", "train.progress=false", "train.tensorboard=true", *extra,
    ])


def test_a_run_has_dassls_rates_logs_each_steps_own_rate_and_resumes_mid_epoch_exactly(tmp_path, dataset_root,
                                                                                       recorded):
    straight_metrics = train(run_config(dataset_root), tmp_path / "straight")
    assert straight_metrics["steps"] == 6
    straight = list(recorded["used"])
    assert straight == pytest.approx(dassl_rates(0.01, 3, 2, 1, 1e-5), rel=1e-12)
    assert recorded["logged"] == [(k, straight[k - 1]) for k in range(1, 7)]  # step k: the k-th step's rate
    recorded["used"].clear()
    # max_steps=5 compresses 3 epochs into 5 steps (epochs 0,0,1,1,2): the same rates as the first 5 of 6.
    first = train(run_config(dataset_root, "optim.max_steps=5"), tmp_path / "cut")
    state = torch.load(tmp_path / "cut" / "checkpoint" / "trainer_state.pt", weights_only=True)
    assert first["steps"] == 5 and (state["epoch"], state["step"]) == (2, 5)  # inside epoch 3
    resumed = train(run_config(dataset_root, "optim.max_steps=null"), tmp_path / "cut", resume=True)
    assert resumed["steps"] == 6
    assert recorded["used"] == pytest.approx(straight, rel=1e-12)
    a = load_file(str(tmp_path / "straight" / "checkpoint" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "cut" / "checkpoint" / "adapter_model.safetensors"))
    assert torch.equal(a["ctx"], b["ctx"])  # the same batches, in the same order, at the same rates


def test_a_checkpoint_that_does_not_fit_the_data_is_refused_on_resume(tmp_path, dataset_root, recorded):
    from mugcp.runs.checkpoint import CheckpointError

    train(run_config(dataset_root, "optim.max_steps=3"), tmp_path / "cut")
    with pytest.raises(CheckpointError,
                       match=r"stopped at step 3 after 1 epochs, which does not fit 1 batches per epoch"):
        train(run_config(dataset_root, "optim.max_steps=null", "data.batch_size=4"), tmp_path / "cut", resume=True)
