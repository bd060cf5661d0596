"""The type and range of every config key (``SCHEMA``), checked before a run reads data or writes files.

A wrong value found here costs a second; found after the dataset is read and the model is built it
costs minutes and leaves a half-made run folder. ``check_values(cfg)`` raises ``ConfigError`` with
one line naming the key, the value, what is allowed and the default.

Adding a config key means adding it to ``DEFAULTS`` (``mugcp.config``) and a ``Spec`` here; a test
checks that every default has one. Specs for keys absent from a config are simply not used.
Method options are declared beside each method (``Option``, ``option``) and checked against those
declarations by ``mugcp.methods.registry.resolve_options``; the names that need a registry (method,
backbone, dataset) by ``mugcp.runs.run_setup.check_run_config``.
"""
from __future__ import annotations

import difflib
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Optional

from mugcp.config import DEFAULTS, ConfigError
from mugcp.kernels import ATTENTION_BACKENDS
from mugcp.kernels import BACKENDS as KERNEL_BACKENDS

PRECISIONS = ("auto", "fp32", "amp_bf16", "amp_fp16")
PROTOCOLS = ("base2new", "fewshot", "all", "cross_dataset", "domain_generalization")
CLASS_SUBSETS = ("base", "new", "all")
OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULERS = ("released", "cosine_per_step", "constant")
SEMANTIC_SOURCES = ("auto", "mllm", "clip", "none")


@dataclass(frozen=True)
class Spec:
    """What one key accepts.

    ``kind``: ``int`` | ``number`` | ``bool`` | ``str`` | ``list`` | ``choice`` | ``any``.
    ``low``/``high`` bound numbers (``*_open`` makes the bound exclusive); ``choices`` lists the
    values of a ``choice`` (and of a list's items for ``list``); ``nullable`` admits ``null``,
    ``also`` a few literal words (``auto``); ``training_only`` marks keys that change training and nothing an
    evaluation does.
    """

    kind: str
    low: Optional[float] = None
    high: Optional[float] = None
    low_open: bool = False
    high_open: bool = False
    choices: tuple = ()
    nullable: bool = False
    null_means: str = ""
    length: Optional[int] = None
    item_kind: Optional[str] = None
    also: tuple = ()
    training_only: bool = False

    def accepts(self, value: Any) -> bool:
        if value is None:
            return self.nullable
        if isinstance(value, str) and value in self.also:
            return True
        if self.kind == "choice":
            return any(value == choice and type(value) is type(choice) for choice in self.choices)
        if self.kind == "list":
            if isinstance(value, str) and (self.choices or self.item_kind == "str"):
                value = [value]  # one name is a list of one
            if not isinstance(value, (list, tuple)) or (self.length is not None and len(value) != self.length):
                return False
            if self.choices:
                return len(value) > 0 and all(isinstance(v, str) and v in self.choices for v in value)
            return all(Spec(self.item_kind or "any", self.low, self.high, self.low_open, self.high_open).accepts(v)
                       for v in value)
        if not _has_kind(value, self.kind):
            return False
        if self.kind in ("int", "number"):
            if not math.isfinite(value):
                return False
            if self.low is not None and (value <= self.low if self.low_open else value < self.low):
                return False
            if self.high is not None and (value >= self.high if self.high_open else value > self.high):
                return False
        return True

    def allowed(self) -> str:
        if self.kind == "choice":
            text = "one of " + ", ".join(show_value(c) for c in self.choices)
        elif self.kind == "list":
            if self.choices:
                text = f"one of {', '.join(self.choices)} or a non-empty list of them"
            elif self.item_kind == "str":
                text = "a string or a list of strings"
            else:
                count = f"{self.length} " if self.length is not None else ""
                text = f"a list of {count}{_PLURAL_WORDS[self.item_kind or 'any']}{self._bounds()}"
        else:
            text = _KIND_WORDS[self.kind] + self._bounds()
        if self.also:
            text += "".join(f", {value}" for value in self.also)
        if self.nullable:
            text += f", or null{' (' + self.null_means + ')' if self.null_means else ''}"
        return text

    def _bounds(self) -> str:
        if self.low is not None and self.high is not None:
            return (f" in {'(' if self.low_open else '['}{show_value(self.low)}, "
                    f"{show_value(self.high)}{')' if self.high_open else ']'}")
        if self.low is not None:
            return f" {'>' if self.low_open else '>='} {show_value(self.low)}"
        if self.high is not None:
            return f" {'<' if self.high_open else '<='} {show_value(self.high)}"
        return ""


