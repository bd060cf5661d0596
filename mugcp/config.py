"""Run configuration: YAML files merged over built-in defaults, with dotted command-line overrides.

Every component receives only its own section (``cfg["data"]``, ``cfg["optim"]``...), never the
whole tree. Unknown keys are errors that name the key, the file and close matches, because a
mistyped hyperparameter that is silently ignored costs a whole training run.
"""
from __future__ import annotations

import copy
import difflib
import functools
import logging
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

from mugcp.errors import UserError


def _config_dir() -> Path:
    """The shipped configs: ``mugcp/configs`` in an installed wheel (package data), else the checkout's
    top-level ``configs/``, where they are edited (a source checkout or an editable install)."""
    package = Path(__file__).resolve().parent
    installed = package / "configs"
    return installed if installed.is_dir() else package.parent / "configs"


CONFIG_DIR = _config_dir()


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads ``1e-3`` as a string; learning rates are written that way, so read them as floats."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def yaml_load(text: str):
    return yaml.load(text, Loader=_Loader)


class ConfigError(UserError, ValueError):
    """A configuration problem a user can fix; the message says what and where."""


# Method-specific options live under ``method`` and are validated against the method's own
# defaults (see ``mugcp.methods.registry``), so they are not listed here.
DEFAULTS: dict[str, Any] = {
    "model": {
        "backbone": "ViT-B-32",
        "pretrained": "auto",
        "attention": "sdpa",
        "kernels": "reference",
        "quick_gelu": "auto",  # auto | true | false: the MLP activation (OpenAI's CLIP weights need QuickGELU)
        # Text encoder: length buckets + EOT-only last block + budgeted chunks (exact); false: one pass cut
        # at the batch's last EOT (the path before issue 9).
        "text_bucketing": True,
    },
    "method": {"name": "coop"},
    "data": {
        "dataset": "fashion_mnist",
        "root": None,
        "protocol": "base2new",
        "shots": 16,
        "seed": None,
        "train_classes": "base",
        "eval_subsets": ["base", "new"],
        "eval_split": "test",
        "max_eval_per_class": None,
        "compare_zeroshot": False,  # per-class zero-shot accuracy of the same backbone beside the run's own (issue 17)
        "batch_size": 4,
        "eval_batch_size": 64,
        "num_workers": 0,
        "augment": True,
        "on_bad_image": "error",
        # Images with more pixels are unreadable (a guard against decompression bombs); null: PIL's
        # Image.MAX_IMAGE_PIXELS.
        "max_image_pixels": None,
        "image_size": None,
        # Datasets without a val split (imagefolder, manifest, fashion_mnist) carve one from train,
        # with a seed of their own so every run's few shots come from the same train pool.
        "val_fraction": 0.2,
        "val_seed": 0,
        # A class with fewer than data.shots training images: keep (as it is, no draw: Dassl's rule) or pad
        # (all its images, then random repeats up to data.shots).
        "fewshot_short_classes": "keep",
        # The released code's few-shot cache (CoOp's split_fewshot/shot_K-seed_S.pkl): auto uses it when the
        # dataset folder holds it, none never, or a path to one such file.
        "fewshot_file": "auto",
    },
    "semantic": {
        "source": "auto",
        "cache": None,
    },
    "optim": {
        "name": "sgd",
        "lr": 0.002,
        "momentum": 0.9,
        "weight_decay": 0.0005,
        "betas": [0.9, 0.999],
        "eps": 1.0e-8,  # adam / adamw (TCP's released runs: 1e-3, for their fp16 parameters)
        "epochs": 5,
        "max_steps": None,
        # released: Dassl's schedule as the released trainers use it (constant warm-up epochs, then one rate per
        # epoch on a cosine over optim.epochs); cosine_per_step: a cosine over the steps after warm-up; constant.
        "scheduler": "released",
        "warmup_epochs": 1,
        "warmup_lr": 1.0e-5,
        "grad_clip": None,
    },
    "train": {
        "seed": 1,
        "device": "auto",
        "precision": "auto",
        "log_every": 10,
        "tensorboard": True,
        "deterministic": True,
        "progress": True,
        # Memory budget (MiB) of the text encoder's (image, class) sequences in training and evaluation;
        # "auto": a sixth of the memory free at the first text pass. Chunks over it are recomputed in backward.
        "text_memory_mb": "auto",
    },
}

