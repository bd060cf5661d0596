"""The text path over ImageNet class names: the single pass before issue 9 beside the bucketed one.

    pytest benchmarks/test_bench_text.py --benchmark-only

ViT-B-16 text tower (random weights), fp32, the first C of open_clip's ImageNet class names:
CoCoOp-style per-image prompts for B = 4 images (B×C sequences, a shared per-image prefix), forward
and forward+backward; and one MuGCP training step. ``path=plain`` is ``model.text_bucketing: false``.
The full table across methods and C (fresh process per configuration, peak RSS) comes from
``benchmarks/text_scaling.py``; see RESULTS.md.
"""
from __future__ import annotations

import pytest
import torch

from benchmarks.text_scaling import BACKBONE, BATCH, build_step, imagenet_classnames
from mugcp.backbones import load_clip
from mugcp.methods.prompt_text import ClassPrompts

N_CTX = 4


@pytest.fixture(scope="module")
def clip(device):
    torch.manual_seed(0)
    return load_clip(BACKBONE, pretrained=None, device=device)


@pytest.mark.parametrize("path", ["plain", "bucketed"])
@pytest.mark.parametrize("backward", [False, True], ids=["forward", "fwd+bwd"])
@pytest.mark.parametrize("classes", [50, 200])
def test_per_image_prompts_over_imagenet_names(run_benchmark, clip, device, classes, backward, path):
    prompts = ClassPrompts(clip, imagenet_classnames(classes), N_CTX).to(device)
    context = torch.randn(BATCH, N_CTX, clip.text_width, device=device,
                          generator=torch.Generator(device).manual_seed(1))
    context.requires_grad_(backward)
    bucketed = path == "bucketed"

    def run():
        clip.text_bucketing = bucketed
        with torch.set_grad_enabled(backward):
            if bucketed:
                def embeddings(rows, length):
                    return prompts.assemble_per_image(context, rows, length)
            else:
                embeddings = prompts.assemble_per_image(context)
            features = clip.encode_text(prompts.tokens, embeddings=embeddings, shared_prefix=1 + N_CTX)
            if backward:
                features.square().sum().backward()
        return features

    try:
        run_benchmark(run, rounds=3, work={"sequences": BATCH * classes}, backbone=BACKBONE, batch=BATCH,
                      classes=classes, path=path, backward=backward)
    finally:
        clip.text_bucketing = True


@pytest.mark.parametrize("path", ["plain", "bucketed"])
def test_mugcp_training_step_imagenet_50(run_benchmark, path):
    _, step = build_step("mugcp", 50, path, None)
    run_benchmark(step, rounds=3, work={"steps": 1}, backbone=BACKBONE, batch=BATCH, classes=50, path=path)
