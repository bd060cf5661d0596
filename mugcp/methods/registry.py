"""The method registry: a name → class table, filled by ``@register_method`` in each method module.

Modules under ``mugcp/methods/`` are imported on first use, so adding a file that registers a method
is all it takes to make ``create_model("name", ...)`` and ``method=name`` work. A method declares each
option once, in ``register_method(options=...)``, with its type, range and help (``config_schema.option``);
every value a config, recipe, sweep or command line gives is checked against that before anything runs.
"""
from __future__ import annotations

import copy
import difflib
import importlib
import pkgutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Optional

from mugcp.config import METHOD_VARIANTS, VARIANT_SEPARATOR, ConfigError
from mugcp.config_schema import Option, check_against


@dataclass
class MethodSpec:
    name: str
    cls: type
    # Option name -> Option (default, type and range, one-line help): the one declaration of every option.
    options: dict
    paper: str = ""
    conditions_on: str = ""
    config: str = ""  # file under configs/methods/ with the published defaults (a test keeps it equal to ``options``)
    # How the released code's checkpoints name this method's tensors (methods/released.py); None: no released
    # checkpoints.
    released: Any = None
    # Checks options together (e.g. n_ctx against ctx_init); raises ConfigError in one line. None: no such rule.
    check: Optional[Callable[[dict], None]] = None

    @property
    def defaults(self) -> dict:
        return {key: copy.deepcopy(declared.default) for key, declared in self.options.items()}


_REGISTRY: dict[str, MethodSpec] = {}
_DISCOVERED = False


def register_method(name: str, options: Mapping[str, Option], paper: str = "", conditions_on: str = "",
                    config: str = "", released=None, check: Optional[Callable[[dict], None]] = None):
    """Register a method class under ``name`` with its declared ``options`` (``mugcp.config_schema.option``).

    ``check(options)`` (optional) refuses combinations of valid values that cannot be trained as recorded.
    """
    for key, declared in options.items():
        if not isinstance(declared, Option):
            raise TypeError(f"method '{name}': declare option '{key}' with config_schema.option(default, spec, help).")

    def decorate(cls):
        if name in _REGISTRY and _REGISTRY[name].cls is not cls:
            raise ValueError(f"method '{name}' is registered twice "
                             f"({_REGISTRY[name].cls.__module__} and {cls.__module__}).")
        spec = MethodSpec(name, cls, dict(options), paper, conditions_on, config, released, check)
        cls.method_name = name
        cls.default_options = spec.defaults
        _REGISTRY[name] = spec
        return cls

    return decorate


def _discover() -> None:
    global _DISCOVERED
    if _DISCOVERED:
        return
    import mugcp.methods as package

    for module in pkgutil.iter_modules(package.__path__):
        if module.name not in ("registry", "base") and not module.name.startswith("_"):
            importlib.import_module(f"mugcp.methods.{module.name}")
    _DISCOVERED = True


def list_methods() -> list[str]:
    _discover()
    return sorted(_REGISTRY)


def list_variants() -> list[str]:
    """Every ``<method>+<suffix>`` whose method declares the option the suffix switches on (``coop+dept``...)."""
    _discover()
    return [f"{name}{VARIANT_SEPARATOR}{suffix}" for name in sorted(_REGISTRY)
            for suffix, option in METHOD_VARIANTS.items() if option in _REGISTRY[name].options]


def get_method(name: str) -> MethodSpec:
    _discover()
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=3)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise ConfigError(f"unknown method '{name}'.{hint} Available: {', '.join(sorted(_REGISTRY))}.")
    return _REGISTRY[name]


def resolve_options(name: str, overrides: Mapping, source: str = "method options", together: bool = True) -> dict:
    """The method's defaults updated by ``overrides``, each value checked against its declaration and then (with
    ``together``) the whole set by the method's ``check``; an unknown option names close matches. Raises ConfigError
    (one line). ``together=False`` checks values one by one, for a caller that checks the complete set later."""
    spec = get_method(name)
    options = spec.defaults
    for key, value in overrides.items():
        if key == "name":
            continue
        if key not in options:
            close = difflib.get_close_matches(key, list(options), n=3, cutoff=0.5)
            hint = f" Did you mean: {', '.join(close)}?" if close else ""
            raise ConfigError(
                f"{source}: method '{name}' has no option '{key}'.{hint} "
                f"Its options: {', '.join(sorted(options)) or 'none'}."
            )
        check_option(spec, key, value)
        options[key] = copy.deepcopy(value)
    if together and spec.check is not None:
        spec.check(options)
    return options


def check_option(spec: MethodSpec, key: str, value: Any) -> None:
    """A method option of the wrong type or out of range is refused naming the option, the value and what is allowed."""
    declared = spec.options[key]
    check_against(declared.spec, f"method.{key}", value, declared.default, f"for method '{spec.name}'")


def create_model(
    method: str,
    classnames: Sequence[str],
    backbone: Any = "ViT-B-32",
    pretrained: Optional[str] = None,
    device: str = "cpu",
    attention: str = "sdpa",
    kernels: str = "reference",
    dataset: Optional[str] = None,
    quick_gelu: Optional[bool] = None,
    **overrides,
):
    """Build a prompt learner: ``create_model("coop", ["cat", "dog"], backbone="ViT-B-32")``.

    ``backbone`` is an open_clip model name or an already loaded ``ClipBackbone`` (shared, frozen).
    ``overrides`` are method options (see ``mugcp.methods.get_method(name).options``).
    ``quick_gelu`` (``None`` = auto, see ``load_clip``) applies when ``backbone`` is a name.
    The returned module's ``forward(images)`` gives logits ``(B, len(classnames))``.
    """
    from mugcp.backbones import ClipBackbone, load_clip
    from mugcp.data.classnames import validate_classnames

    spec = get_method(method)
    options = resolve_options(method, overrides)
    # Before the backbone is loaded, so a bad list fails at once; duplicates pass (see PromptLearner.set_classnames).
    classnames = validate_classnames(classnames, duplicates="allow")
    if isinstance(backbone, ClipBackbone):
        clip = backbone
        clip.attention_backend = attention
    else:
        clip = load_clip(backbone, pretrained=pretrained, device=device, attention=attention, quick_gelu=quick_gelu)
    model = spec.cls(clip, list(classnames), options, kernels=kernels, dataset=dataset)
    return model.to(clip.device)
