"""MuGCP (SCP, AMG, VCP, MPF) on a random-weight ViT-B-32.

Random weights make the numbers meaningless but every shape, gradient path, masking rule and kernel
parity real. Most tests prompt 3 layers instead of 9: the code path per layer is the same.
"""
from __future__ import annotations

import importlib.util
import pickle

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

import mugcp.kernels as kernels
from mugcp.backbones.text_buckets import text_groups
from mugcp.config import ConfigError, load_config
from mugcp.methods import create_model, get_method, resolve_options
from mugcp.methods.mugcp_modules import AttentionPooling, MutualGuidance
from mugcp.methods.mugcp_semantics import CaptionFeatures, encode_captions, resolve_semantic_source

CLASSES = ["red fox", "blue whale", "snow owl"]
OTHER_CLASSES = ["sand cat", "tree frog", "barn swallow", "sea urchin"]
LABELS = torch.tensor([0, 2])
FAST = {"depth": 2}
# Weights that only act through the tanh-gated AMG paths: with γ = 0 they cannot get a gradient.
GATED_WEIGHTS = ("out_visual.weight", "value_semantic.weight", "out_semantic.weight")


@pytest.fixture(scope="module")
def clip(vit_b32):
    return vit_b32


@pytest.fixture(scope="module")
def clip_snapshot(clip):
    return {name: tensor.detach().clone() for name, tensor in clip.state_dict().items()}


@pytest.fixture(scope="module")
def images():
    return torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def one_image(images, semantic):
    """The second image alone (the one whose semantic features end in padding): cheaper to run."""
    return images[1:], (semantic[0][1:], semantic[1][1:])


@pytest.fixture(scope="module")
def semantic():
    """Caption-like features (B=2, T=6, 512); the second image has 4 real tokens and 2 of padding."""
    features = torch.randn(2, 6, 512, generator=torch.Generator().manual_seed(4))
    mask = torch.tensor([[True] * 6, [True] * 4 + [False] * 2])
    features[1, 4:] = 0.0
    return features, mask


def build(clip, classnames=CLASSES, seed=0, **options):
    torch.manual_seed(seed)
    return create_model("mugcp", classnames, backbone=clip, **{**FAST, **options})


def batch_for(model, images, semantic):
    batch = {"images": images, "labels": LABELS[: len(images)]}
    if model.semantic_source == "mllm":
        batch["semantic"], batch["semantic_mask"] = semantic
    return batch


def eval_logits(model, images, semantic=None, mask=None):
    model.eval()
    with torch.no_grad():
        return model(images, semantic, mask)


def gradients(model, images, semantic) -> dict[str, torch.Tensor]:
    model.train()
    model.zero_grad(set_to_none=True)
    loss, _, _ = model.training_step(batch_for(model, images, semantic))
    loss.backward()
    return {name: p.grad for name, p in model.named_parameters() if p.requires_grad}


def assert_clip_unchanged(clip, snapshot):
    changed = [name for name, tensor in clip.state_dict().items() if not torch.equal(tensor, snapshot[name])]
    assert not changed, f"frozen CLIP tensors changed: {changed[:5]}"
    assert not any(p.requires_grad for p in clip.parameters())


# ----------------------------------------------------------------- build, kernels, logits
@pytest.mark.parametrize("bucketing", [False, True], ids=["single_pass", "bucketed"])
def test_default_build_calls_both_kernels_once_per_prompted_layer(clip, one_image, monkeypatch, bucketing):
    calls = {"mutual_attention": [], "fuse_prompts": []}
    for name in calls:
        original = getattr(kernels, name)

        def counted(*args, _original=original, _name=name, **kwargs):
            calls[_name].append(kwargs.get("backend"))
            return _original(*args, **kwargs)

        monkeypatch.setattr(kernels, name, counted)
    torch.manual_seed(0)
    model = create_model("mugcp", CLASSES, backbone=clip)  # DESIGN defaults: J=9, n_c=2, n_s=4, h=8
    assert (model.depth, model.n_ctx, model.n_semantic) == (9, 2, 4)
    assert model.conditional and model.batch_inputs == ("semantic", "semantic_mask")
    image, (features, mask) = one_image
    monkeypatch.setattr(clip, "text_bucketing", bucketing)
    logits = eval_logits(model, image, features, mask)
    assert logits.shape == (1, len(CLASSES)) and torch.isfinite(logits).all()
    # AMG in every prompted vision layer, the B×C text write in every prompted text layer. The
    # bucketed path writes layers 1-8 into the per-image prefix once, and layer 0 once for the prefix
    # and once per length bucket (text_path tests: the same features as the single pass).
    assert calls["mutual_attention"] == ["reference"] * 9
    buckets = len(text_groups(model.class_prompts.tokens.argmax(-1))) if bucketing else 0
    assert calls["fuse_prompts"] == ["reference"] * (9 + buckets)
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and not any(name.startswith("clip.") for name in trainable)
    # The last prompted layer's S^J would reach no text layer, so it has no update weights.
    assert "guidance.8.out_semantic.weight" not in trainable and "guidance.7.out_semantic.weight" in trainable


