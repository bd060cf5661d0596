"""MMA and DePT, restated on open_clip's own modules (tiny CLIP, random LayerNorm affines): forward, loss,
gradients (MMA's gradient scaling, what each trains), DePT's base / new logits, its optimiser groups and
its checkpoints, the released tensor names, and a tiny training run of each."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from fixtures import make_imagefolder
from released_reference import randomise_prompt_parameters, register_tiny_clip, released_class_embeddings, tiny_clip

from mugcp.config import load_config
from mugcp.methods import create_model, get_method
from mugcp.methods.released import split_state
from mugcp.runs.checkpoint import read_checkpoint
from mugcp.runs.layout import CONFIG_FILE
from mugcp.training import train
from mugcp.training.optim import build_optimizer, build_scheduler

CLASSES = ["red fox", "blue whale", "snow owl", "golden retriever"]
LABELS = torch.tensor([0, 3, 1])
TOL = dict(atol=1e-4, rtol=0)


@pytest.fixture(scope="module")
def clip():
    return tiny_clip()


@pytest.fixture(scope="module")
def images():
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(5))


def mma(clip, **options):
    torch.manual_seed(0)
    model = create_model("mma", CLASSES, backbone=clip, layers_from=2, layers_to=3, **options)
    randomise_prompt_parameters(model, scale=0.3)
    return model


# ----------------------------------------------------------------- MMA restated
def adapter_term(model, tower, block, h):
    """scale · up(ReLU(shared(ReLU(down(h))))), with plain autograd (no gradient scaling)."""
    own, shared = getattr(model, f"{tower}_adapter")[str(block)], model.shared_adapter[str(block)]
    hidden = F.relu(F.linear(F.relu(F.linear(h, own.down.weight, own.down.bias)), shared.weight, shared.bias))
    return model.options["scale"] * F.linear(hidden, own.up.weight, own.up.bias)


def restated_mma_logits(model, clip, images):
    """Every block j in the range: out = block(x) + adapter(ln_1(x)), on open_clip's blocks."""
    m = clip.model
    tokens = clip.tokenize([f"a photo of a {name}." for name in CLASSES])
    x = m.token_embedding(tokens) + m.positional_embedding
    for j, block in enumerate(m.transformer.resblocks):
        extra = adapter_term(model, "text", j, block.ln_1(x)) if j in model.blocks else 0
        x = block(x, attn_mask=m.attn_mask) + extra
    text = m.ln_final(x)[torch.arange(len(CLASSES)), tokens.argmax(-1)] @ m.text_projection
    v = m.visual
    x = v.conv1(images).flatten(2).transpose(1, 2)
    x = torch.cat([v.class_embedding.expand(x.shape[0], 1, -1), x], dim=1) + v.positional_embedding
    x = v.ln_pre(x)
    for j, block in enumerate(v.transformer.resblocks):
        extra = adapter_term(model, "visual", j, block.ln_1(x)) if j in model.blocks else 0
        x = block(x) + extra
    image = v.ln_post(x[:, 0]) @ v.proj
    return m.logit_scale.exp() * F.normalize(image, dim=-1) @ F.normalize(text, dim=-1).t()


@pytest.mark.parametrize("bucketing", [True, False])
def test_mma_logits_and_loss_are_the_restated_ones(clip, images, bucketing):
    clip.text_bucketing = bucketing
    try:
        model = mma(clip, scale=0.5)  # a large scale, so a misplaced adapter shows in the logits
        expected = restated_mma_logits(model, clip, images)
        model.eval()
        with torch.no_grad():
            torch.testing.assert_close(model(images), expected, **TOL)
        model.train()
        loss, logits, _ = model.training_step({"images": images, "labels": LABELS})
        assert float(loss.detach()) == pytest.approx(float(F.cross_entropy(expected, LABELS)), abs=1e-5)
    finally:
        clip.text_bucketing = True


def test_mma_adapters_get_their_gradient_over_scale_and_the_backbone_the_true_one(clip, images):
    """The released gradient-scale layers: adapter parameters see grad / scale, the residual stream the true grad."""
    scale = 0.001
    model = mma(clip, scale=scale)
    pixels = images.clone().requires_grad_(True)
    loss, _, _ = model.training_step({"images": pixels, "labels": LABELS})
    loss.backward()
    ours = {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}
    ours_pixels = pixels.grad.clone()
    model.zero_grad()
    pixels.grad = None
    F.cross_entropy(restated_mma_logits(model, clip, pixels), LABELS).backward()
    for name, param in model.named_parameters():
        if param.requires_grad:
            torch.testing.assert_close(ours[name] * scale, param.grad, atol=1e-6, rtol=1e-3, msg=name)
    torch.testing.assert_close(ours_pixels, pixels.grad, atol=1e-7, rtol=1e-3)


