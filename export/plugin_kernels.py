"""The kernels behind :data:`m2f.export.plugins.PLUGINS`: Triton, compiled ahead of time into TensorRT engines.

One shape for every op: ``spec.kernel`` names a function ``(input dims, dtypes, cdiv) ->`` :class:`AotLaunch`
(an :class:`m2f.kernels.aot.KernelSpec` plus its grid, block and int32 scalar arguments), with the dims ints or
TensorRT's ``ShapeExpr``. :func:`compile_plugin_kernel` builds its PTX for a GPU without one;
:func:`register_tensorrt_plugins` registers every spec with ``tensorrt.plugin`` (TensorRT >= 10.7 Python
"quickly deployable plugins"): ``@trtp.register`` (shape / dtype description), ``@trtp.autotune`` (formats) and
``@trtp.aot_impl`` (kernel name, PTX, launch grid, int32 scalars). The PTX is embedded in the engine, so the
engine runs the Triton kernel with no Python at run time.

QDP calling convention for AOT kernels: tensor inputs (pointers) first, then the int32 scalars, then the outputs.
The msda kernel of ``m2f.kernels`` takes the output pointer before its scalars, so :func:`msda_trt_plugin_kernel`
is a thin wrapper in that order that inlines it. The masked-attention plugin runs a kernel written for it
(``m2f.kernels.masked_attention.plugin_kernel``: one launch, empty-row rule inside), already in that order.
"""
from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import triton
import triton.language as tl

from m2f.kernels.common import TRITON_TYPES

from .plugins import PLUGINS, PluginSpec

@dataclass(frozen=True)
class AotLaunch:
    """One plugin launch: the kernel to compile (target filled in by the caller) and how to launch it."""

    kernel: Any  # m2f.kernels.aot.KernelSpec
    grid: tuple[Any, Any, Any]
    block: int
    scalars: tuple[Any, ...]  # the kernel's int32 arguments, in order


def _cdiv(a: Any, b: Any) -> Any:
    return (a + b - 1) // b


def _const(expr: Any, what: str, plugin: str) -> int:
    """A dim that must be a build-time constant (levels, points, head dim are fixed by the architecture)."""
    if isinstance(expr, int):
        return expr
    if not getattr(expr, "is_constant", False):
        raise ValueError(f"{plugin} plugin: {what} must be static in the ONNX graph")
    return int(expr.constant_value)


# --- deformable attention ----------------------------------------------------------------------------

# m2f's MSDA kernel body (the JITFunction behind its autotuner), bound on first use: see msda_plugin_kernel().
_msda_body: Any = None
_msda_kernel: Any = None


@triton.jit
def msda_trt_plugin_kernel(
    value_ptr, shapes_ptr, starts_ptr, loc_ptr, attn_ptr,  # inputs: (N, S, M, D), (L, 2), (L,), locations, weights
    num_keys, num_queries, num_heads,  # int32 scalars: S, Lq, M
    out_ptr,  # output (N, Lq, M, D)
    NUM_LEVELS: tl.constexpr, NUM_POINTS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    ROW_ALIGNED: tl.constexpr, BLOCK_Q: tl.constexpr,
):
    _msda_body(value_ptr, shapes_ptr, starts_ptr, loc_ptr, attn_ptr, out_ptr, num_keys, num_queries, num_heads,
               NUM_LEVELS, NUM_POINTS, HEAD_DIM, BLOCK_D, ROW_ALIGNED, BLOCK_Q)


def msda_plugin_kernel() -> Any:
    """The QDP-ordered MSDA kernel (inputs, scalars, output) as a JITFunction that inlines m2f's kernel.

    Returned as a compilable JITFunction even under TRITON_INTERPRET=1: it is only ever compiled ahead of time.
    """
    global _msda_body, _msda_kernel
    if _msda_kernel is None:
        from m2f.kernels.aot import _as_jit_function
        from m2f.kernels.ms_deform_attn.triton_kernels import ms_deform_attn_fwd_kernel

        # Bound once: Triton refuses to recompile a kernel whose globals changed since its last compilation.
        _msda_body = _as_jit_function(ms_deform_attn_fwd_kernel)
        _msda_kernel = _as_jit_function(msda_trt_plugin_kernel)
    return _msda_kernel


def msda_signature(dtype: str) -> dict[str, str]:
    t = TRITON_TYPES[dtype]
    return {
        "value_ptr": f"*{t}", "shapes_ptr": "*i32", "starts_ptr": "*i32", "loc_ptr": f"*{t}", "attn_ptr": f"*{t}",
        "num_keys": "i32", "num_queries": "i32", "num_heads": "i32", "out_ptr": f"*{t}",
        "NUM_LEVELS": "constexpr", "NUM_POINTS": "constexpr", "HEAD_DIM": "constexpr", "BLOCK_D": "constexpr",
        "ROW_ALIGNED": "constexpr", "BLOCK_Q": "constexpr",
    }


