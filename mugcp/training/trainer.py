"""The training loop: one run = config → splits → model → epochs → checkpoint → evaluation → metrics.

Determinism: epoch ``e`` reseeds every RNG from ``(seed, e)`` and builds its data order from the same
pair, so a run resumed from the checkpoint of epoch ``e`` replays epochs ``e+1...`` bit for bit. A run that
``optim.max_steps`` stopped inside an epoch resumes at that epoch's next batch (same order, same augmentation).
"""
from __future__ import annotations

import logging
import signal
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from mugcp.analysis.curves import METRICS_FILE, MetricsLog, write_curves
from mugcp.config import dump_config
from mugcp.data import ImageDataset, build_loader, build_protocol, build_transform, save_splits
from mugcp.data.loader import set_loader_epoch
from mugcp.runs.checkpoint import CheckpointError, read_checkpoint, read_trainer_state, save_checkpoint
from mugcp.training.distributed import Distributed
from mugcp.training.evaluation import evaluate_subsets, training_cost
from mugcp.training.optim import build_optimizer, build_scheduler, run_length
from mugcp.runs.run_setup import (
    RunFolder, build_run_model, check_resume_folder, check_run_config, resolve_semantics, resolved_run_config,
)
from mugcp.runs.runtime import autocast, peak_memory_mb, resolve_device, resolve_precision
from mugcp.training.stopping import NeverStop, RunStopped, rng_state, set_rng_state
from mugcp.errors import UserError
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
        with RunFolder(output, resume, overwrite, main=distributed.is_main, note=lambda: _resume_note(output), replace=overwrite) as folder:
            return _train(cfg, output, resume, started, distributed, folder, stop or NeverStop())
    finally:
        distributed.close()


def _resume_note(output: Path) -> str:
    """What a failed or interrupted run kept, read from disk so that it is true."""
    checkpoint_dir = output / "checkpoint"
    resume = f"python -m mugcp.train --output {output} --resume"
    try:
        state = read_trainer_state(checkpoint_dir) if checkpoint_dir.exists() else None
    except CheckpointError as err:
        return f"The checkpoint cannot be read ({err})."
    if state is None:
        return f"No checkpoint was saved yet, so nothing can be resumed; {resume} starts the training over."
    if state.get("batch"):
        return (f"The checkpoint of step {state['step']} (epoch {state['epoch'] + 1}, batch {state['batch']}) is kept in "
                f"{checkpoint_dir}; continue with {resume}.")
    return f"The checkpoint of epoch {state['epoch']} is kept in {checkpoint_dir}; continue with {resume}."


