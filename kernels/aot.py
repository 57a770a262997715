"""Ahead-of-time compilation of Triton kernels for a GPU that is not here (sm_90 H100, sm_87 Jetson Orin).

Used by the tests (to prove each kernel builds for each target and to report its resources) and by the
TensorRT plugins (whose AOT implementation embeds the PTX). Needs no GPU: Triton's bundled ptxas and
cuobjdump do the work.
"""
from __future__ import annotations

import os
import re
import subprocess
import tempfile
from dataclasses import dataclass
from typing import Any

TARGETS = {"sm_90": 90, "sm_87": 87}  # H100 / H200, Jetson AGX Orin


@dataclass(frozen=True)
class CompiledKernel:
    name: str
    target: str  # "sm_90" / "sm_87"
    ptx: str
    cubin: bytes
    num_warps: int
    registers: int  # per thread
    shared_bytes: int  # static + dynamic shared memory Triton asked for
    spill_stores: int  # bytes
    spill_loads: int  # bytes
    stack_bytes: int

    def summary(self) -> str:
        return (
            f"{self.name} [{self.target}] warps={self.num_warps} regs={self.registers} "
            f"smem={self.shared_bytes}B spills={self.spill_stores}/{self.spill_loads}B stack={self.stack_bytes}B"
        )


def _nvidia_bin(tool: str) -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", tool)


def _ptxas_for(capability: int) -> str:
    """The ptxas Triton itself uses for this capability (Triton >= 3.7 ships a newer one for sm_90+)."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        return get_ptxas(capability).path
    except (ImportError, AttributeError, TypeError):  # older Triton: one bundled ptxas
        return _nvidia_bin("ptxas")


def compile_for(
    fn: Any,  # a @triton.jit function (not autotuned: pass the config's constexprs explicitly)
    signature: dict[str, str],  # argument -> Triton type, e.g. {"x_ptr": "*fp32", "n": "i32", "BLOCK": "constexpr"}
    constexprs: dict[str, Any],
    target: str = "sm_90",
    num_warps: int = 4,
    num_stages: int = 2,
) -> CompiledKernel:
    """Compile ``fn`` for ``target`` without a GPU and read registers / shared memory / spills from ptxas."""
    import triton
    from triton.backends.compiler import GPUTarget

    if target not in TARGETS:
        raise ValueError(f"unknown target {target!r}; choose one of {', '.join(TARGETS)}")
    src = triton.compiler.ASTSource(fn=_as_jit_function(fn), signature=signature, constexprs=constexprs)
    kernel = triton.compile(
        src, target=GPUTarget("cuda", TARGETS[target], 32), options={"num_warps": num_warps, "num_stages": num_stages}
    )
    ptx = kernel.asm["ptx"]
    usage = ptxas_usage(ptx, target)
    return CompiledKernel(
        name=kernel.name,
        target=target,
        ptx=ptx,
        cubin=kernel.asm["cubin"],
        num_warps=num_warps,
        registers=usage["registers"],
        shared_bytes=int(kernel.metadata.shared),
        spill_stores=usage["spill_stores"],
        spill_loads=usage["spill_loads"],
        stack_bytes=usage["stack"],
    )


def _as_jit_function(fn: Any) -> Any:
    """The JITFunction behind ``fn``: unwraps autotuners / heuristics, and rebuilds a JITFunction from the
    Python function when ``TRITON_INTERPRET=1`` turned ``@triton.jit`` into an interpreter wrapper (as in tests)."""
    from triton.runtime.jit import JITFunction

    while not isinstance(fn, JITFunction):
        inner = getattr(fn, "fn", None)
        if inner is None:
            raise TypeError(f"{fn!r} is not a Triton kernel")
        if not hasattr(inner, "fn") and callable(inner) and not isinstance(inner, JITFunction):
            return JITFunction(inner)  # plain Python function under the interpreter
        fn = inner
    return fn


def ptxas_usage(ptx: str, target: str) -> dict[str, int]:
    """Registers, spills and stack of the PTX's kernel as Triton's bundled ``ptxas -v`` reports them."""
    # Triton writes e.g. ".target sm_90a" for Hopper; ptxas must be asked for exactly that architecture.
    m = re.search(r"^\.target\s+(sm_\w+)", ptx, flags=re.MULTILINE)
    arch = m.group(1) if m else target
    with tempfile.TemporaryDirectory() as tmp:
        ptx_path = os.path.join(tmp, "kernel.ptx")
        with open(ptx_path, "w") as f:
            f.write(ptx)
        proc = subprocess.run(
            [_ptxas_for(TARGETS[target]), "-v", "--gpu-name", arch, ptx_path, "-o", os.path.join(tmp, "kernel.cubin")],
            capture_output=True,
            text=True,
        )
    report = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise RuntimeError(f"ptxas failed for {arch}:\n{report}")

    def grab(pattern: str) -> int:
        m = re.search(pattern, report)
        if m is None:
            raise RuntimeError(f"ptxas report has no match for {pattern!r}:\n{report}")
        return int(m.group(1))

    return {
        "registers": grab(r"Used (\d+) registers"),
        "spill_stores": grab(r"(\d+) bytes spill stores"),
        "spill_loads": grab(r"(\d+) bytes spill loads"),
        "stack": grab(r"(\d+) bytes stack frame"),
    }
