"""Reference bodies of the plugin nodes in standard ONNX ops, as model-local functions (FunctionProto) that ONNX
Runtime runs in place of the nodes it has no kernel for.

Each function has its plugin node's op type and domain, inputs, output and attributes, and computes exactly the
op's semantics (the float64 references ``kernels/ms_deform_attn/naive.py`` / ``kernels/masked_attention/naive.py``,
non-finite rules included), for any shapes (levels and sizes come from the inputs, nothing is baked in). They are
attached only to copies that ONNX Runtime runs (int8 calibration, the accuracy check): a written graph never holds
them, since TensorRT's parser would import a local function of the plugin's name instead of the plugin.

Types follow the inputs (CastLike), so a function runs in whatever float type its node gets; the opset of its body
is the graph's own (>= 18: ReduceSum / Unsqueeze axes as inputs).
"""
from __future__ import annotations

from typing import Any

from .plugins import M2F_MASKED_ATTENTION, PLUGINS, TRT_MSDA, PluginNode


class _Body:
    """Collects the nodes of a function body, naming every intermediate tensor uniquely."""

    def __init__(self) -> None:
        self.nodes: list[Any] = []
        self._count = 0

    def __call__(self, op_type: str, *inputs: str, **attrs: Any) -> str:
        from onnx import helper

        self._count += 1
        out = f"t{self._count}_{op_type}"
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], **attrs))
        return out

    def const(self, values: list[int] | list[float], like: str | None = None) -> str:
        """An int64 constant (``values`` ints), or a float one cast like ``like``."""
        if like is None:
            return self("Constant", value_ints=values)
        return self("CastLike", self("Constant", value_floats=values), like)


def _function(node: PluginNode, body: _Body, output: str, opset: int) -> Any:
    from onnx import helper

    body("Identity", output)
    body.nodes[-1].output[0] = node.outputs[0]
    return helper.make_function(node.domain, node.op_type, list(node.inputs), list(node.outputs), body.nodes,
                                [helper.make_opsetid("", opset)], attributes=sorted(node.attributes))


def msda_function(opset: int) -> Any:
    """``MultiscaleDeformableAttnPlugin_TRT``: value (N, S, M, D), spatial_shapes (L, 2) int32 as (H, W),
    level_start_index (L,) int32, sampling_locations (N, Lq, M, L, P, 2) as (x, y) in [0, 1], attention_weights
    (N, Lq, M, L, P) -> (N, Lq, M, D). Bilinear sampling with zero padding (align_corners=False) as four gathers
    from the flattened value at ``level_start_index + y * W + x``; a point outside (-1, W) x (-1, H) in pixel
    units (NaN included) is skipped (its weight never multiplies), a corner outside its map is never read."""
    from onnx import TensorProto

    b = _Body()
    value, shapes, starts, loc, weights = TRT_MSDA.inputs
    shapes = b("Cast", shapes, to=TensorProto.INT64)
    zero_i, one_i = b.const([0]), b.const([1])
    # per-level sizes and starts as (L, 1): they broadcast against (N, Lq, M, L, P)
    heights, widths = b("Gather", shapes, zero_i, axis=1), b("Gather", shapes, one_i, axis=1)
    starts = b("Unsqueeze", b("Cast", starts, to=TensorProto.INT64), one_i)
    heights_f, widths_f = b("CastLike", heights, loc), b("CastLike", widths, loc)
    half, minus_one, far = b.const([0.5], loc), b.const([-1.0], loc), b.const([-3.0], loc)
    # pixel coordinates, centres at i + 0.5: (N, Lq, M, L, P) each
    x = b("Sub", b("Mul", b("Squeeze", b("Gather", loc, zero_i, axis=5), b.const([5])), widths_f), half)
    y = b("Sub", b("Mul", b("Squeeze", b("Gather", loc, one_i, axis=5), b.const([5])), heights_f), half)
    inside = b("And", b("And", b("Greater", x, minus_one), b("Less", x, widths_f)),
               b("And", b("Greater", y, minus_one), b("Less", y, heights_f)))  # False for NaN
    x, y = b("Where", inside, x, far), b("Where", inside, y, far)  # skipped points: every corner outside
    x0, y0 = b("Floor", x), b("Floor", y)
    fx, fy = b("Sub", x, x0), b("Sub", y, y0)
    one = b.const([1.0], loc)
    gx, gy = b("Sub", one, fx), b("Sub", one, fy)
    x0, y0 = b("Cast", x0, to=TensorProto.INT64), b("Cast", y0, to=TensorProto.INT64)
    x1, y1 = b("Add", x0, one_i), b("Add", y0, one_i)
    heads_major = [0, 2, 1, 3, 4]  # (N, Lq, M, L, P) -> (N, M, Lq, L, P), the gathered layout
    minus_one_i = b.const([-1])

    def per_head(t: str) -> str:  # -> (N, M, Lq, L, P, 1)
        return b("Unsqueeze", b("Transpose", t, perm=heads_major), minus_one_i)

    value_heads = b("Transpose", value, perm=[0, 2, 1, 3])  # (N, M, S, D)
    zero_v = b.const([0.0], value)
    sample = None
    for xc, yc, weight in ((x0, y0, b("Mul", gx, gy)), (x1, y0, b("Mul", fx, gy)), (x0, y1, b("Mul", gx, fy)),
                           (x1, y1, b("Mul", fx, fy))):
        valid = b("And", b("And", b("GreaterOrEqual", xc, zero_i), b("Less", xc, widths)),
                  b("And", b("GreaterOrEqual", yc, zero_i), b("Less", yc, heights)))
        index = b("Where", valid, b("Add", starts, b("Add", b("Mul", yc, widths), xc)), zero_i)
        corner = b("GatherND", value_heads, per_head(index), batch_dims=2)  # (N, M, Lq, L, P, D)
        term = b("Where", per_head(valid), b("Mul", b("CastLike", per_head(weight), value), corner), zero_v)
        sample = term if sample is None else b("Add", sample, term)
    kept = b("Where", inside, weights, b.const([0.0], weights))
    out = b("ReduceSum", b("Mul", sample, b("CastLike", per_head(kept), value)), b.const([3, 4]), keepdims=0)
    return _function(TRT_MSDA, b, b("Transpose", out, perm=[0, 2, 1, 3]), opset)  # (N, Lq, M, D)


