"""TensorRT plugins for Mask2Former's two attention ops, made from m2f's Triton kernels.

Two layers, so that everything but the TensorRT calls is testable without TensorRT:

* Plain data and math (no TensorRT): the ONNX node of each plugin (op type, domain, attributes, input order),
  the output-shape rules (:func:`msda_output_shape`, :func:`masked_attention_output_shape`) written over any
  dimension type (ints here, TensorRT's symbolic ``ShapeExpr`` inside the engine builder), the launch geometry,
  and the PTX of the plugin kernels for a given GPU (:func:`compile_msda_plugin_kernel`,
  :func:`compile_masked_attention_plugin_kernel`, no GPU needed).
* :func:`register_tensorrt_plugins`: registers the plugins with ``tensorrt.plugin`` (TensorRT >= 10.9: Python
  "quickly deployable plugins" date from 10.6, their ahead-of-time ``aot_impl`` that these use from 10.9): ``@trtp.register`` (shape / dtype description) and ``@trtp.aot_impl`` (kernel
  name, PTX, launch grid, int32 scalar arguments). The PTX is embedded in the engine, so the engine runs the
  Triton kernel with no Python at run time.

The ONNX graph from ``m2f export onnx --msda plugin`` uses TensorRT's own interface node
(``MultiscaleDeformableAttnPlugin_TRT``, version "1", no attributes; inputs value [N,S,M,D], spatial_shapes [L,2]
int32, level_start_index [L] int32, sampling_locations [N,Lq,M,L,P,2], attention_weights [N,Lq,M,L,P]; output
[N,Lq,M,D]); ``m2f export tensorrt --plugins m2f`` retargets those nodes to the m2f plugin, which has the same
inputs and output, before parsing. Masked attention has no TensorRT plugin to stand in for it: ``m2f export onnx
--masked-attn plugin`` writes the m2f node itself (op type ``masked_attention``, attribute ``plugin_namespace`` "m2f",
so that the parser's plugin lookup (name = op type, version "1", namespace from the attribute) finds the registered
``m2f::masked_attention``, and ``aot`` 1, which asks TensorRT for the ahead-of-time implementation).

QDP calling convention for AOT kernels: tensor inputs (pointers) first, then the int32 scalars, then the outputs.
The msda kernel of ``m2f.kernels`` takes the output pointer before its scalars, so :func:`msda_plugin_kernel`
is a thin wrapper in that order that inlines it. The masked-attention plugin runs a kernel written for it
(``m2f.kernels.masked_attention.plugin_kernel``: one launch, empty-row rule inside), already in that order.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

# ---------------------------------------------------------------------------------------------------
# ONNX nodes
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PluginNode:
    """How a plugin appears in an ONNX graph: TensorRT's parser looks any unknown op_type up as a plugin of that
    name, with version / namespace from the ``plugin_version`` / ``plugin_namespace`` attributes ("1" / "")."""

    op_type: str
    domain: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    attributes: dict[str, Any] = field(default_factory=dict)

    def retarget(self, node: Any) -> None:
        """Rewrite an ONNX NodeProto with the same inputs into this plugin's node (in place)."""
        from onnx import helper

        node.op_type = self.op_type
        node.domain = self.domain
        del node.attribute[:]
        node.attribute.extend(helper.make_attribute(k, v) for k, v in self.attributes.items())


MSDA_INPUTS = ("value", "spatial_shapes", "level_start_index", "sampling_locations", "attention_weights")

# TensorRT's open-source plugin (plugin/multiscaleDeformableAttnPlugin): name, version "1" (the default the parser
# assumes), no attributes. The domain is not read by the parser; "trt.plugins" is the conventional one.
TRT_MSDA = PluginNode("MultiscaleDeformableAttnPlugin_TRT", "trt.plugins", MSDA_INPUTS, ("output",))

