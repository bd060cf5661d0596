"""PromptSRC: IVLP prompts regularised toward frozen CLIP, averaged over epochs (Khattak et al., ICCV 2023)."""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from mugcp.config import ConfigError
from mugcp.config_schema import Spec, boolean, number, option
from mugcp.methods.ivlp import IVLP, IVLP_OPTIONS, released_ivlp
from mugcp.methods.prompt_text import template_text_features
from mugcp.methods.registry import register_method
from mugcp.methods.released import ReleasedNames
from mugcp.methods.templates import resolve_templates


def gaussian_epoch_weights(epochs: int, mean: float, std: float) -> list[float]:
    """Weights of epochs ``1..epochs`` under N(mean, std²), normalised to sum to 1 (float64)."""
    if epochs < 1 or std <= 0:
        raise ConfigError("Gaussian prompt aggregation needs epochs >= 1 and gpa_std > 0, "
                          f"got epochs={epochs}, gpa_std={std}.")
    raw = [math.exp(-0.5 * ((epoch - mean) / std) ** 2) for epoch in range(1, epochs + 1)]
    total = sum(raw)
    if total == 0.0:  # every epoch is > ~38 std from the mean: fall back to the last epoch
        return [0.0] * (epochs - 1) + [1.0]
    return [value / total for value in raw]