def _train(cfg: dict, output: Path, resume: bool, started: float, distributed: Distributed, folder: RunFolder, stop) -> dict:
    train_cfg, optim_cfg, data_cfg = cfg["train"], cfg["optim"], cfg["data"]
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
        save_splits(splits, output / "splits.json")
    log.info("data: %s; train %d images of %d classes", splits.dataset.summary(), len(splits.train), len(splits.train_classnames))

    semantic = resolve_semantics(cfg, splits.dataset)
    model = build_run_model(cfg, splits.train_classnames, device, semantic, dataset_name=splits.dataset.name)
    cfg = resolved_run_config(cfg, semantic)  # what `auto` became is recorded, so a resumed run keeps it
    if main:
        dump_config(cfg, output / "config.yaml")
    folder.started = True
    log.info(
        "method %s on %s (%s weights): %d trainable parameters; device %s, precision %s",
        model.method_name, model.clip.name, model.clip.pretrained or "RANDOM", model.num_trainable_parameters(), device, precision,
    )

    image_size = data_cfg["image_size"] or model.clip.image_size
    train_set = ImageDataset(
        splits.train, splits.dataset, build_transform(image_size, train=True, augment=data_cfg["augment"]),
        on_bad_image=data_cfg["on_bad_image"], semantic=semantic.train_features(splits.train),
    )
    steps_per_epoch = len(build_loader(train_set, data_cfg["batch_size"], train=True, seed=seed))
    epochs = int(optim_cfg["epochs"])
    total_steps = run_length(epochs, steps_per_epoch, optim_cfg["max_steps"])
    # The epochs that will run: optim.max_steps may end training long before optim.epochs (the progress bar counts these).
    epochs_run = min(epochs, -(-total_steps // max(1, steps_per_epoch)))
    optimizer = build_optimizer(model.parameters(), optim_cfg) if model.num_trainable_parameters() else None
    scheduler = build_scheduler(optimizer, optim_cfg, total_steps) if optimizer else None
    # fp16 gradients underflow without loss scaling; for fp32 and bf16 the scaler is a no-op.
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "amp_fp16")

    start_epoch, step, rng = 0, 0, None
    checkpoint_dir = output / "checkpoint"
    if resume and checkpoint_dir.exists():
        start_epoch, step, rng = _restore(model, optimizer, scheduler, scaler, checkpoint_dir, steps_per_epoch)
        log.info("resumed from %s at epoch %d (step %d)", checkpoint_dir, start_epoch + 1, step)
    elif resume:
        log.info("--resume: %s holds no checkpoint yet (the run stopped in its first epoch); training starts over.", output)
    first_step = step  # the steps before it cost another process's time

    writer = _tensorboard(output) if train_cfg["tensorboard"] and main else None
    metrics_log = MetricsLog(output / METRICS_FILE, resume_step=step if resume else None) if main else None
    trainable = [p for p in model.parameters() if p.requires_grad]
    skipped = 0
    # From here to the end of the loop a stop signal is acted on after the step in flight.
    with stop.deferred():
        for epoch in range(start_epoch, epochs):
            if optimizer is None or step >= total_steps:
                break
            seed_everything(epoch_seed(seed, epoch))
            loader = build_loader(train_set, data_cfg["batch_size"], train=True, seed=epoch_seed(seed, epoch), num_workers=data_cfg["num_workers"])
            # A run stopped inside an epoch (optim.max_steps, a stop signal) continues with that epoch's next batch,
            # with the random generators as they were when a signal stopped it.
            start_batch = step - epoch * steps_per_epoch
            set_loader_epoch(loader, 0, start_batch=start_batch)
            if start_batch and rng:
                set_rng_state(rng[distributed.rank] if len(rng) == distributed.world_size else rng[0])
            loader = distributed.shard(loader)
            model.train()
            bar = tqdm(loader, desc=f"epoch {epoch + 1}/{epochs_run}", total=min(len(loader), total_steps - step), unit="batch",
                       disable=not (progress_wanted(train_cfg["progress"]) and main), leave=False)
            for batch_index, batch in enumerate(bar, start=start_batch):
                if step >= total_steps:
                    break
                skipped += batch.get("n_skipped", 0)
                batch = _to_device(batch, device)
                with autocast(precision, device):
                    local_loss, _, terms = model.training_step(batch)
                # Every rank sees the same loss and the same stop request, so all stop together.
                loss, stopping = distributed.mean_and_any(local_loss.detach(), stop.requested)
                if not torch.isfinite(loss):
                    raise TrainingDiverged(
                        f"loss became {float(loss)} at epoch {epoch + 1}, step {step + 1} (terms {terms}); the run stopped. "
                        f"The last good checkpoint is kept in {checkpoint_dir if checkpoint_dir.exists() else '(none yet)'}. "
                        "Lower optim.lr, set optim.grad_clip, or use train.precision=fp32."
                    )
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(local_loss).backward()
                distributed.average_gradients(trainable)
                if optim_cfg["grad_clip"]:
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(trainable, optim_cfg["grad_clip"])
                lr = optimizer.param_groups[0]["lr"]  # the rate this step uses: logged at its own step number
                scaler.step(optimizer)
                scaler.update()
                scheduler.step()
                step += 1
                bar.set_postfix(loss=f"{float(loss):.4f}", lr=f"{lr:.2e}")
                if metrics_log is not None:
                    metrics_log.train_step(step, epoch + 1, float(loss), lr, terms)
                if writer is not None:
                    writer.add_scalar("train/loss", float(loss), step)
                    writer.add_scalar("train/lr", lr, step)
                    for name, value in terms.items():
                        writer.add_scalar(f"train/{name}", value, step)
                if step % train_cfg["log_every"] == 0 or step == total_steps:
                    log.info("epoch %d step %d/%d loss %.4f lr %.3e %s", epoch + 1, step, total_steps, float(loss), lr,
                             " ".join(f"{k}={v:.4f}" for k, v in terms.items()))
                if stopping and batch_index + 1 < steps_per_epoch and step < total_steps:
                    _stop_mid_epoch(model, cfg, checkpoint_dir, distributed, stop, step, steps_per_epoch, total_steps,
                                    optimizer, scheduler, scaler)
                if stopping:  # the epoch's (or the run's) last step: the end-of-epoch checkpoint follows
                    break
            bar.close()
            model.on_epoch_end(epoch + 1, epochs)
            if epoch + 1 == epochs or step >= total_steps:
                model.on_train_end()
            if main:
                # "epoch": the epochs completed; a run cut inside an epoch resumes at its batch step - epoch * steps_per_epoch.
                save_checkpoint(checkpoint_dir, model, cfg, trainer_state={
                    "epoch": step // steps_per_epoch, "step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "grad_scaler": scaler.state_dict(),
                })
            distributed.barrier()
            if distributed.any(stop.requested):
                raise RunStopped(f"stopped by {_stop_signal(stop).name} after step {step} of {total_steps}, the end of "
                                 f"epoch {epoch + 1}", _stop_signal(stop))
    if main and (optimizer is None or not checkpoint_dir.exists()):
        save_checkpoint(checkpoint_dir, model, cfg)
    train_time = time.time() - started
    if writer is not None:
        writer.flush()
    if not main:  # rank 0 evaluates and writes the metrics
        distributed.barrier()
        return {}

    metrics = evaluate_subsets(model, splits, cfg, device, precision, semantic, writer=writer, output=output)
    metrics_log.evaluation(step, metrics)
    metrics_log.close()
    metrics.update({
        "method": model.method_name,
        "backbone": model.clip.name,
        "pretrained": model.clip.pretrained is not None,
        "pretrained_source": model.clip.pretrained,
        "dataset": splits.dataset.name,
        "protocol": data_cfg["protocol"],
        "shots": data_cfg["shots"],
        "seed": seed,
        "semantic_source": semantic.source,
        "steps": step,
        "train_images_skipped": skipped,
        "trainable_parameters": model.num_trainable_parameters(),
        "wall_time_s": round(time.time() - started, 2),
        "train_time_s": round(train_time, 2),
        "peak_memory_mb": round(peak_memory_mb(device), 1),
        **training_cost((step - first_step) * data_cfg["batch_size"], train_time),
        "device": str(device),
        "precision": precision,
    })
    atomic_write_json(output / "metrics.json", metrics)
    write_curves(output, title=f"{model.method_name} on {splits.dataset.name}, seed {seed}")  # after metrics.json: a figure never costs the run's numbers
    if writer is not None:
        writer.close()
    log.info("metrics: %s", {k: metrics[k] for k in metrics if k in ("base", "new", "all", "hm")})
    distributed.barrier()
    return metrics


def _stop_signal(stop) -> signal.Signals:
    """The signal this process received, or SIGTERM when another rank received it (they stop together)."""
    return signal.Signals(stop.received or signal.SIGTERM)


def _stop_mid_epoch(model, cfg, checkpoint_dir, distributed, stop, step, steps_per_epoch, total_steps,
                    optimizer, scheduler, scaler) -> None:
    """Save the checkpoint of this step, mid-epoch, and stop: --resume goes on with the epoch's next batch."""
    rng = distributed.gather_object(rng_state())  # every rank's generators: the model may draw from them
    epoch, batches_done = divmod(step, steps_per_epoch)
    if distributed.is_main:
        save_checkpoint(checkpoint_dir, model, cfg, trainer_state={
            "epoch": epoch, "batch": batches_done, "step": step, "rng": rng, "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "grad_scaler": scaler.state_dict(),
        })
    distributed.barrier()
    raise RunStopped(f"stopped by {_stop_signal(stop).name} after step {step} of {total_steps} "
                     f"(epoch {epoch + 1}, batch {batches_done})", _stop_signal(stop))


def _restore(model, optimizer, scheduler, scaler, checkpoint_dir: Path, steps_per_epoch: int) -> tuple[int, int, list | None]:
    state = read_trainer_state(checkpoint_dir)
    if state is None:
        raise FileNotFoundError(f"--resume: {checkpoint_dir} holds no trainer_state.pt to resume from.")
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
    return SummaryWriter(str(output / "tensorboard"))
