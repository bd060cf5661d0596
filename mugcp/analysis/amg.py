"""MuGCP seen from inside: AMG maps, MPF gates and the size of the per-image conditional prompts.

:class:`AMGRecorder` sets the ``recorder`` hook of every ``MutualGuidance`` layer for the length of a
``with`` block and keeps what each layer saw. The maps are then computed from the recorded kernel
inputs by the reference path's formula (``mugcp.kernels.mutual_attention.mutual_attention_weights``), so
they are the same whichever backend the model ran (the Triton kernel never materialises them).

The AMG map of semantic token s at layer j is the visual→semantic softmax ``softmax_{N_v}(A)[:, s]``
(the weights with which S^j gathers the visual tokens into U and VCP^j), averaged over heads: one
distribution over the CLS and patch tokens that sums to one.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from mugcp.analysis.figures import new_figure, save_figure
from mugcp.kernels.mutual_attention import mutual_attention_weights

CELL = 150  # pixels per image in the map grid


class AMGRecorder:
    """``with AMGRecorder(mugcp_model) as rec: model(images, ...)``; then ``rec.layers[j]`` holds layer j's tensors."""

    def __init__(self, model):
        self.model = model
        self.layers: dict[int, dict[str, torch.Tensor]] = {}

    def __enter__(self) -> AMGRecorder:
        for layer, module in enumerate(self.model.guidance):
            module.recorder = self._recorder(layer)
        return self

    def __exit__(self, *exc) -> bool:
        for module in self.model.guidance:
            module.recorder = None
        return False

    def _recorder(self, layer: int):
        def record(**tensors: torch.Tensor) -> None:
            self.layers[layer] = {name: tensor.detach().float().cpu() for name, tensor in tensors.items()}

        return record

    def maps(self) -> torch.Tensor:
        """``(B, J, n_s, N_v)``: per image, prompted layer and semantic token, its attention over the visual tokens."""
        if not self.layers:
            raise RuntimeError("no AMG layer ran inside the recorder; run the model's forward within the with-block.")
        return torch.stack([semantic_attention(self.layers[j]) for j in sorted(self.layers)], dim=1)


def semantic_attention(record: dict[str, torch.Tensor]) -> torch.Tensor:
    """``(B, n_s, N_v)``: the head-averaged ``softmax_{N_v}(A)`` of one layer, from its recorded kernel inputs."""
    _, over_visual = mutual_attention_weights(record["affinity_visual"], record["affinity_semantic"])
    return over_visual.mean(dim=1).transpose(1, 2)


