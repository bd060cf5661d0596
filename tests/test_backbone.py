"""The prompt-ready backbone equals open_clip, truncation is exact, prompts go where documented."""
import contextlib

import pytest
import torch

from mugcp.backbones import PretrainedLoadError, load_clip, normalize_model_name, quick_gelu_setting
from mugcp.kernels.attention import AttentionBackendError, attention

TEXTS = ["a photo of a cat.", "a dog", "a very long description of a small red fox in the snow at dawn"]


@pytest.fixture(scope="module")
def images():
    return torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))


def test_without_prompts_equals_open_clip(vit_b32, images):
    tokens = vit_b32.tokenize(TEXTS)
    with torch.no_grad():
        text_diff = (vit_b32.encode_text(tokens) - vit_b32.model.encode_text(tokens)).abs().max()
        image_diff = (vit_b32.encode_image(images) - vit_b32.model.encode_image(images)).abs().max()
    assert text_diff <= 1e-5
    assert image_diff <= 1e-5


def test_text_is_truncated_after_last_eot_and_features_unchanged(vit_b32):
    tokens = vit_b32.tokenize(["a cat", "a small dog"])
    lengths = []

    def spy(layer, x):
        lengths.append(x.shape[1])
        return x

    with torch.no_grad():
        truncated = vit_b32.encode_text(tokens, deep_prompts=spy)
        full = vit_b32.model.encode_text(tokens)
    longest_eot = int(tokens.argmax(dim=-1).max())
    assert set(lengths) == {longest_eot + 1} and longest_eot + 1 < tokens.shape[1]
    assert (truncated - full).abs().max() <= 1e-5


@pytest.mark.parametrize("causal", [False, True])
def test_naive_attention_equals_sdpa(causal):
    q, k, v = torch.randn(3, 2, 4, 9, 16).unbind(0)
    assert torch.allclose(attention(q, k, v, causal, "naive"), attention(q, k, v, causal, "sdpa"), atol=1e-6)


def test_backbone_naive_equals_sdpa(vit_b32, images):
    tokens = vit_b32.tokenize(TEXTS)
    with torch.no_grad():
        sdpa_text, sdpa_image = vit_b32.encode_text(tokens), vit_b32.encode_image(images)
        vit_b32.attention_backend = "naive"
        try:
            naive_text, naive_image = vit_b32.encode_text(tokens), vit_b32.encode_image(images)
        finally:
            vit_b32.attention_backend = "sdpa"
    assert (naive_text - sdpa_text).abs().max() <= 1e-5
    assert (naive_image - sdpa_image).abs().max() <= 1e-5


@pytest.mark.parametrize("backend", ["flash_attn", "xformers"])
def test_optional_attention_backends_fail_clearly_without_cuda(backend):
    q = torch.randn(1, 1, 3, 8)
    with pytest.raises(AttentionBackendError, match=rf"{backend}.*(not installed|only on CUDA)"):
        attention(q, q, q, False, backend)


def test_unknown_attention_backend_is_named():
    q = torch.randn(1, 1, 3, 8)
    with pytest.raises(AttentionBackendError, match="unknown attention backend 'fast'"):
        attention(q, q, q, False, "fast")


@contextlib.contextmanager
def layer_inputs(backbone):
    """Record the sequence entering every transformer block while the ``with`` body runs."""
    seen = []
    original_block = backbone.block

    def recording_block(block, x, causal):
        seen.append(x.detach().clone())
        return original_block(block, x, causal)

    backbone.block = recording_block
    try:
        with torch.no_grad():
            yield seen
    finally:
        del backbone.block


def test_text_prompts_replace_positions_after_sos(vit_b32):
    tokens = vit_b32.tokenize(["X X X cat."])
    prompts = [torch.randn(1, 3, vit_b32.text_width), None, torch.randn(1, 3, vit_b32.text_width)]
    with layer_inputs(vit_b32) as seen:
        prompted = vit_b32.encode_text(tokens, deep_prompts=prompts)
    plain = vit_b32.encode_text(tokens)
    assert torch.equal(seen[0][:, 1:4], prompts[0])
    assert torch.equal(seen[2][:, 1:4], prompts[2])
    assert not torch.allclose(prompted, plain)


