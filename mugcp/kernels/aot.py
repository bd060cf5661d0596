"""Ahead-of-time compilation of this package's Triton kernels for real GPUs, on any machine.

The Triton interpreter accepts kernels that the GPU compiler rejects (or compiles into something
slow), so passing the interpreted tests is not enough. ``triton.compile`` runs the whole NVIDIA
pipeline — Triton IR, LLVM, PTX and ``ptxas`` (shipped in the triton wheel) to a cubin — without a
GPU or a driver, for any ``GPUTarget``. This module turns "the arguments a launcher would pass" into
the signature, constants and alignment hints the JIT would derive from them, so the code compiled
here is the code a GPU launch compiles.

It must run in a process where Triton was imported with ``TRITON_INTERPRET`` unset: under the
interpreter even Triton's own library functions (``tl.zeros``...) are interpreter objects that the
compiler cannot use. From a test, run the command line in a subprocess::

    python -m mugcp.kernels.aot                  # the configurations MuGCP's shapes use, every dtype
    python -m mugcp.kernels.aot --all            # every configuration the launchers can choose
    python -m mugcp.kernels.aot --dtype bfloat16 # one dtype

Each compilation prints one JSON line: kernel, dtype, target, block sizes, PTX target, cubin size
and whether the Hopper code uses ``wgmma``.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import triton
from triton._C.libtriton import native_specialize_impl
from triton.backends.compiler import BaseBackend, GPUTarget
from triton.runtime.jit import JITFunction

HOPPER = GPUTarget("cuda", 90, 32)
AMPERE = GPUTarget("cuda", 80, 32)
DEFAULT_TARGETS = (HOPPER, AMPERE)
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class AotResult:
    """One kernel compiled for one GPU target."""

    kernel: str
    target: str
    constexprs: Mapping[str, Any]
    num_warps: int
    num_stages: int
    ptx: str
    cubin: bytes
    seconds: float

    @property
    def uses_wgmma(self) -> bool:
        """Whether the PTX uses Hopper's warp-group MMA (only possible on sm_90)."""
        return "wgmma.mma_async" in self.ptx

    @property
    def ptx_target(self) -> str:
        for line in self.ptx.splitlines():
            if line.startswith(".target"):
                return line.split()[1].rstrip(",")
        return ""


def _check_compiler_available() -> None:
    # Triton's own library functions are JIT functions only when Triton was imported uninterpreted.
    if not isinstance(triton.language.zeros, JITFunction):
        raise RuntimeError(
            "kernels.aot cannot compile in a process where Triton was imported with TRITON_INTERPRET=1 "
            "(its functions are interpreter objects); run `python -m mugcp.kernels.aot` in a process without "
            "TRITON_INTERPRET set"
        )


def jit_signature(
    kernel: JITFunction, args: Sequence[Any], constexprs: Mapping[str, Any]
) -> tuple[dict[str, str], dict[str, Any], dict[tuple[int, ...], list]]:
    """(signature, constexprs, attrs) for ``ASTSource``, specialised the way a launch specialises.

    ``args`` are the positional arguments of a launch, ``constexprs`` the keyword constants. As at
    run time, integer arguments equal to 1 become constants, and pointers (taken as 16-byte aligned,
    as torch allocations are) and integers divisible by 16 get a divisibility hint.
    """
    names = kernel.arg_names
    if len(args) + len(constexprs) != len(names) or set(constexprs) != set(names[len(args):]):
        raise ValueError(
            f"{kernel.__name__} takes ({', '.join(names)}); got {len(args)} positional arguments and the "
            f"constants ({', '.join(constexprs)})"
        )
    values = {**dict(zip(names, args)), **constexprs}
    signature: dict[str, str] = {}
    constants: dict[str, Any] = {}
    attrs: dict[tuple[int, ...], list] = {}
    for index, (param, name) in enumerate(zip(kernel.params, names)):
        if name in constexprs:
            signature[name], constants[name] = "constexpr", values[name]
            continue
        arg_type, specialization = native_specialize_impl(
            BaseBackend, values[name], False, not param.do_not_specialize, True
        )
        if arg_type == "constexpr":
            signature[name], constants[name] = "constexpr", specialization
        else:
            signature[name] = arg_type
            if isinstance(specialization, str) and specialization:
                attrs[(index,)] = BaseBackend.parse_attr(specialization)
    return signature, constants, attrs


