"""The training loop: one run = config → splits → model → epochs → checkpoint → evaluation → metrics.

Determinism: epoch ``e`` reseeds every RNG from ``(seed, e)`` and builds its data order from the same
pair, so a run resumed from the checkpoint of epoch ``e`` replays epochs ``e+1...`` bit for bit. A run that
``optim.max_steps`` stopped inside an epoch resumes at that epoch's next batch (same order, same augmentation).
"""
from __future__ import annotations

import logging
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from tqdm.auto import tqdm

from mugcp.analysis.curves import MetricsLog, write_curves
from mugcp.config import dump_config
from mugcp.data import ImageDataset, build_loader, build_protocol, build_transform, save_splits
from mugcp.data.loader import set_loader_epoch
from mugcp.errors import UserError
from mugcp.runs.checkpoint import CheckpointError, read_checkpoint, read_trainer_state, save_checkpoint
from mugcp.runs.layout import (
    CHECKPOINT_DIR,
    CONFIG_FILE,
    FINAL_METRICS_FILE,
    SPLITS_FILE,
    STEP_METRICS_FILE,
    TENSORBOARD_DIR,
    TRAINER_STATE_FILE,
)
from mugcp.runs.run_setup import (
    RunFolder,
    build_run_model,
    check_resume_folder,
    check_run_config,
    resolve_semantics,
    resolved_run_config,
)
from mugcp.runs.runtime import autocast, peak_memory_mb, resolve_device, resolve_precision
from mugcp.training.distributed import Distributed
from mugcp.training.evaluation import evaluate_subsets, training_cost
from mugcp.training.optim import build_optimizer, build_scheduler, run_length
from mugcp.training.stopping import NeverStop, RunStopped, rng_state, set_rng_state
from mugcp.utils import atomic_write_json, progress_wanted, seed_everything

log = logging.getLogger("mugcp")


class TrainingDiverged(UserError, RuntimeError):
    pass


def epoch_seed(seed: int, epoch: int) -> int:
    return seed * 100_003 + epoch


def run_seed(cfg: dict) -> int:
    return int(cfg["train"]["seed"])


def train(cfg: dict, output: str | Path, resume: bool = False, overwrite: bool = False, stop=None) -> dict:
    """Train and evaluate one run described by ``cfg``; returns the metrics written to metrics.json.

    Under ``torchrun`` every process calls this; rank 0 writes the run folder and returns the
    metrics, the other ranks return ``{}``. The config (and ``resume``'s folder) is checked before
    anything is read or written; a run that fails keeps its folder only once it has started (see
    ``RunFolder``), with the error in ``log.txt`` and a true account of its checkpoint. ``overwrite``
    empties a previous run's folder once this process owns it (never under a live run).

    ``stop``: a ``mugcp.training.stopping.StopOnSignal`` the caller entered; on its signal the run saves
    the checkpoint of the step in flight and raises ``RunStopped`` (see ``mugcp.training.stopping``).
    """
    output = Path(output)
    started = time.time()
    check_run_config(cfg)
    if resume:
        check_resume_folder(output)
    distributed = Distributed.from_env(resolve_device(cfg["train"]["device"]))
    try:
        with RunFolder(output, resume, overwrite, main=distributed.is_main, note=lambda: _resume_note(output),
                       replace=overwrite) as folder:
            return _train(cfg, output, resume, started, distributed, folder, stop or NeverStop())
    finally:
        distributed.close()


def _resume_note(output: Path) -> str:
    """What a failed or interrupted run kept, read from disk so that it is true."""
    checkpoint_dir = output / CHECKPOINT_DIR
    resume = f"python -m mugcp.train --output {output} --resume"
    try:
        state = read_trainer_state(checkpoint_dir) if checkpoint_dir.exists() else None
    except CheckpointError as err:
        return f"The checkpoint cannot be read ({err})."
    if state is None:
        return f"No checkpoint was saved yet, so nothing can be resumed; {resume} starts the training over."
    if state.get("batch"):
        return (f"The checkpoint of step {state['step']} (epoch {state['epoch'] + 1}, batch {state['batch']}) "
                f"is kept in {checkpoint_dir}; continue with {resume}.")
    return f"The checkpoint of epoch {state['epoch']} is kept in {checkpoint_dir}; continue with {resume}."