@register_method(
    "promptsrc",
    options={
        **IVLP_OPTIONS,
        "text_loss_weight": option(25.0, number(0), "weight of L1(prompted, frozen) text features"),
        "image_loss_weight": option(10.0, number(0), "weight of L1(prompted, frozen) image features"),
        "logit_loss_weight": option(1.0, number(0), "weight of KL(zero-shot logits || prompted logits)"),
        "zs_templates": option("imagenet60", Spec("list", item_kind="str"),
                               "templates of the frozen text features: a name, a template or a list"),
        "gpa": option(True, boolean(), "Gaussian prompt aggregation: evaluate the Gaussian-weighted mean over epochs"),
        "gpa_mean": option(15.0, number(), "mean epoch of the aggregation's Gaussian"),
        "gpa_std": option(1.0, number(0, low_open=True), "standard deviation (epochs) of the aggregation's Gaussian"),
    },
    paper="Khattak et al., Self-regulating Prompts: Foundational Model Adaptation without Forgetting (ICCV 2023)",
    conditions_on="nothing (prompts in both encoders, regularised toward frozen CLIP)",
    config="configs/methods/promptsrc.yaml",
    # PromptSRC's released prompt learner is IVLP's; its file also keeps a frozen zero-shot image encoder.
    released=ReleasedNames(lambda state, embed_dim: released_ivlp(state), dropped=("token_prefix", "token_suffix"),
                           frozen_prefixes=("image_encoder.", "text_encoder.", "logit_scale",
                                            "prompt_learner.ZS_image_encoder."),
                           whole_model=True),
)
class PromptSRC(IVLP):
    """IVLP prompts trained with three self-regularising terms besides cross-entropy:

    - ``text_loss_weight`` · L1(prompted text features, frozen features averaged over ``zs_templates``;
      default ``imagenet60``, the released code's 60 ImageNet templates, averaged unnormalised),
    - ``image_loss_weight`` · L1(prompted image features, frozen image features),
    - ``logit_loss_weight`` · KL(zero-shot logits ‖ prompted logits), summed and divided by B·C;
    all features L2-normalised. With ``gpa``, after every epoch the trainable parameters join a
    running Gaussian-weighted mean (weights over epochs from N(``gpa_mean``, ``gpa_std``²)); after the
    last epoch the parameters are replaced by that mean, so evaluation and the checkpoint use it. The
    running sums are saved with the checkpoint (``extra.gpa.*``) so a resumed run continues them.
    """

    def __init__(self, clip, classnames, options, **kwargs):
        super().__init__(clip, classnames, options, **kwargs)
        self._gpa_sums: dict[str, torch.Tensor] = {}
        self._gpa_weight = 0.0

    def build_class_inputs(self) -> None:
        super().build_class_inputs()
        self._zero_shot_text: Optional[torch.Tensor] = None

    # ----------------------------------------------------------------- regularisers
    def zero_shot_text_features(self) -> torch.Tensor:
        """Frozen CLIP class features ``(C, E)``: template features averaged, then normalised."""
        if self._zero_shot_text is None:
            templates = resolve_templates(self.options["zs_templates"], self.dataset)
            self._zero_shot_text = template_text_features(self.clip, templates, self.classnames, normalize_each=False)
        return self._zero_shot_text

    def training_step(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, dict]:
        images, labels = batch["images"], batch["labels"]
        image_features = F.normalize(self.encode_images(images), dim=-1)
        text_features = self.text_features()
        logits = self.logits(image_features, text_features)
        ce = F.cross_entropy(logits, labels)
        zero_shot_text = self.zero_shot_text_features().to(text_features)
        with torch.no_grad():
            zero_shot_image = F.normalize(self.clip.encode_image(images), dim=-1)
            zero_shot_logits = self.logits(zero_shot_image, zero_shot_text)
        text_l1 = F.l1_loss(text_features, zero_shot_text)
        image_l1 = F.l1_loss(image_features, zero_shot_image)
        logit_kl = F.kl_div(
            F.log_softmax(logits, dim=-1), F.log_softmax(zero_shot_logits, dim=-1), reduction="sum", log_target=True
        ) / logits.numel()
        options = self.options
        loss = (ce + options["text_loss_weight"] * text_l1 + options["image_loss_weight"] * image_l1
                + options["logit_loss_weight"] * logit_kl)
        terms = {name: float(value.detach())
                 for name, value in (("ce", ce), ("text_l1", text_l1), ("image_l1", image_l1), ("logit_kl", logit_kl))}
        return loss, logits, terms

    # ----------------------------------------------------------------- Gaussian prompt aggregation
    def on_epoch_end(self, epoch: int, epochs: int) -> None:
        if not self.options["gpa"]:
            return
        weight = gaussian_epoch_weights(epochs, self.options["gpa_mean"], self.options["gpa_std"])[epoch - 1]
        with torch.no_grad():
            for name, param in self.trainable_state_dict().items():
                contribution = param.double() * weight
                self._gpa_sums[name] = (self._gpa_sums[name].to(param.device) + contribution
                                        if name in self._gpa_sums else contribution)
            self._gpa_weight += weight
            if epoch == epochs:
                self.load_gpa_average()

    def on_train_end(self) -> None:
        # Training may stop before the last epoch (optim.max_steps): evaluate the epochs aggregated so far.
        if self.options["gpa"] and self._gpa_sums:
            self.load_gpa_average()

    def gpa_average(self) -> dict[str, torch.Tensor]:
        """The Gaussian-weighted mean of the parameters over the epochs seen so far."""
        if not self._gpa_sums or self._gpa_weight <= 0.0:
            raise RuntimeError("no epoch has been aggregated yet (PromptSRC.on_epoch_end was never called with "
                               "gpa on).")
        return {name: total / self._gpa_weight for name, total in self._gpa_sums.items()}

    def load_gpa_average(self) -> None:
        """Replace the trainable parameters by their Gaussian-weighted mean."""
        params = dict(self.named_parameters())
        with torch.no_grad():
            for name, mean in self.gpa_average().items():
                params[name].copy_(mean.to(params[name].dtype))
        self._eval_text_features = None

    def extra_state_tensors(self) -> dict[str, torch.Tensor]:
        if not self._gpa_sums:
            return {}
        state = {f"gpa.sum.{name}": total for name, total in self._gpa_sums.items()}
        state["gpa.weight"] = torch.tensor(self._gpa_weight, dtype=torch.float64)
        return state

    def load_extra_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        trainable = set(self.trainable_state_dict())
        sums = {key[len("gpa.sum."):]: value for key, value in tensors.items() if key.startswith("gpa.sum.")}
        unknown = sorted(set(tensors) - {"gpa.weight"} - {f"gpa.sum.{name}" for name in sums})
        if unknown or (sums and (set(sums) != trainable or "gpa.weight" not in tensors)):
            raise KeyError(
                f"promptsrc checkpoint has an unusable prompt-aggregation state (unknown {unknown[:5]}, "
                f"sums for {len(sums)} of {len(trainable)} parameters, "
                f"weight {'present' if 'gpa.weight' in tensors else 'missing'})."
            )
        device = self.clip.device
        self._gpa_sums = {name: value.to(device=device, dtype=torch.float64) for name, value in sums.items()}
        self._gpa_weight = float(tensors["gpa.weight"]) if sums else 0.0
