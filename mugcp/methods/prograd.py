"""ProGrad: CoOp whose updates never conflict with zero-shot CLIP's knowledge (Zhu et al., ICCV 2023)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from mugcp.backbones import ClipBackbone
from mugcp.config import ConfigError
from mugcp.config_schema import integer, number, option, text
from mugcp.methods.base import PromptLearner
from mugcp.methods.coop import released_coop
from mugcp.methods.prompt_text import MAX_TEXT_CONTEXT, ClassPrompts, placeholder_prefix, template_text_features
from mugcp.methods.registry import register_method
from mugcp.methods.released import Mapping, ReleasedNames
from mugcp.methods.templates import PROGRAD_DATASET_TEMPLATES, resolve_templates, template_for


def released_prograd(state: dict, embed_dim: int) -> Mapping:
    """Released ProGrad: CoOp's ``ctx`` (one shared context; the released init never makes it class-specific)."""
    mapping = released_coop(state)
    mapping.options.pop("class_specific")
    if state["ctx"].dim() != 2:
        raise ConfigError(
            f"ctx has shape {tuple(state['ctx'].shape)}; ProGrad learns one shared context (n_ctx, width)."
        )
    return mapping


def zero_padded_context(clip: ClipBackbone, n_ctx: int, init: str, std: float) -> tuple[torch.Tensor, str]:
    """ProGrad's released context init: ``(vectors (n_ctx, width), class-text prefix)``.

    With ``init`` text of W words, the first ``n_ctx - W`` vectors are zeros and the last W are the
    text's first W token embeddings; the class texts are ``"X ... X {init} {class}."`` (``n_ctx - W``
    placeholders). W counts words, as the released code does, so when the text has more tokens than
    words ("a type of pet, a photo of a": 8 words, 9 tokens) its last tokens stay fixed words of every
    class text after the context. Without ``init``: ``n_ctx`` Gaussian vectors with ``std``.
    """
    if not init:
        return torch.randn(n_ctx, clip.text_width) * std, placeholder_prefix(n_ctx)
    words = init.replace("_", " ")
    count = len(words.split(" "))
    if count > n_ctx:
        raise ConfigError(
            f"method option 'ctx_init' ('{init}') has {count} words, more than n_ctx={n_ctx}; "
            "raise n_ctx or shorten it."
        )
    ids = clip.tokenize([words])[0]
    vectors = torch.zeros(n_ctx, clip.text_width)
    with torch.no_grad():
        vectors[n_ctx - count :] = clip.embed_tokens(ids[None])[0, 1 : 1 + count].float().cpu()
    return vectors, " ".join([placeholder_prefix(n_ctx - count), words]).strip()


def dataset_init_text(dataset: Optional[str]) -> str:
    """``ctx_init: auto``: the dataset's ProGrad template without its final ``" {}."``, as released."""
    template = template_for(dataset, PROGRAD_DATASET_TEMPLATES)
    return template.replace(" {}.", "").replace("_", " ")


def project_conflicting(ce_grad: torch.Tensor, kl_grad: torch.Tensor, strength: float) -> torch.Tensor:
    """The released rule over one whole (flattened) tensor: where the cross-entropy gradient points against
    the KL gradient (negative cosine), remove ``strength`` times its component along the KL gradient;
    otherwise keep it unchanged (the KL gradient is never added). No epsilon, as released: a zero
    gradient makes the cosine NaN, which counts as no conflict."""
    kl_unit = kl_grad / torch.linalg.norm(kl_grad)
    ce_unit = ce_grad / torch.linalg.norm(ce_grad)
    conflict = torch.dot(ce_unit.flatten(), kl_unit.flatten()) < 0
    projected = ce_grad - strength * torch.dot(ce_grad.flatten(), kl_unit.flatten()) * kl_unit
    return torch.where(conflict, projected, ce_grad)


