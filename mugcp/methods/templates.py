"""Hand-written prompt templates: the per-dataset ones used by the CoOp papers and a small ensemble."""
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

# A short ensemble in the spirit of CLIP's ImageNet prompt engineering (CoOp's "select" subset).
ENSEMBLE_TEMPLATES = [
    "itap of a {}.",
    "a bad photo of the {}.",
    "a origami {}.",
    "a photo of the large {}.",
    "a {} in a video game.",
    "art of the {}.",
    "a photo of the small {}.",
]


def dataset_key(name: str | None) -> str:
    return (name or "").lower().replace("-", "_")


def template_for(dataset: str | None) -> str:
    return DATASET_TEMPLATES.get(dataset_key(dataset), DEFAULT_TEMPLATE)


def resolve_templates(choice, dataset: str | None) -> list[str]:
    """``"auto"`` (the dataset's template), ``"ensemble"``, one template string, or a list of them."""
    if choice in (None, "auto"):
        return [template_for(dataset)]
    if choice == "ensemble":
        return list(ENSEMBLE_TEMPLATES)
    templates = [choice] if isinstance(choice, str) else list(choice)
    for template in templates:
        if "{}" not in template:
            raise ConfigError(f"prompt template '{template}' has no '{{}}' where the class name goes.")
    return templates