def msda_constexprs(num_levels: int, num_points: int, head_dim: int, dtype: str, block_q: int) -> dict[str, Any]:
    """Compile-time parameters. ROW_ALIGNED (16-byte vector loads of each (key, head) row) holds when a row is a
    multiple of 16 bytes: TensorRT's device buffers are 256-byte aligned, so every row then starts aligned."""
    block_d = 1 << max(0, (head_dim - 1).bit_length())
    itemsize = 2 if dtype == "float16" else 4
    return {"NUM_LEVELS": num_levels, "NUM_POINTS": num_points, "HEAD_DIM": head_dim, "BLOCK_D": block_d,
            "ROW_ALIGNED": head_dim * itemsize % 16 == 0, "BLOCK_Q": block_q}


def msda_aot(dims: Sequence[Sequence[Any]], dtypes: Sequence[str], cdiv: Callable[[Any, Any], Any] = _cdiv) -> AotLaunch:
    """The MSDA plugin launch: one program per (BLOCK_Q queries, batch x head), as the m2f kernel's own launcher,
    with the forward kernel's ahead-of-time config of m2f.kernels (checked there for register spills on sm_90 /
    sm_87; an engine cannot autotune a Triton kernel)."""
    from m2f.kernels.aot import KernelSpec
    from m2f.kernels.ms_deform_attn.triton_kernels import AOT_CONFIGS

    value, loc = dims[0], dims[3]
    block_q, num_warps = int(AOT_CONFIGS["fwd"]["BLOCK_Q"]), int(AOT_CONFIGS["fwd"]["num_warps"])
    constexprs = msda_constexprs(_const(loc[3], "levels", "MSDA"), _const(loc[4], "points", "MSDA"),
                                 _const(value[3], "head dim", "MSDA"), dtypes[0], block_q)
    # named by its factory, so that a child process (the interpreter case of m2f.kernels.aot) binds it too
    kernel = KernelSpec(f"{__name__}:msda_plugin_kernel", msda_signature(dtypes[0]), constexprs, num_warps=num_warps,
                        num_stages=1)
    n, s, m, _ = value
    return AotLaunch(kernel, grid=(cdiv(loc[1], block_q), n * m, 1), block=num_warps * 32, scalars=(s, loc[1], m))


# --- masked attention --------------------------------------------------------------------------------


def masked_attention_aot(dims: Sequence[Sequence[Any]], dtypes: Sequence[str],
                         cdiv: Callable[[Any, Any], Any] = _cdiv) -> AotLaunch:
    """The masked-attention plugin launch: one program per (batch x head, BLOCK_Q queries), heads fastest
    (q (B, Nq, H, D), k (B, Nk, H, D)); the tile of m2f.kernels' plugin kernel for q's dtype."""
    from m2f.kernels.aot import KernelSpec, _as_jit_function
    from m2f.kernels.masked_attention.plugin_kernel import (
        masked_attention_plugin_kernel,
        plugin_constexprs,
        plugin_grid,
        plugin_signature,
        plugin_tile,
    )

    q, k = dims[0], dims[1]
    tile = plugin_tile(dtypes[0])
    head_dim = _const(q[3], "head dim", "masked attention")
    kernel = KernelSpec(_as_jit_function(masked_attention_plugin_kernel), plugin_signature(dtypes[0], dtypes[3]),
                        plugin_constexprs(head_dim, dtypes[0], tile), num_warps=tile.num_warps,
                        num_stages=tile.num_stages)
    batch, n_q, heads, _ = q
    return AotLaunch(kernel, grid=plugin_grid(batch, heads, n_q, tile.block_q, cdiv=cdiv),
                     block=tile.num_warps * 32, scalars=(n_q, k[1], heads))


# --- for every spec ----------------------------------------------------------------------------------


def aot_launch(spec: PluginSpec, dims: Sequence[Sequence[Any]], dtypes: Sequence[str],
               cdiv: Callable[[Any, Any], Any] = _cdiv) -> AotLaunch:
    module, name = spec.kernel.split(":")
    return getattr(importlib.import_module(module), name)(dims, dtypes, cdiv)


def example_dims(spec: PluginSpec, **sizes: int) -> list[list[int]]:
    """Input dims of one plugin call at Mask2Former-like sizes (for compiling without a graph)."""
    b, heads, head_dim = sizes.get("batch", 1), sizes.get("heads", 8), sizes.get("head_dim", 32)
    if spec.name == "msda":
        levels, points, keys, queries = sizes.get("levels", 3), sizes.get("points", 4), 1344, 1344
        return [[b, keys, heads, head_dim], [levels, 2], [levels], [b, queries, heads, levels, points, 2],
                [b, queries, heads, levels, points]]
    return [[b, 100, heads, head_dim], [b, 1344, heads, head_dim], [b, 1344, heads, head_dim], [b, 100, 1344]]


