"""Evaluating a checkpoint on any dataset, split and class subset (``python -m mugcp.evaluate``).

The run's own resolved config (stored in the checkpoint) is the starting point; a config file and
overrides change the data. Settings an evaluation cannot apply are refused, not ignored.
"""
from __future__ import annotations

import copy
import json
import shutil
import time
from pathlib import Path
from typing import Optional

from mugcp.backbones import normalize_model_name
from mugcp.config import DEFAULTS, ConfigError, dump_config, load_yaml_with_bases, merge, parse_overrides
from mugcp.config_schema import SCHEMA, flatten, show_value
from mugcp.data import build_protocol
from mugcp.runs.checkpoint import check_compatible, read_checkpoint
from mugcp.runs.layout import (
    CHECKPOINT_DIR,
    CONFIG_FILE,
    CONFUSION_DIR,
    EVALUATION_DIR_PREFIX,
    FINAL_METRICS_FILE,
    PER_CLASS_DIR,
    PREDICTIONS_DIR,
    PREVIOUS_SUFFIX,
    SPLITS_FILE,
    STEP_METRICS_FILE,
)
from mugcp.runs.learned_classes import check_checkpoint_classes
from mugcp.runs.run_setup import RunFolder, build_run_model, check_run_config, resolve_semantics
from mugcp.runs.runtime import peak_memory_mb, resolve_device, resolve_precision
from mugcp.runs.trained_run import apply_checkpoint_settings, run_classnames
from mugcp.training.evaluation import evaluate_subsets
from mugcp.utils import atomic_write_json, check_output_folder

# What only a training run writes (splits.json comes before anything else, so every run folder has it).
TRAINING_FILES = (CHECKPOINT_DIR, CHECKPOINT_DIR + PREVIOUS_SUFFIX, SPLITS_FILE, STEP_METRICS_FILE)
# What an evaluation writes besides config.yaml and log.txt; --overwrite removes an earlier evaluation's.
EVALUATION_OUTPUTS = (FINAL_METRICS_FILE, PREDICTIONS_DIR, PER_CLASS_DIR, CONFUSION_DIR)


def evaluation_config(run_config: dict, config_path, overrides, method_options: Optional[dict] = None) -> dict:
    """The checkpoint's run config, updated by the user's file and overrides (validated).

    A setting evaluation cannot apply is refused rather than ignored: a training-only key (optimiser,
    shots, batch size...) or a method option, when it differs from what the checkpoint was trained with.
    """
    base = merge(copy.deepcopy(DEFAULTS), run_config or {}, "checkpoint run config", strict=False)
    update: dict = {}
    if config_path:
        update = merge(update, load_yaml_with_bases(config_path), str(config_path), strict=False)
    update = merge(update, parse_overrides(overrides), "command line", strict=False)
    merge(copy.deepcopy(DEFAULTS), update, str(config_path or "command line"))  # raises on unknown keys
    trained = flatten(base)
    trained.update({f"method.{k}": v for k, v in (method_options or {}).items()})
    for key, value in flatten(update).items():
        spec = SCHEMA.get(key)
        training_only = spec is not None and spec.training_only
        if ((training_only or (key.startswith("method.") and key != "method.name")) and key in trained
                and value != trained[key]):
            why = ("it only affects training" if training_only
                   else "the prompts were trained with the checkpoint's value")
            raise ConfigError(
                f"evaluate cannot apply {key}={show_value(value)}: {why} "
                f"(the checkpoint has {key}={show_value(trained[key])}). "
                f"Drop it, or train a new run with it."
            )
    return merge(base, update, "evaluation config", strict=False)


def training_files(folder: Path) -> list[str]:
    """The files of a training run in ``folder`` (its checkpoint, splits, metrics), empty when it holds none."""
    found = [name for name in TRAINING_FILES if (folder / name).exists()]
    metrics = _read_metrics(folder)
    if metrics is not None and "checkpoint" not in metrics:  # an evaluation's metrics.json names its checkpoint
        found.append(FINAL_METRICS_FILE)
    return found


