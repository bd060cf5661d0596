"""kernels.fuse_prompts: the reference against the expand-and-concatenate definition, its memory
discipline, and the Triton kernels against the reference (forward and every gradient).

Triton runs in its interpreter on CPU machines (TRITON_INTERPRET is set before the kernels are
defined; ``kernels`` imports them lazily). On a CUDA machine, TRITON_INTERPRET=0 tests the GPU.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from kernel_testing import DEVICE, needs_triton  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

import mugcp.kernels as kernels  # noqa: E402
from mugcp.kernels.fuse_prompts import fuse_prompts_expand_concat, fuse_prompts_reference  # noqa: E402

INPUT_NAMES = ("seq", "ctx", "cond", "gate")


def make_inputs(batch, n_classes, length, dim, n_ctx, n_cond, seq_dtype=torch.float32,
                param_dtype=torch.float32, seed=0):
    generator = torch.Generator().manual_seed(seed)

    def tensor(dtype, *shape):
        return torch.randn(*shape, generator=generator).to(device=DEVICE, dtype=dtype).requires_grad_()

    return (tensor(seq_dtype, batch, n_classes, length, dim), tensor(param_dtype, n_ctx, dim),
            tensor(param_dtype, batch, n_cond, dim), tensor(param_dtype, n_cond))


def output_and_grads(function, inputs, start, upstream):
    out = function(*inputs, start)
    wanted = [t for t in inputs if t.requires_grad]
    grads = iter(torch.autograd.grad((out * upstream.to(out.dtype)).sum(), wanted))
    return out, [next(grads) if t.requires_grad else None for t in inputs]


def assert_triton_matches_reference(inputs, start, rtol, atol):
    generator = torch.Generator().manual_seed(1)
    upstream = torch.randn(inputs[0].shape, generator=generator).to(DEVICE)
    triton_out, triton_grads = output_and_grads(
        lambda *args: kernels.fuse_prompts(*args, backend="triton"), inputs, start, upstream)
    reference_inputs = [t.detach().float().requires_grad_(t.requires_grad) for t in inputs]
    ref_out, ref_grads = output_and_grads(
        lambda *args: kernels.fuse_prompts(*args, backend="reference"), reference_inputs, start, upstream)
    assert triton_out.dtype == inputs[0].dtype
    torch.testing.assert_close(triton_out.float(), ref_out, rtol=rtol, atol=atol)
    for name, tensor, got, want in zip(INPUT_NAMES, inputs, triton_grads, ref_grads):
        if want is None:
            assert got is None, name
            continue
        assert got.dtype == tensor.dtype, name
        torch.testing.assert_close(got.float(), want, rtol=rtol, atol=atol, msg=lambda m: f"d_{name}: {m}")


# ---------------------------------------------------------------- the reference


def test_reference_equals_expand_and_concatenate_in_float64():
    inputs = [t.detach().double().requires_grad_() for t in make_inputs(2, 3, 11, 6, 2, 3)]
    upstream = torch.randn(2, 3, 11, 6, dtype=torch.float64)
    out, grads = output_and_grads(fuse_prompts_reference, inputs, 4, upstream)
    want_out, want_grads = output_and_grads(fuse_prompts_expand_concat, inputs, 4, upstream)
    torch.testing.assert_close(out, want_out, rtol=0, atol=0)
    for got, want in zip(grads, want_grads):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    # The semantics spelled out: prompt positions replaced, everything else copied.
    seq, ctx, cond, gate = (t.detach() for t in inputs)
    torch.testing.assert_close(out[1, 2, 4:6], ctx, rtol=0, atol=0)
    torch.testing.assert_close(out[1, 0, 6:9], torch.sigmoid(gate)[:, None] * cond[1], rtol=0, atol=0)
    torch.testing.assert_close(out[:, :, :4], seq[:, :, :4], rtol=0, atol=0)
    torch.testing.assert_close(out[:, :, 9:], seq[:, :, 9:], rtol=0, atol=0)
    assert torch.count_nonzero(grads[0][:, :, 4:9]) == 0


@pytest.mark.parametrize("seq_needs_grad", [True, False])
def test_reference_gradcheck_float64(seq_needs_grad):
    seq, ctx, cond, gate = (t.detach().double().requires_grad_() for t in make_inputs(2, 3, 7, 4, 2, 2))
    seq.requires_grad_(seq_needs_grad)
    assert torch.autograd.gradcheck(lambda *args: fuse_prompts_reference(*args, 1), (seq, ctx, cond, gate),
                                    eps=1e-6, atol=1e-7)


class LargeAllocations(TorchDispatchMode):
    """Records every op output that owns new memory of at least ``min_numel`` elements."""

    def __init__(self, min_numel):
        super().__init__()
        self.min_numel = min_numel
        self.created = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        inputs = [t for t in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        input_storages = {t.untyped_storage().data_ptr() for t in inputs}
        for tensor in torch.utils._pytree.tree_leaves(result):
            if (isinstance(tensor, torch.Tensor) and tensor.numel() >= self.min_numel
                    and tensor.untyped_storage().data_ptr() not in input_storages):
                self.created.append((str(func), tuple(tensor.shape)))
        return result


@pytest.mark.parametrize("seq_needs_grad", [True, False])
def test_reference_creates_no_batch_by_class_intermediates(seq_needs_grad):
    batch, n_classes, length, dim = 4, 5, 12, 8
    seq, ctx, cond, gate = make_inputs(batch, n_classes, length, dim, 2, 3)
    seq.requires_grad_(seq_needs_grad)
    # Anything holding at least one token per (image, class) sequence counts as (B, C)-sized.
    tracker = LargeAllocations(min_numel=batch * n_classes * dim)
    with tracker:
        out = fuse_prompts_reference(seq, ctx, cond, gate, 3)
    assert tracker.created == [("aten.clone.default", (batch, n_classes, length, dim))]
    tracker.created.clear()
    upstream = torch.randn_like(out)
    with tracker:
        out.backward(upstream)
    expected = [("aten.clone.default", (batch, n_classes, length, dim))] if seq_needs_grad else []
    assert tracker.created == expected
    if seq_needs_grad:
        # The tracker does see the naive formulation's extra copies: a zero-padded (B, C, L, D)
        # gradient for each slice of seq, and their sum.
        tracker.created.clear()
        with tracker:
            fuse_prompts_expand_concat(seq, ctx, cond, gate, 3).backward(upstream)
        assert len(tracker.created) >= 3, tracker.created


def test_bad_inputs_name_the_problem():
    seq, ctx, cond, gate = (t.detach() for t in make_inputs(2, 3, 10, 8, 2, 3))
    with pytest.raises(ValueError, match=r"start=6 \.\. 6\+2\+3 do not fit in a sequence of length 10"):
        kernels.fuse_prompts(seq, ctx, cond, gate, 6)
    with pytest.raises(ValueError, match=r"expected ctx \(n_c, 8\), cond \(2, n_s, 8\).*cond \(3, 3, 8\)"):
        kernels.fuse_prompts(seq, ctx, cond.repeat(2, 1, 1)[:3], gate, 1)
    with pytest.raises(ValueError, match=r"gate must be a 1-D tensor \(n_s,\), got \(3, 1\)"):
        kernels.fuse_prompts(seq, ctx, cond, gate[:, None], 1)


# ---------------------------------------------------------------- Triton against the reference

SHAPES = [
    # (B, C, L, D, n_c, n_s, start)
    pytest.param(2, 3, 9, 20, 2, 3, 1, id="D20-masked-tile"),
    pytest.param(2, 3, 10, 200, 2, 4, 3, id="D200-two-tiles"),
    pytest.param(1, 2, 6, 16, 2, 4, 0, id="prompts-fill-the-sequence"),
    pytest.param(2, 2, 40, 24, 1, 1, 33, id="L40-three-row-steps-prompts-at-the-end"),
]


@needs_triton
@pytest.mark.parametrize("batch, n_classes, length, dim, n_ctx, n_cond, start", SHAPES)
def test_triton_matches_reference_fp32(batch, n_classes, length, dim, n_ctx, n_cond, start):
    assert_triton_matches_reference(make_inputs(batch, n_classes, length, dim, n_ctx, n_cond), start,
                                    rtol=1e-4, atol=1e-5)


@needs_triton
def test_triton_splits_classes_over_programs(monkeypatch):
    from mugcp.kernels import fuse_prompts_triton

    # A small program budget forces several classes per program and a shorter last chunk (7 = 3+3+1).
    monkeypatch.setattr(fuse_prompts_triton, "TARGET_PROGRAMS", 6)
    config = fuse_prompts_triton.launch_config(2, 7, 12, 24, 3)
    assert (config.classes_per_program, config.n_chunks) == (3, 3)
    assert_triton_matches_reference(make_inputs(2, 7, 12, 24, 1, 2), 5, rtol=1e-4, atol=1e-5)


@needs_triton
@pytest.mark.parametrize("seq_dtype, param_dtype", [
    (torch.float16, torch.float16), (torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32)],
    ids=["fp16", "bf16", "bf16-seq-fp32-params"])
def test_triton_matches_reference_low_precision(seq_dtype, param_dtype):
    inputs = make_inputs(2, 3, 12, 40, 2, 4, seq_dtype=seq_dtype, param_dtype=param_dtype)
    assert_triton_matches_reference(inputs, 2, rtol=1e-2, atol=1e-2)


@needs_triton
def test_triton_without_seq_gradient():
    seq, ctx, cond, gate = make_inputs(2, 3, 9, 20, 2, 3)
    assert_triton_matches_reference((seq.detach(), ctx, cond, gate), 2, rtol=1e-4, atol=1e-5)


@needs_triton
def test_triton_takes_seq_expanded_over_images():
    # Class-name embeddings are the same for every image: a stride-0 view, never copied.
    class_tokens = torch.randn(4, 10, 24, device=DEVICE, requires_grad=True)
    _, ctx, cond, gate = make_inputs(3, 4, 10, 24, 2, 2)
    seq = class_tokens.expand(3, 4, 10, 24)
    upstream = torch.randn(3, 4, 10, 24, device=DEVICE)
    results = {}
    for name in ("triton", "reference"):
        out = kernels.fuse_prompts(seq, ctx, cond, gate, 1, backend=name)
        results[name] = (out, *torch.autograd.grad((out * upstream).sum(), (class_tokens, ctx, cond, gate)))
    for got, want in zip(results["triton"], results["reference"]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@needs_triton
def test_global_backend_selects_the_triton_path():
    inputs = make_inputs(1, 2, 8, 16, 1, 2)
    with kernels.use_backend("triton"):
        out = kernels.fuse_prompts(*inputs, 1)
    assert type(out.grad_fn).__name__ == "FusePromptsFunctionBackward"
    assert type(kernels.fuse_prompts(*inputs, 1).grad_fn).__name__ == "_FusePromptsReferenceBackward"


@needs_triton
def test_triton_rejects_too_many_prompt_tokens():
    seq, ctx, cond, gate = (t.detach() for t in make_inputs(1, 1, 140, 16, 64, 65))
    with pytest.raises(ValueError, match=r"129 prompt tokens is outside 1\.\.128.*backend='reference'"):
        kernels.fuse_prompts(seq, ctx, cond, gate, 0, backend="triton")