def compile_plugin_kernel(spec: PluginSpec, target: str, dtype: str = "float32", **sizes: int) -> Any:
    """PTX (+ cubin and resources) of ``spec``'s plugin kernel for ``target`` ("sm_90", "sm_87"); no GPU needed."""
    from m2f.kernels.aot import compile_many

    dims = example_dims(spec, **sizes)
    dtypes = [dtype if rule.dtypes[0] == "FLOAT" else "int32" for rule in spec.input_rules]
    return compile_many([aot_launch(spec, dims, dtypes).kernel.for_target(target)])[0]


_REGISTERED = False


def register_tensorrt_plugins() -> None:
    """Register every spec's ``trt_node`` with TensorRT's Python plugin registry (idempotent)."""
    global _REGISTERED
    if _REGISTERED:
        return
    from ._trt import import_tensorrt, import_tensorrt_plugin

    trt = import_tensorrt()
    trtp = import_tensorrt_plugin()
    dtype_names = {trt.float32: "float32", trt.float16: "float16", trt.bfloat16: "bfloat16", trt.int32: "int32"}
    for spec in PLUGINS:
        _register(trtp, spec, dtype_names)
    _REGISTERED = True


def _with_inputs(fn: Callable[..., Any], names: Sequence[str], extra: Sequence[str], annotation: Any,
                 returns: Any = inspect.Signature.empty) -> Callable[..., Any]:
    """``fn(*tensors, *extra)`` under a signature naming each input: tensorrt.plugin reads a plugin's inputs off
    the signature of the functions registered for it."""
    params = [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=annotation) for n in names]
    params += [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD) for n in extra]
    fn.__signature__ = inspect.Signature(params, return_annotation=returns)  # type: ignore[attr-defined]
    fn.__annotations__ = {**{n: annotation for n in names}, **({} if returns is inspect.Signature.empty
                                                               else {"return": returns})}
    return fn


def _register(trtp: Any, spec: PluginSpec, dtype_names: dict[Any, str]) -> None:
    plugin_id = f"{spec.trt_node.domain}::{spec.trt_node.op_type}"
    names = spec.trt_node.inputs

    def dims_of(descs: Sequence[Any]) -> list[list[Any]]:
        return [[d.shape_expr[i] for i in range(rule.rank)] for d, rule in zip(descs, spec.input_rules)]

    def describe(*descs: Any) -> Any:
        return trtp.from_shape_expr(spec.output_shape(*dims_of(descs)), dtype=descs[0].dtype)

    def formats(*args: Any) -> list[Any]:
        return [trtp.AutoTuneCombination(spec.trt_formats, "LINEAR")]

    def aot(*args: Any) -> tuple[bytes, bytes, Any, Any]:
        from triton.backends.compiler import GPUTarget

        from m2f.kernels.aot import _as_jit_function, _resolve

        descs = args[: len(names)]
        launch = aot_launch(spec, dims_of(descs), [dtype_names[d.dtype] for d in descs], cdiv=trtp.cdiv)
        major, minor = _device_capability()
        k = launch.kernel
        src = triton.compiler.ASTSource(fn=_as_jit_function(_resolve(k.fn)), signature=k.signature,
                                        constexprs=k.constexprs)
        compiled = triton.compile(src, target=GPUTarget("cuda", major * 10 + minor, 32),
                                  options={"num_warps": k.num_warps, "num_stages": k.num_stages})
        params = trtp.KernelLaunchParams()
        params.grid_x, params.grid_y = launch.grid[0], launch.grid[1]
        params.block_x = launch.block
        params.shared_mem = compiled.metadata.shared
        extra = trtp.SymIntExprs.from_tuple([trtp.SymInt32(e) for e in launch.scalars])
        return compiled.metadata.name.encode(), compiled.asm["ptx"].encode(), params, extra

    trtp.register(plugin_id)(_with_inputs(describe, names, (), trtp.TensorDesc, trtp.TensorDesc))
    trtp.autotune(plugin_id)(_with_inputs(formats, names, ("outputs",), trtp.TensorDesc))
    trtp.aot_impl(plugin_id)(_with_inputs(aot, names, ("outputs", "tactic"), trtp.TensorDesc))


def _device_capability() -> tuple[int, int]:
    """Compute capability of GPU 0 (the engine is built for the GPU it is built on)."""
    from ._trt import check_cuda, import_cudart

    cudart = import_cudart()
    major = check_cuda(cudart.cudaDeviceGetAttribute(cudart.cudaDeviceAttr.cudaDevAttrComputeCapabilityMajor, 0))
    minor = check_cuda(cudart.cudaDeviceGetAttribute(cudart.cudaDeviceAttr.cudaDevAttrComputeCapabilityMinor, 0))
    return int(major), int(minor)