_KIND_WORDS = {"int": "an integer", "number": "a number", "bool": "true or false", "str": "a string", "any": "a value"}
_PLURAL_WORDS = {"int": "integers", "number": "numbers", "bool": "booleans", "str": "strings", "any": "values"}


def _has_kind(value: Any, kind: str) -> bool:
    if kind == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind == "bool":
        return isinstance(value, bool)
    if kind == "str":
        return isinstance(value, str)
    return True


def show_value(value: Any) -> str:
    """A value as it is written in YAML and on the command line."""
    if value is None:
        return "null"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(show_value(v) for v in value) + "]"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


@dataclass(frozen=True)
class Option:
    """One method option, declared once beside its method: default, what it accepts, a one-line help.

    ``register_method(name, options={"n_ctx": option(16, integer(1, 73), "...")})``; the method's
    YAML files and recipes hold values only and are checked against these declarations.
    """

    default: Any
    spec: Spec
    help: str


def option(default: Any, spec: Spec, help: str) -> Option:
    """A method option's declaration; a default its own spec refuses, or a help that is not one line, is a bug."""
    if not spec.accepts(default):
        raise ValueError(f"option default {show_value(default)} is not {spec.allowed()}.")
    if not help.strip() or "\n" in help:
        raise ValueError(f"option help must be one non-empty line, got {help!r}.")
    return Option(default, spec, help)


def with_defaults(options: Mapping[str, Option], **defaults: Any) -> dict:
    """``options`` with some defaults changed, for a method that takes another's options (KgCoOp: CoOp's)."""
    changed = dict(options)
    for key, value in defaults.items():
        changed[key] = option(value, options[key].spec, options[key].help)
    return changed


def integer(low=None, high=None, **kw) -> Spec:
    return Spec("int", low, high, **kw)


def number(low=None, high=None, **kw) -> Spec:
    return Spec("number", low, high, **kw)


def choice(*choices, **kw) -> Spec:
    return Spec("choice", choices=choices, **kw)


def boolean(**kw) -> Spec:
    return Spec("bool", **kw)


def text(**kw) -> Spec:
    return Spec("str", **kw)