# m2f's Triton MSDA as a TensorRT Python plugin "m2f::ms_deform_attn" (same inputs / output as TRT_MSDA).
M2F_NAMESPACE = "m2f"
M2F_MSDA = PluginNode(
    "ms_deform_attn", M2F_NAMESPACE, MSDA_INPUTS, ("output",), {"plugin_namespace": M2F_NAMESPACE, "aot": 1}
)
# m2f's Triton masked attention as "m2f::masked_attention": q (B, Nq, H, D), k, v (B, Nk, H, D), mask logits
# (B, Nq, Nk) (allowed where >= 0); output (B, Nq, H, D). Tokens-major ("BNHD") as the projections produce them,
# so that the graph needs no transpose around the plugin.
MASKED_ATTENTION_INPUTS = ("q", "k", "v", "mask_logits")
M2F_MASKED_ATTENTION = PluginNode(
    "masked_attention", M2F_NAMESPACE, MASKED_ATTENTION_INPUTS, ("output",),
    {"plugin_namespace": M2F_NAMESPACE, "aot": 1},
)

# ---------------------------------------------------------------------------------------------------
# Shape rules (generic over the dimension type: int, or TensorRT's ShapeExpr)
# ---------------------------------------------------------------------------------------------------


def _same(a: Any, b: Any) -> bool:
    """Equal when both are known ints; symbolic dimensions are trusted (TensorRT checks them at build time)."""
    return not (isinstance(a, int) and isinstance(b, int)) or a == b


def msda_output_shape(
    value: Sequence[Any],  # (N, S, M, D)
    spatial_shapes: Sequence[Any],  # (L, 2)
    level_start_index: Sequence[Any],  # (L,)
    sampling_locations: Sequence[Any],  # (N, Lq, M, L, P, 2)
    attention_weights: Sequence[Any],  # (N, Lq, M, L, P)
) -> tuple[Any, Any, Any, Any]:  # (N, Lq, M, D)
    """Output dims of the MSDA plugin, after the consistency checks of TensorRT's plugin (configurePlugin)."""
    ranks = (len(value), len(spatial_shapes), len(level_start_index), len(sampling_locations), len(attention_weights))
    if ranks != (4, 2, 1, 6, 5):
        raise ValueError(f"MSDA plugin inputs must have ranks (4, 2, 1, 6, 5), got {ranks}")
    checks = [
        (value[0], sampling_locations[0], "batch of value / sampling_locations"),
        (value[0], attention_weights[0], "batch of value / attention_weights"),
        (value[2], sampling_locations[2], "heads of value / sampling_locations"),
        (value[2], attention_weights[2], "heads of value / attention_weights"),
        (spatial_shapes[1], 2, "spatial_shapes last dim"),
        (spatial_shapes[0], level_start_index[0], "levels of spatial_shapes / level_start_index"),
        (spatial_shapes[0], sampling_locations[3], "levels of spatial_shapes / sampling_locations"),
        (spatial_shapes[0], attention_weights[3], "levels of spatial_shapes / attention_weights"),
        (sampling_locations[4], attention_weights[4], "points of sampling_locations / attention_weights"),
        (sampling_locations[1], attention_weights[1], "queries of sampling_locations / attention_weights"),
        (sampling_locations[5], 2, "sampling_locations last dim"),
    ]
    for a, b, what in checks:
        if not _same(a, b):
            raise ValueError(f"MSDA plugin: {what} differ ({a} vs {b})")
    return value[0], sampling_locations[1], value[2], value[3]


