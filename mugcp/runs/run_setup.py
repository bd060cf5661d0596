"""Pieces shared by the train and evaluate commands: the run folder, the model, semantic features."""
from __future__ import annotations

import logging
import shutil
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from mugcp.backbones import load_clip, quick_gelu_setting
from mugcp.backbones.weights import model_name_problem, pretrained_problem
from mugcp.config import ConfigError
from mugcp.config_schema import check_values
from mugcp.data.registry import check_data_config
from mugcp.methods import create_model, get_method, resolve_options
from mugcp.runs.layout import CHECKPOINT_DIR, CONFIG_FILE, FINAL_METRICS_FILE, LOG_FILE
from mugcp.runs.run_lock import RunLock
from mugcp.runs.runtime import resolve_device

log = logging.getLogger("mugcp")


def check_run_config(cfg: dict) -> None:
    """Everything about a run's config that can be known without reading data or building a model.

    Values against the schema, the method and its options, the backbone name and its weights source
    (path or tag), the dataset name and root, the device. Raises ConfigError (one line: key, value, what is allowed).
    """
    check_values(cfg)
    resolve_options(cfg["method"]["name"], cfg["method"], source="method section")
    model_cfg = cfg["model"]
    problem = model_name_problem(model_cfg["backbone"])
    if problem:
        raise ConfigError(f"model.backbone={model_cfg['backbone']!r}: {problem}")
    problem = pretrained_problem(model_cfg["backbone"], model_cfg["pretrained"])
    if problem:
        raise ConfigError(f"model.pretrained={model_cfg['pretrained']!r}: {problem}")
    check_data_config(cfg["data"])
    resolve_device(cfg["train"]["device"])


def check_resume_folder(output: Path) -> None:
    """``--resume`` needs a run that started: its folder with the config.yaml the run wrote."""
    if not output.is_dir():
        raise ConfigError(f"--resume: run folder {output} does not exist. Pass the --output of the run to continue.")
    if not (output / CONFIG_FILE).is_file():
        raise ConfigError(
            f"--resume: {output} holds no run (no {CONFIG_FILE}). Pass the --output of the run to continue, "
            "or start a new run there without --resume."
        )


class ConsoleHandler(logging.StreamHandler):
    """Log lines to whatever ``sys.stderr`` is when they are written.

    A plain ``StreamHandler`` keeps the stream it was created with; in a process that runs several
    commands (a notebook, a test session capturing output) that stream may since have been replaced
    and closed, and every later line would fail.
    """

    def __init__(self):
        super().__init__(sys.stderr)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):  # logging.StreamHandler.__init__ assigns it; the property always reads sys.stderr
        pass


def check_output_free(output: Path, resume: bool, overwrite: bool = False) -> None:
    """A new run (neither --resume nor --overwrite) never lands on a folder that holds one."""
    holds_run = any((output / name).exists() for name in (CHECKPOINT_DIR, FINAL_METRICS_FILE))
    if output.exists() and not resume and not overwrite and holds_run:
        raise ConfigError(
            f"output folder {output} already holds a run. Pass --resume to continue it, --overwrite to replace it, "
            "or choose another --output."
        )