FREE_FORM_SECTIONS = {"method"}


def _close(key: str, options: Iterable[str]) -> str:
    matches = difflib.get_close_matches(key, list(options), n=3, cutoff=0.5)
    return f" Did you mean: {', '.join(matches)}?" if matches else ""


def merge(base: dict, update: Mapping, source: str, path: str = "", strict: bool = True) -> dict:
    """Recursively merge ``update`` into a copy of ``base``; unknown keys raise ConfigError."""
    out = copy.deepcopy(base)
    for key, value in update.items():
        dotted = f"{path}{key}"
        if key not in out:
            if strict and path.rstrip(".") not in FREE_FORM_SECTIONS:
                raise ConfigError(
                    f"{source}: unknown config key '{dotted}'.{_close(key, out)} "
                    f"Valid keys here: {', '.join(sorted(out))}."
                )
            out[key] = copy.deepcopy(value)
        elif isinstance(out[key], dict) and isinstance(value, Mapping):
            out[key] = merge(out[key], value, source, dotted + ".", strict)
        elif isinstance(out[key], dict) and not isinstance(value, Mapping):
            raise ConfigError(f"{source}: '{dotted}' is a section and needs a mapping, got {value!r}.")
        else:
            out[key] = copy.deepcopy(_renamed(dotted, value, source) if isinstance(value, str) else value)
    return out


def _renamed(dotted: str, value: str, source: str) -> str:
    """``value``, or its current name (RENAMED_VALUES); a rename is said once per process, not once per merge."""
    new = RENAMED_VALUES.get((dotted, value))
    if new is None:
        return value
    if (dotted, value) not in _RENAMES_SAID:
        _RENAMES_SAID.add((dotted, value))
        logging.getLogger("mugcp").warning("%s=%s (%s) is the old name of %s=%s; %s is used.",
                                           dotted, value, source, dotted, new, new)
    return new


# Values an older release wrote that now have another name: (key, old value) -> new value. Run folders
# and checkpoints written before the released schedule became the default say `optim.scheduler:
# cosine` for what is now `cosine_per_step`; they still resume and evaluate as they were trained.
RENAMED_VALUES = {("optim.scheduler", "cosine"): "cosine_per_step"}
_RENAMES_SAID: set = set()


# Parsed files by (path, mtime, size): a sweep resolves every run's config (a thousand for the few-shot
# protocol) from the same few files, and PyYAML takes milliseconds per file.
_PARSED: dict[tuple, Any] = {}


def read_yaml(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}. Pass an existing YAML file with --config.")
    stat = path.stat()
    key = (str(path.resolve()), stat.st_mtime_ns, stat.st_size)
    if key in _PARSED:
        return copy.deepcopy(_PARSED[key])
    try:
        data = yaml_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if isinstance(data, dict):
        _PARSED[key] = copy.deepcopy(data)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(data).__name__}.")
    return data


def resolve_config_path(name: str | os.PathLike) -> Path:
    """A path as given, or a name under the project's ``configs/`` (``methods/coop`` works)."""
    path = Path(name)
    if path.exists():
        return path
    for candidate in (CONFIG_DIR / path, CONFIG_DIR / path.with_suffix(".yaml")):
        if candidate.is_file():
            return candidate
    return path


def load_yaml_with_bases(path: str | os.PathLike) -> dict:
    """Read a YAML file; a top-level ``_base_`` (path or list, relative to the file) is merged under it."""
    path = resolve_config_path(path)
    data = read_yaml(path)
    bases = data.pop("_base_", [])
    if isinstance(bases, str):
        bases = [bases]
    merged: dict = {}
    for base in bases:
        base_path = (path.parent / base) if not Path(base).is_absolute() else Path(base)
        merged = merge(merged, load_yaml_with_bases(base_path), str(base_path), strict=False)
    return merge(merged, data, str(path), strict=False)