SCHEMA: dict[str, Spec] = {
    # The backbone must also be one of open_clip's model configs (checked by check_run_config).
    "model.backbone": text(),
    "model.pretrained": text(nullable=True, null_means="random weights"),
    "model.attention": choice(*ATTENTION_BACKENDS),
    "model.kernels": choice(*KERNEL_BACKENDS),
    # Keys of other branches (issue 9): used once they are in DEFAULTS.
    "model.quick_gelu": choice("auto", True, False),
    "model.text_bucketing": boolean(),
    "method.name": text(),
    "data.dataset": text(),
    "data.root": text(nullable=True, null_means="the dataset's default location"),
    "data.protocol": choice(*PROTOCOLS),
    "data.shots": integer(1, nullable=True, null_means="every training image", training_only=True),
    "data.seed": integer(0, nullable=True, null_means="the run's train.seed", training_only=True),
    "data.train_classes": choice(*CLASS_SUBSETS, training_only=True),
    "data.eval_subsets": Spec("list", choices=CLASS_SUBSETS),
    "data.eval_split": choice("val", "test"),
    "data.max_eval_per_class": integer(1, nullable=True, null_means="every image"),
    "data.compare_zeroshot": boolean(),
    "data.batch_size": integer(1, training_only=True),
    "data.eval_batch_size": integer(1),
    "data.num_workers": integer(0),
    "data.augment": boolean(training_only=True),
    "data.on_bad_image": choice("error", "skip"),
    "data.max_image_pixels": integer(1, nullable=True,
                                     null_means="PIL's Image.MAX_IMAGE_PIXELS, 89,478,485 by default"),
    "data.image_size": integer(1, nullable=True, null_means="the backbone's"),
    "data.val_fraction": number(0, 1, high_open=True),
    "data.val_seed": integer(0),
    "data.fewshot_short_classes": choice("keep", "pad", training_only=True),
    # Not training_only: evaluate may set it to none where the training machine's file is absent.
    "data.fewshot_file": text(nullable=True, null_means="none"),
    "semantic.source": choice(*SEMANTIC_SOURCES, nullable=True,
                              null_means="the method takes no semantic input; runs record this"),
    "semantic.cache": text(nullable=True, null_means="no cache"),
    "optim.name": choice(*OPTIMIZERS, training_only=True),
    "optim.lr": number(0, low_open=True, training_only=True),
    "optim.momentum": number(0, 1, training_only=True),
    "optim.weight_decay": number(0, training_only=True),
    "optim.betas": Spec("list", 0, 1, high_open=True, length=2, item_kind="number", training_only=True),
    "optim.eps": number(0, low_open=True, training_only=True),
    "optim.epochs": integer(1, training_only=True),
    "optim.max_steps": integer(1, nullable=True, null_means="epochs decide", training_only=True),
    "optim.scheduler": choice(*SCHEDULERS, training_only=True),
    "optim.warmup_epochs": integer(0, training_only=True),
    "optim.warmup_lr": number(0, low_open=True, training_only=True),
    "optim.grad_clip": number(0, low_open=True, nullable=True, null_means="no clipping", training_only=True),
    "train.seed": integer(0),
    "train.device": text(),  # auto, cpu, cuda, cuda:N...: checked by resolve_device
    "train.precision": choice(*PRECISIONS),
    "train.log_every": integer(1, training_only=True),
    "train.tensorboard": boolean(training_only=True),
    "train.deterministic": boolean(training_only=True),
    "train.progress": boolean(),
    "train.text_memory_mb": number(0, low_open=True, also=("auto",), nullable=True, null_means="auto"),  # issue 9
}


def flatten(cfg: Mapping, prefix: str = "") -> dict[str, Any]:
    """``{"optim": {"lr": 1}}`` → ``{"optim.lr": 1}``; the free-form ``method`` section stays one level deep."""
    flat: dict[str, Any] = {}
    for key, value in cfg.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping) and dotted != "method":
            flat.update(flatten(value, dotted + "."))
        elif dotted == "method" and isinstance(value, Mapping):
            flat.update({f"method.{k}": v for k, v in value.items()})
        else:
            flat[dotted] = value
    return flat


def default_of(key: str) -> Any:
    section, _, name = key.partition(".")
    return DEFAULTS.get(section, {}).get(name, "(none)")


def invalid(key: str, value: Any, allowed: str, hint: str = "") -> ConfigError:
    """The one-line error for a bad value: key, value, what is allowed, then a hint."""
    return ConfigError(f"{key}={value!r} is not allowed: expected {allowed}.{hint}")


def check_value(key: str, value: Any) -> None:
    spec = SCHEMA.get(key)
    if spec is not None:
        check_against(spec, key, value, default_of(key))


def check_against(spec: Spec, key: str, value: Any, default: Any = "(none)", owner: str = "") -> None:
    """Raise the one-line ConfigError when ``spec`` refuses ``value`` (close choices, then the default, as hints);
    ``owner`` (``for method 'coop'``) follows what is allowed."""
    if spec.accepts(value):
        return
    hint = ""
    if spec.kind == "choice" and isinstance(value, str):
        close = difflib.get_close_matches(value, [c for c in spec.choices if isinstance(c, str)], n=3, cutoff=0.5)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
    if default != "(none)":
        hint += f" The default is {show_value(default)}."
    raise invalid(key, value, spec.allowed() + (f" {owner}" if owner else ""), hint)


def check_values(cfg: Mapping) -> None:
    """Every key of ``cfg`` that has a spec holds an allowed value; the first bad one raises ConfigError."""
    for key, value in flatten(cfg).items():
        if key.startswith("method.") and key != "method.name":
            continue  # the method's own options: see mugcp.methods.registry.resolve_options
        check_value(key, value)