@register_method(
    "prograd",
    options={
        "n_ctx": option(16, integer(1, MAX_TEXT_CONTEXT), "learned context tokens (template init: words, 0-padded)"),
        "ctx_init": option("auto", text(), "'auto': the dataset's ProGrad template (released); '' starts it Gaussian"),
        "init_std": option(0.02, number(0), "standard deviation of a Gaussian initial context"),
        "grad_lambda": option(1.0, number(0), "how much of the conflicting component the cross-entropy gradient loses"),
        "kl_temperature": option(1.0, number(0, low_open=True), "temperature T of the KL term to zero-shot CLIP"),
        "teacher_template": option("auto", text(), "zero-shot teacher's template; 'auto': the dataset's released one"),
    },
    paper="Zhu et al., Prompt-aligned Gradient for Prompt Tuning (ICCV 2023)",
    conditions_on="nothing (CoOp context; updates kept from conflicting with zero-shot CLIP)",
    config="configs/methods/prograd.yaml",
    released=ReleasedNames(released_prograd, dropped=("token_prefix", "token_suffix")),
)
class ProGrad(PromptLearner):
    """CoOp's shared context, trained with cross-entropy whose gradient is projected against the
    gradient of the KL divergence to zero-shot CLIP's predictions (the released ``ProGradLoss`` and
    Dassl ``prograd_backward_and_update``):

    - the teacher: frozen CLIP with one hand-written template per class, ``teacher_template`` (``auto``:
      the dataset's template from the released ProGrad table), logits ``exp(logit_scale) · cos``;
    - ``kl`` = mean over the batch of H(softmax(teacher / T), softmax(student / T)) · T², T =
      ``kl_temperature`` (the teacher is the target; same gradient as KL(teacher ‖ student));
    - the update: two backward passes (KL, then cross-entropy); where the two gradients of the context
      conflict, the cross-entropy gradient loses ``grad_lambda`` times its component along the KL one
      (``project_conflicting``), one cosine over the whole context tensor;
    - ``ctx_init``: ``auto`` (default, as released: the dataset's template without " {}.", zero-padded to
      ``n_ctx``, see ``zero_padded_context``; on Pets, Flowers, Aircraft and Food101 its last word stays a
      fixed token after the context, as in the released code), a text, or ``""`` (Gaussian, ``init_std``).

    Evaluation uses the prompted model alone. Here everything runs in ``train.precision`` (fp32 on
    CPU); the released runs keep CLIP, the context and its gradients in fp16 (the teacher in fp32).
    """

    def __init__(self, clip, classnames, options, **kwargs):
        super().__init__(clip, classnames, options, **kwargs)
        init = dataset_init_text(self.dataset) if options["ctx_init"] == "auto" else options["ctx_init"]
        vectors, self.prompt_prefix = zero_padded_context(clip, options["n_ctx"], init, options["init_std"])
        self.n_ctx = options["n_ctx"]
        self.ctx = nn.Parameter(vectors)
        self._pending_kl: Optional[torch.Tensor] = None
        self.set_classnames(classnames)

    def build_class_inputs(self) -> None:
        self.prompts = ClassPrompts(self.clip, self.classnames, self.n_ctx, prefix=self.prompt_prefix)
        self.prompts.to(self.clip.device)
        self._teacher: Optional[torch.Tensor] = None

    def compute_text_features(self) -> torch.Tensor:
        return self.clip.encode_text(
            self.prompts.tokens, embeddings=self.prompts.assemble(self.ctx), shared_prefix=self.prompts.shared_prefix
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.logits(self.clip.encode_image(images), self.text_features())

    def teacher_text_features(self) -> torch.Tensor:
        """Zero-shot CLIP's normalised class features ``(C, E)``, computed once per class set."""
        if self._teacher is None:
            templates = resolve_templates(self.options["teacher_template"], self.dataset, PROGRAD_DATASET_TEMPLATES)
            self._teacher = template_text_features(self.clip, templates, self.classnames)
        return self._teacher

    def training_step(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """Returns the cross-entropy as the loss; the KL term waits for ``backward``, which projects."""
        image_features = self.clip.encode_image(batch["images"])
        logits = self.logits(image_features, self.text_features())
        with torch.no_grad():  # the frozen image tower is the teacher's too: its features are reused
            teacher = self.logits(image_features.detach(), self.teacher_text_features().to(image_features))
        ce = F.cross_entropy(logits, batch["labels"])
        temperature = self.options["kl_temperature"]
        soft_targets = F.softmax(teacher.float() / temperature, dim=-1)
        kl = (-soft_targets * F.log_softmax(logits.float() / temperature, dim=-1)).sum(-1).mean() * temperature**2
        self._pending_kl = kl
        return ce, logits, {"ce": float(ce.detach()), "kl": float(kl.detach())}

    def backward(self, loss: torch.Tensor, scale: Callable, average: Callable) -> None:
        """Gradients of ``loss`` (the cross-entropy) and of the pending KL term, projected (see the class)."""
        kl, self._pending_kl = self._pending_kl, None
        if kl is None:
            raise RuntimeError("ProGrad.backward needs the KL term of a training_step first.")
        params = [p for p in self.parameters() if p.requires_grad]
        scale(kl).backward(retain_graph=True)
        average(params)
        kl_grads = [p.grad.clone() for p in params]
        for param in params:
            param.grad = None
        scale(loss).backward()
        average(params)
        for param, kl_grad in zip(params, kl_grads):
            param.grad = project_conflicting(param.grad, kl_grad, self.options["grad_lambda"])
