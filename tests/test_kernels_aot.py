"""Every Triton kernel compiles ahead of time for Hopper (sm_90) and Ampere (sm_80) on this CPU machine.

The interpreter runs kernels the GPU compiler would reject, so the interpreted tests are not enough.
Compilation needs a process whose Triton was imported without TRITON_INTERPRET (see kernels.aot), so
the compiling tests run ``python -m mugcp.kernels.aot`` in a subprocess, with a fresh Triton cache so that
every PTX and cubin is really produced by this run.

* default: bfloat16 (the GPU training dtype) at MuGCP's shapes;
* ``slow``: float16 and float32 at MuGCP's shapes (float32 kernels use 3xTF32 dots and compile slowly);
* ``MUGCP_AOT_ALL=1``: every configuration the launchers can choose, every dtype (630 compilations,
  ~30 min on 2 shared cores).
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from triton.runtime.jit import JITFunction  # noqa: E402

from mugcp.kernels import aot  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
TARGETS = ("cuda:sm_90", "cuda:sm_80")


def run_aot(tmp_path, *arguments, timeout=3600):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")
    completed = subprocess.run(
        [sys.executable, "-m", "mugcp.kernels.aot", *arguments], cwd=REPO_ROOT, env=env,
        capture_output=True, text=True, timeout=timeout,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    return [json.loads(line) for line in completed.stdout.splitlines() if line.startswith("{")]


def launch_key(kernel_name, dtype, constexprs):
    return kernel_name, dtype, json.dumps(dict(constexprs), sort_keys=True)


def expected_keys(scope, dtypes):
    return {
        (*launch_key(launch.kernel.__name__, launch.dtype, launch.constexprs), target)
        for launch in aot.every_launch(scope, dtypes)
        for target in TARGETS
    }


def check_compiled(results, scope, dtypes, record_property):
    got = {(*launch_key(r["kernel"], r["dtype"], r["constexprs"]), r["target"]) for r in results}
    assert len(results) == len(got), "a configuration was compiled twice"
    assert got == expected_keys(scope, dtypes)
    for result in results:
        assert result["cubin_is_elf"] and result["cubin_bytes"] > 1000, result
        assert result["ptx_chars"] > 1000, result
        assert result["ptx_target"] == ("sm_90a" if result["target"] == "cuda:sm_90" else "sm_80"), result
        if result["target"] == "cuda:sm_80":
            assert not result["uses_wgmma"], result
    wgmma = {f"{r['kernel']}[{r['dtype']}, {r['constexprs']}]": r["uses_wgmma"]
             for r in results if r["target"] == "cuda:sm_90"}
    record_property("hopper_wgmma", json.dumps(wgmma))
    for name, uses in sorted(wgmma.items()):
        print(f"sm_90 wgmma={uses}: {name}")
    return wgmma


def test_mugcp_shapes_compile_in_bfloat16_for_hopper_and_ampere(tmp_path, record_property):
    results = run_aot(tmp_path, "--dtype", "bfloat16")
    check_compiled(results, "mugcp", ["bfloat16"], record_property)
    assert len(results) == 2 * (2 + 3)  # (fwd, bwd) + (fwd, bwd with d_seq, bwd without) per target


@pytest.mark.slow
def test_mugcp_shapes_compile_in_float16_and_float32(tmp_path, record_property):
    results = run_aot(tmp_path, "--dtype", "float16", "--dtype", "float32")
    check_compiled(results, "mugcp", ["float16", "float32"], record_property)


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("MUGCP_AOT_ALL") != "1",
                    reason="compiling every configuration takes ~30 min on 2 cores; set MUGCP_AOT_ALL=1")
def test_every_launch_configuration_compiles_for_every_dtype(tmp_path, record_property):
    results = run_aot(tmp_path, "--all", timeout=4 * 3600)
    check_compiled(results, "all", list(aot.DTYPES), record_property)


def test_all_scope_covers_every_configuration_the_launchers_can_choose():
    from mugcp.kernels import fuse_prompts_triton, mutual_attention_triton

    enumerated = {json.dumps(dict(launch.constexprs), sort_keys=True)
                  for launch in aot.every_launch("all", ["bfloat16"])}
    reachable = set()
    for n_b in range(1, 65):
        for dim in range(1, 129):
            for value_dim in (1, 33, 65, 128, dim):
                config = mutual_attention_triton.launch_config(n_b, dim, value_dim, torch.bfloat16, interpreted=False)
                reachable.add(json.dumps(config.constexprs(), sort_keys=True))
    for n_prompt in range(1, 129):
        for dim in (*range(1, 129), 512, 768, 1024):
            config = fuse_prompts_triton.launch_config(4, 10, 77, dim, n_prompt)
            reachable.add(json.dumps(config.constexprs(), sort_keys=True))
            for write_d_seq in (True, False):
                reachable.add(json.dumps({**config.constexprs(), "WRITE_D_SEQ": write_d_seq}, sort_keys=True))
    assert enumerated == reachable
    assert len(enumerated) == 27 + 17 * 3  # mutual attention: 3 Nb x 3 D x 3 Dv blocks; fuse: 17 x 3 kernels


# ---------------------------------------------------------------- the signature helper, in-process


def _toy_kernel(x_ptr, out_ptr, n, stride, scale, BLOCK):  # only its signature is used
    pass


def test_jit_signature_specialises_like_a_launch():
    kernel = JITFunction(_toy_kernel)
    x = torch.empty(8, dtype=torch.bfloat16, device="meta")
    out = torch.empty(8, dtype=torch.float32, device="meta")
    signature, constants, attrs = aot.jit_signature(kernel, (x, out, 1, 32, 0.5), {"BLOCK": 64})
    assert signature == {"x_ptr": "*bf16", "out_ptr": "*fp32", "n": "constexpr", "stride": "i32",
                         "scale": "fp32", "BLOCK": "constexpr"}
    assert constants == {"n": 1, "BLOCK": 64}
    assert attrs == {(0,): [["tt.divisibility", 16]], (1,): [["tt.divisibility", 16]],
                     (3,): [["tt.divisibility", 16]]}
    _, _, attrs = aot.jit_signature(kernel, (x, out, 7, 33, 0.5), {"BLOCK": 64})
    assert (2,) not in attrs and (3,) not in attrs


def test_jit_signature_rejects_wrong_arguments():
    kernel = JITFunction(_toy_kernel)
    x = torch.empty(8, device="meta")
    with pytest.raises(ValueError, match=r"_toy_kernel takes \(x_ptr, out_ptr, n, stride, scale, BLOCK\)"):
        aot.jit_signature(kernel, (x, x, 3, 4), {"BLOCK": 64})


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="checks the interpreter-mode guard")
def test_compiling_under_the_interpreter_says_what_to_run_instead():
    kernel = JITFunction(_toy_kernel)
    x = torch.empty(8, device="meta")
    with pytest.raises(RuntimeError, match=r"TRITON_INTERPRET=1.*python -m mugcp.kernels.aot"):
        aot.compile_kernel(kernel, (x, x, 3, 4, 0.5), {"BLOCK": 64}, aot.HOPPER)