def patch_grid(maps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Split ``(..., N_v)`` maps into the CLS share ``(...)`` and patch maps ``(..., g, g)`` (CLS first, then patches
    row by row)."""
    patches = maps.shape[-1] - 1
    side = math.isqrt(patches)
    if side * side != patches:
        raise ValueError(f"{maps.shape[-1]} visual tokens are not a CLS token plus a square grid of patches.")
    return maps[..., 0], maps[..., 1:].reshape(*maps.shape[:-1], side, side)


def display_image(pixels: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """A preprocessed ``(3, S, S)`` tensor back to an ``(S, S, 3)`` float image in [0, 1]."""
    image = pixels.detach().float().cpu() * torch.tensor(std)[:, None, None] + torch.tensor(mean)[:, None, None]
    return image.clamp(0, 1).permute(1, 2, 0).numpy()


def map_grid_size(layers: int, tokens: int) -> tuple[int, int]:
    return (CELL * (tokens + 1) + 40, CELL * layers + 70)


def plot_map_grid(image: np.ndarray, maps: torch.Tensor, path: str | Path, title: str = "",
                  layers: Optional[Sequence[int]] = None) -> tuple[Path, tuple[int, int]]:
    """One row per prompted layer: the image, then each semantic token's map over the patches on it.

    ``maps`` ``(J, n_s, N_v)`` of one image. Each map is drawn on its own colour scale (its title gives
    the largest patch weight and the CLS share), upsampled to the image.
    """
    depth, tokens = maps.shape[:2]
    layers = list(layers) if layers is not None else list(range(depth))
    cls_share, grid = patch_grid(maps)
    size = map_grid_size(depth, tokens)
    plt, fig, axes = new_figure(size, nrows=depth, ncols=tokens + 1, squeeze=False)
    height, width = image.shape[:2]
    for row in range(depth):
        axes[row, 0].imshow(image)
        axes[row, 0].set_ylabel(f"layer {layers[row]}", fontsize=8)
        for token in range(tokens):
            ax = axes[row, token + 1]
            ax.imshow(image)
            heat = grid[row, token].numpy()
            ax.imshow(heat, cmap="jet", alpha=0.5, extent=(-0.5, width - 0.5, height - 0.5, -0.5),
                      interpolation="bilinear")
            ax.set_title(f"S{token}: max {heat.max():.3f}, CLS {float(cls_share[row, token]):.2f}", fontsize=6)
        for ax in axes[row]:
            ax.set_xticks([])
            ax.set_yticks([])
    axes[0, 0].set_title("image", fontsize=7)
    fig.suptitle(title or "AMG: attention of each semantic token over the patches", fontsize=9)
    return save_figure(fig, path, size), size


GATES_SIZE = (1000, 380)


def gate_values(model) -> dict[str, torch.Tensor]:
    """MPF gates after the sigmoid, ``(J, n_s)`` each: how much of S^j enters the text prompts and of VCP^j the
    vision prompts."""
    return {"text": torch.sigmoid(model.text_gates.detach().float().cpu()),
            "vision": torch.sigmoid(model.vision_gates.detach().float().cpu())}


def plot_gates(gates: dict[str, torch.Tensor], path: str | Path, size: tuple[int, int] = GATES_SIZE) -> Path:
    plt, fig, axes = new_figure(size, ncols=len(gates), squeeze=False)
    for ax, (name, values) in zip(axes[0], gates.items()):
        # Gates start at one value (σ(0) = 0.5) and move little: a scale around their own range shows how they moved.
        low, high = float(values.min()), float(values.max())
        middle, half = (low + high) / 2, max((high - low) / 2, 0.01)
        image = ax.imshow(values.numpy(), cmap="viridis", vmin=middle - half, vmax=middle + half, aspect="auto")
        depth, tokens = values.shape
        ax.set_xticks(range(tokens), [f"S{t}" for t in range(tokens)], fontsize=8)
        ax.set_yticks(range(depth), [f"layer {j}" for j in range(depth)], fontsize=8)
        ax.set_title(f"σ(g_{name[0]}): {name} prompts", fontsize=9)
        if depth * tokens <= 200:
            for j in range(depth):
                for t in range(tokens):
                    ax.text(t, j, f"{float(values[j, t]):.3f}", ha="center", va="center", fontsize=7,
                            color="black" if values[j, t] > middle else "white")
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.03)
    fig.suptitle("MPF gates per prompted layer and semantic token", fontsize=10)
    return save_figure(fig, path, size)


def mugcp_conditional_sizes(model, recorder: AMGRecorder) -> list[dict]:
    """Per image and prompted layer: mean L2 norm per token of the shared context and of the per-image conditional part.

    Text prompts: ``ctx_t^j`` against ``σ(g_t^j)⊙S^j``; vision prompts: ``F^j(ctx_t^j)`` against ``σ(g_v^j)⊙VCP^j``.
    """
    gates = gate_values(model)
    rows = []
    with torch.no_grad():
        for layer in sorted(recorder.layers):
            record = recorder.layers[layer]
            context = model.text_context[layer].detach().float().cpu()
            coupled = model.coupling[layer](model.text_context[layer]).detach().float().cpu()
            text_conditional = gates["text"][layer][None, :, None] * record["semantic"]
            vision_conditional = gates["vision"][layer][None, :, None] * record["visual_prompts"]
            for image in range(record["semantic"].shape[0]):
                for side, shared, conditional in (("text", context, text_conditional[image]),
                                                  ("vision", coupled, vision_conditional[image])):
                    shared_norm = float(shared.norm(dim=-1).mean())
                    conditional_norm = float(conditional.norm(dim=-1).mean())
                    rows.append({"image": image, "layer": layer, "prompts": side, "shared_norm": shared_norm,
                                 "conditional_norm": conditional_norm,
                                 "ratio": conditional_norm / shared_norm if shared_norm else float("nan")})
    return rows


def cocoop_conditional_sizes(model, images: torch.Tensor) -> list[dict]:
    """Per image: mean L2 norm of the shared context tokens against the meta-net's per-image shift π(x) (CoCoOp)."""
    import torch.nn.functional as F

    with torch.no_grad():
        features = F.normalize(model.clip.encode_image(images), dim=-1)
        shift = model.meta_net(features).float().cpu()
        shared_norm = float(model.ctx.detach().float().cpu().norm(dim=-1).mean())
    return [{"image": i, "layer": 0, "prompts": "text", "shared_norm": shared_norm,
             "conditional_norm": float(shift[i].norm()),
             "ratio": float(shift[i].norm()) / shared_norm if shared_norm else float("nan")}
            for i in range(shift.shape[0])]