def _read_metrics(folder: Path):
    try:
        return json.loads((folder / FINAL_METRICS_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def check_evaluation_output(output: Path, overwrite: bool = False) -> None:
    """Evaluate writes into a new folder, an unfinished evaluation's, or (``--overwrite``) a finished
    evaluation's; never into a training run's folder or its checkpoint, whose files it would replace."""
    check_output_folder(output, "--output")
    for folder in (output, *output.parents):
        found = training_files(folder)
        if found and folder == output:
            raise ConfigError(
                f"--output {output} holds a training run ({', '.join(found)}); evaluate never writes into a run's "
                "folder. Leave out --output (the evaluation goes to RUN/eval_<dataset>_<time>/) or choose a new folder."
            )
        if found and folder != output and output.relative_to(folder).parts[0] in TRAINING_FILES:
            raise ConfigError(f"--output {output} is inside the run {folder}'s {output.relative_to(folder).parts[0]}; "
                              "choose a new folder, e.g. the default RUN/eval_<dataset>_<time>/.")
    earlier = _read_metrics(output)
    if earlier is not None and not overwrite:
        raise ConfigError(
            f"--output {output} holds a finished evaluation (of {earlier.get('checkpoint')}); "
            "pass --overwrite to replace it, or choose another --output."
        )


def _remove_earlier_evaluation(output: Path) -> None:
    """``--overwrite``: an earlier evaluation's results go first, so none of them is left beside the new ones."""
    for name in EVALUATION_OUTPUTS:
        path = output / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()


def default_output(checkpoint_path: Path, cfg: dict) -> Path:
    """Beside the training's files, in a folder of its own: ``<run>/eval_<dataset>_<time>`` (``_2``... when
    another evaluation started in the same second)."""
    folder = (checkpoint_path.parent
              / f"{EVALUATION_DIR_PREFIX}{cfg['data']['dataset']}_{time.strftime('%Y%m%d-%H%M%S')}")
    taken = [folder] + [folder.with_name(f"{folder.name}_{n}") for n in range(2, 100)]
    return next((candidate for candidate in taken if not candidate.exists()), taken[-1])


def evaluate_checkpoint(checkpoint, config_path=None, overrides=(), output=None,
                        overwrite: bool = False) -> tuple[dict, Path]:
    """Evaluate ``checkpoint`` with the run's config updated by ``config_path`` and ``overrides``; writes
    ``config.yaml`` and ``metrics.json`` in ``output`` (default: ``<run>/eval_<dataset>_<time>``) and
    returns the metrics and that folder. ``output`` is checked first (``check_evaluation_output``)."""
    started = time.time()
    if output is not None:
        check_evaluation_output(Path(output), overwrite)
    ckpt_config, tensors, ckpt_path = read_checkpoint(checkpoint)
    cfg = evaluation_config(ckpt_config.get("run_config", {}), config_path, overrides, ckpt_config["method_options"])
    check_compatible(ckpt_config, cfg["method"]["name"], normalize_model_name(cfg["model"]["backbone"]), ckpt_path)
    apply_checkpoint_settings(cfg, ckpt_config)  # evaluate the checkpoint's model, on the weights it was trained with
    check_run_config(cfg)

    if output is None:
        output = default_output(ckpt_path, cfg)
    output = Path(output)
    with RunFolder(output, overwrite=True) as folder:
        if overwrite:
            _remove_earlier_evaluation(output)
        device = resolve_device(cfg["train"]["device"])
        precision = resolve_precision(cfg["train"]["precision"], device)
        splits = build_protocol(cfg["data"], int(cfg["train"]["seed"]))
        # Before the model is built: prompts learned per class are refused for other classes, not mis-scored.
        check_checkpoint_classes(ckpt_path, ckpt_config, tensors, run_classnames(ckpt_path)[0], splits.eval,
                                 splits.dataset.name)
        semantic = resolve_semantics(cfg, splits.dataset)
        first_classes = next(iter(splits.eval.values()))[1]
        model = build_run_model(cfg, first_classes, device, semantic, dataset_name=splits.dataset.name)
        model.load_adapter_state(tensors, source=str(ckpt_path))
        dump_config(cfg, output / CONFIG_FILE)
        folder.started = True
        metrics = evaluate_subsets(model, splits, cfg, device, precision, semantic, output=output)
        metrics.update({
            "checkpoint": str(ckpt_path),
            "method": model.variant_name,
            "backbone": model.clip.name,
            "pretrained": model.clip.pretrained is not None,
            "dataset": splits.dataset.name,
            "protocol": cfg["data"]["protocol"],
            "seed": int(cfg["train"]["seed"]),
            "semantic_source": semantic.source,
            "wall_time_s": round(time.time() - started, 2),
            "peak_memory_mb": round(peak_memory_mb(device), 1),
        })
        atomic_write_json(output / FINAL_METRICS_FILE, metrics)
    return metrics, output