def compile_kernel(
    kernel: JITFunction,
    args: Sequence[Any],
    constexprs: Mapping[str, Any],
    target: GPUTarget,
    num_warps: int = 4,
    num_stages: int = 2,
) -> AotResult:
    """Compile ``kernel`` for ``target`` as a launch with these arguments would; returns PTX and cubin."""
    _check_compiler_available()
    signature, constants, attrs = jit_signature(kernel, args, constexprs)
    source = triton.compiler.ASTSource(fn=kernel, signature=signature, constexprs=constants, attrs=attrs)
    started = time.perf_counter()
    compiled = triton.compile(source, target=target, options={"num_warps": num_warps, "num_stages": num_stages})
    return AotResult(
        kernel=kernel.__name__,
        target=f"{target.backend}:sm_{target.arch}",
        constexprs=dict(constexprs),
        num_warps=num_warps,
        num_stages=num_stages,
        ptx=compiled.asm["ptx"],
        cubin=compiled.asm["cubin"],
        seconds=time.perf_counter() - started,
    )


@dataclass(frozen=True)
class Launch:
    """One kernel launch as a launcher would issue it (tensors on the meta device)."""

    op: str
    kernel: JITFunction
    dtype: str
    args: tuple
    constexprs: Mapping[str, Any] = field(default_factory=dict)
    num_warps: int = 4
    num_stages: int = 2