def test_vision_prompts_appended_then_replaced(vit_b32, images):
    width = vit_b32.vision_width
    prompts = [torch.randn(2, 4, width), torch.randn(2, 4, width)]
    with layer_inputs(vit_b32) as seen:
        vit_b32.encode_image(images, deep_prompts=prompts)
    lengths, tails = [x.shape[1] for x in seen], [x[:, -4:] for x in seen]
    patches = (224 // 32) ** 2 + 1
    assert lengths == [patches + 4] * vit_b32.vision_layers
    # Layer-0 prompts are appended before ln_pre (the released MaPLe / IVLP / PromptSRC placement), so
    # layer 0 sees them normalised together with the image tokens; deeper ones replace the tail as given.
    with torch.no_grad():
        before_ln_pre = torch.cat([vit_b32.embed_patches(images), prompts[0]], dim=1)
        assert torch.equal(seen[0], vit_b32.model.visual.ln_pre(before_ln_pre))
    assert not torch.allclose(tails[0], prompts[0])
    assert torch.equal(tails[1], prompts[1])


def test_openai_model_names_are_normalised():
    assert normalize_model_name("ViT-B/16") == "ViT-B-16"
    assert normalize_model_name(" ViT-L/14 ") == "ViT-L-14"


def test_unknown_model_name_suggests_close_matches():
    with pytest.raises(PretrainedLoadError, match=r"unknown open_clip model 'ViT-B-33'.*ViT-B-32"):
        load_clip("ViT-B-33")


def test_missing_weights_file_is_named(tmp_path):
    with pytest.raises(PretrainedLoadError, match=r"not found: .*nope\.pt.*ViT-B-32"):
        load_clip("ViT-B-32", pretrained=str(tmp_path / "nope.pt"))


def test_unknown_tag_lists_known_tags():
    with pytest.raises(PretrainedLoadError, match=r"'laion9000' is not an open_clip pretrained tag.*openai"):
        load_clip("ViT-B-32", pretrained="laion9000")


def test_uncached_tag_fails_fast_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", "/nonexistent-hf-home")
    with pytest.raises(PretrainedLoadError, match=r"'ViT-B-32' / 'openai' are not in the local cache.*pretrained=none"):
        load_clip("ViT-B-32", pretrained="openai")


def test_auto_falls_back_to_random_weights_loudly(monkeypatch, caplog):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", "/nonexistent-hf-home")
    with caplog.at_level("WARNING"):
        backbone = load_clip("ViT-B-32", pretrained="auto")
    assert backbone.pretrained is None
    assert "RANDOM weights" in caplog.text


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_local_state_dict_round_trip(vit_b32, tmp_path, images, suffix):
    path = tmp_path / f"weights{suffix}"
    state = {k: v.contiguous() for k, v in vit_b32.model.state_dict().items()}
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(path))
    else:
        torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, path)
    loaded = load_clip("ViT-B-32", pretrained=str(path))
    assert loaded.pretrained == f"file:{path}"
    with torch.no_grad():
        assert torch.equal(loaded.encode_image(images), vit_b32.encode_image(images))


def test_weights_of_another_architecture_are_refused(vit_b32, tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "b32.safetensors"
    save_file({k: v.contiguous() for k, v in vit_b32.model.state_dict().items()}, str(path))
    with pytest.raises(PretrainedLoadError,
                       match=r"b32\.safetensors do not fit model 'ViT-B-16'.*shape mismatches.*visual\.conv1\.weight"):
        load_clip("ViT-B-16", pretrained=str(path))


def test_weights_with_missing_keys_are_refused(vit_b32, tmp_path):
    path = tmp_path / "partial.pt"
    state = vit_b32.model.state_dict()
    torch.save({k: v for k, v in state.items() if not k.startswith("ln_final")}, path)
    with pytest.raises(PretrainedLoadError, match=r"2 missing keys \(e\.g\. ln_final\.bias, ln_final\.weight\)"):
        load_clip("ViT-B-32", pretrained=str(path))


@pytest.mark.slow
def test_hugging_face_clip_folder_matches_transformers(tmp_path):
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    config = CLIPConfig(
        text_config=dict(hidden_size=512, intermediate_size=2048, num_attention_heads=8, num_hidden_layers=12,
                         max_position_embeddings=77, vocab_size=49408, hidden_act="gelu", eos_token_id=49407),
        vision_config=dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
                           image_size=224, patch_size=32, hidden_act="gelu"),
        projection_dim=512,
    )
    hf = CLIPModel(config).eval()
    hf.save_pretrained(tmp_path / "hf-clip")
    backbone = load_clip("ViT-B-32", pretrained=str(tmp_path / "hf-clip"))
    tokens = backbone.tokenize(TEXTS)
    pixels = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        ours_text, ours_image = backbone.encode_text(tokens), backbone.encode_image(pixels)
        theirs_text = hf.get_text_features(input_ids=tokens)
        theirs_image = hf.get_image_features(pixel_values=pixels)
    theirs_text = getattr(theirs_text, "pooler_output", theirs_text)
    theirs_image = getattr(theirs_image, "pooler_output", theirs_image)
    assert (ours_text - theirs_text).abs().max() <= 1e-4
    assert (ours_image - theirs_image).abs().max() <= 1e-4


def test_frozen_backbone_has_no_trainable_parameters(vit_b32):
    assert not any(p.requires_grad for p in vit_b32.parameters())
    vit_b32.train()
    assert not vit_b32.training and not vit_b32.model.training


