"""DePT: decoupled prompt tuning, a switch on CoOp, CoCoOp, KgCoOp and MaPLe (Zhang et al., CVPR 2024).

``method.dept: true`` adds the channel-adjusted transfer (CAT) head of the released ``elp_*`` trainers to the
base method: a channel-wise scale and shift per modality on the raw (un-normalised) projected features,
then one linear classifier over the training classes. Training: the head is trained on the image
features and on the text features of every sample's own class (2B rows, labels ``[y, y]``), and the loss is
``(1 - dept_weight) · CE(CLIP logits) + dept_weight · CE(head)`` plus the base method's own terms;
nothing is detached, so the head's loss also reaches the prompts. The head and the scale/shift are an
optimiser group at ``dept_lr_scale`` times ``optim.lr`` (the warm-up rate is the same for every group).

Evaluation: the released code fuses ``(1 - dept_weight) · CLIP logits + dept_weight · head logits`` on the
base task (``SUBSAMPLE_CLASSES base``, or an ImageNet-named dataset after ImageNet training, the head's
rows sliced to the classes present) and uses the CLIP logits alone everywhere else. Here the evaluated
class list decides: when every class is one the head was trained on (as CLIP tokenises the names), the
head's rows of those classes are fused; otherwise the CLIP logits alone are returned. That gives the
released choice for base / new, and for ImageNet-V2 / -Sketch / -A / -R after ImageNet; a transfer dataset
whose every class name is an ImageNet class would be fused here where the released name test would not.
The trained class names travel with the checkpoint (their CLIP token ids, extra tensor ``dept_classes``).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from mugcp.config import ConfigError
from mugcp.config_schema import boolean, number, option
from mugcp.methods.base import PromptLearner
from mugcp.methods.released import Mapping

DEPT_OPTIONS = {
    "dept": option(False, boolean(),
                   "DePT: train a channel-adjusted linear head on the base classes beside the prompts"),
    "dept_weight": option(0.7, number(0.0, 1.0),
                          "the head's share of the loss and of base-class logits (released 0.7)"),
    "dept_lr_scale": option(6.5, number(0.0), "the head's learning rate over the prompts' (released 6.5)"),
    "dept_fusion": option(True, boolean(), "fuse the head's logits into the classes it was trained on at test time"),
}
# A DePT checkpoint registers the whole CustomCLIP: its frozen CLIP weights sit beside the prompts.
DEPT_FROZEN = ("image_encoder.", "text_encoder.", "logit_scale")
# Released names of the head's tensors (trainers/elp_*.py) and ours.
DEPT_RELEASED = {
    "film_lp_img.scale": "dept.film_image.scale", "film_lp_img.bias": "dept.film_image.bias",
    "film_lp_text.scale": "dept.film_text.scale", "film_lp_text.bias": "dept.film_text.bias",
    "linear_probe_proj.weight": "dept.head.weight", "linear_probe_proj.bias": "dept.head.bias",
}


def take_dept(state: dict, mapping: Mapping) -> None:
    """Add the released DePT tensors (FiLMs, and the head when the file has one) to ``mapping``."""
    present = [key for key in DEPT_RELEASED if key in state]
    if not present:
        return
    films = [key for key in DEPT_RELEASED if key.startswith("film")]
    missing = [key for key in films if key not in state]
    if missing:
        raise ConfigError(f"missing {missing} (a DePT checkpoint has both channel scale/shift pairs)")
    for key in present:
        mapping.take(state, key, DEPT_RELEASED[key])
    mapping.options = {**mapping.options, "dept": True}


class ChannelScaleShift(nn.Module):
    """``x · scale + bias`` per channel (the released ``FiLM``), from the identity."""

    def __init__(self, width: int):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(width))
        self.bias = nn.Parameter(torch.zeros(width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale.to(x.dtype) * x + self.bias.to(x.dtype)


class TransferHead(nn.Module):
    """The CAT head: a scale/shift per modality and a linear classifier (with bias) over the training classes."""

    def __init__(self, width: int, class_tokens: torch.Tensor):
        super().__init__()
        self.film_image = ChannelScaleShift(width)
        self.film_text = ChannelScaleShift(width)
        self.head = nn.Linear(width, class_tokens.shape[0])
        self.register_buffer("class_tokens", class_tokens, persistent=False)
        self.rows: Optional[torch.Tensor] = torch.arange(class_tokens.shape[0])

    def select(self, tokens: torch.Tensor) -> None:
        """The head's rows for the classes tokenised as ``tokens``, or None when any of them was not trained."""
        known = {tuple(row.tolist()): index for index, row in enumerate(self.class_tokens)}
        rows = [known.get(tuple(row.tolist())) for row in tokens.to(self.class_tokens.device)]
        self.rows = None if any(row is None for row in rows) else torch.tensor(rows, device=self.class_tokens.device)

    def resize(self, class_tokens: torch.Tensor) -> None:
        """The head for another set of trained classes (a checkpoint's), before its tensors are loaded."""
        weight = self.head.weight
        self.head = nn.Linear(weight.shape[1], class_tokens.shape[0]).to(weight.device, weight.dtype)
        self.class_tokens = class_tokens.to(self.class_tokens.device)

    def training_logits(self, image_features: torch.Tensor, label_text_features: torch.Tensor) -> torch.Tensor:
        rows = torch.cat([self.film_text(label_text_features), self.film_image(image_features)])
        return self.head(rows.to(self.head.weight.dtype))

    def image_logits(self, image_features: torch.Tensor) -> torch.Tensor:
        logits = self.head(self.film_image(image_features).to(self.head.weight.dtype))
        return logits[:, self.rows]


