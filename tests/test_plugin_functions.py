"""The plugin nodes' reference bodies (export/plugin_functions.py) in ONNX Runtime against the float64 references
(kernels/ms_deform_attn/naive.py, kernels/masked_attention/naive.py): awkward shapes, float32 and float64, the
skipped-point / forbidden-key / empty-mask rules, and one session run at several shapes (every dim symbolic)."""
from __future__ import annotations

import pytest
import torch

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from onnx import TensorProto, helper  # noqa: E402

from m2f.export.onnx_export import _register_schema  # noqa: E402
from m2f.export.plugin_functions import with_reference_functions  # noqa: E402
from m2f.export.plugins import MASKED_ATTN, MSDA  # noqa: E402
from m2f.kernels.masked_attention.naive import masked_attention_from_logits_torch  # noqa: E402
from m2f.kernels.ms_deform_attn.naive import ms_deform_attn_torch  # noqa: E402
from tests.utils import rel_err  # noqa: E402

ONNX_FLOAT = {torch.float32: TensorProto.FLOAT, torch.float64: TensorProto.DOUBLE}
TOL = {torch.float32: 2e-6, torch.float64: 1e-13}


def _one_node_model(spec, dtype: torch.dtype, opset: int = 18):
    """A graph of one plugin node with every input dim symbolic, plus its reference function."""
    node = spec.node
    float_type = ONNX_FLOAT[dtype]
    inputs = [helper.make_tensor_value_info(name, float_type if "FLOAT" in rule.dtypes else TensorProto.INT32,
                                            [f"{name}_{i}" for i in range(rule.rank)])
              for name, rule in zip(node.inputs, spec.input_rules)]
    output = helper.make_tensor_value_info(node.outputs[0], float_type, [f"out_{i}" for i in range(4)])
    graph = helper.make_graph([helper.make_node(node.op_type, list(node.inputs), list(node.outputs), domain=node.domain,
                                                name="plugin", **node.attributes)], "one_plugin", inputs, [output])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid(node.domain, 1)])
    runnable = with_reference_functions(model)
    # an export in plugin mode registers the plugins' schemas in the process (float / float16 only, as TensorRT's
    # plugins are), after which full_check's inference refuses a float64 node: register them here in every order,
    # and check float64 graphs structurally only (the float64 runs test the bodies, not a deployable graph)
    for plugin in (MSDA, MASKED_ATTN):
        _register_schema(plugin)
    onnx.checker.check_model(runnable, full_check=dtype != torch.float64)
    return runnable


def _session(model):
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def _run(session, spec, tensors) -> torch.Tensor:
    feeds = {name: t.numpy() for name, t in zip(spec.node.inputs, tensors)}
    return torch.from_numpy(session.run(None, feeds)[0])


# ---------------------------------------------------------------------------------------------------
# Deformable attention
# ---------------------------------------------------------------------------------------------------


def _msda_inputs(shapes, n, lq, m, d, p, rng, dtype):
    levels = torch.tensor(shapes, dtype=torch.int32)
    sizes = levels.prod(1)
    starts = torch.cat((torch.zeros(1, dtype=torch.int64), sizes.cumsum(0)[:-1])).to(torch.int32)
    value = torch.randn(n, int(sizes.sum()), m, d, generator=rng, dtype=torch.float64)
    # beyond [0, 1] on both sides: points skipped and corners outside their map
    locations = torch.rand(n, lq, m, len(shapes), p, 2, generator=rng, dtype=torch.float64) * 1.6 - 0.3
    weights = torch.randn(n, lq, m, len(shapes), p, generator=rng, dtype=torch.float64)
    return [value.to(dtype), levels, starts, locations.to(dtype), weights.to(dtype)]


def _msda_reference(value, levels, starts, locations, weights) -> torch.Tensor:
    n, _, m, d = value.shape
    out = ms_deform_attn_torch(value.double(), levels.long(), locations.double(), weights.double())
    return out.view(n, locations.shape[1], m, d)  # the plugin's (N, Lq, M, D)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_msda_function_matches_the_reference_at_several_shapes_in_one_session(dtype, rng):
    session = _session(_one_node_model(MSDA, dtype))
    # levels, N, Lq, M, D, P: level count, sizes and every other dim change between runs of one session
    for shapes, n, lq, m, d, p in ([(3, 5), (2, 2), (1, 7)], 2, 7, 3, 5, 3), ([(4, 1), (5, 3)], 1, 11, 2, 3, 1), \
            ([(2, 3), (1, 1), (3, 2), (1, 4)], 3, 1, 1, 6, 2):
        inputs = _msda_inputs(shapes, n, lq, m, d, p, rng, dtype)
        got, ref = _run(session, MSDA, inputs), _msda_reference(*inputs)
        assert got.dtype == dtype and got.shape == ref.shape, (got.shape, ref.shape)
        assert rel_err(got, ref) <= TOL[dtype], (shapes, rel_err(got, ref), rng.seed_value)