def test_random_weights_are_reproducible(vit_b32):
    torch.manual_seed(1234)  # the caller's RNG state must not matter
    again = load_clip("ViT-B-32", pretrained=None)
    assert torch.equal(again.model.visual.conv1.weight, vit_b32.model.visual.conv1.weight)
    assert torch.equal(again.model.token_embedding.weight, vit_b32.model.token_embedding.weight)


@pytest.mark.filterwarnings("ignore")
def test_torchscript_archive_loads_with_quick_gelu(vit_b32, tmp_path, images):
    """OpenAI's released .pt files are TorchScript archives of models trained with QuickGELU."""
    path = tmp_path / "ViT-B-32.pt"
    torch.jit.script(vit_b32.model).save(str(path))
    loaded = load_clip("ViT-B-32", pretrained=str(path))
    assert type(loaded.model.transformer.resblocks[0].mlp.gelu).__name__ == "QuickGELU"
    assert torch.equal(loaded.model.visual.conv1.weight, vit_b32.model.visual.conv1.weight)


def test_vision_prompts_start_at_the_first_prompted_layer(vit_b32, images):
    prompts = [None, torch.randn(2, 4, vit_b32.vision_width)]
    with layer_inputs(vit_b32) as seen:
        vit_b32.encode_image(images, deep_prompts=prompts)
    lengths = [x.shape[1] for x in seen]
    patches = (224 // 32) ** 2 + 1
    assert lengths == [patches] + [patches + 4] * (vit_b32.vision_layers - 1)


# ----------------------------------------------------------------- model.quick_gelu
def _activation(backbone) -> str:
    return type(backbone.model.transformer.resblocks[0].mlp.gelu).__name__


def test_openai_state_dict_with_quick_gelu_true_equals_open_clips_quick_gelu_model(vit_b32, tmp_path, images, caplog):
    """What clip.load(..., jit=False).state_dict() gives: a plain .pt state dict of QuickGELU weights."""
    import logging

    import open_clip

    path = tmp_path / "ViT-B-32-openai-state.pt"
    torch.save(vit_b32.model.state_dict(), path)
    with caplog.at_level(logging.INFO, logger="mugcp"):
        loaded = load_clip("ViT-B-32", pretrained=str(path), quick_gelu=quick_gelu_setting("true"))
    assert _activation(loaded) == "QuickGELU"
    assert "ViT-B-32 uses QuickGELU (model.quick_gelu=true)" in caplog.text
    reference = open_clip.create_model("ViT-B-32", pretrained=None, force_quick_gelu=True)
    reference.load_state_dict(torch.load(path, weights_only=True))
    reference.eval()
    tokens = loaded.tokenize(["a photo of a cat.", "a diagram"])
    with torch.no_grad():
        assert torch.allclose(loaded.encode_image(images), reference.encode_image(images), atol=1e-5, rtol=0)
        assert torch.allclose(loaded.encode_text(tokens), reference.encode_text(tokens), atol=1e-5, rtol=0)
        assert not torch.allclose(loaded.encode_image(images), vit_b32.encode_image(images), atol=1e-3)  # GELU differs


def test_quick_gelu_auto_warns_on_a_plain_state_dict_and_follows_names(vit_b32, tmp_path, caplog):
    import logging

    path = tmp_path / "state.pt"
    torch.save(vit_b32.model.state_dict(), path)
    with caplog.at_level(logging.INFO, logger="mugcp"):
        loaded = load_clip("ViT-B-32", pretrained=str(path), quick_gelu=quick_gelu_setting("auto"))
    assert _activation(loaded) == "GELU"
    assert "does not say which activation" in caplog.text and "need model.quick_gelu=true" in caplog.text
    assert _activation(load_clip("ViT-B-32-quickgelu", pretrained=None)) == "QuickGELU"
    with pytest.raises(PretrainedLoadError,
                       match=r"model.quick_gelu=false, but model 'ViT-B-32-quickgelu' is defined with QuickGELU"):
        load_clip("ViT-B-32-quickgelu", pretrained=None, quick_gelu=False)
    with pytest.raises(ValueError, match=r"model.quick_gelu must be auto, true or false, got 'maybe'"):
        quick_gelu_setting("maybe")
    assert (quick_gelu_setting("auto"), quick_gelu_setting(True), quick_gelu_setting("false")) == (None, True, False)


def test_quick_gelu_auto_follows_open_clip_tags():
    """Every 'openai' tag was trained with QuickGELU; open_clip alone would only warn and keep GELU."""
    from mugcp.backbones.weights import choose_quick_gelu

    assert choose_quick_gelu("ViT-B-16", None, True, "open_clip tag 'openai'") is True
    assert choose_quick_gelu("ViT-B-16", None, False, "open_clip tag 'laion2b_s34b_b88k'") is False
    assert choose_quick_gelu("ViT-B-16", False, True, "open_clip tag 'openai'") is False
