"""Zero-shot CLIP and CoOp: templates, context initialisation, class-token positions, class-specific context."""
import pytest
import torch
import torch.nn.functional as F

from mugcp.methods import create_model
from mugcp.methods.prompt_text import encode_class_texts
from mugcp.methods.templates import ENSEMBLE_TEMPLATES, resolve_templates

CLASSES = ["abyssinian cat", "beagle", "pug"]


def frozen(clip, texts):
    return F.normalize(encode_class_texts(clip, texts), dim=-1)


def test_zsclip_uses_the_dataset_template(vit_b32):
    model = create_model("zsclip", CLASSES, backbone=vit_b32, dataset="oxford_pets").eval()
    expected = frozen(vit_b32, [f"a photo of a {c}, a type of pet." for c in CLASSES])
    with torch.no_grad():
        assert torch.allclose(model.text_features(), expected, atol=1e-6)


def test_zsclip_ensemble_averages_normalised_template_features(vit_b32):
    """CoOp's released ZeroshotCLIP2: the 7 select templates plus the dataset's own (none for ImageNet)."""
    model = create_model("zsclip", CLASSES, backbone=vit_b32, templates="ensemble", dataset="dtd").eval()
    templates = ENSEMBLE_TEMPLATES + ["{} texture."]
    per_template = torch.stack([frozen(vit_b32, [t.format(c) for c in CLASSES]) for t in templates])
    with torch.no_grad():
        assert torch.allclose(model.text_features(), F.normalize(per_template.mean(0), dim=-1), atol=1e-6)
    assert resolve_templates("ensemble", "imagenet") == ENSEMBLE_TEMPLATES
    assert resolve_templates("ensemble", None) == ENSEMBLE_TEMPLATES + ["a photo of a {}."]


def test_zsclip_template_without_slot_is_refused(vit_b32):
    with pytest.raises(ValueError, match=r"prompt template 'a photo' has no '\{\}'"):
        create_model("zsclip", CLASSES, backbone=vit_b32, templates="a photo")


@pytest.mark.parametrize(
    "position, text",
    [("end", "a photo of a {}."), ("front", "{} a photo of a."), ("middle", "a photo {} of a.")],
)
def test_coop_initialised_from_text_equals_that_prompt(vit_b32, position, text):
    """With ctx = the embeddings of "a photo of a", CoOp's text features are CLIP's for the full prompt."""
    model = create_model("coop", CLASSES, backbone=vit_b32, n_ctx=4, ctx_init="a photo of a",
                         class_token_position=position).eval()
    assert model.n_ctx == 4 and tuple(model.ctx.shape) == (4, vit_b32.text_width)
    with torch.no_grad():
        learned = model.text_features()
    assert torch.allclose(learned, frozen(vit_b32, [text.format(c) for c in CLASSES]), atol=1e-5)


def test_coop_counts_init_words_and_keeps_extra_tokens_fixed(vit_b32):
    """The released CoOp sets n_ctx to the number of *words* of ctx_init; a word of several tokens
    leaves its later tokens in the class text as fixed tokens."""
    init = "a photograph of an ocelot"  # "ocelot" is more than one token for CLIP's tokenizer
    tokens = int(vit_b32.tokenize([init])[0].argmax()) - 1
    assert tokens > 5
    model = create_model("coop", CLASSES, backbone=vit_b32, n_ctx=5, ctx_init=init).eval()
    assert model.n_ctx == 5 and model.prompts.prefix_text == init
    with torch.no_grad():
        learned = model.text_features()
    assert torch.allclose(learned, frozen(vit_b32, [f"{init} {c}." for c in CLASSES]), atol=1e-5)


def test_coop_random_init_and_class_specific_context(vit_b32):
    torch.manual_seed(0)
    shared = create_model("coop", CLASSES, backbone=vit_b32, n_ctx=16)
    assert tuple(shared.ctx.shape) == (16, vit_b32.text_width)
    assert 0.015 < float(shared.ctx.detach().std()) < 0.025
    specific = create_model("coop", CLASSES, backbone=vit_b32, n_ctx=8, class_specific=True)
    assert tuple(specific.ctx.shape) == (3, 8, vit_b32.text_width)
    logits = specific(torch.randn(2, 3, 224, 224))
    logits.sum().backward()
    assert specific.ctx.grad.abs().sum(dim=(1, 2)).gt(0).all()  # every class's own context learns
    with pytest.raises(ValueError, match=r"class-specific context for 3 classes, got 2 class names"):
        specific.set_classnames(["a", "b"])
