"""m2f's fused ops as export plugins: one :class:`PluginSpec` per op, in :data:`PLUGINS`, which the ONNX export,
``m2f export check`` and the TensorRT plugin registration loop over (adding an op = one spec here, its kernel
entry in :mod:`m2f.export.plugin_kernels`; see CONTRIBUTING.md).

Plain data and math only, so the ONNX path never imports triton: the ONNX node of each plugin (op type, domain,
attributes, input order, input ranks / dtypes), the ONNX schema and translation of the torch custom op, the
output-shape rule (written over any dimension type: ints here, TensorRT's symbolic ``ShapeExpr`` in the builder).
The kernels (Triton, compiled ahead of time into a TensorRT engine) are named by ``kernel`` and loaded lazily;
registering them with ``tensorrt.plugin`` needs TensorRT >= 10.9 (its ahead-of-time ``aot_impl``).

The ONNX graph from ``m2f export onnx --msda plugin`` uses TensorRT's own interface node
(``MultiscaleDeformableAttnPlugin_TRT``, version "1", no attributes; inputs value [N,S,M,D], spatial_shapes [L,2]
int32, level_start_index [L] int32, sampling_locations [N,Lq,M,L,P,2], attention_weights [N,Lq,M,L,P]; output
[N,Lq,M,D]); ``m2f export tensorrt --plugins m2f`` retargets those nodes to the m2f plugin, which has the same
inputs and output, before parsing. Masked attention has no TensorRT plugin to stand in for it: ``m2f export onnx
--masked-attn plugin`` writes the m2f node itself (op type ``masked_attention_logits``, attribute
``plugin_namespace`` "m2f", so that the parser's plugin lookup (name = op type, version "1", namespace from the
attribute) finds the registered ``m2f::masked_attention_logits``, and ``aot`` 1, which asks TensorRT for the
ahead-of-time implementation). It takes mask logits in the (B, N, H, D) layout, unlike the torch op
``m2f::masked_attention`` (bool mask, (B, H, N, D)), hence its own name.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

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

    @property
    def key(self) -> str:
        """Its key in the op census of ``m2f export check``: "domain::op_type"."""
        return f"{self.domain}::{self.op_type}"

    def matches(self, node: Any) -> bool:
        return (node.op_type, node.domain) == (self.op_type, self.domain)

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
# m2f's Triton masked attention as "m2f::masked_attention_logits": q (B, Nq, H, D), k, v (B, Nk, H, D), mask
# logits (B, Nq, Nk) (allowed where >= 0); output (B, Nq, H, D). Tokens-major ("BNHD") as the projections produce
# them, so that the graph needs no transpose around the plugin.
MASKED_ATTENTION_INPUTS = ("q", "k", "v", "mask_logits")
M2F_MASKED_ATTENTION = PluginNode(
    "masked_attention_logits", M2F_NAMESPACE, MASKED_ATTENTION_INPUTS, ("output",),
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
# ONNX schemas and translations of the torch custom ops (onnxscript, imported when an export needs them)
# ---------------------------------------------------------------------------------------------------

FLOATS = ("tensor(float)", "tensor(float16)")
FLOATS_BF16 = (*FLOATS, "tensor(bfloat16)")


def _msda_schema() -> Any:
    from onnx.defs import OpSchema

    param = OpSchema.FormalParameter
    return OpSchema(
        TRT_MSDA.op_type, TRT_MSDA.domain, 1,
        doc="TensorRT MultiscaleDeformableAttnPlugin_TRT (version 1): output [N, Lq, M, D]",
        inputs=[param("value", "T"), param("spatial_shapes", "I"), param("level_start_index", "I"),
                param("sampling_locations", "T"), param("attention_weights", "T")],
        outputs=[param("output", "T")],
        type_constraints=[("T", list(FLOATS), "value dtype"), ("I", ["tensor(int32)"], "int32")],
    )


def _masked_attention_schema() -> Any:
    from onnx.defs import OpSchema

    param, attr = OpSchema.FormalParameter, OpSchema.Attribute
    node = M2F_MASKED_ATTENTION
    return OpSchema(
        node.op_type, node.domain, 1,
        doc=f"m2f TensorRT Python plugin {node.key}: q (B, Nq, H, D), k, v (B, Nk, H, D), mask logits (B, Nq, Nk) "
            "(allowed where >= 0; a row with none attends everywhere) -> (B, Nq, H, D)",
        inputs=[param(name, "T") for name in MASKED_ATTENTION_INPUTS],
        outputs=[param("output", "T")],
        type_constraints=[("T", list(FLOATS_BF16), "one float dtype")],
        attributes=[attr("plugin_namespace", OpSchema.AttrType.STRING, "TensorRT plugin namespace", required=True),
                    attr("aot", OpSchema.AttrType.INT, "1: TensorRT's ahead-of-time implementation", required=True)],
    )


def _msda_translation() -> Callable[..., Any]:
    """m2f::ms_deform_attn -> Cast(int32) x 2 -> plugin node -> Reshape (N, Lq, M*D)."""
    import onnxscript
    from onnxscript import ir
    from onnxscript import opset18 as op

    trt_plugins = onnxscript.values.Opset(TRT_MSDA.domain, 1)

    def ms_deform_attn_to_trt_plugin(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
        out = getattr(trt_plugins, TRT_MSDA.op_type)(
            value,
            op.Cast(spatial_shapes, to=ir.DataType.INT32),
            op.Cast(level_start_index, to=ir.DataType.INT32),
            sampling_locations,
            attention_weights,
        )  # (N, Lq, M, D)
        return op.Reshape(out, op.Constant(value_ints=[0, 0, -1]))  # (N, Lq, M * D)

    return ms_deform_attn_to_trt_plugin


def _masked_attention_translation() -> Callable[..., Any]:
    """m2f::masked_attention_from_logits -> the plugin node, between Transposes to / from its (B, N, H, D) layout
    (they cancel the graph's own head split / merge)."""
    import onnxscript
    from onnxscript import opset18 as op

    m2f_plugins = onnxscript.values.Opset(M2F_MASKED_ATTENTION.domain, 1)
    attributes = M2F_MASKED_ATTENTION.attributes

    def masked_attention_to_plugin(q, k, v, mask_logits):
        to_bnhd = [0, 2, 1, 3]  # (B, H, N, D) <-> (B, N, H, D)
        out = getattr(m2f_plugins, M2F_MASKED_ATTENTION.op_type)(
            op.Transpose(q, perm=to_bnhd), op.Transpose(k, perm=to_bnhd), op.Transpose(v, perm=to_bnhd),
            mask_logits, **attributes,
        )  # (B, Nq, H, D)
        # The custom op also returns the log-sum-exp (for its backward); the exported graph never reads it, so
        # a scalar stand-in fills its place and the optimizer removes it (typed: an empty list's type is ambiguous,
        # which onnx_ir warns about on every export).
        return op.Transpose(out, perm=to_bnhd), op.Constant(value_float=0.0)

    return masked_attention_to_plugin


def _msda_function(opset: int) -> Any:
    from .plugin_functions import msda_function

    return msda_function(opset)


def _masked_attention_function(opset: int) -> Any:
    from .plugin_functions import masked_attention_function

    return masked_attention_function(opset)


def _msda_modules(model: Any) -> list[Any]:
    from m2f.pixel_decoder import MultiScaleDeformableAttention

    return [m for m in model.modules() if isinstance(m, MultiScaleDeformableAttention)]


def _masked_attention_layers(model: Any) -> list[Any]:
    from m2f.transformer_decoder import CrossAttentionLayer

    return [m for m in model.modules() if isinstance(m, CrossAttentionLayer)]


# ---------------------------------------------------------------------------------------------------
# The specs
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class InputRule:
    """What the plugin accepts on one input: its rank and ONNX element types (TensorProto names)."""

    rank: int
    dtypes: tuple[str, ...]


@dataclass(frozen=True)
class PluginSpec:
    """One fused op, as every export stage sees it.

    ``name`` is its manifest / CLI key (``--msda``), ``modes`` its (reference, plugin) export modes. In plugin
    mode the export switches ``modules(model)`` to the "triton" backend, so torch.export traces the custom op
    ``torch.ops.m2f.<torch_op>`` (registered by importing ``kernel_module``), which ``translation()`` turns into
    ``node`` (declared to onnx by ``schema()``). ``check`` holds each node to ``input_rules`` (+ one dtype for
    all float inputs when ``one_dtype``) and ``node.attributes``. TensorRT runs ``trt_node`` (``node`` is
    retargeted to it when they differ), whose output dims come from ``output_shape`` and whose kernel is
    ``kernel`` ("module:function" returning an :class:`m2f.export.plugin_kernels.AotLaunch`).
    ``reference_function(opset)`` is ``node`` computed in standard ONNX ops (a model-local FunctionProto of its
    op type and domain, :mod:`m2f.export.plugin_functions`), so ONNX Runtime can run a copy of a plugin graph
    (int8 calibration, ``check``'s parity).
    """

    name: str
    modes: tuple[str, str]
    what: str  # what one plugin node stands for, for messages: "deformable-attention call (one per encoder layer)"
    node: PluginNode
    trt_node: PluginNode
    torch_op: str
    kernel_module: str
    modules: Callable[[Any], list[Any]]
    schema: Callable[[], Any]
    translation: Callable[[], Callable[..., Any]]
    input_rules: tuple[InputRule, ...]
    one_dtype: bool
    output_shape: Callable[..., tuple[Any, ...]]
    trt_formats: str  # TensorRT AutoTuneCombination type string: inputs then output, "|" alternatives by position
    kernel: str
    reference_function: Callable[[int], Any]

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def plugin_mode(self) -> str:
        return self.modes[1]

    def count(self, model: Any) -> int:
        """Its plugin nodes in an ONNX ModelProto's main graph."""
        return sum(1 for n in model.graph.node if self.node.matches(n))


_F, _F16, _BF16, _I32 = "FLOAT", "FLOAT16", "BFLOAT16", "INT32"

MSDA = PluginSpec(
    name="msda", modes=("decomposed", "plugin"), what="deformable-attention call (one per encoder layer)",
    node=TRT_MSDA, trt_node=M2F_MSDA, torch_op="ms_deform_attn", kernel_module="m2f.kernels.ms_deform_attn.op",
    modules=_msda_modules, schema=_msda_schema, translation=_msda_translation,
    input_rules=(InputRule(4, (_F, _F16)), InputRule(2, (_I32,)), InputRule(1, (_I32,)), InputRule(6, (_F, _F16)),
                 InputRule(5, (_F, _F16))),
    one_dtype=False, output_shape=msda_output_shape,
    trt_formats="FP32|FP16, INT32, INT32, FP32|FP16, FP32|FP16, FP32|FP16",
    kernel="m2f.export.plugin_kernels:msda_aot", reference_function=_msda_function,
)
MASKED_ATTN = PluginSpec(
    name="masked_attn", modes=("standard", "plugin"), what="masked-attention call (one per decoder layer)",
    node=M2F_MASKED_ATTENTION, trt_node=M2F_MASKED_ATTENTION, torch_op="masked_attention_from_logits",
    kernel_module="m2f.kernels.masked_attention.op", modules=_masked_attention_layers,
    schema=_masked_attention_schema, translation=_masked_attention_translation,
    input_rules=tuple(InputRule(rank, (_F, _F16, _BF16)) for rank in (4, 4, 4, 3)),
    one_dtype=True, output_shape=masked_attention_output_shape,
    trt_formats=", ".join(["FP32|FP16|BF16"] * 5),
    kernel="m2f.export.plugin_kernels:masked_attention_aot", reference_function=_masked_attention_function,
)

PLUGINS: tuple[PluginSpec, ...] = (MSDA, MASKED_ATTN)


def plugin_spec(name: str) -> PluginSpec:
    return next(spec for spec in PLUGINS if spec.name == name)


def op_modes(**given: str | None) -> dict[str, str]:
    """Every op's mode: the ones given (by name, None = default), the reference mode for the rest."""
    return {spec.name: given.get(spec.name) or spec.modes[0] for spec in PLUGINS}