def _train(cfg: dict, output: Path, resume: bool, started: float, distributed: Distributed, folder: RunFolder,
           stop) -> dict:
    """Setup → epochs → steps → checkpoint → final metrics (rank 0 writes them; other ranks return ``{}``)."""
    setup = _set_up(cfg, output, distributed, folder)
    loop = TrainingLoop(setup, output, distributed, stop, resume)
    loop.run()
    loop.save_final_checkpoint()
    train_time = time.time() - started
    if loop.writer is not None:
        loop.writer.flush()
    if not distributed.is_main:  # rank 0 evaluates and writes the metrics
        distributed.barrier()
        return {}
    metrics = _final_metrics(setup, loop, output, started, train_time)
    distributed.barrier()
    return metrics


@dataclass
class RunSetup:
    """What a run trains: its resolved config, data, semantic features and model, on a device."""

    cfg: dict
    seed: int
    device: torch.device
    precision: str
    splits: Any
    semantic: Any
    model: Any
    train_set: ImageDataset


def _set_up(cfg: dict, output: Path, distributed: Distributed, folder: RunFolder) -> RunSetup:
    """Seeds, data, model; writes ``splits.json`` and ``config.yaml``, after which the run has started."""
    train_cfg, data_cfg = cfg["train"], cfg["data"]
    main = distributed.is_main
    seed = run_seed(cfg)
    device = distributed.device(resolve_device(train_cfg["device"]))
    precision = resolve_precision(train_cfg["precision"], device)
    distributed.check_batch_size(data_cfg["batch_size"])
    if train_cfg["deterministic"]:
        torch.use_deterministic_algorithms(True, warn_only=True)
    seed_everything(seed)

    splits = build_protocol(data_cfg, seed)
    if main:
        save_splits(splits, output / SPLITS_FILE)
    log.info("data: %s; train %d images of %d classes", splits.dataset.summary(), len(splits.train),
             len(splits.train_classnames))

    semantic = resolve_semantics(cfg, splits.dataset)
    model = build_run_model(cfg, splits.train_classnames, device, semantic, dataset_name=splits.dataset.name)
    cfg = resolved_run_config(cfg, semantic)  # what `auto` became is recorded, so a resumed run keeps it
    if main:
        dump_config(cfg, output / CONFIG_FILE)
    folder.started = True
    log.info("method %s on %s (%s weights): %d trainable parameters; device %s, precision %s", model.variant_name,
             model.clip.name, model.clip.pretrained or "RANDOM", model.num_trainable_parameters(), device, precision)
    image_size = data_cfg["image_size"] or model.clip.image_size
    train_set = ImageDataset(
        splits.train, splits.dataset, build_transform(image_size, train=True, augment=data_cfg["augment"]),
        on_bad_image=data_cfg["on_bad_image"], semantic=semantic.features_for(splits.train),
    )
    return RunSetup(cfg, seed, device, precision, splits, semantic, model, train_set)