def _meta(shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(tuple(shape), dtype=dtype, device="meta")


def mutual_attention_launches(dtype_name: str, n_b: int, head_dim: int, value_dim: int) -> list[Launch]:
    """Forward and backward launches of ``mutual_attention`` at these sizes (Bt=2, H=3, Na=197)."""
    from . import mutual_attention_triton as module

    dtype = DTYPES[dtype_name]
    a, va = _meta((2, 3, 197, head_dim), dtype), _meta((2, 3, 197, value_dim), dtype)
    b, vb = _meta((2, 3, n_b, head_dim), dtype), _meta((2, 3, n_b, value_dim), dtype)
    _, args, config, (oa, ob, lse_row, lse_col) = module.forward_launch(a, b, va, vb, 0.125, interpreted=False)
    _, back_args, back_config, _ = module.backward_launch(
        a, b, va, vb, ob, oa, ob, lse_row, lse_col, 0.125, interpreted=False
    )
    return [
        Launch("mutual_attention", module._mutual_attention_forward_kernel, dtype_name, args,
               config.constexprs(), config.num_warps, config.num_stages),
        Launch("mutual_attention", module._mutual_attention_backward_kernel, dtype_name, back_args,
               back_config.constexprs(), back_config.num_warps, back_config.num_stages),
    ]


def fuse_prompts_launches(dtype_name: str, n_ctx: int, n_cond: int, dim: int) -> list[Launch]:
    """Forward and both backward variants (with and without a ``seq`` gradient), B=2, C=3, L=77."""
    from . import fuse_prompts_triton as module

    dtype = DTYPES[dtype_name]
    seq = _meta((2, 3, 77, dim), dtype)
    ctx, cond, gate = _meta((n_ctx, dim), torch.float32), _meta((2, n_cond, dim), torch.float32), _meta(
        (n_cond,), torch.float32)
    _, args, config, out = module.forward_launch(seq, ctx, cond, gate, 1)
    launches = [Launch("fuse_prompts", module._fuse_prompts_forward_kernel, dtype_name, args,
                       config.constexprs(), config.num_warps)]
    for write_d_seq in (True, False):
        _, back_args, back_config, _, _ = module.backward_launch(out, seq.shape, dtype, n_ctx, n_cond, 1, write_d_seq)
        launches.append(Launch("fuse_prompts", module._fuse_prompts_backward_kernel, dtype_name, back_args,
                               {**back_config.constexprs(), "WRITE_D_SEQ": write_d_seq}, back_config.num_warps))
    return launches


# Sizes that reach each block size of the launchers' rules (see their launch_config functions).
MUTUAL_ATTENTION_NB_FOR_BLOCK = {16: 4, 32: 17, 64: 64}
MUTUAL_ATTENTION_DIM_FOR_BLOCK = {32: 32, 64: 64, 128: 80}
FUSE_PROMPTS_SPLIT_FOR_BLOCK_P = {8: (2, 4), 16: (4, 8), 32: (8, 16), 64: (16, 32), 128: (32, 64)}
FUSE_PROMPTS_DIM_FOR_BLOCK_D = {16: 16, 32: 32, 64: 64, 128: 512}


def every_launch(scope: str, dtype_names: Sequence[str]) -> Iterator[Launch]:
    """``scope="mugcp"``: the configurations at MuGCP's shapes (ViT-B/16 and ViT-L/14: head dim 64,
    up to 16 semantic tokens; text width 512/768, 2 context + 4 semantic prompt tokens).
    ``scope="all"``: one launch per distinct configuration the launchers can choose."""
    for dtype_name in dtype_names:
        if scope == "mugcp":
            yield from mutual_attention_launches(dtype_name, 4, 64, 64)
            yield from fuse_prompts_launches(dtype_name, 2, 4, 512)
            continue
        for n_b in MUTUAL_ATTENTION_NB_FOR_BLOCK.values():
            for head_dim in MUTUAL_ATTENTION_DIM_FOR_BLOCK.values():
                for value_dim in MUTUAL_ATTENTION_DIM_FOR_BLOCK.values():
                    yield from mutual_attention_launches(dtype_name, n_b, head_dim, value_dim)
        seen = set()
        for n_ctx, n_cond in FUSE_PROMPTS_SPLIT_FOR_BLOCK_P.values():
            for dim in FUSE_PROMPTS_DIM_FOR_BLOCK_D.values():
                launches = fuse_prompts_launches(dtype_name, n_ctx, n_cond, dim)
                blocks = tuple(sorted(launches[0].constexprs.items()))
                if blocks not in seen:
                    seen.add(blocks)
                    yield from launches


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mugcp.kernels.aot", description=__doc__.split("\n\n")[0])
    parser.add_argument("--all", action="store_true", help="every configuration the launchers can choose")
    parser.add_argument("--dtype", action="append", choices=sorted(DTYPES), help="repeatable; default: all")
    parser.add_argument("--target", action="append", type=int, choices=(80, 90), help="SM arch; default: 90 and 80")
    options = parser.parse_args(argv)
    targets = [GPUTarget("cuda", arch, 32) for arch in options.target] if options.target else DEFAULT_TARGETS
    for launch in every_launch("all" if options.all else "mugcp", options.dtype or list(DTYPES)):
        for target in targets:
            result = compile_kernel(launch.kernel, launch.args, launch.constexprs, target,
                                    launch.num_warps, launch.num_stages)
            print(json.dumps({
                "op": launch.op,
                "kernel": result.kernel,
                "dtype": launch.dtype,
                "target": result.target,
                "constexprs": {k: v for k, v in result.constexprs.items()},
                "num_warps": result.num_warps,
                "num_stages": result.num_stages,
                "ptx_target": result.ptx_target,
                "ptx_chars": len(result.ptx),
                "cubin_bytes": len(result.cubin),
                "cubin_is_elf": result.cubin[:4] == b"\x7fELF",
                "uses_wgmma": result.uses_wgmma,
                "seconds": round(result.seconds, 2),
            }), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