def test_text_sequences_in_chunks_give_the_same_logits(clip, one_image):
    whole = build(clip)
    chunked = build(clip, max_text_sequences=2)  # one image: 2 + 1 classes per text-encoder call
    image, (features, mask) = one_image
    torch.testing.assert_close(eval_logits(chunked, image, features, mask), eval_logits(whole, image, features, mask),
                               rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------- training
def test_training_step_updates_only_trainable_parameters(clip, clip_snapshot, images, semantic, monkeypatch):
    image_passes = []
    original = clip.encode_image
    monkeypatch.setattr(clip, "encode_image",
                        lambda *a, **k: image_passes.append(k.get("deep_prompts") is None) or original(*a, **k))
    model = build(clip, amg_gate_init=0.5)  # open AMG gates: see the next test for the closed start
    before = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model.train()
    loss, logits, terms = model.training_step(batch_for(model, images, semantic))
    assert logits.shape == (2, len(CLASSES)) and set(terms) == {"ce"}
    torch.testing.assert_close(loss, F.cross_entropy(logits, LABELS))
    # Consistency weights are 0 by default: no frozen image pass, no zero-shot text features.
    assert image_passes == [False] and model._frozen_text_features is None
    optimizer.zero_grad()
    loss.backward()
    no_gradient = [name for name, p in model.named_parameters() if p.requires_grad and not p.grad.abs().sum() > 0]
    assert not no_gradient, f"parameters without gradient: {no_gradient}"
    optimizer.step()
    unchanged = [name for name, p in model.named_parameters()
                 if p.requires_grad and torch.equal(p.detach(), before[name])]
    assert not unchanged, f"trainable parameters not updated: {unchanged}"
    assert_clip_unchanged(clip, clip_snapshot)


def test_closed_amg_gates_block_exactly_the_gated_weights(clip, one_image):
    # At the zero start tanh(γ)=0 multiplies the semantic→visual message and the S update, so exactly
    # the weights behind those products get no gradient, while γ itself does (d tanh/dγ = 1 at 0):
    # the first optimiser step opens the gates, and from then on every parameter gets a gradient
    # (the previous test, with open gates).
    closed = gradients(build(clip), *one_image)
    no_gradient = {name for name, grad in closed.items() if grad is None or not grad.abs().sum() > 0}
    expected = {name for name in closed if name.startswith("guidance.") and name.endswith(GATED_WEIGHTS)}
    assert len(expected) == 3 * FAST["depth"] - 1 > 0
    assert no_gradient == expected
    assert all(closed[f"guidance.{j}.gate_visual"].abs().sum() > 0 for j in range(FAST["depth"]))
    assert all(closed[f"guidance.{j}.gate_semantic"].abs().sum() > 0 for j in range(FAST["depth"] - 1))


@pytest.mark.parametrize(
    "options",
    [  # mllm with caption features: test_training_step_updates_only_trainable_parameters
        {"semantic_source": "mllm", "semantic_features": "hidden", "semantic_dim": 24},
        {"semantic_source": "clip"},
        {"semantic_source": "none"},
    ],
    ids=["mllm-hidden", "clip", "none"],
)
def test_every_semantic_source_trains(clip, one_image, options):
    images, semantic = one_image
    model = build(clip, **options)
    if options.get("semantic_features") == "hidden":
        features = torch.randn(1, 5, 24, dtype=torch.float16)  # the cache stores fp16
        semantic = (features, torch.tensor([[True] * 2 + [False] * 3]))
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    scp = model.pooling if options["semantic_source"] != "none" else model.semantic_tokens
    before = ([p.detach().clone() for p in scp.parameters()] if isinstance(scp, torch.nn.Module)
              else [scp.detach().clone()])
    model.train()
    loss, logits, _ = model.training_step(batch_for(model, images, semantic))
    assert torch.isfinite(loss) and logits.shape == (1, len(CLASSES))
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    after = list(scp.parameters()) if isinstance(scp, torch.nn.Module) else [scp]
    assert all(not torch.equal(a.detach(), b) for a, b in zip(after, before)), "the SCP parameters did not train"


def test_consistency_terms_use_one_frozen_image_pass(clip, one_image, monkeypatch):
    images, semantic = one_image
    image_passes = []
    original = clip.encode_image
    monkeypatch.setattr(clip, "encode_image",
                        lambda *a, **k: image_passes.append(k.get("deep_prompts") is None) or original(*a, **k))
    weights = {"text_consistency_weight": 25.0, "image_consistency_weight": 10.0, "logit_consistency_weight": 1.0}
    model = build(clip, **weights)
    model.train()
    loss, logits, terms = model.training_step(batch_for(model, images, semantic))
    assert image_passes == [True, False]  # one frozen pass, one prompted pass
    assert set(terms) == {"ce", "text_consistency", "image_consistency", "logit_consistency"}
    assert all(value > 0 for value in terms.values())
    expected = terms["ce"] + sum(weights[f"{name}_weight"] * terms[name] for name in terms if name != "ce")
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert model.frozen_text_features().shape == (len(CLASSES), clip.embed_dim)


# ----------------------------------------------------------------- AMG and SCP in isolation
def test_closed_amg_gates_leave_visual_and_semantic_tokens_unchanged(clip, images):
    model = build(clip)
    semantic0 = torch.randn(2, model.n_semantic, clip.text_width)
    semantic_layers = [semantic0]
    hook = model._vision_hook(semantic_layers)
    prompts = model.n_ctx + model.n_semantic
    with torch.no_grad():
        layer0 = clip.embed_image(images)
        tokens = layer0.shape[1]
        out0 = hook(0, layer0)
        assert out0.shape == (2, tokens + prompts, clip.vision_width)  # prompts appended at layer 0
        assert torch.equal(out0[:, :tokens], layer0)
        layer1 = out0 + torch.randn_like(out0)  # stands in for layer 0's output
        out1 = hook(1, layer1)
        assert out1.shape == layer1.shape  # prompts replaced at later layers
        assert torch.equal(out1[:, :tokens], layer1[:, :tokens])
        assert not torch.equal(out1[:, tokens:], layer1[:, tokens:])
    assert len(semantic_layers) == model.depth and all(torch.equal(s, semantic0) for s in semantic_layers)

    # The same module with open gates does change both, so the checks above can fail.
    guidance = MutualGuidance(clip.vision_width, clip.text_width, 64, 8, gate_init=0.5)
    visual = torch.randn(2, tokens, clip.vision_width)
    new_visual, visual_prompts, next_semantic = guidance(visual, semantic0)
    assert visual_prompts.shape == (2, model.n_semantic, clip.vision_width)
    assert not torch.equal(new_visual, visual) and not torch.equal(next_semantic, semantic0)


def test_attention_pooling_ignores_padding():
    torch.manual_seed(0)
    pooling = AttentionPooling(in_dim=24, out_dim=32, n_queries=4, dim=16, heads=4)
    features = torch.randn(3, 5, 24)
    mask = torch.tensor([[True] * 5, [True] * 3 + [False] * 2, [False] * 5])
    pooled = pooling(features, mask)
    assert pooled.shape == (3, 4, 32)

    garbage = features.clone()
    garbage[1, 3], garbage[1, 4], garbage[2] = float("nan"), 1e6, float("inf")
    extra = torch.cat([garbage, torch.full((3, 4, 24), 7e4)], dim=1)  # longer padding, same real tokens
    extra_mask = torch.cat([mask, torch.zeros(3, 4, dtype=torch.bool)], dim=1)
    torch.testing.assert_close(pooling(extra, extra_mask), pooled, rtol=1e-5, atol=1e-6)
    # An image without any real token pools to zeros, i.e. S⁰ is the output bias.
    torch.testing.assert_close(pooled[2], pooling.out.bias.detach().expand(4, 32))
    # No mask means every token is real; changing a real token does change the result.
    torch.testing.assert_close(pooling(features[:1]), pooled[:1])
    changed = features.clone()
    changed[1, 0] = torch.randn(24)
    assert not torch.allclose(pooling(changed, mask)[1], pooled[1])


def test_padding_does_not_change_the_model_logits(clip, one_image):
    model = build(clip)
    image, (features, mask) = one_image
    padded = torch.cat([features, torch.randn(1, 3, 512) * 100], dim=1)
    padded_mask = torch.cat([mask, torch.zeros(1, 3, dtype=torch.bool)], dim=1)
    torch.testing.assert_close(eval_logits(model, image, padded, padded_mask),
                               eval_logits(model, image, features, mask), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------- persistence
def test_checkpoint_round_trip_and_other_classnames(clip, one_image, tmp_path):
    trained = build(clip, seed=1)
    with torch.no_grad():  # move away from the initial values so that a failed load would show
        for param in trained.parameters():
            if param.requires_grad:
                param.add_(0.05 * torch.randn_like(param))
    path = tmp_path / "adapter.safetensors"
    save_file({k: v.contiguous() for k, v in trained.adapter_state().items()}, str(path))
    state = load_file(str(path))
    assert not any(key.startswith(("clip.", "class_prompts.")) for key in state)

    fresh = build(clip, seed=2)
    fresh.load_adapter_state(state)
    image, (features, mask) = one_image
    assert torch.equal(eval_logits(fresh, image, features, mask), eval_logits(trained, image, features, mask))

    other = build(clip, classnames=OTHER_CLASSES, seed=3)
    other.load_adapter_state(state)
    trained.set_classnames(OTHER_CLASSES)
    logits = eval_logits(other, image, features, mask)
    assert logits.shape == (1, len(OTHER_CLASSES))
    assert torch.equal(logits, eval_logits(trained, image, features, mask))


# ----------------------------------------------------------------- Triton parity
@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_triton_kernels_give_the_reference_logits_and_gradients(clip, one_image):
    if not kernels.backend.interpreter_enabled():
        pytest.skip("the model runs on the CPU here, so its Triton kernels need TRITON_INTERPRET=1 "
                    "(tests/conftest.py sets it)")
    # Open gates so that every kernel input carries a gradient.
    images, semantic = one_image
    tiny = {"depth": 1, "amg_gate_init": 0.3, "prompt_gate_init": 0.4}
    reference = build(clip, CLASSES[:2], **tiny)
    triton = build(clip, CLASSES[:2], **tiny, kernels="triton")
    triton.load_adapter_state(reference.adapter_state())
    assert triton.kernels == "triton"
    results = []
    for model in (reference, triton):
        model.train()
        model.zero_grad(set_to_none=True)
        loss, logits, _ = model.training_step(batch_for(model, images, semantic))
        loss.backward()
        results.append((logits.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}))
    (ref_logits, ref_grads), (tri_logits, tri_grads) = results
    torch.testing.assert_close(tri_logits, ref_logits, rtol=1e-4, atol=1e-4)
    for name, grad in ref_grads.items():
        scale = float(grad.abs().max())
        torch.testing.assert_close(tri_grads[name], grad, rtol=1e-3, atol=1e-4 * scale + 1e-9,
                                   msg=lambda m, n=name: f"{n}: {m}")


# ----------------------------------------------------------------- semantic inputs and errors
def test_encode_captions_returns_the_frozen_text_token_outputs(clip):
    texts = ["a red fox in the snow", "", "fox"]
    features, mask = encode_captions(clip, texts, chunk=2)
    tokens = clip.tokenize(texts)
    lengths = tokens.argmax(dim=-1) + 1
    assert features.shape == (3, int(lengths.max()), clip.text_width)
    assert mask.sum(dim=1).tolist() == lengths.tolist() and lengths.tolist()[1:] == [2, 3]
    assert torch.equal(features[~mask], torch.zeros_like(features[~mask]))
    # The EOT row projected by CLIP's text projection is CLIP's own text feature.
    eot = features[torch.arange(3), lengths - 1]
    torch.testing.assert_close(eot @ clip.model.text_projection, clip.encode_text(tokens), rtol=1e-5, atol=1e-5)

    class Answers(dict):
        def text(self, key):
            return self[key]

    table = CaptionFeatures.from_texts(clip, Answers(cat=texts[0], empty=texts[1]), chunk=1)
    assert table.dim == clip.text_width and sorted(table) == ["cat", "empty"] and "cat" in table
    assert table["cat"].dtype == torch.float16 and table["cat"].shape == (int(lengths[0]), clip.text_width)
    torch.testing.assert_close(table["cat"].float(), features[0, : int(lengths[0])], rtol=1e-3, atol=1e-3)
    assert sorted(pickle.loads(pickle.dumps(table))) == ["cat", "empty"]
    with pytest.raises(KeyError, match="no caption features for 'dog'"):
        table["dog"]


def test_resolve_semantic_source():
    assert resolve_semantic_source({"source": "auto", "cache": "c"}, cache=object()) == ("mllm", None)
    source, warning = resolve_semantic_source({"source": "auto", "cache": None}, cache=None)
    assert source == "clip" and "ablation" in warning and "mugcp.extract" in warning
    assert resolve_semantic_source({"source": "none"}) == ("none", None)
    with pytest.raises(ConfigError, match="semantic.source=mllm needs a semantic cache"):
        resolve_semantic_source({"source": "mllm", "cache": None})
    with pytest.raises(ConfigError, match="must be auto, mllm, clip or none"):
        resolve_semantic_source({"source": "llava"})


def test_bad_inputs_and_options_are_clear_errors(clip, images, semantic):
    model = build(clip, depth=1)
    with pytest.raises(ValueError, match="semantic_source='mllm' needs each image's semantic features"):
        model(images)
    with pytest.raises(ValueError, match=r"expected \(2, T, 512\)"):
        model(images, torch.randn(2, 4, 300))
    with pytest.raises(ValueError, match="semantic_mask must be a bool tensor of shape"):
        model(images, semantic[0], semantic[1].float())
    with pytest.raises(ValueError, match="built with semantic_source='none' but got semantic features"):
        build(clip, depth=1, semantic_source="none")(images, *semantic)
    with pytest.raises(ConfigError, match="semantic_features=caption gives caption token features"):
        build(clip, semantic_dim=4096)
    with pytest.raises(ConfigError, match="semantic_features=hidden needs semantic_dim"):
        build(clip, semantic_features="hidden")
    with pytest.raises(ConfigError, match="option 'depth' is 13"):
        build(clip, depth=13)
    refused = "^method.semantic_source='auto' is not allowed: expected one of mllm, clip, none for method 'mugcp'"
    with pytest.raises(ConfigError, match=refused):
        build(clip, semantic_source="auto")
    with pytest.raises(ConfigError, match="^method.amg_dim=100 is not a multiple of method.amg_heads=8: the width"):
        build(clip, amg_dim=100)


def test_config_file_carries_every_default():
    spec = get_method("mugcp")
    assert spec.config == "configs/methods/mugcp.yaml" and spec.paper and spec.conditions_on
    cfg = load_config(spec.config)
    assert resolve_options("mugcp", cfg["method"]) == spec.defaults
    assert {k for k in cfg["method"] if k != "name"} == set(spec.defaults)
    assert (cfg["optim"]["name"], cfg["optim"]["lr"], cfg["optim"]["epochs"],
            cfg["data"]["batch_size"]) == ("sgd", 0.0035, 5, 4)
    assert (spec.defaults["depth"], spec.defaults["n_ctx"], spec.defaults["n_semantic"],
            spec.defaults["amg_heads"]) == (9, 2, 4, 8)
