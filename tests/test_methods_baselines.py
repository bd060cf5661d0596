"""The baseline prompt learners (CoCoOp, IVLP, MaPLe, KgCoOp, PromptSRC) on a random-weight ViT-B-32.

Random weights make the numbers meaningless but every shape, gradient path, parity and formula real.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from mugcp.config import load_config
from mugcp.methods import create_model, get_method, resolve_options
from mugcp.methods.deep_prompts import text_context_init
from mugcp.methods.prompt_text import encode_class_texts
from mugcp.methods.promptsrc import gaussian_epoch_weights

BASELINES = ["cocoop", "ivlp", "maple", "kgcoop", "promptsrc", "prograd", "tcp"]
CLASSES = ["red fox", "blue whale", "snow owl"]
OTHER_CLASSES = ["sand cat", "tree frog", "barn swallow", "sea urchin"]
SAMPLED_CLIP_TENSORS = ("token_embedding.weight", "positional_embedding", "class_embedding",
                        "resblocks.0.attn.in_proj_weight",
                        "resblocks.11.mlp.c_proj.weight", "text_projection", "visual.proj", "logit_scale")
# Small prompt depths keep the tests fast without changing any code path.
FAST = {
    "cocoop": {},
    "ivlp": {"text_depth": 3, "vision_depth": 3},
    "maple": {"depth": 3},
    "kgcoop": {},
    "promptsrc": {"text_depth": 3, "vision_depth": 3, "gpa_mean": 2.0},
    "prograd": {},
    "tcp": {},
}


@pytest.fixture(scope="module")
def clip(vit_b32):
    return vit_b32


@pytest.fixture(scope="module")
def clip_snapshot(clip):
    """Every CLIP tensor copied once, with its version counter (bumped by any in-place write)."""
    return {name: (tensor.detach().clone(), tensor._version)
            for name, tensor in clip.state_dict(keep_vars=True).items()}


@pytest.fixture(scope="module")
def images():
    generator = torch.Generator().manual_seed(3)
    return torch.randn(2, 3, 224, 224, generator=generator)


@pytest.fixture(scope="module")
def image(images):
    """One image: the image encoder dominates the cost of every test."""
    return images[:1]


def build(clip, method, classnames=CLASSES, seed=0, **options):
    torch.manual_seed(seed)
    return create_model(method, classnames, backbone=clip, **{**FAST[method], **options})


def assert_clip_unchanged(clip, snapshot, full=False):
    """No CLIP tensor was written in place (version counters), a few sampled ones (or, with ``full``,
    all of them) still equal the snapshot bit for bit, and none became trainable."""
    current = clip.state_dict(keep_vars=True)
    written = [name for name, tensor in current.items() if tensor._version != snapshot[name][1]]
    assert not written, f"frozen CLIP tensors written in place: {written[:5]}"
    names = list(current) if full else [name for name in current if name.endswith(SAMPLED_CLIP_TENSORS)]
    changed = [name for name in names if not torch.equal(current[name].detach(), snapshot[name][0])]
    assert not changed, f"frozen CLIP tensors changed: {changed[:5]}"
    assert not any(p.requires_grad for p in clip.parameters())


def eval_logits(model, images):
    model.eval()
    with torch.no_grad():
        return model(images)


# ----------------------------------------------------------------- every method
@pytest.mark.parametrize("method", BASELINES)
def test_training_step_updates_only_prompt_parameters(clip, clip_snapshot, image, method):
    model = build(clip, method)
    trainable = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and not any(name.startswith("clip.") for name in trainable)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)

    model.train()
    loss, logits, terms = model.training_step({"images": image, "labels": torch.tensor([2])})
    assert logits.shape == (1, len(CLASSES))
    assert torch.isfinite(loss) and "ce" in terms
    optimizer.zero_grad()
    loss.backward()
    no_gradient = [n for n, p in model.named_parameters()
                   if p.requires_grad and (p.grad is None or not p.grad.abs().sum() > 0)]
    assert not no_gradient, f"parameters without gradient: {no_gradient}"
    optimizer.step()

    unchanged = [n for n, p in model.named_parameters() if p.requires_grad and torch.equal(p.detach(), trainable[n])]
    assert not unchanged, f"trainable parameters not updated: {unchanged}"
    assert_clip_unchanged(clip, clip_snapshot)
    assert eval_logits(model, image).shape == (1, len(CLASSES))


@pytest.mark.parametrize("method", BASELINES)
def test_checkpoint_round_trip_and_other_classnames(clip, clip_snapshot, image, method, tmp_path):
    trained = build(clip, method, seed=1)
    with torch.no_grad():  # move away from the initial values so that a failed load would show
        for param in trained.parameters():
            if param.requires_grad:
                param.add_(0.01 * torch.randn_like(param))
    path = tmp_path / "adapter.safetensors"
    save_file({k: v.contiguous() for k, v in trained.adapter_state().items()}, str(path))
    state = load_file(str(path))
    assert not any(key.startswith("clip.") for key in state)

    fresh = build(clip, method, seed=2)
    fresh.load_adapter_state(state)
    assert torch.equal(eval_logits(fresh, image), eval_logits(trained, image))

    other = build(clip, method, classnames=OTHER_CLASSES, seed=3)
    other.load_adapter_state(state)
    trained.set_classnames(OTHER_CLASSES)
    logits = eval_logits(other, image)
    assert logits.shape == (1, len(OTHER_CLASSES))
    assert torch.equal(logits, eval_logits(trained, image))
    assert_clip_unchanged(clip, clip_snapshot)


@pytest.mark.parametrize("method", BASELINES)
def test_config_file_carries_every_default(method):
    spec = get_method(method)
    assert spec.paper and spec.conditions_on
    cfg = load_config(spec.config.removeprefix("configs/"))
    assert cfg["method"]["name"] == method
    assert {k for k in cfg["method"] if k != "name"} == set(spec.defaults)
    assert resolve_options(method, cfg["method"]) == spec.defaults


def test_config_files_hold_published_settings():
    def load(name):
        return load_config(f"methods/{name}")

    maple, cocoop, coop, promptsrc, kgcoop = (load(n) for n in ("maple", "cocoop", "coop", "promptsrc", "kgcoop"))
    assert (maple["optim"]["lr"], maple["optim"]["epochs"], maple["data"]["batch_size"]) == (0.0035, 5, 4)
    assert (maple["method"]["n_ctx"], maple["method"]["depth"], maple["method"]["ctx_init"]) == (2, 9, "a photo of a")
    assert (cocoop["data"]["batch_size"], cocoop["optim"]["epochs"], cocoop["method"]["n_ctx"]) == (1, 10, 4)
    assert coop["method"]["n_ctx"] == 16
    assert (promptsrc["optim"]["lr"], promptsrc["optim"]["epochs"],
            promptsrc["method"]["text_depth"]) == (0.0025, 20, 9)
    assert (promptsrc["method"]["text_loss_weight"], promptsrc["method"]["image_loss_weight"]) == (25.0, 10.0)
    assert kgcoop["method"]["kg_weight"] == 8.0
    assert load("zsclip")["method"] == {"name": "zsclip", "templates": "auto"}


@pytest.mark.parametrize(
    "method, options, message",
    [
        ("maple", {"depth": 13}, "'depth' is 13, but the text encoder of ViT-B-32 has 12 layers"),
        ("ivlp", {"vision_depth": -1},
         "method.vision_depth=-1 is not allowed: expected an integer >= 0 for method 'ivlp'. The default is 9."),
        ("cocoop", {"meta_reduction": 1024}, "'meta_reduction' (1024) leaves no hidden units"),
        ("kgcoop", {"kg_distance": "l1"},
         "method.kg_distance='l1' is not allowed: expected one of cosine, squared_l2 for method 'kgcoop'."),
    ],
)
def test_bad_options_are_named(clip, method, options, message):
    with pytest.raises(ValueError) as err:
        create_model(method, CLASSES, backbone=clip, **options)
    assert message in str(err.value)


# ----------------------------------------------------------------- deep prompts
def test_text_context_init_follows_the_released_rule(clip):
    """n_ctx is kept; init words beyond it stay in the class text; n_ctx > 4 ignores the init text."""
    tokens = clip.tokenize(["a photo of a"])[0]
    words = clip.embed_tokens(tokens[None])[0, 1:5]
    vectors, prefix = text_context_init(clip, 2, "a photo of a")
    assert torch.equal(vectors, words[:2]) and prefix == "a photo of a"  # context "a photo", "of a" fixed
    torch.manual_seed(0)
    random, prefix = text_context_init(clip, 6, "a photo of a", std=0.02)
    assert prefix == "X X X X X X" and 0.01 < float(random.std()) < 0.03
    with pytest.raises(ValueError, match=r"ctx_init 'a photo' has 2 tokens, fewer than n_ctx=3"):
        text_context_init(clip, 3, "a photo")


def test_ivlp_with_only_layer0_text_prompts_is_coop(clip, image):
    """Depth 1 text / depth 0 vision IVLP is CoOp with the same context: same logits, bit for bit."""
    ivlp = build(clip, "ivlp", text_depth=1, vision_depth=0, n_ctx_text=4)
    coop = create_model("coop", CLASSES, backbone=clip, n_ctx=4, ctx_init="a photo of a")
    assert torch.equal(ivlp.text_prompts.layers[0].detach(), coop.ctx.detach())
    assert torch.equal(eval_logits(ivlp, image), eval_logits(coop, image))


def test_ivlp_vision_prompts_enter_the_image_encoder(clip, image):
    model = build(clip, "ivlp")
    model.eval()
    with torch.no_grad():
        plain = clip.encode_image(image)
        prompted = model.encode_images(image)
        explicit = clip.encode_image(image, deep_prompts=[p for p in model.vision_prompts.layers])
    assert torch.equal(prompted, explicit)
    assert not torch.allclose(prompted, plain)


# ----------------------------------------------------------------- MaPLe
def test_maple_vision_prompts_are_the_coupled_text_prompts(clip, image, monkeypatch):
    model = build(clip, "maple")
    assert torch.equal(model.text_prompts.layers[0].detach(), text_context_init(clip, 2, "a photo of a")[0])
    seen = {}
    original = clip.encode_image

    def spy(images, deep_prompts=None, **kwargs):
        seen["vision"] = deep_prompts
        return original(images, deep_prompts=deep_prompts, **kwargs)

    monkeypatch.setattr(clip, "encode_image", spy)
    eval_logits(model, image)
    vision = seen["vision"]
    assert len(vision) == 3
    for layer, prompt in enumerate(vision):
        text = model.text_prompts.layers[layer]
        coupling = model.coupling[layer]
        assert prompt.shape == (2, clip.vision_width)
        assert torch.allclose(prompt, text @ coupling.weight.t() + coupling.bias, atol=1e-6)


# ----------------------------------------------------------------- CoCoOp
def test_cocoop_per_image_contexts_grouping_and_silent_meta_net(clip, images):
    model = build(clip, "cocoop")
    model.eval()
    with torch.no_grad():
        features = F.normalize(clip.encode_image(images), dim=-1)
        contexts = model.image_contexts(features)
        assert contexts.shape == (2, 4, clip.text_width)
        assert not torch.allclose(contexts[0], contexts[1])
        text = model.per_image_text_features(contexts)
        assert text.shape == (2, len(CLASSES), clip.embed_dim)
        assert torch.allclose(model(images), model.logits(features, text), atol=1e-5)

        model.options["max_text_sequences"] = len(CLASSES)  # evaluation groups of one image
        assert torch.allclose(model.per_image_text_features(contexts), text, atol=1e-5)

        # A zero meta-net output leaves every image with the plain context: CoCoOp = CoOp.
        model.meta_net[-1].weight.zero_()
        model.meta_net[-1].bias.zero_()
        coop = create_model("coop", CLASSES, backbone=clip, n_ctx=4, ctx_init="a photo of a")
        assert torch.equal(model.ctx, coop.ctx)
        silent = model.per_image_text_features(model.image_contexts(features))
        assert torch.allclose(silent, coop.compute_text_features().expand_as(silent), atol=1e-5)


# ----------------------------------------------------------------- KgCoOp
def test_kgcoop_term_is_the_released_cosine_distance(clip, image):
    model = build(clip, "kgcoop")
    model.train()
    labels = torch.tensor([1])
    _, _, terms = model.training_step({"images": image, "labels": labels})
    assert terms["kg"] < 1e-10  # the context starts as "a photo of a": learned prompt = hand-crafted prompt

    with torch.no_grad():
        model.ctx.add_(0.05 * torch.randn_like(model.ctx))
    loss, logits, terms = model.training_step({"images": image, "labels": labels})
    handcrafted = F.normalize(encode_class_texts(clip, [f"a photo of a {c}." for c in CLASSES]), dim=-1)
    with torch.no_grad():
        learned = F.normalize(model.compute_text_features(), dim=-1)
    expected = 1.0 - float(F.cosine_similarity(learned, handcrafted, dim=1).mean())  # the released score
    assert terms["kg"] > 1e-4
    assert terms["kg"] == pytest.approx(expected, rel=1e-4)
    assert float(loss.detach()) == pytest.approx(float(F.cross_entropy(logits.detach(), labels)) + 8.0 * expected,
                                                 rel=1e-4)

    model.options["kg_distance"] = "squared_l2"  # the paper's ||w - w_clip||^2: twice 1 - cos on unit vectors
    squared = sum(float(((learned[c] - handcrafted[c]) ** 2).sum()) for c in range(len(CLASSES))) / len(CLASSES)
    assert float(model.knowledge_distance(learned)) == pytest.approx(squared, rel=1e-4)
    assert squared == pytest.approx(2 * expected, rel=1e-4)


# ----------------------------------------------------------------- PromptSRC
def test_promptsrc_terms_vanish_when_prompts_reproduce_frozen_clip(clip, image):
    """Layer-0 text prompt "a photo of a", no vision prompts, the same template: prompted = frozen CLIP."""
    model = build(clip, "promptsrc", text_depth=1, vision_depth=0, zs_templates="a photo of a {}.")
    model.train()
    loss, logits, terms = model.training_step({"images": image, "labels": torch.tensor([1])})
    assert terms["image_l1"] == 0.0
    assert terms["text_l1"] < 1e-6 and abs(terms["logit_kl"]) < 1e-6
    assert float(loss.detach()) == pytest.approx(terms["ce"], abs=1e-4)


def test_promptsrc_loss_weights_the_three_terms(clip, image):
    model = build(clip, "promptsrc")
    model.train()
    loss, logits, terms = model.training_step({"images": image, "labels": torch.tensor([2])})
    assert terms["text_l1"] > 0 and terms["image_l1"] > 0 and terms["logit_kl"] > 0
    expected = terms["ce"] + 25.0 * terms["text_l1"] + 10.0 * terms["image_l1"] + 1.0 * terms["logit_kl"]
    assert float(loss.detach()) == pytest.approx(expected, rel=1e-5)
    with torch.no_grad():  # the KL term is KL(zero-shot || prompted), averaged over B*C entries
        zero_shot = model.logits(clip.encode_image(image), model.zero_shot_text_features())
        p_zs = zero_shot.softmax(-1)
        kl = (p_zs * (p_zs.log() - logits.log_softmax(-1))).sum() / logits.numel()
    assert terms["logit_kl"] == pytest.approx(float(kl), rel=1e-4)


def test_gaussian_epoch_weights():
    weights = gaussian_epoch_weights(20, 15.0, 1.0)
    assert sum(weights) == pytest.approx(1.0)
    assert max(range(20), key=weights.__getitem__) == 14  # epoch 15
    assert weights[13] == pytest.approx(weights[15]) and weights[13] / weights[14] == pytest.approx(math.exp(-0.5))
    assert gaussian_epoch_weights(3, 500.0, 1.0) == [0.0, 0.0, 1.0]
    with pytest.raises(ValueError, match="gpa_std > 0"):
        gaussian_epoch_weights(5, 2.0, 0.0)


def test_promptsrc_aggregate_is_the_gaussian_weighted_mean_and_resumes(clip, image):
    epochs = 3
    model = build(clip, "promptsrc")
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = dict(model.named_parameters())
    per_epoch = []
    resumed = None
    for epoch in range(1, epochs + 1):
        with torch.no_grad():  # stand-in for an epoch of training
            for name in names:
                params[name].copy_(torch.randn_like(params[name]))
        per_epoch.append({name: params[name].detach().clone() for name in names})
        model.on_epoch_end(epoch, epochs)
        if epoch == 1:  # a checkpoint after epoch 1 carries the running aggregate
            resumed = build(clip, "promptsrc", seed=9)
            resumed.load_adapter_state({k: v.clone() for k, v in model.adapter_state().items()})
        else:
            with torch.no_grad():
                for name in names:
                    dict(resumed.named_parameters())[name].copy_(per_epoch[-1][name])
            resumed.on_epoch_end(epoch, epochs)

    weights = [math.exp(-0.5 * (e - 2.0) ** 2) for e in range(1, epochs + 1)]
    weights = [w / sum(weights) for w in weights]
    for name in names:
        expected = sum(w * p[name].double() for w, p in zip(weights, per_epoch)).float()
        assert torch.allclose(params[name].detach(), expected, atol=1e-6), name
        assert torch.equal(dict(resumed.named_parameters())[name].detach(), params[name].detach()), name
    state = model.adapter_state()
    assert float(state["extra.gpa.weight"]) == pytest.approx(1.0)
    assert {f"extra.gpa.sum.{n}" for n in names} <= set(state)
    assert torch.equal(eval_logits(model, image), eval_logits(resumed, image))


def test_promptsrc_rejects_a_broken_aggregate_state(clip):
    model = build(clip, "promptsrc")
    model.on_epoch_end(1, 2)
    state = model.adapter_state()
    del state["extra.gpa.weight"]
    with pytest.raises(KeyError, match="weight missing"):
        build(clip, "promptsrc").load_adapter_state(state)


def test_frozen_clip_is_bit_identical_after_all_method_tests(clip, clip_snapshot):
    """Runs last in this module: every CLIP tensor against the snapshot taken before the first test."""
    assert_clip_unchanged(clip, clip_snapshot, full=True)


def test_maple_deeper_couplings_start_as_copies_of_one_layer(clip):
    """Released MaPLe: ``compound_prompt_projections`` are deep copies of one initialised Linear."""
    model = build(clip, "maple", depth=4)
    for layer in (2, 3):
        assert torch.equal(model.coupling[layer].weight, model.coupling[1].weight)
        assert torch.equal(model.coupling[layer].bias, model.coupling[1].bias)
        assert model.coupling[layer].weight.data_ptr() != model.coupling[1].weight.data_ptr()  # copies, not shared
    assert not torch.equal(model.coupling[0].weight, model.coupling[1].weight)
