"""Throughput and peak memory of the ``kernels`` ops, reference against Triton (Triton on CUDA only).

    pytest benchmarks/test_bench_kernels.py --benchmark-only --benchmark-group-by=group

Shapes:
* ``mutual_attention`` at ViT-B/16 (Bt·H = 32·12, Na = 197 + 6 prompt tokens, D = 64) and ViT-L/14
  (32·16, Na = 257 + 6, D = 64), with Nb = 4 and 16 semantic tokens;
* ``fuse_prompts`` at B = 32 images, C = 100 and 1000 classes, L = 24 (truncated text), D = 512,
  2 context + 4 semantic tokens; ``expand_concat`` is the naive formulation. ``seq=frozen``: the
  class-name embeddings expanded over the images, no gradient (MuGCP's text encoder);
  ``seq=learned``: a materialised (B, C, L, D) ``seq`` that needs a gradient too (a deeper prompted
  layer's input), where expand-and-concatenate pays for zero-padded full-size gradients.

On CUDA every path runs in bfloat16 (the GPU targets are stated in bfloat16); on the CPU in float32
(bf16 matmul on these CPUs is ~400x slower). Compare paths by the ratio of their median times.
"""
from __future__ import annotations

import pytest
import torch

import mugcp.kernels as kernels
from mugcp.kernels.fuse_prompts import fuse_prompts_expand_concat

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # as conftest.bench_device()
DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
ROUNDS = 20 if DEVICE.type == "cuda" else 5
CPU_PEAK_FP32_GFLOPS = 130  # DESIGN.md §4: measured fp32 matmul peak of the 2-core CPUs here

PATHS = ["reference", "triton"]
MODES = ["forward", "forward_backward"]

needs_cuda_for_triton = pytest.mark.skipif(
    DEVICE.type != "cuda", reason="Triton benchmarks need CUDA (the interpreter's speed means nothing)"
)


def path_params(paths):
    return [pytest.param(p, marks=needs_cuda_for_triton) if p == "triton" else p for p in paths]


MUTUAL_ATTENTION_SHAPES = {
    "vit_b16": dict(bt=32, heads=12, n_a=197 + 6, dim=64),
    "vit_l14": dict(bt=32, heads=16, n_a=257 + 6, dim=64),
}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("path", path_params(PATHS))
@pytest.mark.parametrize("n_b", [4, 16])
@pytest.mark.parametrize("shape", list(MUTUAL_ATTENTION_SHAPES))
def test_mutual_attention(run_benchmark, benchmark, shape, n_b, path, mode):
    sizes = MUTUAL_ATTENTION_SHAPES[shape]
    bt, heads, n_a, dim = sizes["bt"], sizes["heads"], sizes["n_a"], sizes["dim"]
    benchmark.group = f"mutual_attention {shape} Nb={n_b} {mode}"
    generator = torch.Generator().manual_seed(0)
    backward = mode == "forward_backward"

    def tensor(n):
        return torch.randn(bt, heads, n, dim, generator=generator).to(DEVICE, DTYPE).requires_grad_(backward)

    a, b, va, vb = tensor(n_a), tensor(n_b), tensor(n_a), tensor(n_b)
    d_oa, d_ob = torch.randn_like(a), torch.randn_like(b)

    def step():
        if not backward:
            with torch.no_grad():
                return kernels.mutual_attention(a, b, va, vb, backend=path)
        oa, ob = kernels.mutual_attention(a, b, va, vb, backend=path)
        # autograd.grad, not backward: nothing accumulates into .grad between rounds.
        return torch.autograd.grad((oa, ob), (a, b, va, vb), (d_oa, d_ob))

    # Forward: three (Na x Nb x D) matmuls; backward: twice as many.
    flops = (18 if backward else 6) * bt * heads * n_a * n_b * dim
    run_benchmark(step, ROUNDS, work={"gflop": flops / 1e9, "problems": bt * heads},
                  op="mutual_attention", path=path, mode=mode, dtype=str(DTYPE),
                  shape=dict(sizes, n_b=n_b))
    if DEVICE.type == "cpu":
        benchmark.extra_info["fraction_of_cpu_fp32_peak"] = (
            benchmark.extra_info["gflop_per_s"] / CPU_PEAK_FP32_GFLOPS)


FUSE_PATHS = ["expand_concat", "reference", "triton"]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("path", path_params(FUSE_PATHS))
@pytest.mark.parametrize("n_classes", [100, 1000])
@pytest.mark.parametrize("seq_kind", ["frozen", "learned"])
def test_fuse_prompts(run_benchmark, benchmark, seq_kind, n_classes, path, mode):
    batch, length, dim, n_ctx, n_cond, start = 32, 24, 512, 2, 4, 1
    if seq_kind == "learned" and n_classes == 1000 and DEVICE.type == "cpu":
        pytest.skip("seq=learned at C=1000 needs ~11 GB in float32; too much for the shared CPU machine")
    benchmark.group = f"fuse_prompts B={batch} C={n_classes} seq={seq_kind} {mode}"
    generator = torch.Generator().manual_seed(0)
    backward = mode == "forward_backward"

    def tensor(*shape):
        return torch.randn(*shape, generator=generator).to(DEVICE, DTYPE)

    if seq_kind == "frozen":
        seq = tensor(n_classes, length, dim).expand(batch, n_classes, length, dim)
    else:
        seq = tensor(batch, n_classes, length, dim).requires_grad_(backward)
    ctx, cond, gate = (t.requires_grad_(backward) for t in (tensor(n_ctx, dim), tensor(batch, n_cond, dim),
                                                          tensor(n_cond)))
    d_out = tensor(batch, n_classes, length, dim) if backward else None

    def fuse():
        if path == "expand_concat":
            return fuse_prompts_expand_concat(seq, ctx, cond, gate, start)
        return kernels.fuse_prompts(seq, ctx, cond, gate, start, backend=path)

    def step():
        if not backward:
            with torch.no_grad():
                return fuse()
        return torch.autograd.grad(fuse(), [t for t in (seq, ctx, cond, gate) if t.requires_grad], d_out)

    out_bytes = batch * n_classes * length * dim * torch.finfo(DTYPE).bits // 8
    run_benchmark(step, ROUNDS if n_classes < 1000 or DEVICE.type == "cuda" else 3,
                  work={"sequences": batch * n_classes, "output_gb": out_bytes / 1e9},
                  op="fuse_prompts", path=path, mode=mode, dtype=str(DTYPE), seq=seq_kind,
                  shape=dict(batch=batch, n_classes=n_classes, length=length, dim=dim, n_ctx=n_ctx,
                             n_cond=n_cond))