def open_run_folder(output: Path, resume: bool, overwrite: bool = False) -> logging.Handler:
    """Create the run folder and send the ``mugcp`` log there (``log.txt``) as well as to the console."""
    check_output_free(output, resume, overwrite)
    output.mkdir(parents=True, exist_ok=True)
    logger = logging.getLogger("mugcp")
    logger.setLevel(logging.INFO)
    logger.propagate = False  # the console handler below already prints; avoid doubled lines via the root logger
    if not any(isinstance(h, ConsoleHandler) for h in logger.handlers):
        console = ConsoleHandler()
        console.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(console)
    handler = logging.FileHandler(output / LOG_FILE, mode="a" if resume else "w", encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    logger.addHandler(handler)
    return handler


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C (or a stop signal) during a run; the message says what was kept (the command-line tools
    print it and exit with ``exit_code``: 130 for Ctrl-C, 128 + the signal's number for others)."""

    def __init__(self, message: str, exit_code: int = 130):
        super().__init__(message)
        self.exit_code = exit_code


class RunFolder:
    """A run's output folder and its ``log.txt``, from opening to a clean or a failed end.

    The main process holds the folder's ``RunLock`` throughout: a second process is refused
    (``RunFolderBusy``, naming the holder's pid) before it touches anything.
    A run has *started* once it has written ``config.yaml`` (its data read, its model built; the
    caller sets ``started``). A run that fails or is interrupted before that removes the folder if it
    created it, so mistakes leave no litter. After that the folder stays, with the last checkpoint,
    and the error with its traceback goes to the end of ``log.txt`` while the console gets one line
    saying so; ``note()`` (if given) adds what can be done next, e.g. how to resume.
    """

    def __init__(self, output: Path, resume: bool = False, overwrite: bool = False, main: bool = True,
                 note: Optional[Callable[[], str]] = None, replace: bool = False):
        self.output = Path(output)
        self.created = not self.output.exists()
        self.started = False
        self.note = note
        self.handler = None
        # The main process owns the folder (RunLock) before it reads, clears or writes anything in it;
        # ``replace`` (train --overwrite) then empties it, which is only safe once no one else runs there.
        self.lock = RunLock(self.output) if main else None
        if self.lock is None:
            return
        self.output.mkdir(parents=True, exist_ok=True)
        self.lock.acquire()
        try:
            if replace:
                self.lock.empty_folder()
                self.created = True  # the old run is gone: a failure before the start leaves no empty folder
            self.handler = open_run_folder(self.output, resume, overwrite)
        except BaseException:
            if self.created:
                shutil.rmtree(self.output, ignore_errors=True)
            self.lock.release()
            raise

    def __enter__(self) -> RunFolder:
        return self

    def __exit__(self, kind, err, traceback) -> bool:
        try:
            if err is not None and self.handler is not None:
                self._record_failure(err)
        finally:
            self.close()
        return False

    def close(self) -> None:
        self._close_log()
        if self.lock is not None:
            self.lock.release()

    def _close_log(self) -> None:
        if self.handler is not None:
            log.removeHandler(self.handler)
            self.handler.close()
            self.handler = None

    def _record_failure(self, err: BaseException) -> None:
        interrupted = isinstance(err, KeyboardInterrupt)
        exit_code = getattr(err, "exit_code", 130)
        if not self.started and self.created:
            self._close_log()
            shutil.rmtree(self.output, ignore_errors=True)  # still holding the lock: no one can have moved in
            self.close()
            if interrupted:
                raise RunInterrupted(f"interrupted before the run started; {self.output} was removed.",
                                     exit_code) from None
            return
        # A stop signal's interrupt says how it stopped (e.g. "stopped by SIGTERM after step 3"); Ctrl-C says nothing.
        what = (str(err) or "interrupted") if interrupted else f"failed: {type(err).__name__}: {err}"
        next_step = f" {self.note()}" if self.note is not None and self.started else ""
        line = f"run {what}.{next_step} The log, with the traceback, is {self.output / LOG_FILE}."
        exc_info = (type(err), err, err.__traceback__)
        self.handler.handle(log.makeRecord(log.name, logging.ERROR, __file__, 0, line, (), exc_info))
        if interrupted:
            raise RunInterrupted(line, exit_code) from None  # its message is the console's line
        for handler in log.handlers:  # the console: one line, no traceback
            if handler is not self.handler:
                handler.handle(log.makeRecord(log.name, logging.ERROR, __file__, 0, line, (), None))


@dataclass
class SemanticContext:
    """Which semantic features a run uses and where they come from.

    ``source`` is None for methods that take no semantic input, else ``mllm`` | ``clip`` | ``none``.
    With ``mllm``, ``kind`` says whether the model reads the cache's MLLM hidden states (``hidden``) or
    its answer texts encoded by the frozen CLIP text encoder (``caption``, encoded once per run).
    """

    source: Optional[str] = None
    cache: Any = None
    kind: str = "caption"
    clip: Any = None

    @property
    def dim(self) -> Optional[int]:
        return self.cache.dim if self.source == "mllm" and self.kind == "hidden" else None

    def features_for(self, items: Sequence) -> Optional[Mapping]:
        """A key → (T, d) mapping covering ``items`` (missing keys are reported by the data loader)."""
        if self.source != "mllm":
            return None
        if self.kind == "hidden":
            return self.cache
        from mugcp.methods.mugcp_semantics import CaptionFeatures

        keys = sorted({item.key for item in items if item.key in self.cache})
        return CaptionFeatures.from_texts(self.clip, self.cache, keys=keys)



def resolve_semantics(cfg: dict, dataset=None) -> SemanticContext:
    """Resolve ``semantic.source`` (auto | mllm | clip | none) for methods that take semantic input."""
    spec = get_method(cfg["method"]["name"])
    if "semantic" not in getattr(spec.cls, "batch_inputs", ()):
        return SemanticContext()
    from mugcp.methods.mugcp_semantics import resolve_semantic_source

    cache_path = cfg["semantic"]["cache"]
    cache = None
    if cache_path:
        if Path(cache_path).exists():
            from mugcp.semantics import SemanticCache

            cache = SemanticCache(cache_path)
        elif cfg["semantic"]["source"] == "mllm":
            raise ConfigError(
                f"semantic.cache {cache_path} does not exist. Extract it first: "
                f"python -m mugcp.extract --config YOUR_CONFIG --mllm MODEL --out {cache_path}"
            )
    source, warning = resolve_semantic_source(cfg["semantic"], cache)
    if warning:
        log.warning(warning)
    kind = cfg["method"].get("semantic_features", spec.defaults.get("semantic_features", "caption"))
    return SemanticContext(source=source, cache=cache if source == "mllm" else None, kind=kind)


def resolved_run_config(cfg: dict, semantic: SemanticContext) -> dict:
    """The config a run writes to its config.yaml: ``cfg`` with ``semantic.source`` as resolved."""
    return dict(cfg, semantic=dict(cfg["semantic"], source=semantic.source))


def run_config_text(cfg: dict) -> str:
    """What a training run with ``cfg`` would write to its config.yaml, found without reading data or writing files."""
    from mugcp.config import config_text

    check_run_config(cfg)
    return config_text(resolved_run_config(cfg, resolve_semantics(cfg)))


def method_options(cfg: dict, semantic: SemanticContext) -> dict:
    options = {k: v for k, v in cfg["method"].items() if k != "name"}
    if semantic.source is not None:
        options["semantic_source"] = semantic.source
        if semantic.dim is not None:
            options["semantic_dim"] = semantic.dim
    return options


def configure_text_path(clip, bucketing: bool, memory_mb) -> None:
    """Apply ``model.text_bucketing`` and ``train.text_memory_mb`` (their values checked by the schema) to the
    backbone."""
    clip.text_bucketing = bool(bucketing)
    clip.text_memory_mb = None if memory_mb in (None, "auto") else float(memory_mb)


def build_run_model(cfg: dict, classnames: Sequence[str], device: torch.device, semantic: SemanticContext,
                    dataset_name: Optional[str] = None):
    model_cfg = cfg["model"]
    clip = load_clip(
        model_cfg["backbone"], pretrained=model_cfg["pretrained"], device=device, attention=model_cfg["attention"],
        quick_gelu=quick_gelu_setting(model_cfg["quick_gelu"]),
    )
    configure_text_path(clip, model_cfg["text_bucketing"], cfg["train"]["text_memory_mb"])
    semantic.clip = clip
    return create_model(
        cfg["method"]["name"], classnames, backbone=clip, attention=model_cfg["attention"],
        kernels=model_cfg["kernels"], dataset=dataset_name, **method_options(cfg, semantic),
    )