def test_mma_trains_the_adapters_only(clip, images):
    model = mma(clip)
    trained = {name for name, p in model.named_parameters() if p.requires_grad}
    kinds = ("down.weight", "down.bias", "up.weight", "up.bias")
    expected = {f"{tower}_adapter.{b}.{kind}" for tower in ("text", "visual") for b in (1, 2) for kind in kinds}
    expected |= {f"shared_adapter.{b}.{kind}" for b in (1, 2) for kind in ("weight", "bias")}
    assert trained == expected
    text, vision, dim = 48, 64, 32
    per_layer = (2 * text * dim + dim + text) + (2 * vision * dim + dim + vision) + dim * dim + dim
    assert model.num_trainable_parameters() == 2 * per_layer
    model.training_step({"images": images, "labels": LABELS})[0].backward()
    assert all(p.grad is None for p in clip.parameters())
    assert all(model.get_parameter(name).grad.abs().sum() > 0 for name in expected)


def test_mma_fresh_adapters_are_he_initialised_with_zero_bias(clip):
    torch.manual_seed(0)
    model = create_model("mma", CLASSES, backbone=clip, layers_from=1, layers_to=3, adapter_dim=16)
    assert model.blocks == [0, 1, 2]
    assert all(float(p.abs().sum()) == 0 for n, p in model.named_parameters() if p.requires_grad and n.endswith("bias"))
    up = torch.cat([model.visual_adapter[str(b)].up.weight.flatten() for b in model.blocks])
    assert float(up.std()) == pytest.approx(math.sqrt(2 / 64), rel=0.1)  # kaiming over fan-out (64 rows)


def test_mma_released_names_map_layer_i_to_block_i_minus_1(clip):
    state = {"token_embedding": torch.zeros(2, 77, 48), "tokenized_prompts": torch.zeros(2, 77)}
    for layer in (2, 3):
        for tower, width in (("text", 48), ("visual", 64)):
            state[f"{tower}_adapter.{layer}.down.0.weight"] = torch.randn(32, width)
            state[f"{tower}_adapter.{layer}.down.0.bias"] = torch.randn(32)
            state[f"{tower}_adapter.{layer}.up.weight"] = torch.randn(width, 32)
            state[f"{tower}_adapter.{layer}.up.bias"] = torch.randn(width)
        state[f"shared_adapter.{layer}.0.weight"] = torch.randn(32, 32)
        state[f"shared_adapter.{layer}.0.bias"] = torch.randn(32)
    mapping, ignored = split_state("mma", get_method("mma").released, state, 32, Path("model.pth.tar-5"))
    assert ignored == ["token_embedding", "tokenized_prompts"]
    assert mapping.options == {"layers_from": 2, "layers_to": 3, "adapter_dim": 32}
    assert torch.equal(mapping.tensors["text_adapter.1.down.weight"], state["text_adapter.2.down.0.weight"])
    assert torch.equal(mapping.tensors["shared_adapter.2.bias"], state["shared_adapter.3.0.bias"])
    model = create_model("mma", CLASSES, backbone=clip, **mapping.options)
    model.load_adapter_state(mapping.tensors)
    assert torch.equal(model.visual_adapter["2"].up.weight, state["visual_adapter.3.up.weight"])


# ----------------------------------------------------------------- DePT
def dept_model(clip, method, classes=CLASSES, **options):
    torch.manual_seed(0)
    model = create_model(method, classes, backbone=clip, dept=True, **options)
    randomise_prompt_parameters(model, scale=0.3)
    with torch.no_grad():  # scale/shift near the identity, as trained ones are
        for film in (model.dept.film_image, model.dept.film_text):
            film.scale.add_(1.0)
    return model


def coop_features(clip, ctx, images):
    """Released CoOp's raw text features (C, E) and raw image features (B, E)."""
    m = clip.model
    tokens, prefix, suffix = released_class_embeddings(m, clip.tokenizer, "X X X X", 4, CLASSES)
    x = torch.cat([prefix, ctx.expand(len(CLASSES), -1, -1), suffix], dim=1) + m.positional_embedding
    for block in m.transformer.resblocks:
        x = block(x, attn_mask=m.attn_mask)
    text = m.ln_final(x)[torch.arange(len(CLASSES)), tokens.argmax(-1)] @ m.text_projection
    return text, m.encode_image(images)


def head(model, features, film):
    return F.linear(film.scale * features + film.bias, model.dept.head.weight, model.dept.head.bias)