def masked_attention_output_shape(
    q: Sequence[Any],  # (B, Nq, H, D)
    k: Sequence[Any],  # (B, Nk, H, D)
    v: Sequence[Any],  # (B, Nk, H, D)
    mask_logits: Sequence[Any],  # (B, Nq, Nk)
) -> tuple[Any, Any, Any, Any]:  # (B, Nq, H, D)
    """Output dims of the masked-attention plugin, after checking that the inputs fit together."""
    ranks = (len(q), len(k), len(v), len(mask_logits))
    if ranks != (4, 4, 4, 3):
        raise ValueError(f"masked attention plugin inputs must have ranks (4, 4, 4, 3), got {ranks}")
    checks = [
        (q[0], k[0], "batch of q / k"), (k[0], v[0], "batch of k / v"), (q[0], mask_logits[0], "batch of q / mask"),
        (q[2], k[2], "heads of q / k"), (k[2], v[2], "heads of k / v"),
        (q[3], k[3], "head dim of q / k"), (k[3], v[3], "head dim of k / v"), (k[1], v[1], "keys of k / v"),
        (q[1], mask_logits[1], "queries of q / mask"), (k[1], mask_logits[2], "keys of k / mask"),
    ]
    for a, b, what in checks:
        if not _same(a, b):
            raise ValueError(f"masked attention plugin: {what} differ ({a} vs {b})")
    return q[0], q[1], q[2], q[3]


# ---------------------------------------------------------------------------------------------------
# Kernels (PTX for a target GPU, no GPU needed)
# ---------------------------------------------------------------------------------------------------

# Fallback launch config when m2f.kernels does not publish one (AOT_CONFIGS): 64 queries x 8 warps compiled with
# no spills on sm_90 / sm_87 for the first version of the kernel.
MSDA_BLOCK_Q = 64
MSDA_NUM_WARPS = 8
TRITON_TYPES = {"float32": "fp32", "float16": "fp16"}


@dataclass(frozen=True)
class MsdaLaunch:
    """Grid and scalar arguments of one MSDA plugin launch, from the input dims (ints or ShapeExprs)."""

    grid: tuple[Any, Any, Any]
    block: int
    scalars: tuple[Any, Any, Any]  # num_keys S, num_queries Lq, num_heads M (the kernel's int32 arguments)


