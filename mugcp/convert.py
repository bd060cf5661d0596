"""``python -m mugcp.convert --method NAME --backbone MODEL DASSL_FILE --out DIR [--option KEY=VALUE ...]``

Turns a checkpoint published with a baseline's released code (a Dassl file: ``model.pth.tar-N`` or
``model-best.pth.tar``, a torch-pickled dict with ``state_dict``, ``epoch``, ``optimizer``, ...) into
this library's checkpoint folder (``adapter_config.json`` + ``adapter_model.safetensors``), which
``python -m mugcp.evaluate --checkpoint DIR`` then evaluates. Prompt counts and depths are read from
the tensor shapes; options the file cannot tell (``ctx_init``, which decides the fixed words of the
class texts, ``class_token_position``) come from the method's published config unless ``--option``
sets them. The released buffers ``token_prefix`` / ``token_suffix`` (class-name embeddings) and any
frozen CLIP weights in the file are dropped: the CLIP weights are the ones ``--pretrained`` names.
A file that is not a Dassl checkpoint of the method is refused, naming the keys that do not fit.
"""
from __future__ import annotations

import argparse
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

from mugcp.config import ConfigError, load_config, parse_value

log = logging.getLogger("mugcp.convert")

# Keys of the released prompt learners that hold no trained prompt: class-name embeddings, and
# KgCoOp's meta_net / bias_vectors, which its released code builds but never trains or uses.
DROPPED = {
    "coop": ("token_prefix", "token_suffix"),
    "cocoop": ("token_prefix", "token_suffix"),
    "kgcoop": ("token_prefix", "token_suffix", "bias_vectors", "meta_net.linear1.weight", "meta_net.linear1.bias"),
    "ivlp": ("token_prefix", "token_suffix"),
    "maple": ("token_prefix", "token_suffix"),
    "promptsrc": ("token_prefix", "token_suffix"),
}
# MaPLe / IVLP / PromptSRC register the whole model with Dassl, so their files also carry the frozen
# CLIP towers (``image_encoder.*``, ``text_encoder.*``, ``logit_scale``; PromptSRC's zero-shot copy).
FROZEN_PREFIXES = {
    "ivlp": ("image_encoder.", "text_encoder.", "logit_scale"),
    "maple": ("image_encoder.", "text_encoder.", "logit_scale"),
    "promptsrc": ("image_encoder.", "text_encoder.", "logit_scale", "prompt_learner.ZS_image_encoder."),
}


@dataclass
class Mapping:
    """Our tensor names for the released ones, and the method options the shapes imply."""

    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    options: dict = field(default_factory=dict)
    used: set[str] = field(default_factory=set)


def _take(state: dict, mapping: Mapping, released: str, ours: str) -> torch.Tensor:
    tensor = state[released]
    mapping.tensors[ours] = tensor.detach().float().contiguous()
    mapping.used.add(released)
    return tensor


def _indexed(state: dict, pattern: str) -> dict[int, str]:
    """``{index: key}`` for keys matching ``pattern`` (one ``(\\d+)`` group)."""
    found = {}
    for key in state:
        match = re.fullmatch(pattern, key)
        if match:
            found[int(match.group(1))] = key
    return found


def _consecutive(found: dict[int, str], first: int, what: str) -> list[str]:
    expected = list(range(first, first + len(found)))
    if sorted(found) != expected:
        raise ConfigError(f"{what} exist for layers {sorted(found)}, expected consecutive layers from {first}; the file is incomplete.")
    return [found[i] for i in expected]


def _require(state: dict, keys: list[str]) -> None:
    missing = [key for key in keys if key not in state]
    if missing:
        raise ConfigError(f"missing {missing}")


def map_coop(state: dict, embed_dim: int) -> Mapping:
    _require(state, ["ctx"])
    mapping = Mapping()
    ctx = _take(state, mapping, "ctx", "ctx")
    mapping.options = {"n_ctx": ctx.shape[-2], "class_specific": ctx.dim() == 3}
    return mapping


