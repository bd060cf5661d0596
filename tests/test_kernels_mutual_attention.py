"""kernels.mutual_attention: the reference against the definition, the Triton kernels against the
reference (forward and every gradient), the backend switch and its errors.

Triton runs in its interpreter on CPU machines. TRITON_INTERPRET must be set before the Triton
kernels are first defined; ``kernels`` imports them lazily, so setting it here is early enough.
On a CUDA machine, run with TRITON_INTERPRET=0 to test the compiled kernels on the GPU instead.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import importlib.util  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from kernel_testing import DEVICE, needs_triton  # noqa: E402

import mugcp.kernels as kernels  # noqa: E402
from mugcp.kernels import backend as backend_module  # noqa: E402
from mugcp.kernels.mutual_attention import mutual_attention_reference  # noqa: E402


def make_inputs(bt, heads, n_a, n_b, dim, value_dim, dtype=torch.float32, seed=0):
    generator = torch.Generator().manual_seed(seed)

    def tensor(*shape):
        return torch.randn(*shape, generator=generator).to(device=DEVICE, dtype=dtype).requires_grad_()

    return (
        tensor(bt, heads, n_a, dim),
        tensor(bt, heads, n_b, dim),
        tensor(bt, heads, n_a, value_dim),
        tensor(bt, heads, n_b, value_dim),
    )


def outputs_and_grads(inputs, backend, upstream=None):
    oa, ob = kernels.mutual_attention(*inputs, backend=backend)
    if upstream is None:
        generator = torch.Generator().manual_seed(1)
        upstream = tuple(torch.randn(o.shape, generator=generator).to(o.device, o.dtype) for o in (oa, ob))
    grads = torch.autograd.grad((oa * upstream[0]).sum() + (ob * upstream[1]).sum(), inputs)
    return (oa, ob), grads, upstream


def assert_matches_reference(inputs, rtol, atol):
    """Triton on ``inputs`` against the reference on the same values in fp32."""
    (oa, ob), grads, upstream = outputs_and_grads(inputs, "triton")
    reference_inputs = [t.detach().float().requires_grad_() for t in inputs]
    (ref_oa, ref_ob), ref_grads, _ = outputs_and_grads(
        reference_inputs, "reference", tuple(u.float() for u in upstream))
    for name, got, want in zip(("oa", "ob", "d_a", "d_b", "d_va", "d_vb"), (oa, ob, *grads),
                               (ref_oa, ref_ob, *ref_grads)):
        assert got.dtype == inputs[0].dtype, name
        torch.testing.assert_close(got.float(), want, rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


# ---------------------------------------------------------------- the reference


def test_reference_matches_the_definition_in_float64():
    a, b, va, vb = (t.detach().double() for t in make_inputs(2, 3, 11, 5, 8, 6))
    scale = 0.37
    affinity = torch.einsum("bhid,bhjd->bhij", a, b) * scale
    row_weights = torch.exp(affinity - affinity.amax(-1, keepdim=True))
    row_weights = row_weights / row_weights.sum(-1, keepdim=True)
    col_weights = torch.exp(affinity - affinity.amax(-2, keepdim=True))
    col_weights = col_weights / col_weights.sum(-2, keepdim=True)
    want_oa = torch.einsum("bhij,bhjv->bhiv", row_weights, vb)
    want_ob = torch.einsum("bhij,bhiv->bhjv", col_weights, va)
    oa, ob = kernels.mutual_attention(a, b, va, vb, scale=scale, backend="reference")
    torch.testing.assert_close(oa, want_oa, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ob, want_ob, rtol=1e-12, atol=1e-12)
    assert oa.shape == (2, 3, 11, 6) and ob.shape == (2, 3, 5, 6)


def test_default_scale_is_inverse_square_root_of_head_dim():
    a, b, va, vb = (t.detach() for t in make_inputs(1, 2, 9, 3, 16, 4))
    default = kernels.mutual_attention(a, b, va, vb, backend="reference")
    explicit = kernels.mutual_attention(a, b, va, vb, scale=0.25, backend="reference")
    unscaled = kernels.mutual_attention(a, b, va, vb, scale=1.0, backend="reference")
    torch.testing.assert_close(default, explicit, rtol=0, atol=0)
    assert not torch.allclose(default[0], unscaled[0])


def test_reference_gradcheck_float64():
    inputs = [t.detach().double().requires_grad_() for t in make_inputs(1, 2, 6, 3, 4, 3)]
    assert torch.autograd.gradcheck(
        lambda a, b, va, vb: mutual_attention_reference(a, b, va, vb, 0.6), inputs, eps=1e-6, atol=1e-7)


# ---------------------------------------------------------------- Triton against the reference

ODD_SHAPES = [
    # (Bt, H, Na, Nb, D, Dv): Nb=1; Na not a multiple of the row block (64 or 32); D=80 padded to
    # 128; Dv != D; Nb at the 64 maximum; head dims 32 and 128.
    pytest.param(2, 3, 50, 1, 32, 32, id="Nb1-Na50-D32"),
    pytest.param(1, 2, 77, 17, 80, 80, id="Nb17-Na77-D80"),
    pytest.param(1, 1, 197, 4, 64, 64, id="ViT-B-tokens-Nb4-D64"),
    pytest.param(1, 1, 70, 64, 128, 128, id="Nb64-D128-rowblock32"),
    pytest.param(1, 2, 33, 5, 80, 48, id="Dv48-differs-from-D80"),
]


@needs_triton
@pytest.mark.parametrize("bt, heads, n_a, n_b, dim, value_dim", ODD_SHAPES)
def test_triton_matches_reference_fp32(bt, heads, n_a, n_b, dim, value_dim):
    assert_matches_reference(make_inputs(bt, heads, n_a, n_b, dim, value_dim), rtol=1e-4, atol=1e-5)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("bt, heads, n_a, n_b, dim, value_dim", [
    pytest.param(1, 2, 50, 1, 32, 32, id="Nb1-Na50-D32"),
    pytest.param(1, 1, 77, 17, 80, 80, id="Nb17-Na77-D80"),
])
def test_triton_matches_reference_low_precision(dtype, bt, heads, n_a, n_b, dim, value_dim):
    # Low-precision inputs, fp32 accumulation: compared with the fp32 reference on the same values.
    assert_matches_reference(make_inputs(bt, heads, n_a, n_b, dim, value_dim, dtype), rtol=1e-2, atol=1e-2)


@needs_triton
def test_triton_takes_strided_inputs_and_broadcast_gradients():
    # Heads split from a (Bt, N, H, D) projection are strided views; loss.sum() gives stride-0 grads.
    generator = torch.Generator().manual_seed(3)
    projected = [torch.randn(2, n, 3, 16, generator=generator, device=DEVICE, requires_grad=True)
                 for n in (40, 6, 40, 6)]
    a, b, va, vb = (p.transpose(1, 2) for p in projected)
    assert not a.is_contiguous()
    results = {}
    for name in ("triton", "reference"):
        oa, ob = kernels.mutual_attention(a, b, va, vb, backend=name)
        grads = torch.autograd.grad(oa.sum() + 2 * ob.sum(), projected)
        results[name] = (oa, ob, *grads)
    for got, want in zip(results["triton"], results["reference"]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@needs_triton
def test_triton_gradient_through_one_output_only():
    inputs = make_inputs(1, 2, 20, 3, 32, 32)
    for output_index in (0, 1):
        grads = {}
        for name in ("triton", "reference"):
            outputs = kernels.mutual_attention(*inputs, backend=name)
            grads[name] = torch.autograd.grad(outputs[output_index].square().sum(), inputs, allow_unused=True)
        for got, want in zip(grads["triton"], grads["reference"]):
            want = torch.zeros_like(got) if want is None else want
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@needs_triton
def test_triton_rejects_more_than_64_b_tokens():
    with pytest.raises(ValueError, match=r"Nb=65 is outside 1\.\.64.*backend='reference'"):
        kernels.mutual_attention(*make_inputs(1, 1, 8, 65, 16, 16), backend="triton")


def test_shape_mismatch_names_the_argument():
    a, b, va, vb = make_inputs(1, 2, 8, 3, 16, 16)
    with pytest.raises(ValueError, match=r"vb has shape \(1, 2, 4, 16\), expected \(1, 2, 3, 16\)"):
        kernels.mutual_attention(a, b, va, vb[:, :, :1].repeat(1, 1, 4, 1))
    with pytest.raises(ValueError, match="share one dtype"):
        kernels.mutual_attention(a, b, va, vb.double())


# ---------------------------------------------------------------- the backend switch


@needs_triton
def test_global_backend_selects_the_triton_path_and_restores():
    inputs = make_inputs(1, 1, 10, 2, 16, 16)
    assert kernels.get_backend() == "reference"
    with kernels.use_backend("triton"):
        oa, _ = kernels.mutual_attention(*inputs)
        assert kernels.get_backend() == "triton"
    assert type(oa.grad_fn).__name__ == "MutualAttentionFunctionBackward"
    oa, _ = kernels.mutual_attention(*inputs)
    assert kernels.get_backend() == "reference"
    assert "MutualAttention" not in type(oa.grad_fn).__name__


def test_use_backend_restores_after_an_exception():
    with pytest.raises(RuntimeError, match="boom"):
        with kernels.use_backend("triton"):
            raise RuntimeError("boom")
    assert kernels.get_backend() == "reference"


def test_unknown_backend_names_the_choices():
    with pytest.raises(kernels.KernelBackendError, match=r"unknown kernel backend 'cuda'.*reference, triton"):
        kernels.set_backend("cuda")
    with pytest.raises(kernels.KernelBackendError, match="backend= argument"):
        kernels.mutual_attention(*make_inputs(1, 1, 4, 2, 8, 8), backend="fast")


def test_environment_variable_sets_the_default(monkeypatch):
    monkeypatch.setenv("MUGCP_KERNELS", "Triton")
    assert backend_module._default_from_environment() == "triton"
    monkeypatch.setenv("MUGCP_KERNELS", "")
    assert backend_module._default_from_environment() == "reference"
    monkeypatch.setenv("MUGCP_KERNELS", "tirton")
    with pytest.raises(kernels.KernelBackendError, match="environment variable MUGCP_KERNELS"):
        backend_module._default_from_environment()


def test_triton_without_cuda_or_interpreter_says_how_to_fix(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    inputs = make_inputs(1, 1, 4, 2, 8, 8)
    with pytest.raises(kernels.KernelBackendError) as error:
        kernels.mutual_attention(*inputs, backend="triton")
    message = str(error.value)
    assert "needs a CUDA GPU" in message
    assert "TRITON_INTERPRET=1" in message and "kernels: reference" in message


def test_triton_with_cpu_tensors_on_a_cuda_machine_says_how_to_fix(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    inputs = [t.detach().cpu() for t in make_inputs(1, 1, 4, 2, 8, 8)]
    with pytest.raises(kernels.KernelBackendError, match="got tensors on cpu.*TRITON_INTERPRET=1"):
        kernels.mutual_attention(*inputs, backend="triton")


def test_triton_not_installed_says_how_to_fix(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: None if name == "triton" else real_find_spec(name, *args))
    with pytest.raises(kernels.KernelBackendError, match="triton package, which is not installed.*kernels: reference"):
        kernels.mutual_attention(*make_inputs(1, 1, 4, 2, 8, 8), backend="triton")