def msda_launch(value: Sequence[Any], sampling_locations: Sequence[Any], cdiv: Any = None,
                block_q: int = MSDA_BLOCK_Q, num_warps: int = MSDA_NUM_WARPS) -> MsdaLaunch:
    """One program per (BLOCK_Q queries, batch x head), as the m2f kernel's own launcher."""
    cdiv = cdiv or (lambda a, b: (a + b - 1) // b)
    n, s, m, _ = value
    q = sampling_locations[1]
    return MsdaLaunch(grid=(cdiv(q, block_q), n * m, 1), block=num_warps * 32, scalars=(s, q, m))


_msda_kernel: Any = None  # bound on first use: see msda_plugin_kernel()


def msda_plugin_kernel() -> Any:
    """The QDP-ordered MSDA kernel (inputs, scalars, output) as a JITFunction that inlines m2f's kernel.

    Returned as a compilable JITFunction even under TRITON_INTERPRET=1: it is only ever compiled ahead of time.
    """
    global _msda_kernel
    if _msda_kernel is None:
        from m2f.kernels.aot import _as_jit_function
        from m2f.kernels.ms_deform_attn.triton_kernels import ms_deform_attn_fwd_kernel

        from . import _msda_plugin_jit

        # Bound once: Triton refuses to recompile a kernel whose globals changed since its last compilation.
        _msda_plugin_jit._msda_body = _as_jit_function(ms_deform_attn_fwd_kernel)
        _msda_kernel = _as_jit_function(_msda_plugin_jit.msda_trt_plugin_kernel)
    return _msda_kernel


def msda_signature(dtype: str) -> dict[str, str]:
    t = TRITON_TYPES[dtype]
    return {
        "value_ptr": f"*{t}", "shapes_ptr": "*i32", "starts_ptr": "*i32", "loc_ptr": f"*{t}", "attn_ptr": f"*{t}",
        "num_keys": "i32", "num_queries": "i32", "num_heads": "i32", "out_ptr": f"*{t}",
        "NUM_LEVELS": "constexpr", "NUM_POINTS": "constexpr", "HEAD_DIM": "constexpr", "BLOCK_D": "constexpr",
        "ROW_ALIGNED": "constexpr", "BLOCK_Q": "constexpr",
    }


def msda_constexprs(num_levels: int, num_points: int, head_dim: int, dtype: str = "float32",
                    block_q: int | None = None) -> dict[str, Any]:
    """Compile-time parameters. ROW_ALIGNED (16-byte vector loads of each (key, head) row) holds when a row is a
    multiple of 16 bytes: TensorRT's device buffers are 256-byte aligned, so every row then starts aligned."""
    block_d = 1 << max(0, (head_dim - 1).bit_length())
    itemsize = 2 if dtype == "float16" else 4
    return {"NUM_LEVELS": num_levels, "NUM_POINTS": num_points, "HEAD_DIM": head_dim, "BLOCK_D": block_d,
            "ROW_ALIGNED": head_dim * itemsize % 16 == 0, "BLOCK_Q": block_q or msda_aot_config()[0]}


def msda_aot_config() -> tuple[int, int]:
    """(BLOCK_Q, num_warps) of the forward kernel's ahead-of-time config in m2f.kernels (checked there for
    register spills on sm_90 / sm_87); the engine cannot autotune a Triton kernel."""
    try:
        from m2f.kernels.ms_deform_attn.triton_kernels import AOT_CONFIGS

        return int(AOT_CONFIGS["fwd"]["BLOCK_Q"]), int(AOT_CONFIGS["fwd"]["num_warps"])
    except (ImportError, KeyError):
        return MSDA_BLOCK_Q, MSDA_NUM_WARPS


def compile_msda_plugin_kernel(target: str, dtype: str = "float32", num_levels: int = 3, num_points: int = 4,
                               head_dim: int = 32) -> Any:
    """PTX (+ cubin and resources) of the plugin kernel for ``target`` ("sm_90", "sm_87") via m2f.kernels.aot."""
    from m2f.kernels.aot import KernelSpec, compile_many

    spec = KernelSpec(f"{__name__}:msda_plugin_kernel", msda_signature(dtype),
                      msda_constexprs(num_levels, num_points, head_dim, dtype=dtype), target=target,
                      num_warps=msda_aot_config()[1], num_stages=1)
    return compile_many([spec])[0]


# --- masked attention ------------------------------------------------------------------------------


@dataclass(frozen=True)
class MaskedAttentionLaunch:
    """Grid and scalar arguments of one masked-attention plugin launch, from the input dims (ints or ShapeExprs)."""

    grid: tuple[Any, Any, Any]
    block: int
    scalars: tuple[Any, Any, Any]  # Nq, Nk, H (the kernel's int32 arguments)


def masked_attention_launch(q: Sequence[Any], k: Sequence[Any], block_q: int, num_warps: int,
                            cdiv: Any = None) -> MaskedAttentionLaunch:
    """One program per (batch x head, BLOCK_Q queries), heads fastest (q (B, Nq, H, D), k (B, Nk, H, D))."""
    from m2f.kernels.masked_attention.plugin_kernel import plugin_grid

    batch, n_q, heads, _ = q
    return MaskedAttentionLaunch(grid=plugin_grid(batch, heads, n_q, block_q, cdiv=cdiv), block=num_warps * 32,
                                 scalars=(n_q, k[1], heads))


def masked_attention_kernel_spec(dtype: str, head_dim: int, mask_dtype: str | None = None) -> dict[str, Any]:
    """Everything an ahead-of-time build of the plugin kernel needs: fn, signature, constexprs, warps, stages.

    Returned as a compilable JITFunction even under TRITON_INTERPRET=1: it is only ever compiled ahead of time."""
    from m2f.kernels.aot import _as_jit_function
    from m2f.kernels.masked_attention.plugin_kernel import (
        masked_attention_plugin_kernel,
        plugin_constexprs,
        plugin_signature,
        plugin_tile,
    )

    tile = plugin_tile(dtype)
    return {"fn": _as_jit_function(masked_attention_plugin_kernel), "signature": plugin_signature(dtype, mask_dtype),
            "constexprs": plugin_constexprs(head_dim, dtype, tile), "num_warps": tile.num_warps,
            "num_stages": tile.num_stages, "block_q": tile.block_q}


def compile_masked_attention_plugin_kernel(target: str, dtype: str = "float32", head_dim: int = 32) -> Any:
    """PTX (+ cubin and resources) of the masked-attention plugin kernel for ``target`` ("sm_90", "sm_87")."""
    from m2f.kernels.aot import KernelSpec, compile_many

    spec = masked_attention_kernel_spec(dtype, head_dim)
    return compile_many([KernelSpec(spec["fn"], spec["signature"], spec["constexprs"], target=target,
                                    num_warps=spec["num_warps"], num_stages=spec["num_stages"])])[0]


# ---------------------------------------------------------------------------------------------------
# Registration with tensorrt.plugin (TensorRT >= 10.9, for aot_impl)
# ---------------------------------------------------------------------------------------------------

_REGISTERED = False


def _const(expr: Any, what: str, plugin: str = "MSDA") -> int:
    """A ShapeExpr that must be a build-time constant (levels, points, head dim are fixed by the architecture)."""
    if isinstance(expr, int):
        return expr
    if not getattr(expr, "is_constant", False):
        raise ValueError(f"{plugin} plugin: {what} must be static in the ONNX graph")
    return int(expr.constant_value)


def register_tensorrt_plugins() -> None:
    """Register ``m2f::ms_deform_attn`` and ``m2f::masked_attention`` with TensorRT's Python plugin registry
    (idempotent)."""
    global _REGISTERED
    if _REGISTERED:
        return
    from ._trt import import_tensorrt, import_tensorrt_plugin

    trt = import_tensorrt()
    trtp = import_tensorrt_plugin()
    plugin_id = f"{M2F_NAMESPACE}::{M2F_MSDA.op_type}"

    @trtp.register(plugin_id)
    def _msda_desc(value: trtp.TensorDesc, spatial_shapes: trtp.TensorDesc, level_start_index: trtp.TensorDesc,
                   sampling_locations: trtp.TensorDesc, attention_weights: trtp.TensorDesc) -> trtp.TensorDesc:
        dims = msda_output_shape(
            [value.shape_expr[i] for i in range(4)], [spatial_shapes.shape_expr[i] for i in range(2)],
            [level_start_index.shape_expr[0]], [sampling_locations.shape_expr[i] for i in range(6)],
            [attention_weights.shape_expr[i] for i in range(5)],
        )
        return trtp.from_shape_expr(dims, dtype=value.dtype)

    @trtp.autotune(plugin_id)
    def _msda_formats(value, spatial_shapes, level_start_index, sampling_locations, attention_weights, outputs):
        # positions: value, shapes, starts, locations, weights, output ("|" alternatives pair up by position)
        return [trtp.AutoTuneCombination("FP32|FP16, INT32, INT32, FP32|FP16, FP32|FP16, FP32|FP16", "LINEAR")]

    @trtp.aot_impl(plugin_id)
    def _msda_aot(value: trtp.TensorDesc, spatial_shapes: trtp.TensorDesc, level_start_index: trtp.TensorDesc,
                  sampling_locations: trtp.TensorDesc, attention_weights: trtp.TensorDesc,
                  outputs: tuple, tactic: int):
        import triton
        from triton.backends.compiler import GPUTarget

        dtype = "float16" if value.dtype == trt.float16 else "float32"
        loc = sampling_locations.shape_expr
        constexprs = msda_constexprs(_const(loc[3], "levels"), _const(loc[4], "points"),
                                     _const(value.shape_expr[3], "head dim"), dtype=dtype)
        block_q, num_warps = msda_aot_config()
        major, minor = _device_capability()
        src = triton.compiler.ASTSource(fn=msda_plugin_kernel(), signature=msda_signature(dtype), constexprs=constexprs)
        kernel = triton.compile(src, target=GPUTarget("cuda", major * 10 + minor, 32),
                                options={"num_warps": num_warps, "num_stages": 1})
        launch = msda_launch([value.shape_expr[i] for i in range(4)], [loc[i] for i in range(6)], cdiv=trtp.cdiv,
                             block_q=block_q, num_warps=num_warps)
        params = trtp.KernelLaunchParams()
        params.grid_x, params.grid_y = launch.grid[0], launch.grid[1]
        params.block_x = launch.block
        params.shared_mem = kernel.metadata.shared
        extra = trtp.SymIntExprs.from_tuple([trtp.SymInt32(e) for e in launch.scalars])
        return kernel.metadata.name.encode(), kernel.asm["ptx"].encode(), params, extra

    masked_id = f"{M2F_NAMESPACE}::{M2F_MASKED_ATTENTION.op_type}"
    dtype_names = {trt.float32: "float32", trt.float16: "float16", trt.bfloat16: "bfloat16"}

    @trtp.register(masked_id)
    def _masked_attention_desc(q: trtp.TensorDesc, k: trtp.TensorDesc, v: trtp.TensorDesc,
                               mask_logits: trtp.TensorDesc) -> trtp.TensorDesc:
        dims = masked_attention_output_shape(
            [q.shape_expr[i] for i in range(4)], [k.shape_expr[i] for i in range(4)],
            [v.shape_expr[i] for i in range(4)], [mask_logits.shape_expr[i] for i in range(3)],
        )
        return trtp.from_shape_expr(dims, dtype=q.dtype)

    @trtp.autotune(masked_id)
    def _masked_attention_formats(q, k, v, mask_logits, outputs):
        # positions: q, k, v, mask logits, output: one dtype for all ("|" alternatives pair up by position)
        return [trtp.AutoTuneCombination("FP32|FP16|BF16, FP32|FP16|BF16, FP32|FP16|BF16, FP32|FP16|BF16, "
                                         "FP32|FP16|BF16", "LINEAR")]

    @trtp.aot_impl(masked_id)
    def _masked_attention_aot(q: trtp.TensorDesc, k: trtp.TensorDesc, v: trtp.TensorDesc,
                              mask_logits: trtp.TensorDesc, outputs: tuple, tactic: int):
        import triton
        from triton.backends.compiler import GPUTarget

        head_dim = _const(q.shape_expr[3], "head dim", plugin="masked attention")
        spec = masked_attention_kernel_spec(dtype_names[q.dtype], head_dim, mask_dtype=dtype_names[mask_logits.dtype])
        major, minor = _device_capability()
        src = triton.compiler.ASTSource(fn=spec["fn"], signature=spec["signature"], constexprs=spec["constexprs"])
        kernel = triton.compile(src, target=GPUTarget("cuda", major * 10 + minor, 32),
                                options={"num_warps": spec["num_warps"], "num_stages": spec["num_stages"]})
        launch = masked_attention_launch([q.shape_expr[i] for i in range(4)], [k.shape_expr[i] for i in range(4)],
                                         block_q=spec["block_q"], num_warps=spec["num_warps"], cdiv=trtp.cdiv)
        params = trtp.KernelLaunchParams()
        params.grid_x, params.grid_y = launch.grid[0], launch.grid[1]
        params.block_x = launch.block
        params.shared_mem = kernel.metadata.shared
        extra = trtp.SymIntExprs.from_tuple([trtp.SymInt32(e) for e in launch.scalars])
        return kernel.metadata.name.encode(), kernel.asm["ptx"].encode(), params, extra

    _REGISTERED = True


def _device_capability() -> tuple[int, int]:
    """Compute capability of GPU 0 (the engine is built for the GPU it is built on)."""
    from ._trt import check_cuda, import_cudart

    cudart = import_cudart()
    major = check_cuda(cudart.cudaDeviceGetAttribute(cudart.cudaDeviceAttr.cudaDevAttrComputeCapabilityMajor, 0))
    minor = check_cuda(cudart.cudaDeviceGetAttribute(cudart.cudaDeviceAttr.cudaDevAttrComputeCapabilityMinor, 0))
    return int(major), int(minor)