def map_kgcoop(state: dict, embed_dim: int) -> Mapping:
    mapping = map_coop(state, embed_dim)
    mapping.options.pop("class_specific")
    if state["ctx"].dim() != 2:
        raise ConfigError(f"ctx has shape {tuple(state['ctx'].shape)}; KgCoOp learns one shared context (n_ctx, width).")
    return mapping


def map_cocoop(state: dict, embed_dim: int) -> Mapping:
    keys = ["ctx", "meta_net.linear1.weight", "meta_net.linear1.bias", "meta_net.linear2.weight", "meta_net.linear2.bias"]
    _require(state, keys)
    mapping = Mapping()
    ctx = _take(state, mapping, "ctx", "ctx")
    for released, ours in (("linear1", "0"), ("linear2", "2")):
        for kind in ("weight", "bias"):
            _take(state, mapping, f"meta_net.{released}.{kind}", f"meta_net.{ours}.{kind}")
    hidden = state["meta_net.linear1.weight"].shape[0]
    reduction = max(1, embed_dim // max(hidden, 1))
    if embed_dim // reduction != hidden:
        raise ConfigError(f"meta_net.linear1 has {hidden} hidden units, which no meta_reduction gives for a {embed_dim}-wide image feature.")
    mapping.options = {"n_ctx": ctx.shape[0], "meta_reduction": reduction}
    return mapping


def map_ivlp(state: dict, embed_dim: int) -> Mapping:
    _require(state, ["prompt_learner.ctx"])
    mapping = Mapping()
    ctx = _take(state, mapping, "prompt_learner.ctx", "text_prompts.layers.0")
    text = _consecutive(_indexed(state, r"text_encoder\.transformer\.resblocks\.(\d+)\.VPT_shallow"), 1, "text VPT_shallow prompts")
    for layer, key in enumerate(text, start=1):
        _take(state, mapping, key, f"text_prompts.layers.{layer}")
    mapping.options = {"n_ctx_text": ctx.shape[0], "text_depth": 1 + len(text), "vision_depth": 0}
    vision = _indexed(state, r"image_encoder\.transformer\.resblocks\.(\d+)\.VPT_shallow")
    if "image_encoder.VPT" in state:  # released vision depth 0 has no vision prompt at all
        first = _take(state, mapping, "image_encoder.VPT", "vision_prompts.layers.0")
        for layer, key in enumerate(_consecutive(vision, 1, "vision VPT_shallow prompts"), start=1):
            _take(state, mapping, key, f"vision_prompts.layers.{layer}")
        mapping.options.update({"n_ctx_vision": first.shape[0], "vision_depth": 1 + len(vision)})
    elif vision:
        raise ConfigError("has deep vision prompts (image_encoder.transformer.resblocks.N.VPT_shallow) but no first-layer image_encoder.VPT")
    return mapping


def map_maple(state: dict, embed_dim: int) -> Mapping:
    _require(state, ["prompt_learner.ctx", "prompt_learner.proj.weight", "prompt_learner.proj.bias"])
    mapping = Mapping()
    ctx = _take(state, mapping, "prompt_learner.ctx", "text_prompts.layers.0")
    for kind in ("weight", "bias"):
        _take(state, mapping, f"prompt_learner.proj.{kind}", f"coupling.0.{kind}")
    deeper = _consecutive(_indexed(state, r"prompt_learner\.compound_prompts_text\.(\d+)"), 0, "compound_prompts_text")
    for index, key in enumerate(deeper):
        _take(state, mapping, key, f"text_prompts.layers.{index + 1}")
        for kind in ("weight", "bias"):
            released = f"prompt_learner.compound_prompt_projections.{index}.{kind}"
            if released not in state:
                raise ConfigError(f"missing ['{released}'] (one projection per compound prompt)")
            _take(state, mapping, released, f"coupling.{index + 1}.{kind}")
    mapping.options = {"n_ctx": ctx.shape[0], "depth": 1 + len(deeper)}
    return mapping


MAPPERS: dict[str, Callable[[dict, int], Mapping]] = {
    "coop": map_coop,
    "cocoop": map_cocoop,
    "kgcoop": map_kgcoop,
    "ivlp": map_ivlp,
    "maple": map_maple,
    "promptsrc": map_ivlp,
}


# ----------------------------------------------------------------- reading a Dassl file
def _stand_in(name: str) -> type:
    """An inert class standing for ``module.Qualified`` (e.g. Dassl's scheduler): never runs its code."""
    module, _, qualname = name.rpartition(".")

    def init(self, *args, **kwargs):
        self.args = args

    return type(qualname, (), {"__module__": module, "__qualname__": qualname, "__init__": init, "__setstate__": lambda self, state: None})


def read_dassl_file(path: Path) -> dict:
    """The pickled dict, read with ``torch.load(weights_only=True)``. Objects of other classes in it
    (Dassl's learning-rate schedulers) are read as inert stand-ins, so no code from the file runs."""
    if not path.is_file():
        raise ConfigError(f"Dassl checkpoint not found: {path}. Pass a model.pth.tar-N or model-best.pth.tar file.")
    try:
        unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except Exception as err:
        raise ConfigError(f"{path} is not a torch checkpoint ({type(err).__name__}: {err}); expected a Dassl model.pth.tar-N file.") from None
    stand_ins = [_stand_in(name) for name in unsafe]
    if stand_ins:
        log.debug("reading %d non-tensor object types as inert stand-ins: %s", len(unsafe), ", ".join(unsafe))
    try:
        with torch.serialization.safe_globals(stand_ins):
            content = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:
        raise ConfigError(f"cannot read {path} as a weights-only torch checkpoint: {err}") from None
    if not isinstance(content, dict) or not isinstance(content.get("state_dict"), dict):
        found = sorted(content)[:8] if isinstance(content, dict) else type(content).__name__
        raise ConfigError(f"{path} is not a Dassl checkpoint: expected a dict with 'state_dict' (and 'epoch', 'optimizer'), found {found}.")
    return content


def released_state(content: dict) -> dict[str, torch.Tensor]:
    state = {}
    for key, value in content["state_dict"].items():
        key = key[len("module."):] if key.startswith("module.") else key
        state[key] = value
    return state


def split_state(method: str, state: dict[str, torch.Tensor], embed_dim: int, path: Path) -> tuple[Mapping, list[str]]:
    """Map the released tensors; everything else must be a known dropped or frozen key."""
    # The CoOp-family prompt learner is registered on its own (keys "ctx"...), the others inside
    # the whole model ("prompt_learner.ctx"); accept either spelling of the prompt learner's keys.
    if method in ("coop", "cocoop", "kgcoop"):
        state = {key.removeprefix("prompt_learner."): value for key, value in state.items()}
    else:
        state = {key if key.startswith(("prompt_learner.", "image_encoder.", "text_encoder.", "logit_scale")) else f"prompt_learner.{key}": value
                 for key, value in state.items()}
    non_tensors = sorted(key for key, value in state.items() if not isinstance(value, torch.Tensor))
    if non_tensors:
        raise ConfigError(f"{path}: state_dict entries {non_tensors[:5]} are not tensors; is this a Dassl checkpoint?")
    try:
        mapping = MAPPERS[method](state, embed_dim)
    except ConfigError as err:
        raise ConfigError(f"{path} is not a released {method} checkpoint: {err}. Its state_dict keys: {sorted(state)[:12]}.") from None
    dropped = {key for key in state if key.removeprefix("prompt_learner.") in DROPPED[method]}
    frozen = {key for key in state if key.startswith(FROZEN_PREFIXES.get(method, ())) and key not in mapping.used}
    unfit = sorted(set(state) - mapping.used - dropped - frozen)
    if method in FROZEN_PREFIXES:
        unfit += sorted(key for key in frozen if "VPT" in key or "compound" in key)  # prompts of another method
    if unfit:
        raise ConfigError(
            f"{path} is not a released {method} checkpoint: keys that do not fit {method}: {unfit[:8]}"
            f"{f' (+{len(unfit) - 8} more)' if len(unfit) > 8 else ''}. Pick the --method the file was trained with."
        )
    return mapping, sorted(dropped | frozen)


# ----------------------------------------------------------------- command line
def parse_options(items: list[str]) -> dict:
    options = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--option '{item}' must look like KEY=VALUE (e.g. ctx_init='a photo of a').")
        key, text = item.split("=", 1)
        options[key.strip()] = parse_value(text)
    return options


def convert(method: str, backbone: str, source: Path, out: Path, pretrained: str = "openai", options: Optional[dict] = None) -> tuple[Path, list[str]]:
    """Write our checkpoint folder for a released Dassl checkpoint; returns the folder and the released
    keys left out (class-name buffers, frozen CLIP weights)."""
    from mugcp.backbones import load_clip, normalize_model_name
    from mugcp.engine.checkpoint import save_checkpoint
    from mugcp.methods import create_model, resolve_options

    if method not in MAPPERS:
        raise ConfigError(f"--method '{method}' has no released checkpoints to convert; choose one of {', '.join(sorted(MAPPERS))}.")
    content = read_dassl_file(source)
    backbone = normalize_model_name(backbone)
    clip = load_clip(backbone, pretrained=None)  # only the architecture matters: no weights are read or written
    mapping, ignored = split_state(method, released_state(content), clip.embed_dim, source)
    given = dict(options or {})
    clashes = {key: (given[key], value) for key, value in mapping.options.items() if key in given and given[key] != value}
    if clashes:
        raise ConfigError(f"--option values contradict the tensor shapes in {source}: " + ", ".join(f"{k}={a} (file: {b})" for k, (a, b) in clashes.items()))
    cfg = load_config(f"methods/{method}")
    method_options = resolve_options(method, {**{k: v for k, v in cfg["method"].items() if k != "name"}, **given, **mapping.options}, "convert --option")
    torch.manual_seed(0)
    # Checkpoints hold no class names; a class-specific CoOp context needs one name per class row.
    count = mapping.tensors["ctx"].shape[0] if method == "coop" and mapping.options.get("class_specific") else 2
    placeholder_classes = [f"class {i}" for i in range(count)]
    try:
        model = create_model(method, placeholder_classes, backbone=clip, **method_options)
        model.load_adapter_state(mapping.tensors, source=str(source))
    except ValueError as err:
        raise ConfigError(f"{source} does not fit {method} on {backbone}: {err}") from None
    cfg["model"].update({"backbone": backbone, "pretrained": pretrained})
    cfg["method"] = {"name": method, **method_options}
    extra = {
        "pretrained": pretrained,
        "converted_from": {"file": str(source), "epoch": content.get("epoch"), "released_keys": sorted(mapping.used)},
    }
    return save_checkpoint(out, model, cfg, extra=extra), ignored


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mugcp.convert", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dassl_file", type=Path, help="released checkpoint, e.g. output/.../MultiModalPromptLearner/model.pth.tar-5")
    parser.add_argument("--method", required=True, help="coop, cocoop, kgcoop, ivlp, maple or promptsrc")
    parser.add_argument("--backbone", required=True, help="open_clip model the prompts were trained on, e.g. ViT-B-16")
    parser.add_argument("--pretrained", default="openai", help="CLIP weights to evaluate with (recorded in the checkpoint; default openai)")
    parser.add_argument("--out", required=True, type=Path, help="checkpoint folder to write")
    parser.add_argument("--option", action="append", default=[], metavar="KEY=VALUE", help="method option the file cannot tell, e.g. ctx_init='a photo of a'")
    args = parser.parse_args(argv)
    folder, ignored = convert(args.method, args.backbone, args.dassl_file, args.out, args.pretrained, parse_options(args.option))
    if ignored:
        print(f"left out {len(ignored)} released tensors that hold no prompt (class-name buffers, frozen CLIP weights), e.g. {', '.join(ignored[:3])}")
    print(f"wrote {folder} ({args.method}, {args.backbone}); evaluate with: python -m mugcp.evaluate --checkpoint {folder} data.dataset=...")
    return 0


if __name__ == "__main__":
    from mugcp.cli import run_cli

    run_cli(main)
