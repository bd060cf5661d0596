"""Whole-model benchmarks: the text encoder over B×C sequences per attention backend (with and
without EOT truncation), and one MuGCP training step per attention backend and kernel backend.

    pytest benchmarks/test_bench_model.py --benchmark-only

CPU: ViT-B-32 with random weights at small sizes (minutes). CUDA: ViT-B-16 at the paper's batch,
bf16 autocast, plus the optional flash_attn / xformers backends when installed.
"""
from __future__ import annotations

import importlib.util

import pytest
import torch

from mugcp.backbones import load_clip
from mugcp.methods import create_model

ON_CUDA = torch.cuda.is_available()
BACKBONE = "ViT-B-16" if ON_CUDA else "ViT-B-32"
BATCH, CLASSES = (32, 100) if ON_CUDA else (2, 5)
CLASSNAMES = [f"class number {i}" for i in range(CLASSES)]


def attention_backends():
    out = []
    for name in ("naive", "sdpa", "flash_attn", "xformers"):
        reason = None
        if name in ("flash_attn", "xformers"):
            if not ON_CUDA:
                reason = f"{name} runs only on CUDA"
            elif importlib.util.find_spec(name) is None:
                reason = f"{name} is not installed"
        out.append(pytest.param(name, marks=pytest.mark.skipif(reason is not None, reason=reason or "")))
    return out


@pytest.fixture(scope="module")
def clip(device):
    return load_clip(BACKBONE, pretrained=None, device=device)


def autocast(device):
    return (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
            else torch.autocast("cpu", enabled=False))


@pytest.mark.parametrize("truncate", [True, False], ids=["truncated", "full77"])
@pytest.mark.parametrize("backend", attention_backends())
def test_text_encoder_over_bxc_sequences(run_benchmark, clip, device, backend, truncate):
    """The dominant cost of conditional prompting (DESIGN §4): B×C prompted text sequences."""
    tokens = clip.tokenize([f"X X X X {name}." for name in CLASSNAMES])
    embeddings = clip.embed_tokens(tokens).repeat(BATCH, 1, 1)
    if not truncate:
        if backend != "sdpa":
            pytest.skip("the untruncated reference is measured once, with sdpa")
        # open_clip's own encoder runs all 77 positions; the same embeddings go in.
        model = clip.model

        def run():
            with torch.no_grad(), autocast(device):
                x = embeddings + model.positional_embedding
                x = model.ln_final(model.transformer(x, attn_mask=model.attn_mask))
                return x[torch.arange(x.shape[0]), tokens.argmax(-1).repeat(BATCH)] @ model.text_projection
    else:
        clip.attention_backend = backend
        # "truncated" is the single pass cut at the last EOT; the bucketed path is benchmarks/test_bench_text.py's.
        clip.text_bucketing = False

        def run():
            with torch.no_grad(), autocast(device):
                return clip.encode_text(tokens, embeddings=embeddings)

    try:
        run_benchmark(run, rounds=5, work={"sequences": BATCH * CLASSES}, backbone=BACKBONE, batch=BATCH,
                      classes=CLASSES, attention=backend, truncated=truncate,
                      length=int(tokens.argmax(-1).max()) + 1 if truncate else 77)
    finally:
        clip.attention_backend = "sdpa"
        clip.text_bucketing = True


def kernel_backends():
    marks = [] if ON_CUDA else [pytest.mark.skip(reason="Triton kernels are benchmarked on CUDA only "
                                                        "(the CPU interpreter is not a speed path)")]
    return ["reference", pytest.param("triton", marks=marks)]


@pytest.mark.parametrize("kernels", kernel_backends())
@pytest.mark.parametrize("attention", attention_backends())
def test_mugcp_training_step(run_benchmark, clip, device, attention, kernels):
    clip.attention_backend = attention
    model = create_model("mugcp", CLASSNAMES, backbone=clip, attention=attention, kernels=kernels,
                         semantic_source="none")
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    batch = {"images": torch.randn(BATCH if ON_CUDA else 2, 3, clip.image_size, clip.image_size, device=device),
             "labels": torch.arange(BATCH if ON_CUDA else 2, device=device) % CLASSES}

    def step():
        with autocast(device):
            loss, _, _ = model.training_step(batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss

    try:
        run_benchmark(step, rounds=3, work={"images": batch["images"].shape[0]}, backbone=BACKBONE, classes=CLASSES,
                      batch=batch["images"].shape[0], attention=attention, kernels=kernels)
    finally:
        clip.attention_backend = "sdpa"