def test_dept_coop_loss_and_base_new_logits_are_the_restated_ones(clip, images):
    model = dept_model(clip, "coop", n_ctx=4)
    text, image = coop_features(clip, model.ctx, images)
    clip_logits = clip.model.logit_scale.exp() * F.normalize(image, dim=-1) @ F.normalize(text, dim=-1).t()
    rows = torch.cat([head(model, text[LABELS], model.dept.film_text), head(model, image, model.dept.film_image)])
    head_ce = F.cross_entropy(rows, torch.cat([LABELS, LABELS]))
    expected_loss = 0.3 * F.cross_entropy(clip_logits, LABELS) + 0.7 * head_ce
    model.train()
    loss, _, terms = model.training_step({"images": images, "labels": LABELS})
    assert float(loss.detach()) == pytest.approx(float(expected_loss), abs=1e-5)
    assert set(terms) == {"ce", "dept_ce"}
    model.eval()
    image_head = head(model, image, model.dept.film_image)
    with torch.no_grad():
        torch.testing.assert_close(model(images), 0.3 * clip_logits + 0.7 * image_head, **TOL)
        model.set_classnames(["snow owl", "red fox"])  # trained classes only (ImageNet-A / -R): the head's rows of them
        torch.testing.assert_close(model(images), (0.3 * clip_logits + 0.7 * image_head)[:, [2, 0]], **TOL)
        model.set_classnames(["snow owl", "tabby cat"])  # an untrained class: CLIP logits only
        plain = create_model("coop", ["snow owl", "tabby cat"], backbone=clip, n_ctx=4).eval()
        plain.load_adapter_state({"ctx": model.ctx})
        torch.testing.assert_close(model(images), plain(images), atol=1e-6, rtol=0)
        model.set_classnames(CLASSES)
        model.options["dept_fusion"] = False
        torch.testing.assert_close(model(images), image_head, **TOL)


def test_dept_cocoop_head_trains_on_each_images_text_of_its_class(clip, images):
    model = dept_model(clip, "cocoop")
    model.train()
    raw_image, per_image_text, logits = model.training_features(images)
    own = per_image_text[torch.arange(3), LABELS]
    rows = torch.cat([head(model, own, model.dept.film_text), head(model, raw_image, model.dept.film_image)])
    expected = 0.3 * F.cross_entropy(logits, LABELS) + 0.7 * F.cross_entropy(rows, torch.cat([LABELS, LABELS]))
    loss, _, _ = model.training_step({"images": images, "labels": LABELS})
    assert float(loss.detach()) == pytest.approx(float(expected), abs=1e-5)


def test_dept_kgcoop_adds_its_knowledge_term_at_full_weight(clip, images):
    model = dept_model(clip, "kgcoop", kg_weight=2.0)
    model.train()
    loss, _, terms = model.training_step({"images": images, "labels": LABELS})
    dept_only = 0.3 * terms["ce"] + 0.7 * terms["dept_ce"]
    assert terms["kg"] > 0
    assert float(loss.detach()) == pytest.approx(dept_only + 2.0 * terms["kg"], abs=1e-5)


def test_dept_head_and_films_run_at_lr_scale_and_warm_up_with_the_rest(clip):
    model = dept_model(clip, "maple", depth=2)
    prompts, extra = model.parameter_groups()
    assert {id(p) for p in extra["params"]} == {id(p) for p in model.dept.parameters()}
    assert (prompts["lr_scale"], extra["lr_scale"]) == (1.0, 6.5)
    assert len(prompts["params"]) == len([p for p in model.parameters() if p.requires_grad]) - 6
    cfg = {"name": "sgd", "lr": 0.0035, "momentum": 0.9, "weight_decay": 5e-4, "scheduler": "released", "epochs": 10,
           "warmup_epochs": 1, "warmup_lr": 1e-5}
    optimizer = build_optimizer(model.parameter_groups(), cfg)
    scheduler = build_scheduler(optimizer, cfg, total_steps=10)
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([1e-5, 1e-5])  # epoch 0: the constant warm-up
    optimizer.step()
    scheduler.step()
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([0.0035, 0.0035 * 6.5])
    plain = create_model("maple", CLASSES, backbone=clip, depth=2)
    assert [g["lr"] for g in build_optimizer(plain.parameter_groups(), cfg).param_groups] == [0.0035]


