"""Each baseline gives the released code's logits (and losses) for the same CLIP weights and prompts.

The released forward passes are restated in ``released_reference`` on open_clip's modules; the CLIP is
tiny, with random weights and random LayerNorm affines, and every prompt parameter is random and
non-zero. Tolerance 1e-4 in fp32.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from released_reference import (
    randomise_prompt_parameters,
    released_cocoop_logits,
    released_coop_logits,
    released_deep_logits,
    released_image_encoder,
    released_logits,
    released_prograd_init,
    released_prograd_losses,
    released_tcp_text_features,
    released_template_features,
    tiny_clip,
)

from mugcp.methods import create_model
from mugcp.methods.templates import ENSEMBLE_TEMPLATES, IMAGENET_60_TEMPLATES

CLASSES = ["red fox", "blue whale", "snow owl", "golden retriever"]
TOL = dict(atol=1e-4, rtol=0)


@pytest.fixture(scope="module")
def clip():
    return tiny_clip()


@pytest.fixture(scope="module")
def images():
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(5))


def build(clip, method, **options):
    torch.manual_seed(0)
    model = create_model(method, CLASSES, backbone=clip, **options)
    randomise_prompt_parameters(model)
    return model.eval()


def ours(model, images):
    with torch.no_grad():
        return model(images)


def test_fresh_open_clip_layer_norms_would_hide_placement(clip):
    """The fixture's LayerNorms are not identity, so prompts before / after ln_pre differ."""
    assert not torch.allclose(clip.model.visual.ln_pre.weight, torch.ones_like(clip.model.visual.ln_pre.weight))
    assert not torch.allclose(clip.model.visual.ln_pre.bias, torch.zeros_like(clip.model.visual.ln_pre.bias))


def test_zsclip_matches_released_zero_shot(clip, images):
    tokenizer = clip.tokenizer
    for templates, dataset, expected_templates in (
        ("auto", "dtd", ["{} texture."]),
        ("ensemble", "eurosat", ENSEMBLE_TEMPLATES + ["a centered satellite photo of {}."]),
    ):
        model = create_model("zsclip", CLASSES, backbone=clip, templates=templates, dataset=dataset).eval()
        with torch.no_grad():
            text = released_template_features(clip.model, tokenizer, expected_templates, CLASSES)
            expected = released_logits(clip.model, released_image_encoder(clip.model, images), text)
        torch.testing.assert_close(ours(model, images), expected, **TOL)


@pytest.mark.parametrize("position", ["end", "middle", "front"])
def test_coop_matches_released(clip, images, position):
    model = build(clip, "coop", n_ctx=4, ctx_init="", class_token_position=position)
    with torch.no_grad():
        expected = released_coop_logits(clip.model, clip.tokenizer, images, CLASSES, model.ctx, "X X X X", position)
    torch.testing.assert_close(ours(model, images), expected, **TOL)


def test_coop_with_multi_token_init_word_matches_released(clip, images):
    """n_ctx = word count of ctx_init; the second token of "ocelot" stays a fixed class-text token."""
    init = "a photograph of an ocelot"
    model = build(clip, "coop", n_ctx=5, ctx_init=init)
    assert model.ctx.shape[0] == 5
    with torch.no_grad():
        expected = released_coop_logits(clip.model, clip.tokenizer, images, CLASSES, model.ctx, init)
    torch.testing.assert_close(ours(model, images), expected, **TOL)


def test_cocoop_matches_released(clip, images):
    model = build(clip, "cocoop")  # published: n_ctx 4 from "a photo of a"
    linear1, linear2 = model.meta_net[0], model.meta_net[2]
    with torch.no_grad():
        expected = released_cocoop_logits(
            clip.model, clip.tokenizer, images, CLASSES, model.ctx,
            (linear1.weight, linear1.bias), (linear2.weight, linear2.bias), "a photo of a",
        )
    torch.testing.assert_close(ours(model, images), expected, **TOL)


def test_kgcoop_logits_and_loss_match_released(clip, images):
    model = build(clip, "kgcoop", handcrafted_template="auto")
    model.dataset = "dtd"  # the released KgCoOp table's own DTD template
    labels = torch.tensor([0, 3, 1])
    with torch.no_grad():
        logits = released_coop_logits(clip.model, clip.tokenizer, images, CLASSES, model.ctx, "a photo of a")
        handcrafted = released_template_features(clip.model, clip.tokenizer, ["a photo of a {}, a type of texture."],
                                                 CLASSES)
        prompts_text = _coop_text_features(clip, model.ctx, "a photo of a")
        score = 1.0 - F.cosine_similarity(prompts_text, handcrafted, dim=1, eps=1e-7).mean()
        expected_loss = F.cross_entropy(logits, labels) + 8.0 * score
    torch.testing.assert_close(ours(model, images), logits, **TOL)
    model.train()
    loss, train_logits, terms = model.training_step({"images": images, "labels": labels})
    torch.testing.assert_close(train_logits.detach(), logits, **TOL)
    assert terms["kg"] == pytest.approx(float(score), abs=1e-5)
    assert float(loss.detach()) == pytest.approx(float(expected_loss), abs=1e-4)