class TrainingLoop:
    """The optimiser, the position (epoch, step) and the logs of one run's training, from its start or checkpoint."""

    def __init__(self, setup: RunSetup, output: Path, distributed: Distributed, stop, resume: bool):
        optim_cfg, data_cfg = setup.cfg["optim"], setup.cfg["data"]
        self.setup, self.model, self.distributed, self.stop = setup, setup.model, distributed, stop
        self.steps_per_epoch = len(build_loader(setup.train_set, data_cfg["batch_size"], train=True, seed=setup.seed))
        self.epochs = int(optim_cfg["epochs"])
        self.total_steps = run_length(self.epochs, self.steps_per_epoch, optim_cfg["max_steps"])
        # The epochs that will run: optim.max_steps may end training long before optim.epochs (the bar counts these).
        self.epochs_run = min(self.epochs, -(-self.total_steps // max(1, self.steps_per_epoch)))
        trains = self.model.num_trainable_parameters() > 0
        self.optimizer = build_optimizer(self.model.parameter_groups(), optim_cfg) if trains else None
        self.scheduler = build_scheduler(self.optimizer, optim_cfg, self.total_steps) if self.optimizer else None
        # fp16 gradients underflow without loss scaling; for fp32 and bf16 the scaler is a no-op.
        self.scaler = torch.amp.GradScaler(setup.device.type, enabled=setup.precision == "amp_fp16")

        self.start_epoch, self.step, self.rng = 0, 0, None
        self.checkpoint_dir = output / CHECKPOINT_DIR
        if resume and self.checkpoint_dir.exists():
            self.start_epoch, self.step, self.rng = _restore(self.model, self.optimizer, self.scheduler, self.scaler,
                                                             self.checkpoint_dir, self.steps_per_epoch)
            log.info("resumed from %s at epoch %d (step %d)", self.checkpoint_dir, self.start_epoch + 1, self.step)
        elif resume:
            log.info("--resume: %s holds no checkpoint yet (the run stopped in its first epoch); training starts over.",
                     output)
        self.first_step = self.step  # the steps before it cost another process's time

        main = distributed.is_main
        self.writer = _tensorboard(output) if setup.cfg["train"]["tensorboard"] and main else None
        resume_step = self.step if resume else None
        self.metrics_log = MetricsLog(output / STEP_METRICS_FILE, resume_step=resume_step) if main else None
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.skipped = 0

    def run(self) -> None:
        """Every epoch left; from here to the end of the loop a stop signal is acted on after the step in flight."""
        with self.stop.deferred():
            for epoch in range(self.start_epoch, self.epochs):
                if self.optimizer is None or self.step >= self.total_steps:
                    break
                self._epoch(epoch)
                self._end_epoch(epoch)

    def _epoch(self, epoch: int) -> None:
        """The epoch's steps, from its first batch or, for a run stopped inside it, its next one."""
        setup, distributed, data_cfg = self.setup, self.distributed, self.setup.cfg["data"]
        seed_everything(epoch_seed(setup.seed, epoch))
        loader = build_loader(setup.train_set, data_cfg["batch_size"], train=True, seed=epoch_seed(setup.seed, epoch),
                              num_workers=data_cfg["num_workers"])
        # A run stopped inside an epoch (optim.max_steps, a stop signal) continues with that epoch's next batch,
        # with the random generators as they were when a signal stopped it.
        start_batch = self.step - epoch * self.steps_per_epoch
        set_loader_epoch(loader, 0, start_batch=start_batch)
        if start_batch and self.rng:
            set_rng_state(self.rng[distributed.rank] if len(self.rng) == distributed.world_size else self.rng[0])
        loader = distributed.shard(loader)
        self.model.train()
        shown = progress_wanted(setup.cfg["train"]["progress"]) and distributed.is_main
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{self.epochs_run}",
                   total=min(len(loader), self.total_steps - self.step), unit="batch", disable=not shown, leave=False)
        for batch_index, batch in enumerate(bar, start=start_batch):
            if self.step >= self.total_steps:
                break
            stopping = self._step(batch, epoch, bar)
            if stopping and batch_index + 1 < self.steps_per_epoch and self.step < self.total_steps:
                self._stop_mid_epoch()
            if stopping:  # the epoch's (or the run's) last step: the end-of-epoch checkpoint follows
                break
        bar.close()

    def _step(self, batch: dict, epoch: int, bar) -> bool:
        """One optimiser step; True when a stop was asked for (on any rank)."""
        setup, optimizer, scaler = self.setup, self.optimizer, self.scaler
        self.skipped += batch.get("n_skipped", 0)
        batch = _to_device(batch, setup.device)
        with autocast(setup.precision, setup.device):
            local_loss, _, terms = self.model.training_step(batch)
        # Every rank sees the same loss and the same stop request, so all stop together.
        loss, stopping = self.distributed.mean_and_any(local_loss.detach(), self.stop.requested)
        if not torch.isfinite(loss):
            kept = self.checkpoint_dir if self.checkpoint_dir.exists() else "(none yet)"
            raise TrainingDiverged(
                f"loss became {float(loss)} at epoch {epoch + 1}, step {self.step + 1} (terms {terms}); "
                f"the run stopped. The last good checkpoint is kept in {kept}. "
                "Lower optim.lr, set optim.grad_clip, or use train.precision=fp32."
            )
        optimizer.zero_grad(set_to_none=True)
        self.model.backward(local_loss, scaler.scale, self.distributed.average_gradients)  # ProGrad has its own
        grad_clip = setup.cfg["optim"]["grad_clip"]
        if grad_clip:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(self.trainable, grad_clip)
        lr = optimizer.param_groups[0]["lr"]  # the rate this step uses: logged at its own step number
        scaler.step(optimizer)
        scaler.update()
        self.scheduler.step()
        self.step += 1
        bar.set_postfix(loss=f"{float(loss):.4f}", lr=f"{lr:.2e}")
        self._log_step(epoch, float(loss), lr, terms)
        return stopping

    def _log_step(self, epoch: int, loss: float, lr: float, terms: dict) -> None:
        """The step's loss, rate and loss terms: to STEP_METRICS_FILE, TensorBoard and (every log_every) the log."""
        step = self.step
        if self.metrics_log is not None:
            self.metrics_log.train_step(step, epoch + 1, loss, lr, terms)
        if self.writer is not None:
            self.writer.add_scalar("train/loss", loss, step)
            self.writer.add_scalar("train/lr", lr, step)
            for name, value in terms.items():
                self.writer.add_scalar(f"train/{name}", value, step)
        if step % self.setup.cfg["train"]["log_every"] == 0 or step == self.total_steps:
            log.info("epoch %d step %d/%d loss %.4f lr %.3e %s", epoch + 1, step, self.total_steps, loss, lr,
                     " ".join(f"{k}={v:.4f}" for k, v in terms.items()))

    def _end_epoch(self, epoch: int) -> None:
        """The method's epoch hooks, the checkpoint, and the stop a signal asked for during the epoch."""
        self.model.on_epoch_end(epoch + 1, self.epochs)
        if epoch + 1 == self.epochs or self.step >= self.total_steps:
            self.model.on_train_end()
        if self.distributed.is_main:
            save_checkpoint(self.checkpoint_dir, self.model, self.setup.cfg, trainer_state=self.trainer_state())
        self.distributed.barrier()
        if self.distributed.any(self.stop.requested):
            raise RunStopped(f"stopped by {_stop_signal(self.stop).name} after step {self.step} of {self.total_steps}, "
                             f"the end of epoch {epoch + 1}", _stop_signal(self.stop))

    def _stop_mid_epoch(self) -> None:
        """Save the checkpoint of this step, mid-epoch, and stop: --resume goes on with the epoch's next batch."""
        rng = self.distributed.gather_object(rng_state())  # every rank's generators: the model may draw from them
        epoch, batches_done = divmod(self.step, self.steps_per_epoch)
        if self.distributed.is_main:
            save_checkpoint(self.checkpoint_dir, self.model, self.setup.cfg, trainer_state=self.trainer_state(rng))
        self.distributed.barrier()
        raise RunStopped(f"stopped by {_stop_signal(self.stop).name} after step {self.step} of {self.total_steps} "
                         f"(epoch {epoch + 1}, batch {batches_done})", _stop_signal(self.stop))

    def trainer_state(self, rng: Optional[list] = None) -> dict:
        """What ``--resume`` needs. "epoch": the epochs completed; a run cut inside an epoch resumes at its batch
        ``step - epoch * steps_per_epoch``. ``rng`` (every rank's generators) only for a stop inside an epoch."""
        epoch, batches_done = divmod(self.step, self.steps_per_epoch)
        position = {"epoch": epoch, "step": self.step}
        if rng is not None:
            position = {"epoch": epoch, "batch": batches_done, "step": self.step, "rng": rng}
        return {**position, "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "grad_scaler": self.scaler.state_dict()}

    def save_final_checkpoint(self) -> None:
        """A run that trained nothing (zero-shot CLIP, or no step left) still leaves its checkpoint."""
        if self.distributed.is_main and (self.optimizer is None or not self.checkpoint_dir.exists()):
            save_checkpoint(self.checkpoint_dir, self.model, self.setup.cfg)


def _final_metrics(setup: RunSetup, loop: TrainingLoop, output: Path, started: float, train_time: float) -> dict:
    """Evaluate, then write ``metrics.json`` and the curves (rank 0 only)."""
    model, data_cfg = setup.model, setup.cfg["data"]
    metrics = evaluate_subsets(model, setup.splits, setup.cfg, setup.device, setup.precision, setup.semantic,
                               writer=loop.writer, output=output)
    loop.metrics_log.evaluation(loop.step, metrics)
    loop.metrics_log.close()
    metrics.update({
        "method": model.variant_name,
        "backbone": model.clip.name,
        "pretrained": model.clip.pretrained is not None,
        "pretrained_source": model.clip.pretrained,
        "dataset": setup.splits.dataset.name,
        "protocol": data_cfg["protocol"],
        "shots": data_cfg["shots"],
        "seed": setup.seed,
        "semantic_source": setup.semantic.source,
        "steps": loop.step,
        "train_images_skipped": loop.skipped,
        "trainable_parameters": model.num_trainable_parameters(),
        "wall_time_s": round(time.time() - started, 2),
        "train_time_s": round(train_time, 2),
        "peak_memory_mb": round(peak_memory_mb(setup.device), 1),
        **training_cost((loop.step - loop.first_step) * data_cfg["batch_size"], train_time),
        "device": str(setup.device),
        "precision": setup.precision,
    })
    atomic_write_json(output / FINAL_METRICS_FILE, metrics)
    # after the metrics: a figure never costs the run's numbers
    write_curves(output, title=f"{model.variant_name} on {setup.splits.dataset.name}, seed {setup.seed}")
    if loop.writer is not None:
        loop.writer.close()
    log.info("metrics: %s", {k: metrics[k] for k in metrics if k in ("base", "new", "all", "hm")})
    return metrics


def _stop_signal(stop) -> signal.Signals:
    """The signal this process received, or SIGTERM when another rank received it (they stop together)."""
    return signal.Signals(stop.received or signal.SIGTERM)


def _restore(model, optimizer, scheduler, scaler, checkpoint_dir: Path,
             steps_per_epoch: int) -> tuple[int, int, list | None]:
    state = read_trainer_state(checkpoint_dir)
    if state is None:
        raise FileNotFoundError(f"--resume: {checkpoint_dir} holds no {TRAINER_STATE_FILE} to resume from.")
    epoch, step = int(state["epoch"]), int(state["step"])
    if not 0 <= step - epoch * steps_per_epoch < steps_per_epoch:
        raise CheckpointError(
            f"--resume: {checkpoint_dir} stopped at step {step} after {epoch} epochs, which does not fit "
            f"{steps_per_epoch} batches per epoch: the training data or data.batch_size changed since. "
            "Resume with the run's own data settings, or start a new run."
        )
    _, tensors, path = read_checkpoint(checkpoint_dir)
    model.load_adapter_state(tensors, source=str(path))
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if "grad_scaler" in state:
        scaler.load_state_dict(state["grad_scaler"])
    return epoch, step, state.get("rng")


def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}


def _tensorboard(output: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # pragma: no cover - tensorboard is a dependency
        log.warning("tensorboard is not installed; no scalars are written")
        return None
    return SummaryWriter(str(output / TENSORBOARD_DIR))
