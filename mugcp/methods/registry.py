"""The method registry: a name → class table, filled by ``@register_method`` in each method module.

Modules under ``mugcp/methods/`` are imported on first use, so adding a file that registers a method
is all it takes to make ``create_model("name", ...)`` and ``method=name`` work.
"""
from __future__ import annotations

import copy
import difflib
import importlib
import pkgutil
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

from mugcp.config import ConfigError
from mugcp.config_schema import Spec, boolean, integer, invalid, number, show_value, text


@dataclass
class MethodSpec:
    name: str
    cls: type
    defaults: dict
    paper: str = ""
    conditions_on: str = ""
    config: str = ""  # file under configs/methods/ with the published defaults
    # Option name -> Spec, for options whose type the default does not tell (see option_spec).
    option_specs: dict = field(default_factory=dict)
    # How the released code's checkpoints name this method's tensors (methods/released.py); None: no released checkpoints.
    released: Any = None


_REGISTRY: dict[str, MethodSpec] = {}
_DISCOVERED = False


def register_method(name: str, defaults: dict, paper: str = "", conditions_on: str = "", config: str = "", option_specs: Optional[dict] = None,
                    released=None):
    def decorate(cls):
        if name in _REGISTRY and _REGISTRY[name].cls is not cls:
            raise ValueError(f"method '{name}' is registered twice ({_REGISTRY[name].cls.__module__} and {cls.__module__}).")
        cls.method_name = name
        cls.default_options = copy.deepcopy(defaults)
        _REGISTRY[name] = MethodSpec(name, cls, copy.deepcopy(defaults), paper, conditions_on, config, dict(option_specs or {}), released)
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


def get_method(name: str) -> MethodSpec:
    _discover()
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=3)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise ConfigError(f"unknown method '{name}'.{hint} Available: {', '.join(sorted(_REGISTRY))}.")
    return _REGISTRY[name]


def resolve_options(name: str, overrides: dict, source: str = "method options") -> dict:
    """The method's defaults updated by ``overrides``; an unknown option names close matches."""
    spec = get_method(name)
    options = copy.deepcopy(spec.defaults)
    for key, value in overrides.items():
        if key == "name":
            continue
        if key not in options:
            close = difflib.get_close_matches(key, list(options), n=3, cutoff=0.5)
            hint = f" Did you mean: {', '.join(close)}?" if close else ""
            raise ConfigError(
                f"{source}: method '{name}' has no option '{key}'.{hint} Its options: {', '.join(sorted(options)) or 'none'}."
            )
        check_option(spec, key, value)
        options[key] = copy.deepcopy(value)
    return options


def option_spec(spec: MethodSpec, key: str) -> Optional[Spec]:
    """What an option accepts: declared by the method, else the type of its default (None: anything)."""
    if key in spec.option_specs:
        return spec.option_specs[key]
    default = spec.defaults.get(key)
    if isinstance(default, bool):
        return boolean()
    if isinstance(default, int):
        return integer()
    if isinstance(default, float):
        return number()
    if isinstance(default, str):
        return text()
    if isinstance(default, (list, tuple)):
        return Spec("list")
    return None


def check_option(spec: MethodSpec, key: str, value: Any) -> None:
    """A method option of the wrong type is refused naming the option, the value and the type wanted."""
    wanted = option_spec(spec, key)
    if wanted is not None and not wanted.accepts(value):
        raise invalid(f"method.{key}", value, f"{wanted.allowed()} for method '{spec.name}'", f" The default is {show_value(spec.defaults.get(key))}.")


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
    ``overrides`` are method options (see ``mugcp.methods.get_method(name).defaults``).
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
