"""Hand-written prompt templates: the per-dataset ones used by the CoOp papers, CoOp's ensemble and the
60 ImageNet templates PromptSRC's released code averages.

The strings are data the released code depends on, kept verbatim so that frozen-CLIP features match it.
"""
from __future__ import annotations

from mugcp.config import ConfigError

DEFAULT_TEMPLATE = "a photo of a {}."

# One template per dataset, as in the CoOp / CoCoOp / MaPLe zero-shot baselines.
DATASET_TEMPLATES = {
    "oxford_pets": "a photo of a {}, a type of pet.",
    "flowers102": "a photo of a {}, a type of flower.",
    "fgvc_aircraft": "a photo of a {}, a type of aircraft.",
    "dtd": "{} texture.",
    "eurosat": "a centered satellite photo of {}.",
    "stanford_cars": "a photo of a {}.",
    "food101": "a photo of {}, a type of food.",
    "sun397": "a photo of a {}.",
    "caltech101": "a photo of a {}.",
    "ucf101": "a photo of a person doing {}.",
    "imagenet": "a photo of a {}.",
    "imagenet_sketch": "a photo of a {}.",
    "imagenet_v2": "a photo of a {}.",
    "imagenet_a": "a photo of a {}.",
    "imagenet_r": "a photo of a {}.",
    "fashion_mnist": "a photo of a {}, a type of clothing.",
}

# CoOp's "select" subset of CLIP's ImageNet prompts (its ZeroshotCLIP2 ensemble, which adds the
# dataset's own template for every dataset but ImageNet; see ``resolve_templates``).
ENSEMBLE_TEMPLATES = [
    "itap of a {}.",
    "a bad photo of the {}.",
    "a origami {}.",
    "a photo of the large {}.",
    "a {} in a video game.",
    "art of the {}.",
    "a photo of the small {}.",
]

# KgCoOp's released code has its own copy of the per-dataset table; it differs from CoOp's for DTD only.
KGCOOP_DATASET_TEMPLATES = {**DATASET_TEMPLATES, "dtd": "a photo of a {}, a type of texture."}

# ProGrad's released table (trainers/prograd.py): its zero-shot teacher's template, and, with " {}." cut off,
# the text its context starts from. It differs from CoOp's for Pets, Flowers, Aircraft, DTD and Food101.
PROGRAD_DATASET_TEMPLATES = {
    "oxford_pets": "a type of pet, a photo of a {}.",
    "flowers102": "a type of flower, a photo of a {}.",
    "fgvc_aircraft": "a type of aircraft, a photo of a {}.",
    "dtd": "a texture of {}.",
    "eurosat": "a centered satellite photo of {}.",
    "food101": "a type of food, a photo of {}.",
    "ucf101": "a photo of a person doing {}.",
    # stanford_cars, sun397, caltech101 and the ImageNets (and datasets the table lacks): DEFAULT_TEMPLATE
}

# TCP's released tables (trainers/tcp.py): the hand-crafted prompt whose frozen features feed its token
# generator and anchor its consistency term, and the learnable prompt whose tokens 1-4 are the context.
TCP_HANDCRAFTED_TEMPLATES = {
    **DATASET_TEMPLATES,
    "fgvc_aircraft": "a photo of an aircraft {}.",
    "dtd": "a photo of a {}, a type of texture.",
    "food101": "a photo of a {}, a type of food.",
}
TCP_PROMPT_TEMPLATES = {
    "oxford_pets": "X X X X {}, a type of pet.",
    "flowers102": "X X X X {}, a type of flower.",
    "fgvc_aircraft": "X X X X {}, a type of aircraft.",
    "dtd": "X X X X {} texture.",
    "eurosat": "X X X X {}.",
    "stanford_cars": "X X X X {}, a type of car",  # no final period in the released table
    "food101": "X X X X {}, a type of food.",
    "sun397": "X X X X {}.",
    "caltech101": "X X X X {}.",
    "ucf101": "a photo of a person doing {}.",
    "imagenet": "a photo of a {}.",
    "imagenet_sketch": "a photo of a {}.",
    "imagenet_v2": "a photo of a {}.",
    "imagenet_a": "a photo of a {}.",
    "imagenet_r": "a photo of a {}.",
}

# The 60 ImageNet templates (a subset of CLIP's 80) whose averaged frozen features are PromptSRC's
# text targets in its released code.
IMAGENET_60_TEMPLATES = [
    "a photo of a {}.", "a bad photo of a {}.", "a photo of many {}.", "a sculpture of a {}.",
    "a photo of the hard to see {}.", "a low resolution photo of the {}.", "a rendering of a {}.",
    "graffiti of a {}.", "a bad photo of the {}.", "a cropped photo of the {}.", "a tattoo of a {}.",
    "the embroidered {}.", "a photo of a hard to see {}.", "a bright photo of a {}.", "a photo of a clean {}.",
    "a photo of a dirty {}.", "a dark photo of the {}.", "a drawing of a {}.", "a photo of my {}.",
    "the plastic {}.", "a photo of the cool {}.", "a close-up photo of a {}.", "a black and white photo of the {}.",
    "a painting of the {}.", "a painting of a {}.", "a pixelated photo of the {}.", "a sculpture of the {}.",
    "a bright photo of the {}.", "a cropped photo of a {}.", "a plastic {}.", "a photo of the dirty {}.",
    "a jpeg corrupted photo of a {}.", "a blurry photo of the {}.", "a photo of the {}.", "a good photo of the {}.",
    "a rendering of the {}.", "a {} in a video game.", "a photo of one {}.", "a doodle of a {}.",
    "a close-up photo of the {}.", "the origami {}.", "the {} in a video game.", "a sketch of a {}.",
    "a doodle of the {}.", "a origami {}.", "a low resolution photo of a {}.", "the toy {}.",
    "a rendition of the {}.", "a photo of the clean {}.", "a photo of a large {}.", "a rendition of a {}.",
    "a photo of a nice {}.", "a photo of a weird {}.", "a blurry photo of a {}.", "a cartoon {}.", "art of a {}.",
    "a sketch of the {}.", "a embroidered {}.", "a pixelated photo of a {}.", "itap of the {}.",
]


def dataset_key(name: str | None) -> str:
    return (name or "").lower().replace("-", "_")


def template_for(dataset: str | None, table: dict[str, str] = DATASET_TEMPLATES) -> str:
    return table.get(dataset_key(dataset), DEFAULT_TEMPLATE)


def resolve_templates(choice, dataset: str | None, table: dict[str, str] = DATASET_TEMPLATES) -> list[str]:
    """The templates a choice stands for:

    - ``"auto"``: the dataset's template from ``table`` (CoOp's per-dataset table by default);
    - ``"ensemble"``: CoOp's ensemble, the 7 "select" ImageNet templates plus the dataset's own
      template unless the dataset is ImageNet (as CoOp's released ``ZeroshotCLIP2``);
    - ``"imagenet60"``: the 60 ImageNet templates of PromptSRC's released code;
    - one template string, or a list of them.
    """
    if choice in (None, "auto"):
        return [template_for(dataset, table)]
    if choice == "ensemble":
        extra = [] if dataset_key(dataset) == "imagenet" else [template_for(dataset, table)]
        return list(ENSEMBLE_TEMPLATES) + extra
    if choice == "imagenet60":
        return list(IMAGENET_60_TEMPLATES)
    templates = [choice] if isinstance(choice, str) else list(choice)
    for template in templates:
        if "{}" not in template:
            raise ConfigError(f"prompt template '{template}' has no '{{}}' where the class name goes "
                              "(or use auto, ensemble, imagenet60).")
    return templates