PETS = "a type of pet, a photo of a {}."  # ProGrad's Pets template: 8 words, 9 tokens


def test_prograd_init_logits_and_losses_match_released(clip, images):
    """Zero-padded init from the dataset's template; its 9th token ("a") stays a fixed word after the context."""
    labels = torch.tensor([1, 3, 0])
    model = create_model("prograd", CLASSES, backbone=clip, dataset="oxford_pets").eval()
    with torch.no_grad():
        ctx, prefix = released_prograd_init(clip.model, clip.tokenizer, PETS, 16)
    torch.testing.assert_close(model.ctx.detach(), ctx, atol=0, rtol=0)
    assert model.prompt_prefix == prefix.strip() and not ctx[:8].any()
    assert int(clip.tokenizer([prefix])[0].argmax()) - 1 == 17  # 16 context slots + the frozen "a"
    for temperature in (1.0, 2.0):
        model = build(clip, "prograd", dataset="oxford_pets", kl_temperature=temperature)
        with torch.no_grad():
            logits = released_coop_logits(clip.model, clip.tokenizer, images, CLASSES, model.ctx, prefix)
            teacher_text = released_template_features(clip.model, clip.tokenizer, [PETS], CLASSES)
            teacher = released_logits(clip.model, released_image_encoder(clip.model, images), teacher_text)
            ce, kl = released_prograd_losses(logits, teacher, labels, temperature)
        torch.testing.assert_close(ours(model, images), logits, **TOL)
        model.train()
        loss, _, terms = model.training_step({"images": images, "labels": labels})
        assert float(loss.detach()) == pytest.approx(float(ce), abs=1e-5) and terms["ce"] == float(loss.detach())
        assert terms["kl"] == pytest.approx(float(kl), abs=1e-5)


@pytest.mark.parametrize("dataset, layer", [("stanford_cars", 2), ("imagenet", 1)])
def test_tcp_logits_and_loss_match_released(clip, images, dataset, layer):
    """Cars: "X X X X {}, a type of car" (no period); ImageNet: "a photo of a {}.", "a photo of a" in the context
    slots."""
    from mugcp.methods.templates import TCP_HANDCRAFTED_TEMPLATES, TCP_PROMPT_TEMPLATES

    labels = torch.tensor([2, 0, 3])
    model = build(clip, "tcp", dataset=dataset, token_layer=layer)
    linear1, linear2 = model.meta_net.linear1, model.meta_net.linear2
    with torch.no_grad():
        text, handcrafted = released_tcp_text_features(
            clip.model, clip.tokenizer, CLASSES, model.ctx, (linear1.weight, linear1.bias),
            (linear2.weight, linear2.bias),
            TCP_PROMPT_TEMPLATES[dataset], TCP_HANDCRAFTED_TEMPLATES[dataset], layer)
        image = released_image_encoder(clip.model, images)
        logits = clip.model.logit_scale.exp() * (image / image.norm(dim=-1, keepdim=True)) @ text.t()
        score = 1.0 - F.cosine_similarity(text, handcrafted, dim=1, eps=1e-7).mean()
        expected_loss = F.cross_entropy(logits, labels) + 8.0 * score
    torch.testing.assert_close(ours(model, images), logits, **TOL)
    model.train()
    loss, _, terms = model.training_step({"images": images, "labels": labels})
    assert terms["consistency"] == pytest.approx(float(score), abs=1e-5)
    assert float(loss.detach()) == pytest.approx(float(expected_loss), abs=1e-4)


def _coop_text_features(clip, ctx, prefix_text):
    from released_reference import released_class_embeddings, released_text_encoder

    tokens, prefix, suffix = released_class_embeddings(clip.model, clip.tokenizer, prefix_text, ctx.shape[0], CLASSES)
    text = released_text_encoder(clip.model, torch.cat([prefix, ctx.expand(len(CLASSES), -1, -1), suffix], dim=1),
                                 tokens)
    return text / text.norm(dim=-1, keepdim=True)


def _ivlp_statement(clip, model, images):
    text_layers, vision_layers = list(model.text_prompts.layers), list(model.vision_prompts.layers)
    return released_deep_logits(
        clip.model, clip.tokenizer, images, CLASSES, text_layers[0], text_layers[1:],
        vision_layers[0], vision_layers[1:], model.prompts.prefix_text,
    )


def test_ivlp_matches_released(clip, images):
    model = build(clip, "ivlp", text_depth=3, vision_depth=2)  # prompts end before the last vision layer
    with torch.no_grad():
        expected, _, _ = _ivlp_statement(clip, model, images)
    torch.testing.assert_close(ours(model, images), expected, **TOL)


