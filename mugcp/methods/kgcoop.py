"""KgCoOp: CoOp kept close to the hand-crafted prompt's text features (Yao et al., CVPR 2023)."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from mugcp.config import ConfigError
from mugcp.config_schema import Spec, choice, number, option, with_defaults
from mugcp.methods.coop import COOP_OPTIONS, CoOp, released_coop
from mugcp.methods.dept import DEPT_FROZEN, DEPT_OPTIONS
from mugcp.methods.prompt_text import check_context_words, template_text_features
from mugcp.methods.registry import register_method
from mugcp.methods.released import Mapping, ReleasedNames
from mugcp.methods.templates import KGCOOP_DATASET_TEMPLATES, resolve_templates


def released_kgcoop(state: dict, embed_dim: int) -> Mapping:
    """Released KgCoOp: CoOp's shared ``ctx``; its ``meta_net`` / ``bias_vectors`` are built but never trained or
    used."""
    mapping = released_coop(state)
    mapping.options.pop("class_specific")
    if state["ctx"].dim() != 2:
        raise ConfigError(f"ctx has shape {tuple(state['ctx'].shape)}; KgCoOp learns one shared context "
                          "(n_ctx, width).")
    return mapping


@register_method(
    "kgcoop",
    options={
        **with_defaults(COOP_OPTIONS, n_ctx=4, ctx_init="a photo of a"),
        "kg_weight": option(8.0, number(0), "weight of the distance to the hand-crafted prompt's text features"),
        "kg_distance": option("cosine", choice("cosine", "squared_l2"),
                              "cosine: 1 - mean cos (the released code); squared_l2: the paper's formula"),
        "handcrafted_template": option("auto", Spec("list", item_kind="str"),
                                       "auto (the dataset's template in KgCoOp's table), a template or a list"),
        **DEPT_OPTIONS,
    },
    check=check_context_words,
    paper="Yao et al., Visual-Language Prompt Tuning with Knowledge-guided Context Optimization (CVPR 2023)",
    conditions_on="nothing (CoOp context, pulled toward hand-crafted prompt features)",
    config="configs/methods/kgcoop.yaml",
    released=ReleasedNames(released_kgcoop,
                           # built, never trained (DePT's KgCoOp also saves its unused adapter)
                           dropped=("token_prefix", "token_suffix", "bias_vectors", "meta_net.linear1.weight",
                                    "meta_net.linear1.bias", "adapter.fc.0.weight", "adapter.fc.2.weight"),
                           frozen_prefixes=DEPT_FROZEN),
)
class KgCoOp(CoOp):
    """Loss = CE + ``kg_weight`` · distance between the normalised learned class features w_c and the
    frozen CLIP features w_c^clip of ``handcrafted_template``, as in the authors' released code:

    - ``kg_distance``: ``cosine`` (default, the released code: 1 − mean over classes of cos(w_c, w_c^clip))
      or ``squared_l2`` (the paper's formula: mean over classes of ‖w_c − w_c^clip‖²). On unit vectors
      ‖a − b‖² = 2·(1 − cos), so at the same weight the paper's form is twice as strong.
    - ``handcrafted_template``: ``auto`` (default: the dataset's template from the released code's own
      table, which differs from CoOp's for DTD), or any choice of ``resolve_templates``.
    """

    def build_class_inputs(self) -> None:
        super().build_class_inputs()
        self._handcrafted: Optional[torch.Tensor] = None

    def handcrafted_text_features(self) -> torch.Tensor:
        """Normalised frozen features ``(C, E)`` of the hand-crafted prompt, computed once per class set."""
        if self._handcrafted is None:
            templates = resolve_templates(self.options["handcrafted_template"], self.dataset, KGCOOP_DATASET_TEMPLATES)
            self._handcrafted = template_text_features(self.clip, templates, self.classnames)
        return self._handcrafted

    def knowledge_distance(self, text_features: torch.Tensor) -> torch.Tensor:
        """Mean distance (``kg_distance``) between normalised learned and hand-crafted class features."""
        learned = F.normalize(text_features, dim=-1)
        handcrafted = self.handcrafted_text_features().to(learned)
        if self.options["kg_distance"] == "cosine":
            return 1.0 - (learned * handcrafted).sum(-1).mean()
        return (learned - handcrafted).pow(2).sum(-1).mean()

    def training_step(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, dict]:
        if self.dept is not None:  # the released elp_kgcoop: DePT's loss plus the same knowledge term
            loss, logits, terms, raw_text = self.dept_step(batch)
            kg = self.knowledge_distance(raw_text)
            return loss + self.options["kg_weight"] * kg, logits, {**terms, "kg": float(kg.detach())}
        text_features = self.text_features()
        logits = self.logits(self.clip.encode_image(batch["images"]), text_features)
        ce = F.cross_entropy(logits, batch["labels"])
        kg = self.knowledge_distance(text_features)
        loss = ce + self.options["kg_weight"] * kg
        return loss, logits, {"ce": float(ce.detach()), "kg": float(kg.detach())}