def test_dept_maple_trains_prompts_couplings_and_head_only(clip, images):
    model = dept_model(clip, "maple", depth=2)
    model.train()
    model.training_step({"images": images, "labels": LABELS})[0].backward()
    assert all(p.grad is None for p in clip.parameters())
    grads = {name: p.grad for name, p in model.named_parameters() if p.requires_grad}
    assert set(grads) == {"text_prompts.layers.0", "text_prompts.layers.1", "coupling.0.weight", "coupling.0.bias",
                          "coupling.1.weight", "coupling.1.bias", "dept.film_image.scale", "dept.film_image.bias",
                          "dept.film_text.scale", "dept.film_text.bias", "dept.head.weight", "dept.head.bias"}
    assert all(grad is not None and grad.abs().sum() > 0 for grad in grads.values())


def test_dept_checkpoint_carries_its_classes_to_a_model_built_for_others(clip, images):
    model = dept_model(clip, "coop", n_ctx=4).eval()
    with torch.no_grad():
        base = model(images)
    other = create_model("coop", ["tabby cat", "fire truck"], backbone=clip, n_ctx=4, dept=True).eval()
    other.load_adapter_state(model.adapter_state())
    assert other.dept.head.weight.shape == (4, 32) and other.dept.rows is None
    other.set_classnames(CLASSES)
    with torch.no_grad():
        torch.testing.assert_close(other(images), base, atol=1e-6, rtol=0)


def test_dept_released_names_of_a_whole_model_coop_file(clip):
    state = {"prompt_learner.ctx": torch.randn(4, 48), "prompt_learner.token_prefix": torch.randn(4, 1, 48),
             "prompt_learner.token_suffix": torch.randn(4, 72, 48),
             "image_encoder.conv1.weight": torch.randn(64, 3, 8, 8),
             "text_encoder.ln_final.weight": torch.randn(48), "logit_scale": torch.tensor(4.6),
             "film_lp_img.scale": torch.randn(32), "film_lp_img.bias": torch.randn(32),
             "film_lp_text.scale": torch.randn(32), "film_lp_text.bias": torch.randn(32),
             "linear_probe_proj.weight": torch.randn(4, 32).half(), "linear_probe_proj.bias": torch.randn(4).half()}
    mapping, ignored = split_state("coop", get_method("coop").released, state, 32, Path("model.pth.tar-10"))
    assert mapping.options == {"n_ctx": 4, "class_specific": False, "dept": True}
    assert set(mapping.tensors) == {"ctx", "dept.film_image.scale", "dept.film_image.bias", "dept.film_text.scale",
                                    "dept.film_text.bias", "dept.head.weight", "dept.head.bias"}
    assert torch.equal(mapping.tensors["dept.film_text.bias"], state["film_lp_text.bias"])
    assert "image_encoder.conv1.weight" in ignored and "logit_scale" in ignored
    model = create_model("coop", ["a", "b"], backbone=clip, **mapping.options)
    model.load_adapter_state(mapping.tensors)  # the file names no classes: its head never fuses
    assert model.dept.head.weight.shape == (4, 32) and model.dept.rows is None


# ----------------------------------------------------------------- training runs
@pytest.mark.parametrize("method, options, trainable", [
    # 2 layers x (3152 text + 4192 visual + 1056 shared)
    ("mma", ["method.layers_from=2", "method.layers_to=3"], 16800),
    # ctx 4x48, two scale/shift pairs 4x32, the head over the 2 base classes 2x32+2
    # the variant's name: CoOp with method.dept on
    ("coop+dept", ["method.n_ctx=4"], 386),
])
def test_a_tiny_training_run(tmp_path, method, options, trainable):
    root = make_imagefolder(tmp_path / "data", ["cat", "dog", "owl", "fox"], per_class={"train": 2, "test": 2})
    cfg = load_config(None, [
        f"method={method}", *options, "data.dataset=imagefolder", f"data.root={root}", "data.shots=2",
        "data.batch_size=2",
        "data.eval_batch_size=8", f"model.backbone={register_tiny_clip()}", "model.pretrained=none", "optim.epochs=1",
        "optim.lr=0.01", "optim.warmup_epochs=0", "train.progress=false", "train.tensorboard=false",
    ])
    metrics = train(cfg, tmp_path / "run")
    assert (metrics["method"], metrics["steps"], metrics["trainable_parameters"]) == (method, 1, trainable)
    assert 0 <= metrics["base"]["accuracy"] <= 100 and 0 <= metrics["new"]["accuracy"] <= 100
    config, tensors, _ = read_checkpoint(tmp_path / "run")
    if method == "coop+dept":  # reported under the variant; recorded as the method and its switch
        recorded = yaml.safe_load((tmp_path / "run" / CONFIG_FILE).read_text())["method"]
        assert (recorded["name"], recorded["dept"], config["method"]) == ("coop", True, "coop")
        assert config["method_options"]["dept"] is True
        assert tensors["dept.head.weight"].shape == (2, 32) and tensors["extra.dept_classes"].shape == (2, 77)