def parse_value(text: str) -> Any:
    """Command-line values are YAML scalars: ``3``, ``1e-3``, ``true``, ``null``, ``[a, b]``."""
    return copy.deepcopy(_parse_value(text))


@functools.lru_cache(maxsize=4096)
def _parse_value(text: str) -> Any:
    try:
        return yaml_load(text)
    except yaml.YAMLError:
        return text


# A method variant is a method with a plug-in switched on, named ``<method>+<suffix>``: ``coop+dept`` is CoOp with
# ``method.dept: true``. Sweeps, recipes (configs/recipes/coop+dept/), run names and reports use the variant's name;
# a run's config records the method and the switch. Suffix -> the boolean method option it turns on.
METHOD_VARIANTS = {"dept": "dept"}
VARIANT_SEPARATOR = "+"


def split_variant(name: str) -> tuple[str, dict]:
    """``"coop+dept"`` -> ``("coop", {"dept": True})``; a plain name -> ``(name, {})``. Whether the method has the
    option is checked with its other options (``mugcp.methods.registry``)."""
    base, *suffixes = str(name).split(VARIANT_SEPARATOR)
    switches = {}
    for suffix in suffixes:
        if suffix not in METHOD_VARIANTS:
            known = ", ".join(f"{VARIANT_SEPARATOR}{s}" for s in METHOD_VARIANTS)
            raise ConfigError(f"method '{name}': unknown variant '{VARIANT_SEPARATOR}{suffix}'; variants: {known}.")
        switches[METHOD_VARIANTS[suffix]] = True
    return base, switches


def variant_name(method: str, options: Mapping) -> str:
    """The name a run of ``method`` with ``options`` is reported under: ``coop+dept`` when ``dept`` is on."""
    return method + "".join(f"{VARIANT_SEPARATOR}{suffix}" for suffix, option in METHOD_VARIANTS.items()
                            if options.get(option))


def parse_overrides(items: Iterable[str]) -> dict:
    tree: dict = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like section.key=value (e.g. optim.lr=0.01).")
        dotted, text = item.split("=", 1)
        keys = dotted.strip().split(".")
        if keys == ["method"]:
            keys = ["method", "name"]
        node = tree
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        node[keys[-1]] = parse_value(text)
        if keys == ["method", "name"] and isinstance(node["name"], str):
            node["name"], switches = split_variant(node["name"])
            node.update(switches)
    return tree


def load_config(path: str | os.PathLike | None = None, overrides: Iterable[str] = ()) -> dict:
    """Defaults ← YAML file (with ``_base_``) ← ``key=value`` overrides, validated."""
    cfg = copy.deepcopy(DEFAULTS)
    if path is not None:
        cfg = merge(cfg, load_yaml_with_bases(path), str(path))
    command_line = parse_overrides(overrides)
    requested = command_line.get("method", {}).get("name")
    if requested and requested != cfg["method"].get("name"):
        # Switching method on the command line: the file's options belong to its own method, so
        # start from the new method's published options instead.
        cfg["method"] = method_section(requested)
    return merge(cfg, command_line, "command line")


def method_section(name: str) -> dict:
    """``{"name": name}`` plus the options in ``configs/methods/<name>.yaml``, when that file exists."""
    section: dict = {"name": name}
    path = CONFIG_DIR / "methods" / f"{name}.yaml"
    if path.is_file():
        section.update(load_yaml_with_bases(path).get("method", {}))
        section["name"] = name
    return section


def config_text(cfg: Mapping) -> str:
    """A config as YAML, exactly as a run's config.yaml holds it."""
    return yaml.safe_dump(dict(cfg), sort_keys=False)


def dump_config(cfg: Mapping, path: str | os.PathLike) -> None:
    from mugcp.utils import atomic_write_text

    atomic_write_text(path, config_text(cfg))
