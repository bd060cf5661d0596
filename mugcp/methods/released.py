"""Released checkpoints' tensor names: how a method's Dassl state dict maps onto its trained tensors.

Each method that has released checkpoints declares a :class:`ReleasedNames` next to its own code
(``register_method(..., released=...)``): a function that maps the released tensors onto ours and
reads the options their shapes imply, and the released keys that hold no trained prompt. The
converter (:mod:`mugcp.runs.released_checkpoint`) is generic over these declarations.
"""
from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mugcp.config import ConfigError


@dataclass
class Mapping:
    """Our tensor names for the released ones, and the method options the shapes imply."""

    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    options: dict = field(default_factory=dict)
    used: set[str] = field(default_factory=set)

    def take(self, state: dict, released: str, ours: str) -> torch.Tensor:
        """Record ``state[released]`` as our ``ours`` (fp32, contiguous) and return the released tensor."""
        tensor = state[released]
        self.tensors[ours] = tensor.detach().float().contiguous()
        self.used.add(released)
        return tensor


@dataclass(frozen=True)
class ReleasedNames:
    """A method's released state-dict layout.

    ``mapper(state, embed_dim)`` → :class:`Mapping` (raises ConfigError naming what is missing);
    ``dropped``: prompt-learner keys that hold no trained prompt (class-name buffers, unused modules);
    ``frozen_prefixes``: frozen CLIP weights saved beside the prompts (the whole model registered);
    ``whole_model``: the prompt learner's keys are spelled ``prompt_learner.*`` inside the whole model
    (MaPLe / IVLP / PromptSRC) rather than registered on their own (CoOp family).
    """

    mapper: Callable[[dict, int], Mapping]
    dropped: tuple[str, ...] = ()
    frozen_prefixes: tuple[str, ...] = ()
    whole_model: bool = False


def indexed(state: dict, pattern: str) -> dict[int, str]:
    """``{index: key}`` for keys matching ``pattern`` (one ``(\\d+)`` group)."""
    found = {}
    for key in state:
        match = re.fullmatch(pattern, key)
        if match:
            found[int(match.group(1))] = key
    return found


def consecutive(found: dict[int, str], first: int, what: str) -> list[str]:
    expected = list(range(first, first + len(found)))
    if sorted(found) != expected:
        raise ConfigError(f"{what} exist for layers {sorted(found)}, expected consecutive layers from {first}; "
                          "the file is incomplete.")
    return [found[i] for i in expected]


def require(state: dict, keys: list[str]) -> None:
    missing = [key for key in keys if key not in state]
    if missing:
        raise ConfigError(f"missing {missing}")


def split_state(method: str, names: ReleasedNames, state: dict[str, torch.Tensor], embed_dim: int,
                path: Path) -> tuple[Mapping, list[str]]:
    """Map the released tensors; everything else must be a known dropped or frozen key. Returns the
    mapping and the released keys left out."""
    # Accept either spelling of the prompt learner's keys (registered alone, or inside the whole model).
    if not names.whole_model:
        state = {key.removeprefix("prompt_learner."): value for key, value in state.items()}
    else:
        state = {(key if key.startswith(("prompt_learner.", "image_encoder.", "text_encoder.", "logit_scale"))
                  else f"prompt_learner.{key}"): value
                 for key, value in state.items()}
    non_tensors = sorted(key for key, value in state.items() if not isinstance(value, torch.Tensor))
    if non_tensors:
        raise ConfigError(f"{path}: state_dict entries {non_tensors[:5]} are not tensors; is this a Dassl checkpoint?")
    try:
        mapping = names.mapper(state, embed_dim)
    except ConfigError as err:
        raise ConfigError(f"{path} is not a released {method} checkpoint: {err}. "
                          f"Its state_dict keys: {sorted(state)[:12]}.") from None
    dropped = {key for key in state if key.removeprefix("prompt_learner.") in names.dropped}
    frozen = {key for key in state
              if names.frozen_prefixes and key.startswith(names.frozen_prefixes) and key not in mapping.used}
    unfit = sorted(set(state) - mapping.used - dropped - frozen)
    if names.frozen_prefixes:
        unfit += sorted(key for key in frozen if "VPT" in key or "compound" in key)  # prompts of another method
    if unfit:
        raise ConfigError(
            f"{path} is not a released {method} checkpoint: keys that do not fit {method}: {unfit[:8]}"
            f"{f' (+{len(unfit) - 8} more)' if len(unfit) > 8 else ''}. Pick the --method the file was trained with."
        )
    return mapping, sorted(dropped | frozen)
