"""What every prompt learner shares: the frozen backbone, class names, logits, loss and persistence."""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from mugcp.backbones import ClipBackbone
from mugcp.config import variant_name
from mugcp.data.classnames import validate_classnames


class PromptLearner(nn.Module):
    """Base class of all methods. Subclasses implement ``forward(images, **extras) -> logits``.

    Only parameters with ``requires_grad`` are trained and saved; the CLIP weights stay frozen and
    class names live in plain attributes, so a checkpoint transfers to other class names.
    Methods whose text features do not depend on the image set ``conditional = False`` and get
    ``text_features()`` cached for a whole evaluation.
    """

    method_name: str = ""
    default_options: dict = {}
    conditional: bool = False
    #: batch entries (besides images) that ``forward`` accepts, e.g. ("semantic", "semantic_mask")
    batch_inputs: tuple[str, ...] = ()

    def __init__(self, clip: ClipBackbone, classnames: Sequence[str], options: dict, kernels: str = "reference",
                 dataset: Optional[str] = None):
        super().__init__()
        self.clip = clip
        self.options = dict(options)
        self.kernels = kernels
        self.dataset = dataset
        self.classnames: list[str] = []
        self._eval_text_features: Optional[torch.Tensor] = None

    @property
    def variant_name(self) -> str:
        """The name its results are reported under: the method, or its variant (``coop+dept``) when a plug-in is on."""
        return variant_name(self.method_name, self.options)

    def fused_logits(self, image_features: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """Evaluation logits from the raw image features ``(B, E)`` and the cosine logits: these unchanged, unless a
        plug-in head adds its own (DePT, ``methods/dept.py``). Exports call it after their baked class weights."""
        return logits

    # ----------------------------------------------------------------- class names
    def set_classnames(self, classnames: Sequence[str]) -> None:
        """Point the model at a new label set (e.g. the new classes of base-to-novel); see ``validate_classnames``.

        Duplicates pass here: a dataset's own list may have them (ImageNet's does); lists a user gives are
        checked for them where they come in (``load_run``, ``predict``).
        """
        self.classnames = [name.replace("_", " ") for name in validate_classnames(classnames, duplicates="allow")]
        self._eval_text_features = None
        self.build_class_inputs()

    def build_class_inputs(self) -> None:
        """Tokenise whatever the method needs per class; called on every ``set_classnames``."""

    # ----------------------------------------------------------------- text features
    def compute_text_features(self) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} is conditional: its text features depend on the image")

    def text_features(self) -> torch.Tensor:
        """Normalised text features ``(C, E)``; cached during evaluation for non-conditional methods."""
        if self.training or torch.is_grad_enabled():
            return F.normalize(self.compute_text_features(), dim=-1)
        if self._eval_text_features is None:
            self._eval_text_features = F.normalize(self.compute_text_features(), dim=-1)
        return self._eval_text_features

    def train(self, mode: bool = True):
        self._eval_text_features = None
        return super().train(mode)

    def logits(self, image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
        """Cosine similarity times CLIP's temperature; per-image text features ``(B, C, E)`` allowed."""
        image_features = F.normalize(image_features, dim=-1)
        scale = self.clip.logit_scale.exp()
        if text_features.dim() == 3:
            return scale * torch.einsum("be,bce->bc", image_features, F.normalize(text_features, dim=-1))
        return scale * image_features @ text_features.t()

    # ----------------------------------------------------------------- training
    def training_step(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """Loss for one batch: (loss, logits, named loss terms as floats). Cross-entropy by default."""
        logits = self(batch["images"], **{k: batch[k] for k in self.batch_inputs if k in batch})
        loss = F.cross_entropy(logits, batch["labels"])
        return loss, logits, {"ce": float(loss.detach())}

    def backward(self, loss: torch.Tensor, scale: Callable[[torch.Tensor], torch.Tensor],
                 average: Callable[[list], None]) -> None:
        """Turn the loss of ``training_step`` into the gradients the trainer then clips and steps with.

        ``scale`` is the trainer's loss scaling (its GradScaler's ``scale``), ``average`` averages the given
        parameters' gradients over processes. Default: one backward pass. A method whose update is not the
        gradient of one loss (ProGrad's projected gradient) overrides this.
        """
        scale(loss).backward()
        average([p for p in self.parameters() if p.requires_grad])

    def on_epoch_end(self, epoch: int, epochs: int) -> None:
        """Called by the trainer after each epoch (``epoch`` counts from 1)."""

    def on_train_end(self) -> None:
        """Called once after the last training step (also when ``optim.max_steps`` ends training early),
        before the final checkpoint is written."""

    # ----------------------------------------------------------------- persistence
    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        return {name: param.detach() for name, param in self.named_parameters() if param.requires_grad}

    def extra_state_tensors(self) -> dict[str, torch.Tensor]:
        """Non-parameter tensors a method must save (e.g. PromptSRC's running prompt average)."""
        return {}

    def load_extra_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        if tensors:
            raise KeyError(f"{self.method_name} saves no extra tensors, got {sorted(tensors)}")

    def adapter_state(self) -> dict[str, torch.Tensor]:
        """What a checkpoint holds: trainable parameters plus method extras (prefixed ``extra.``)."""
        state = dict(self.trainable_state_dict())
        state.update({f"extra.{k}": v for k, v in self.extra_state_tensors().items()})
        return state

    def load_adapter_state(self, state: dict[str, torch.Tensor], source: str = "checkpoint") -> None:
        params = dict(self.named_parameters())
        trainable = {name for name, p in params.items() if p.requires_grad}
        given = {k for k in state if not k.startswith("extra.")}
        missing, unexpected = sorted(trainable - given), sorted(given - trainable)
        bad_shapes = [
            f"{k}: {tuple(state[k].shape)} vs {tuple(params[k].shape)}"
            for k in sorted(given & trainable)
            if tuple(state[k].shape) != tuple(params[k].shape)
        ]
        if missing or unexpected or bad_shapes:
            raise ValueError(
                f"{source} does not fit this {self.method_name} model: "
                + "; ".join(
                    part
                    for part in (
                        f"missing {missing[:5]}" if missing else "",
                        f"unexpected {unexpected[:5]}" if unexpected else "",
                        f"shape mismatch {bad_shapes[:3]}" if bad_shapes else "",
                    )
                    if part
                )
                + ". Was it trained with other method options (n_ctx, depth...)? "
                "Use the checkpoint's adapter_config.json."
            )
        with torch.no_grad():
            for name in given:
                params[name].copy_(state[name].to(params[name].dtype))
        self.load_extra_state_tensors({k[len("extra."):]: v for k, v in state.items() if k.startswith("extra.")})
        self._eval_text_features = None

    def parameter_groups(self) -> list[dict]:
        """Optimiser groups: ``{"params": [...], "lr_scale": s}``, trained at ``s`` times ``optim.lr``
        (``training.optim.parameter_groups``). One group by default; DePT's head runs faster."""
        return [{"params": [p for p in self.parameters() if p.requires_grad], "lr_scale": 1.0}]

    def num_trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)
