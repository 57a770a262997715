"""Ahead-of-time compilation of Triton kernels for a GPU that is not here (sm_90 H100, sm_87 Jetson Orin).

Used by the tests (to prove each kernel builds for each target and to report its resources) and by the
TensorRT plugins (whose AOT implementation embeds the PTX). Needs no GPU: Triton's bundled ptxas does the work.

Under ``TRITON_INTERPRET=1`` (the CPU test set-up) ``@triton.jit`` functions, Triton's own library helpers
(``tl.sum``, ``tl.zeros``, ...) included, are interpreter wrappers that the compiler cannot lower. Builds then run
in one child process with the interpreter off; callers see no difference.

    spec = KernelSpec(fn=my_kernel, signature={"x_ptr": "*fp32", "n": "i32", "BLOCK": "constexpr"},
                      constexprs={"BLOCK": 128}, divisible_by_16=("x_ptr", "n"))
    [k90, k87] = compile_many([spec.for_target("sm_90"), spec.for_target("sm_87")])
"""
from __future__ import annotations

import dataclasses
import os
import pickle
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from typing import Any, Sequence

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


@dataclass(frozen=True)
class KernelSpec:
    """One kernel build: a @triton.jit (or autotuned) module-level function and how to specialise it."""

    # A @triton.jit / autotuned module-level function, or "module:name" naming one or naming a zero-argument
    # factory that returns one (for kernels assembled at run time, e.g. the TensorRT plugins' wrappers).
    fn: Any
    signature: dict[str, str]  # argument -> Triton type ("*fp32", "i32", "fp32", "constexpr")
    constexprs: dict[str, Any]  # values of the constexpr arguments (autotuned ones included)
    target: str = "sm_90"
    num_warps: int = 4
    num_stages: int = 2
    # Pointer / integer arguments a real launch would find divisible by 16 (aligned pointers, sizes and strides
    # that are multiples of 16): Triton specialises on it (vector loads), so register reports match real launches.
    divisible_by_16: Sequence[str] = ()

    def for_target(self, target: str) -> "KernelSpec":
        return dataclasses.replace(self, target=target)


def compile_for(
    fn: Any,
    signature: dict[str, str],
    constexprs: dict[str, Any],
    target: str = "sm_90",
    num_warps: int = 4,
    num_stages: int = 2,
    divisible_by_16: Sequence[str] = (),
) -> CompiledKernel:
    """Compile one kernel for ``target`` without a GPU; see :class:`KernelSpec` for the arguments."""
    spec = KernelSpec(fn, signature, constexprs, target, num_warps, num_stages, tuple(divisible_by_16))
    return compile_many([spec])[0]


def compile_many(specs: Sequence[KernelSpec]) -> list[CompiledKernel]:
    """Compile every spec (in a child process when the Triton interpreter is on here)."""
    from ._backend import triton_interpreter_enabled

    if triton_interpreter_enabled():
        return _compile_in_child(specs)
    return [_compile(spec) for spec in specs]


def _compile(spec: KernelSpec) -> CompiledKernel:
    import triton
    from triton.backends.compiler import GPUTarget

    if spec.target not in TARGETS:
        raise ValueError(f"unknown target {spec.target!r}; choose one of {', '.join(TARGETS)}")
    jit_fn = _as_jit_function(_resolve(spec.fn))
    unknown = set(spec.divisible_by_16) - set(jit_fn.arg_names)
    if unknown:
        raise ValueError(f"divisible_by_16 names arguments {sorted(unknown)} that {jit_fn.__name__} does not have")
    attrs = {(jit_fn.arg_names.index(name),): [["tt.divisibility", 16]] for name in spec.divisible_by_16}
    src = triton.compiler.ASTSource(fn=jit_fn, signature=spec.signature, constexprs=spec.constexprs, attrs=attrs)
    kernel = triton.compile(
        src,
        target=GPUTarget("cuda", TARGETS[spec.target], 32),
        options={"num_warps": spec.num_warps, "num_stages": spec.num_stages},
    )
    ptx = kernel.asm["ptx"]
    usage = ptxas_usage(ptx, spec.target)
    return CompiledKernel(
        name=kernel.name,
        target=spec.target,
        ptx=ptx,
        cubin=kernel.asm["cubin"],
        num_warps=spec.num_warps,
        registers=usage["registers"],
        shared_bytes=int(kernel.metadata.shared),
        spill_stores=usage["spill_stores"],
        spill_loads=usage["spill_loads"],
        stack_bytes=usage["stack"],
    )


# -- the interpreter case: build in a child process ------------------------------------------------------------


def _resolve(fn: Any) -> Any:
    """A kernel object from a KernelSpec's ``fn`` (see there)."""
    if not isinstance(fn, str):
        return fn
    import importlib

    module, _, name = fn.partition(":")
    obj = importlib.import_module(module)
    for part in name.split("."):
        obj = getattr(obj, part)
    is_kernel = hasattr(obj, "fn") or type(obj).__name__ in ("JITFunction", "InterpretedFunction")
    return obj if is_kernel else obj()


def _python_function(fn: Any) -> Any:
    """The plain Python function under jit / autotune / heuristics / interpreter wrappers."""
    while hasattr(fn, "fn"):
        fn = fn.fn
    return fn


def _compile_in_child(specs: Sequence[KernelSpec]) -> list[CompiledKernel]:
    requests = []
    for spec in specs:
        fn = spec.fn
        if not isinstance(fn, str):
            py = _python_function(fn)
            if "<locals>" in py.__qualname__:
                raise ValueError(f"{py.__qualname__} is not a module-level kernel: it cannot be rebuilt in a child")
            fn = f"{py.__module__}:{py.__qualname__}"
        requests.append(dataclasses.replace(spec, fn=fn))
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    proc = subprocess.run([sys.executable, "-m", "m2f.kernels.aot"], input=pickle.dumps(requests), env=env,
                          capture_output=True)
    if proc.returncode != 0:
        raise RuntimeError(f"ahead-of-time build failed in the child process:\n{proc.stderr.decode()[-4000:]}")
    return pickle.loads(proc.stdout)


def _child_main() -> None:
    """``python -m m2f.kernels.aot``: pickled build requests on stdin, pickled CompiledKernels on stdout."""
    requests = pickle.loads(sys.stdin.buffer.read())
    sys.stdout.buffer.write(pickle.dumps([_compile(spec) for spec in requests]))


# -- tools ------------------------------------------------------------------------------------------------------


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


def _as_jit_function(fn: Any) -> Any:
    """The JITFunction behind ``fn``: unwraps autotuners / heuristics, and rebuilds a JITFunction from the Python
    function when ``TRITON_INTERPRET=1`` made ``@triton.jit`` an interpreter wrapper. (Such a rebuilt kernel still
    calls interpreted library helpers; compile_many builds in a child process for that reason.)"""
    from triton.runtime.jit import JITFunction

    while not isinstance(fn, JITFunction):
        inner = getattr(fn, "fn", None)
        if inner is None:
            raise TypeError(f"{fn!r} is not a Triton kernel")
        if not hasattr(inner, "fn") and callable(inner) and not isinstance(inner, JITFunction):
            return JITFunction(inner)  # the plain Python function under the interpreter's wrapper
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
            [_ptxas_for(TARGETS[target]), "-v", "--gpu-name", arch, ptx_path, "-o", os.path.join(tmp, "k.cubin")],
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


if __name__ == "__main__":
    # Re-import under the package name so the pickled CompiledKernels name m2f.kernels.aot, not __main__.
    from m2f.kernels.aot import _child_main as main

    main()