def test_maple_matches_released(clip, images):
    """n_ctx 2 from "a photo of a": "of a" stays in every class text; F_0(ctx) enters before ln_pre."""
    model = build(clip, "maple", depth=3)
    assert model.prompts.prefix_text == "a photo of a"
    text_layers = list(model.text_prompts.layers)
    vision = [couple(prompt) for couple, prompt in zip(model.coupling, text_layers)]
    with torch.no_grad():
        expected, _, _ = released_deep_logits(
            clip.model, clip.tokenizer, images, CLASSES, text_layers[0], text_layers[1:], vision[0], vision[1:],
            "a photo of a"
        )
        dropped_words, _, _ = released_deep_logits(  # the old construction, "X X {class}.", is really different
            clip.model, clip.tokenizer, images, CLASSES, text_layers[0], text_layers[1:], vision[0], vision[1:], "X X"
        )
    logits = ours(model, images)
    torch.testing.assert_close(logits, expected, **TOL)
    assert (logits - dropped_words).abs().max() > 1e-2


def test_promptsrc_logits_and_losses_match_released(clip, images):
    model = build(clip, "promptsrc", text_depth=3, vision_depth=3)
    labels = torch.tensor([2, 0, 3])
    with torch.no_grad():
        logits, image, text = _ivlp_statement(clip, model, images)
        image = image / image.norm(dim=-1, keepdim=True)
        text = text / text.norm(dim=-1, keepdim=True)
        fixed = released_template_features(clip.model, clip.tokenizer, IMAGENET_60_TEMPLATES, CLASSES,
                                           normalize_each=False)
        zero_shot_image = released_image_encoder(clip.model, images)
        zero_shot_image = zero_shot_image / zero_shot_image.norm(dim=-1, keepdim=True)
        zero_shot_logits = clip.model.logit_scale.exp() * zero_shot_image @ fixed.t()
        text_l1 = F.l1_loss(text, fixed) * 25
        image_l1 = F.l1_loss(image, zero_shot_image) * 10
        logit_kl = F.kl_div(F.log_softmax(logits, 1), F.log_softmax(zero_shot_logits, 1), reduction="sum",
                            log_target=True) / logits.numel()
        expected_loss = F.cross_entropy(logits, labels) + logit_kl + text_l1 + image_l1
    torch.testing.assert_close(ours(model, images), logits, **TOL)
    model.train()
    loss, _, terms = model.training_step({"images": images, "labels": labels})
    assert 25 * terms["text_l1"] == pytest.approx(float(text_l1), abs=1e-5)
    assert 10 * terms["image_l1"] == pytest.approx(float(image_l1), abs=1e-5)
    assert terms["logit_kl"] == pytest.approx(float(logit_kl), abs=1e-5)
    assert float(loss.detach()) == pytest.approx(float(expected_loss), abs=1e-4)


def test_promptsrc_gaussian_aggregation_matches_released(clip):
    """The released GPA: epoch e's state weighted by the N(mean, std²) density at e, normalised over all epochs."""
    epochs, mean, std = 4, 2.5, 1.3
    model = build(clip, "promptsrc", text_depth=2, vision_depth=2, gpa_mean=mean, gpa_std=std)
    density = [(1 / (std * math.sqrt(2 * math.pi))) * math.exp(-0.5 * ((e - mean) / std) ** 2)
               for e in range(1, epochs + 1)]
    weights = [d / sum(density) for d in density]
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    expected = {n: torch.zeros_like(p) for n, p in params.items()}
    for epoch in range(1, epochs + 1):
        randomise_prompt_parameters(model, seed=10 + epoch)
        for name, param in params.items():
            expected[name] += weights[epoch - 1] * param.detach()
        model.on_epoch_end(epoch, epochs)
    for name, param in params.items():
        torch.testing.assert_close(param.detach(), expected[name], atol=1e-6, rtol=0)


def test_mugcp_first_vision_prompts_enter_before_ln_pre_like_maple(clip, images):
    """MuGCP has no released code; its layer-0 vision prompts are placed as MaPLe's: the context rows
    of layer 0's input are ln_pre(F_0(ctx_0)), not F_0(ctx_0)."""
    model = build(clip, "mugcp", depth=2, semantic_source="none", n_semantic=2, amg_dim=16, amg_heads=2, pool_dim=16,
                  pool_heads=2)
    seen = []
    first_block = clip.model.visual.transformer.resblocks[0]
    original = clip.block

    def record(block, x, causal):
        if block is first_block:
            seen.append(x.detach().clone())
        return original(block, x, causal)

    clip.block = record
    try:
        ours(model, images)
    finally:
        del clip.block
    patches = (32 // 8) ** 2 + 1
    context_rows = seen[0][:, patches : patches + model.n_ctx]
    with torch.no_grad():
        coupled = model.coupling[0](model.text_context[0])
        torch.testing.assert_close(context_rows, clip.model.visual.ln_pre(coupled).expand_as(context_rows), atol=1e-5,
                                   rtol=0)
    assert not torch.allclose(context_rows, coupled.expand_as(context_rows), atol=1e-2)