def test_msda_function_skips_non_finite_points_and_reads_no_corner_outside(rng):
    """A point at a NaN / inf location is skipped with its inf / NaN weight; a non-finite value outside every
    sampled corner is never read: the output stays finite and equal to the reference's."""
    session = _session(_one_node_model(MSDA, torch.float32))
    value, levels, starts, locations, weights = _msda_inputs([(3, 4), (2, 5)], 2, 6, 2, 4, 3, rng, torch.float32)
    locations[0, 0, 0, 0, 0] = float("nan")
    locations[1, 2, 1, 1, 2, 0] = float("inf")
    locations[0, 3, 1, 0, 1, 1] = -float("inf")
    weights[0, 0, 0, 0, 0] = float("inf")
    weights[1, 2, 1, 1, 2] = float("nan")
    weights[0, 3, 1, 0, 1] = float("inf")
    locations[:, :, 0, 0, :, 0] = locations[:, :, 0, 0, :, 0].clamp(max=0.6)  # head 0 never reads column 3 of...
    value[:, 3, 0] = float("inf")  # ... level 0 (3 x 4: flat index 3 = row 0, column 3)
    got, ref = _run(session, MSDA, [value, levels, starts, locations, weights]), _msda_reference(
        value, levels, starts, locations, weights)
    assert torch.isfinite(ref).all() and torch.isfinite(got).all(), rng.seed_value
    assert rel_err(got, ref) <= TOL[torch.float32], (rel_err(got, ref), rng.seed_value)


# ---------------------------------------------------------------------------------------------------
# Masked attention
# ---------------------------------------------------------------------------------------------------


def _attention_inputs(b, nq, nk, h, d, rng, dtype, empty_rows: int = 1):
    q = torch.randn(b, nq, h, d, generator=rng, dtype=torch.float64)
    k, v = (torch.randn(b, nk, h, d, generator=rng, dtype=torch.float64) for _ in range(2))
    logits = torch.randn(b, nq, nk, generator=rng, dtype=torch.float64)
    logits[:, :empty_rows] = -logits[:, :empty_rows].abs() - 0.1  # rows with no allowed key attend everywhere
    return [t.to(dtype) for t in (q, k, v, logits)]


def _attention_reference(q, k, v, logits) -> torch.Tensor:
    bhnd = [t.double().transpose(1, 2) for t in (q, k, v)]  # the plugin's (B, N, H, D) -> the reference's layout
    return masked_attention_from_logits_torch(*bhnd, logits.double()).transpose(1, 2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_masked_attention_function_matches_the_reference_at_several_shapes_in_one_session(dtype, rng):
    session = _session(_one_node_model(MASKED_ATTN, dtype))
    for b, nq, nk, h, d, empty in (2, 5, 9, 3, 4, 2), (1, 1, 13, 2, 7, 1), (3, 7, 1, 1, 3, 0), (2, 3, 6, 4, 5, 3):
        inputs = _attention_inputs(b, nq, nk, h, d, rng, dtype, empty)
        got, ref = _run(session, MASKED_ATTN, inputs), _attention_reference(*inputs)
        assert got.dtype == dtype and got.shape == ref.shape, (got.shape, ref.shape)
        assert rel_err(got, ref) <= TOL[dtype], ((b, nq, nk, h, d), rel_err(got, ref), rng.seed_value)


def test_masked_attention_function_empty_mask_attends_everywhere(rng):
    """A row whose logits are all negative equals unmasked attention; heads share the mask."""
    session = _session(_one_node_model(MASKED_ATTN, torch.float64))
    q, k, v, logits = _attention_inputs(2, 4, 6, 3, 5, rng, torch.float64, empty_rows=4)
    got = _run(session, MASKED_ATTN, [q, k, v, logits])
    open_logits = logits.abs()  # every key allowed
    ref = _attention_reference(q, k, v, open_logits)
    assert rel_err(got, ref) <= TOL[torch.float64], (rel_err(got, ref), rng.seed_value)


def test_masked_attention_function_non_finite_values_follow_the_reference(rng):
    """inf / NaN values of forbidden keys contribute nothing; an allowed +inf, -inf or both makes +inf / -inf / NaN
    in exactly the reference's (row, channel) places."""
    session = _session(_one_node_model(MASKED_ATTN, torch.float32))
    q, k, v, logits = _attention_inputs(1, 4, 5, 2, 3, rng, torch.float32, empty_rows=0)
    logits[0] = torch.tensor([[1, -1, -1, -1, -1], [-1, 1, 1, -1, -1], [1, 1, -1, -1, -1], [-1, -1, -1, -1, 1.]])
    v[0, 3, 0, 0], v[0, 4, 1, 2] = float("nan"), float("inf")  # key 3 forbidden everywhere, key 4 allowed in row 3
    v[0, 0, 0, 1], v[0, 1, 0, 1] = float("inf"), -float("inf")  # +inf (rows 0, 2) and -inf (rows 1, 2)
    got, ref = _run(session, MASKED_ATTN, [q, k, v, logits]), _attention_reference(q, k, v, logits)
    for test in (torch.isnan, torch.isposinf, torch.isneginf):
        assert torch.equal(test(got), test(ref)), (test.__name__, got, ref)
    finite = torch.isfinite(ref)
    assert finite.any() and rel_err(got[finite], ref[finite]) <= TOL[torch.float32], rng.seed_value


# ---------------------------------------------------------------------------------------------------
# Attaching and removing
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("opset", [18, 24])
def test_functions_are_attached_for_present_plugins_only_at_the_graph_opset(opset):
    model = _one_node_model(MSDA, torch.float32, opset)
    assert [(f.domain, f.name) for f in model.functions] == [(MSDA.node.domain, MSDA.node.op_type)]
    function = model.functions[0]
    assert list(function.input) == list(MSDA.node.inputs) and list(function.output) == list(MSDA.node.outputs)
    assert [(o.domain, o.version) for o in function.opset_import] == [("", opset)]
    assert len(with_reference_functions(model).functions) == 1  # not attached twice
    attention = _one_node_model(MASKED_ATTN, torch.float32, opset).functions
    assert [(f.name, sorted(f.attribute)) for f in attention] == [
        (MASKED_ATTN.node.op_type, sorted(MASKED_ATTN.node.attributes))]