class DecoupledPromptLearner(PromptLearner):
    """A prompt learner that can carry the DePT head (``method.dept``); see the module docstring.

    Subclasses call ``init_dept`` before their first ``set_classnames``, return ``self.fused_logits(image
    features, logits)`` from ``forward`` and give ``training_features``; ``training_step`` then trains the head."""

    def __init__(self, clip, classnames, options, **kwargs):
        super().__init__(clip, classnames, options, **kwargs)
        self.dept: Optional[TransferHead] = None

    def init_dept(self, classnames: Sequence[str]) -> None:
        options = self.options
        if not options["dept"]:
            return
        if options["dept_lr_scale"] <= 0:
            raise ConfigError(f"method option 'dept_lr_scale' must be positive, got {options['dept_lr_scale']}.")
        names = [name.replace("_", " ") for name in classnames]
        self.dept = TransferHead(self.clip.embed_dim, self.clip.tokenize(names))

    def set_classnames(self, classnames: Sequence[str]) -> None:
        super().set_classnames(classnames)
        if self.dept is not None:
            self.dept.select(self.clip.tokenize(self.classnames))

    def fused_logits(self, image_features: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """Evaluation logits: fused with the head on trained classes (``dept_fusion``; else the head's alone),
        the CLIP logits elsewhere and whenever the model is training."""
        if self.dept is None or self.training or self.dept.rows is None:
            return logits
        head = self.dept.image_logits(image_features).to(logits.dtype)
        if not self.options["dept_fusion"]:
            return head
        weight = self.options["dept_weight"]
        return (1 - weight) * logits + weight * head

    def training_features(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Raw image features ``(B, E)``, raw text features ``(C, E)`` (or per image ``(B, C, E)``) and the logits."""
        raise NotImplementedError(f"{type(self).__name__} does not support method.dept")

    def dept_step(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, dict, torch.Tensor]:
        """``(1 - w) · CE(logits) + w · CE(head over [text of each label's class; image])``, the logits, the
        terms and the raw text features (for a base method's own terms)."""
        labels = batch["labels"]
        image_features, text_features, logits = self.training_features(batch["images"])
        if text_features.dim() == 3:  # per-image text (CoCoOp): each image's own text of its class
            own_class = text_features[torch.arange(labels.shape[0], device=labels.device), labels]
        else:
            own_class = text_features[labels]
        ce = F.cross_entropy(logits, labels)
        head_ce = F.cross_entropy(self.dept.training_logits(image_features, own_class), torch.cat([labels, labels]))
        weight = self.options["dept_weight"]
        loss = (1 - weight) * ce + weight * head_ce
        return loss, logits, {"ce": float(ce.detach()), "dept_ce": float(head_ce.detach())}, text_features

    def training_step(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, dict]:
        if self.dept is None:
            return super().training_step(batch)
        loss, logits, terms, _ = self.dept_step(batch)
        return loss, logits, terms

    def parameter_groups(self) -> list[dict]:
        if self.dept is None:
            return super().parameter_groups()
        head = {id(p) for p in self.dept.parameters()}
        own = [p for p in self.parameters() if p.requires_grad and id(p) not in head]
        extra = [p for p in self.dept.parameters() if p.requires_grad]
        return [{"params": own, "lr_scale": 1.0}, {"params": extra, "lr_scale": float(self.options["dept_lr_scale"])}]

    def extra_state_tensors(self) -> dict[str, torch.Tensor]:
        extras = dict(super().extra_state_tensors())
        if self.dept is not None:
            extras["dept_classes"] = self.dept.class_tokens.detach()
        return extras

    def load_extra_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        tensors = dict(tensors)
        classes = tensors.pop("dept_classes", None)
        if self.dept is not None and classes is not None:
            self.dept.class_tokens = classes.to(self.dept.class_tokens)
        super().load_extra_state_tensors(tensors)
        if self.dept is not None:
            self.dept.select(self.clip.tokenize(self.classnames))

    def load_adapter_state(self, state: dict[str, torch.Tensor], source: str = "checkpoint") -> None:
        """A model built for other classes (the evaluation's) takes the checkpoint's head and its classes."""
        head = state.get("dept.head.weight")
        if self.dept is not None and head is not None and head.shape[0] != self.dept.head.weight.shape[0]:
            classes = state.get("extra.dept_classes")
            if classes is None:  # a converted released file: its head's classes are unknown, so it never fuses
                known = self.dept.class_tokens
                classes = torch.zeros(head.shape[0], known.shape[1], dtype=known.dtype)
                state = {**state, "extra.dept_classes": classes}
            self.dept.resize(classes)
        super().load_adapter_state(state, source)