def masked_attention_function(opset: int) -> Any:
    """``m2f::masked_attention_logits``: q (B, Nq, H, D), k, v (B, Nk, H, D), mask logits (B, Nq, Nk) ->
    (B, Nq, H, D): softmax(q kᵀ / sqrt(D), keys with logit >= 0 only; a row with none attends to every key) v,
    heads sharing the mask. A forbidden key contributes nothing even when its value is inf / NaN; an allowed
    non-finite value reaches its rows as in the reference (+inf / -inf per row and channel, NaN when both)."""
    from onnx import TensorProto

    b = _Body()
    q, k, v, mask = M2F_MASKED_ATTENTION.inputs
    to_bhnd = [0, 2, 1, 3]
    q, v = b("Transpose", q, perm=to_bhnd), b("Transpose", v, perm=to_bhnd)
    k = b("Transpose", k, perm=[0, 2, 3, 1])  # (B, H, D, Nk)
    scale = b("Reciprocal", b("Sqrt", b("CastLike", b("Shape", q, start=3, end=4), q)))
    scores = b("Mul", b("MatMul", q, k), scale)  # (B, H, Nq, Nk)
    allow = b("GreaterOrEqual", mask, b.const([0.0], mask))
    minus_one = b.const([-1])
    empty = b("Equal", b("ReduceSum", b("Cast", allow, to=TensorProto.INT64), minus_one, keepdims=1), b.const([0]))
    allow = b("Unsqueeze", b("Or", allow, empty), b.const([1]))  # (B, 1, Nq, Nk)
    probs = b("Softmax", b("Where", allow, scores, b.const([float("-inf")], scores)), axis=-1)
    non_finite = b("Or", b("IsInf", v), b("IsNaN", v))
    zero = b.const([0.0], v)
    out = b("MatMul", probs, b("Where", non_finite, zero, v))
    allowed = b("CastLike", allow, v)

    def reaches(sign_excluded: str) -> str:  # does an allowed key hold NaN or inf of the other sign, per (row, chan)
        holds = b("And", non_finite, b("Not", b("IsInf", v, **{sign_excluded: 0})))
        return b("Greater", b("MatMul", allowed, b("CastLike", holds, v)), zero)

    up, down = reaches("detect_positive"), reaches("detect_negative")  # NaN or +inf / NaN or -inf
    out = b("Add", out, b("Where", up, b.const([float("inf")], v), zero))
    out = b("Add", out, b("Where", down, b.const([float("-inf")], v), zero))  # inf + -inf = NaN
    return _function(M2F_MASKED_ATTENTION, b, b("Transpose", out, perm=to_bhnd), opset)


def with_reference_functions(model: Any) -> Any:
    """A copy of ``model`` that ONNX Runtime can run: the reference function of every plugin whose nodes it
    holds, at the graph's opset. The tensor names are ``model``'s own."""
    import onnx

    copy = onnx.ModelProto.FromString(model.SerializeToString())
    opset = next(o.version for o in copy.opset_import if o.domain in ("", "ai.onnx"))
    defined = {(f.domain, f.name) for f in copy.functions}
    for spec in PLUGINS:
        node = spec.node
        if spec.count(copy) and (node.domain, node.op_type) not in defined:
            copy.functions.append(spec.reference_function(opset))
    return copy

