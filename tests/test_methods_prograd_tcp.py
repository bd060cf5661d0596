"""ProGrad's projected update and TCP's trainable set, on the tiny CLIP; both trained through ``mugcp.training.train``.

The expected gradients are computed independently: the released forward passes of ``released_reference``,
``torch.autograd.grad`` of each loss, and the released projection rule written out here.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from fixtures import make_imagefolder
from released_reference import (
    randomise_prompt_parameters,
    register_tiny_clip,
    released_coop_logits,
    released_image_encoder,
    released_logits,
    released_prograd_losses,
    released_tcp_text_features,
    released_template_features,
    tiny_clip,
)
from test_convert import CLASSES as CONVERT_CLASSES
from test_convert import convert, converted_model, released_state

from mugcp.config import load_config
from mugcp.methods import create_model
from mugcp.methods.prograd import ProGrad, project_conflicting
from mugcp.training import train

CLASSES = ["red fox", "blue whale", "snow owl", "sand cat"]


@pytest.fixture(scope="module")
def clip():
    return tiny_clip()


@pytest.fixture(scope="module")
def images():
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(11))


def no_averaging(params):
    pass


# ----------------------------------------------------------------- the projection rule
@pytest.mark.parametrize("strength, expected", [(1.0, [0.5, 0.5]), (0.8, [0.6, 0.4])])
def test_conflicting_gradient_loses_its_component_along_the_kl_gradient(strength, expected):
    ce, kl = torch.tensor([1.0, 0.0]), torch.tensor([-1.0, 1.0])  # cosine -1/sqrt(2)
    torch.testing.assert_close(project_conflicting(ce, kl, strength), torch.tensor(expected), atol=1e-7, rtol=0)


def test_aligned_gradient_is_kept_and_the_kl_gradient_is_not_added():
    ce, kl = torch.tensor([1.0, 0.0]), torch.tensor([1.0, 1.0])
    assert torch.equal(project_conflicting(ce, kl, 1.0), ce)


def test_one_cosine_over_the_whole_tensor():
    """Row 2 alone agrees with the KL gradient, but the flattened tensor conflicts: all of it is projected."""
    ce, kl = torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([[-1.0, 0.0], [0.0, 0.5]])
    torch.testing.assert_close(
        project_conflicting(ce, kl, 1.0), torch.tensor([[0.6, 0.0], [0.0, 1.2]]), atol=1e-6, rtol=0
    )


def test_a_zero_kl_gradient_counts_as_no_conflict_as_released():
    ce = torch.tensor([0.3, -0.2])
    assert torch.equal(project_conflicting(ce, torch.zeros(2), 1.0), ce)


# ----------------------------------------------------------------- ProGrad's update on the model
def released_gradients(clip, model, images, labels):
    """Gradients of the released CE and KL with respect to the context, from the released forward pass."""
    ctx = model.ctx.detach().clone().requires_grad_(True)
    logits = released_coop_logits(clip.model, clip.tokenizer, images, CLASSES, ctx, model.prompt_prefix)
    with torch.no_grad():
        teacher_text = released_template_features(clip.model, clip.tokenizer, ["a photo of a {}."], CLASSES)
        teacher = released_logits(clip.model, released_image_encoder(clip.model, images), teacher_text)
    ce, kl = released_prograd_losses(logits, teacher, labels)
    (ce_grad,) = torch.autograd.grad(ce, ctx, retain_graph=True)
    (kl_grad,) = torch.autograd.grad(kl, ctx)
    return ce_grad, kl_grad


@pytest.mark.parametrize("labels, conflict", [([3, 3, 3], True), ([2, 2, 0], False)])
def test_prograd_backward_gives_the_released_projected_gradient(clip, images, labels, conflict):
    torch.manual_seed(0)
    model = create_model("prograd", CLASSES, backbone=clip, grad_lambda=0.8)
    randomise_prompt_parameters(model, seed=4, scale=0.1)
    labels = torch.tensor(labels)
    ce_grad, kl_grad = released_gradients(clip, model, images, labels)
    cosine = float(torch.dot(ce_grad.flatten(), kl_grad.flatten()) / (ce_grad.norm() * kl_grad.norm()))
    assert (cosine < 0) == conflict
    unit = kl_grad / kl_grad.norm()
    expected = ce_grad - 0.8 * torch.dot(ce_grad.flatten(), unit.flatten()) * unit if conflict else ce_grad

    model.train()
    loss, _, _ = model.training_step({"images": images, "labels": labels})
    model.backward(loss, lambda value: value, no_averaging)
    torch.testing.assert_close(model.ctx.grad, expected, atol=1e-5, rtol=1e-4)
    if conflict:  # the projection really changed the update
        assert not torch.allclose(model.ctx.grad, ce_grad, atol=1e-4)
    with pytest.raises(RuntimeError, match="needs the KL term of a training_step first"):
        model.backward(loss, lambda value: value, no_averaging)


# ----------------------------------------------------------------- what is trained
@pytest.mark.parametrize(
    "method, trained",
    [
        ("prograd", {"ctx"}),
        (
            "tcp",
            {
                "ctx",
                "meta_net.linear1.weight",
                "meta_net.linear1.bias",
                "meta_net.linear2.weight",
                "meta_net.linear2.bias",
            },
        ),
    ],
)
def test_gradients_reach_only_what_the_released_code_trains(clip, images, method, trained):
    model = create_model(method, CLASSES, backbone=clip, **({"token_layer": 2} if method == "tcp" else {}))
    assert {name for name, p in model.named_parameters() if p.requires_grad} == trained
    assert not any(p.requires_grad for p in clip.parameters())
    model.train()
    loss, _, _ = model.training_step({"images": images, "labels": torch.tensor([0, 1, 2])})
    model.backward(loss, lambda value: value, no_averaging)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for name, p in model.named_parameters() if name in trained)
    assert all(p.grad is None for p in clip.parameters())
    model.zero_grad(set_to_none=True)


def test_tcp_sizes_follow_the_backbone_and_new_classes_use_the_trained_generator(clip, images):
    model = create_model("tcp", CLASSES, backbone=clip, token_layer=2)
    assert tuple(model.meta_net.linear1.weight.shape) == (clip.embed_dim // 4, clip.embed_dim)
    assert tuple(model.meta_net.linear2.weight.shape) == (4 * clip.text_width, clip.embed_dim // 4)
    assert model.num_trainable_parameters() == 4 * 48 + (32 * 8 + 8) + (8 * 192 + 192)
    model.eval()
    model.set_classnames(["tree frog", "barn swallow"])
    with torch.no_grad():
        tokens = model.class_tokens()
        before = model(images)
        model.meta_net.linear2.bias.add_(torch.randn(4 * clip.text_width, generator=torch.Generator().manual_seed(2)))
        model._eval_text_features = None
        after = model(images)
    assert tokens.shape == (2, 4, clip.text_width) and before.shape == (3, 2)
    assert (before - after).abs().max() > 1e-3  # the new classes' prompts go through the trained generator


@pytest.mark.parametrize(
    "options, message",
    [
        ({"token_layer": 3}, "'token_layer' is 3, but the text encoder of mugcp-tiny-test has 3 layers"),
        (
            {"token_layer": 2, "meta_reduction": 64},
            "'meta_reduction' (64) leaves no hidden units for a 32-wide text feature",
        ),
    ],
)
def test_tcp_bad_options_are_named(clip, options, message):
    with pytest.raises(ValueError) as err:
        create_model("tcp", CLASSES, backbone=clip, **options)
    assert message in str(err.value)


def test_prograd_init_text_longer_than_the_context_is_refused(clip):
    with pytest.raises(ValueError, match=r"'ctx_init' \('a photo of a big red fox'\) has 7 words, more than n_ctx=4"):
        create_model("prograd", CLASSES, backbone=clip, n_ctx=4, ctx_init="a photo of a big red fox")


# ----------------------------------------------------------------- through the trainer
@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return make_imagefolder(tmp_path_factory.mktemp("data"), CLASSES, per_class={"train": 4, "test": 2})


def tiny_run(data_root, out, *options):
    cfg = load_config(
        None,
        [
            "data.dataset=imagefolder",
            f"data.root={data_root}",
            "data.shots=2",
            "data.batch_size=2",
            "data.eval_batch_size=8",
            f"model.backbone={register_tiny_clip()}",
            "model.pretrained=none",
            "optim.epochs=2",
            "optim.lr=0.01",
            "optim.warmup_epochs=0",
            "train.progress=false",
            "train.tensorboard=false",
            *options,
        ],
    )
    return train(cfg, out)


def test_prograd_trains_through_its_own_backward(tmp_path, data_root, monkeypatch):
    calls = []
    real = ProGrad.backward

    def counted(self, loss, scale, average):
        calls.append(float(loss.detach()))
        return real(self, loss, scale, average)

    monkeypatch.setattr(ProGrad, "backward", counted)
    metrics = tiny_run(data_root, tmp_path / "prograd", "method=prograd", "method.n_ctx=8")
    assert (
        metrics["method"] == "prograd" and metrics["steps"] == len(calls) == 4
    )  # 2 classes x 2 shots / batch 2, 2 epochs
    steps = [json.loads(line) for line in (tmp_path / "prograd" / "metrics.jsonl").read_text().splitlines()]
    terms = [row["terms"] for row in steps if row["kind"] == "train"]
    assert [row["ce"] for row in terms] == pytest.approx(calls) and all(math.isfinite(row["kl"]) for row in terms)


def test_tcp_trains_with_the_released_adam(tmp_path, data_root):
    metrics = tiny_run(
        data_root, tmp_path / "tcp", "method=tcp", "method.token_layer=2", "optim.name=adam", "optim.eps=0.001"
    )
    assert metrics["method"] == "tcp" and metrics["steps"] == 4
    assert metrics["trainable_parameters"] == 4 * 48 + (32 * 8 + 8) + (8 * 192 + 192)
    state = torch.load(tmp_path / "tcp" / "checkpoint" / "trainer_state.pt", weights_only=False)
    assert state["optimizer"]["param_groups"][0]["eps"] == 0.001 and "exp_avg_sq" in next(
        iter(state["optimizer"]["state"].values())
    )


# ----------------------------------------------------------------- released checkpoints (none are published)
def test_converted_prograd_and_tcp_give_released_logits(tmp_path, clip, images):
    (tmp_path / "prograd").mkdir()
    state = released_state("prograd")
    model, config, _ = converted_model(clip, convert(tmp_path / "prograd", "prograd", state))
    assert config["method_options"]["n_ctx"] == 16 and config["method_options"]["ctx_init"] == "auto"
    with torch.no_grad():  # no dataset: the context slots precede "a photo of a"'s last word-count tokens, as released
        expected = released_coop_logits(
            clip.model, clip.tokenizer, images, CONVERT_CLASSES, state["ctx"].float(), "X " * 12 + "a photo of a"
        )
        torch.testing.assert_close(model(images), expected, atol=1e-4, rtol=0)

    (tmp_path / "tcp").mkdir()
    state = {k: v.float() for k, v in released_state("tcp").items()}
    model, config, _ = converted_model(clip, convert(tmp_path / "tcp", "tcp", state, "--option", "token_layer=2"))
    assert config["method_options"]["meta_reduction"] == 4
    with torch.no_grad():
        text, _ = released_tcp_text_features(
            clip.model,
            clip.tokenizer,
            CONVERT_CLASSES,
            state["ctx"],
            (state["meta_net.linear1.weight"], state["meta_net.linear1.bias"]),
            (state["meta_net.linear2.weight"], state["meta_net.linear2.bias"]),
            "a photo of a {}.",
            "a photo of a {}.",
            2,
        )
        image = released_image_encoder(clip.model, images)
        expected = clip.model.logit_scale.exp() * (image / image.norm(dim=-1, keepdim=True)) @ text.t()
        torch.testing.assert_close(model(images), expected, atol=1e-4, rtol=0)


def test_adam_adds_weight_decay_to_the_gradient_with_the_configured_eps():
    """Dassl's "adam" (TCP's released optimiser): L2 folded into the gradient, not AdamW's decoupled decay."""
    from mugcp.training.optim import build_optimizer

    param = torch.nn.Parameter(torch.ones(2))
    optim_cfg = {"name": "adam", "lr": 0.1, "betas": [0.9, 0.999], "eps": 1e-3, "weight_decay": 0.5, "momentum": 0.9}
    optimizer = build_optimizer([param], optim_cfg)
    assert type(optimizer) is torch.optim.Adam and optimizer.param_groups[0]["eps"] == 1e-3
    param.grad = torch.zeros(2)
    optimizer.step()  # gradient 0 + 0.5 * 1: Adam's first step is lr * g / (|g| + eps)
    torch.testing.assert_close(param.detach(), torch.full((2,), 1 - 0.1 * 0.5 / (0.5 + 1e-3)), atol=1e-7, rtol=0)
