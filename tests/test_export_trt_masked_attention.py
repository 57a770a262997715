"""The masked-attention TensorRT plugin: its single-kernel Triton forward (interpreter, against a float64
reference), the kernel compiled ahead of time for sm_90 / sm_87, the plugin's shape rules and launch geometry,
``m2f export onnx --masked-attn plugin`` graphs of a tiny model (structure, and numerics in ONNX Runtime with the
plugin node stood in for by a reference ONNX function), ``m2f export check`` on them, and the CLI flag.
TensorRT itself is not installable here: the engine tests are marked ``tensorrt`` and skip."""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch

from m2f.errors import InputError
from m2f.export.plugins import (
    MASKED_ATTN,
    M2F_MASKED_ATTENTION,
    MASKED_ATTENTION_INPUTS,
    masked_attention_output_shape,
)
from m2f.kernels.masked_attention.naive import masked_attention_from_logits_torch
from m2f.kernels.masked_attention.plugin_kernel import masked_attention_plugin
from tests.utils import poisoned_like, rel_err, save_tiny_checkpoint

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper  # noqa: E402

TOLERANCE = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 2e-2}


# ---------------------------------------------------------------------------------------------------
# The single-kernel forward (Triton's interpreter on the CPU)
# ---------------------------------------------------------------------------------------------------


def _mask_logits(case: str, B: int, n_q: int, n_k: int, gen: torch.Generator) -> torch.Tensor:
    """(B, Nq, Nk) float32 logits: allowed where >= 0."""
    logits = torch.randn(B, n_q, n_k, generator=gen) - 0.4  # ~35 % allowed
    if case == "all_forbidden":
        return -logits.abs() - 0.1
    if case == "all_allowed":
        return logits.abs()
    logits[:, 0] = -logits[:, 0].abs() - 0.1  # an empty row: attends to every key
    if n_q > 2:
        logits[:, 2] = -logits[:, 2].abs() - 0.1
        logits[:, 2, -1] = 0.0  # allowed only at the last key (exactly 0 is allowed: sigmoid(0) = 0.5)
    if n_q > 4:
        logits[:, 4, ::3] = 0.0
    if case == "late_keys":  # every other row allowed at key 0: the empty-row scan stops early for all but row 2
        logits[:, 1:, 0] = 1.0
        logits[:, 2, 0] = -1.0
    return logits


# (case, dtype, B, H, Nq, Nk, D): odd sizes, tails in every block, head dim 24 (padded to 32), Nq = 1, Nk = 1
CASES = [
    ("mixed", torch.float32, 2, 3, 19, 37, 24),
    ("late_keys", torch.float32, 1, 2, 20, 101, 16),
    ("all_forbidden", torch.float32, 1, 2, 5, 33, 16),
    ("all_allowed", torch.float32, 1, 2, 17, 20, 32),
    ("mixed", torch.float32, 1, 2, 1, 50, 8),  # one query
    ("mixed", torch.float32, 2, 1, 7, 1, 32),  # one key
    ("mixed", torch.float16, 2, 3, 19, 37, 24),
    ("all_forbidden", torch.float16, 1, 2, 5, 33, 16),
    ("mixed", torch.float16, 1, 1, 7, 1, 32),
    ("mixed", torch.bfloat16, 1, 2, 19, 37, 24),
]


@pytest.mark.parametrize("case,dtype,B,H,n_q,n_k,D", CASES)
def test_plugin_kernel_matches_float64_reference(rng, case, dtype, B, H, n_q, n_k, D):
    q = torch.randn(B, n_q, H, D, generator=rng).to(dtype)  # the plugin's layout: (B, N, H, D)
    k = torch.randn(B, n_k, H, D, generator=rng).to(dtype)
    v = torch.randn(B, n_k, H, D, generator=rng).to(dtype)
    logits = _mask_logits(case, B, n_q, n_k, rng).to(dtype)
    out = poisoned_like(q)
    got = masked_attention_plugin(q, k, v, logits, out=out)
    assert got.data_ptr() == out.data_ptr()
    to_bhnd = (lambda t: t.double().transpose(1, 2))
    ref = masked_attention_from_logits_torch(to_bhnd(q), to_bhnd(k), to_bhnd(v), logits.double()).transpose(1, 2)
    err = rel_err(out, ref)
    print(f"{case} {dtype} B={B} H={H} Nq={n_q} Nk={n_k} D={D}: rel_err {err:.2e}")
    assert torch.isfinite(out).all(), f"unwritten or non-finite outputs (seed {rng.seed_value})"
    assert err <= TOLERANCE[dtype], f"{case} {dtype}: rel_err {err:.3g} (seed {rng.seed_value})"


def test_plugin_kernel_empty_rows_attend_everywhere(rng):
    """A fully forbidden row equals plain softmax attention over all keys (not zeros, not NaN)."""
    B, H, n_q, n_k, D = 1, 2, 3, 21, 16
    q, k, v = (torch.randn(B, n, H, D, generator=rng) for n in (n_q, n_k, n_k))
    out = masked_attention_plugin(q, k, v, -torch.rand(B, n_q, n_k, generator=rng) - 0.5)
    scores = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double()) / math.sqrt(D)
    plain = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v.double())
    assert rel_err(out, plain) <= 1e-5, f"seed {rng.seed_value}"


def test_plugin_launcher_rejects_wrong_layout():
    q = torch.zeros(1, 4, 2, 8)
    with pytest.raises(ValueError, match="layout"):
        masked_attention_plugin(q, torch.zeros(1, 2, 4, 8), torch.zeros(1, 2, 4, 8), torch.zeros(1, 4, 4))


# ---------------------------------------------------------------------------------------------------
# Ahead-of-time builds, shape rules, launch geometry
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("target", ["sm_90", "sm_87"])
def test_plugin_kernel_compiles_to_ptx_without_spills(target):
    from m2f.export.plugin_kernels import compile_plugin_kernel

    for dtype in ("float32", "float16", "bfloat16"):
        kernel = compile_plugin_kernel(MASKED_ATTN, target, dtype, head_dim=32)
        print(f"{dtype:8s} {kernel.summary()}")
        entry = re.search(r"\.entry\s+(\w+)\((.*?)\)", kernel.ptx, re.S)
        assert entry is not None and entry.group(1) == kernel.name == "masked_attention_plugin_kernel"
        # QDP order: q, k, v, mask pointers; Nq, Nk, H int32; the output pointer (+ Triton's scratch pointers)
        params = [p.strip().split()[1] for p in entry.group(2).split(",")]
        assert params[:8] == [".u64"] * 4 + [".u32"] * 3 + [".u64"], params
        assert kernel.spill_stores == 0 and kernel.spill_loads == 0, kernel.summary()
        assert kernel.registers <= 255 and len(kernel.cubin) > 0
        assert re.search(rf"^\.target {target}a?\b", kernel.ptx, re.M), kernel.ptx[:400]


def test_masked_attention_shape_rules_and_launch():
    q, kv, mask = (2, 100, 8, 32), (2, 1024, 8, 32), (2, 100, 1024)  # (B, N, H, D), (B, Nq, Nk)
    assert masked_attention_output_shape(q, kv, kv, mask) == q
    # symbolic dims (strings stand in for TensorRT's ShapeExprs) pass through unchecked
    assert masked_attention_output_shape(("B", "Q", 8, 32), ("B", "K", 8, 32), ("B", "K", 8, 32),
                                         ("B", "Q", "K")) == ("B", "Q", 8, 32)
    for bad, match in [((kv, kv, (2, 100, 512)), "keys of k / mask"), ((kv, (2, 1024, 4, 32), mask), "heads of k / v"),
                       (((2, 1024, 8, 16), kv, mask), "head dim of q / k"), ((kv, kv, (2, 99, 1024)), "queries"),
                       ((kv, kv, mask[:2]), "ranks")]:
        with pytest.raises(ValueError, match=match):
            masked_attention_output_shape(q, *bad)
    from m2f.export.plugin_kernels import aot_launch
    from m2f.kernels.masked_attention.plugin_kernel import plugin_tile

    launch = aot_launch(MASKED_ATTN, [q, kv, kv, mask], ["float32"] * 4)
    tile = plugin_tile("float32")
    assert launch.grid == (16, -(-100 // tile.block_q), 1) and launch.block == 32 * tile.num_warps
    assert launch.scalars == (100, 1024, 8) and launch.kernel.num_stages == tile.num_stages
    assert M2F_MASKED_ATTENTION.attributes == {"plugin_namespace": "m2f", "aot": 1}
    # not "masked_attention": that is the torch op of a bool mask in (B, H, N, D)
    assert (M2F_MASKED_ATTENTION.op_type, M2F_MASKED_ATTENTION.domain) == ("masked_attention_logits", "m2f")
    assert MASKED_ATTENTION_INPUTS == ("q", "k", "v", "mask_logits")


def _masked_graph(attributes: dict | None = None, mask_dtype=TensorProto.FLOAT, q_rank: int = 4) -> onnx.ModelProto:
    q_shape = [1, 6, 4, 8] if q_rank == 4 else [1, 6, 32]
    inputs = [helper.make_tensor_value_info("q", TensorProto.FLOAT, q_shape),
              helper.make_tensor_value_info("k", TensorProto.FLOAT, [1, 24, 4, 8]),
              helper.make_tensor_value_info("v", TensorProto.FLOAT, [1, 24, 4, 8]),
              helper.make_tensor_value_info("mask_logits", mask_dtype, [1, 6, 24])]
    attrs = M2F_MASKED_ATTENTION.attributes if attributes is None else attributes
    node = helper.make_node(M2F_MASKED_ATTENTION.op_type, ["q", "k", "v", "mask_logits"], ["out"], name="ma", domain="m2f",
                            **attrs)
    graph = helper.make_graph([node], "g", inputs, [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("m2f", 1)])


def test_masked_attention_node_checks():
    from m2f.export.check import plugin_nodes

    info = plugin_nodes(MASKED_ATTN, _masked_graph())
    assert info["count"] == 1 and info["problems"] == [] and info["nodes"][0]["dtype"] == "FLOAT"
    assert any("attributes" in p for p in plugin_nodes(MASKED_ATTN, _masked_graph({"aot": 1}))["problems"])
    assert any("one dtype" in p for p in
               plugin_nodes(MASKED_ATTN, _masked_graph(mask_dtype=TensorProto.FLOAT16))["problems"])
    assert any("rank 3, expected 4" in p for p in plugin_nodes(MASKED_ATTN, _masked_graph(q_rank=3))["problems"])


# ---------------------------------------------------------------------------------------------------
# Plugin-mode ONNX graphs of a tiny model
# ---------------------------------------------------------------------------------------------------

HEIGHT, WIDTH = 64, 96  # levels 1/32, 1/16, 1/8: 2x3, 4x6, 8x12 keys
LEVEL_KEYS = (6, 24, 96)


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory, "tiny_checkpoint")


@pytest.fixture(scope="module")
def tensorrt_target_export(tiny_checkpoint, tmp_path_factory):
    """``m2f export onnx --target tensorrt``: both attention ops as plugin nodes by default."""
    from m2f.cli import main

    ckpt, seed = tiny_checkpoint
    out = tmp_path_factory.mktemp("trt") / "tiny.trt.onnx"
    code = main(["export", "onnx", "--checkpoint", str(ckpt), "--output", str(out), "--target", "tensorrt",
                 "--height", str(HEIGHT), "--width", str(WIDTH)])
    assert code == 0
    return out, seed


def test_tensorrt_target_graph_has_one_plugin_node_per_attention_call(tensorrt_target_export, capsys):
    from m2f.cli import main
    from m2f.export.plugins import TRT_MSDA

    path, seed = tensorrt_target_export
    manifest = json.loads(path.with_name(path.name + ".json").read_text())
    assert manifest["target"] == "tensorrt"
    assert manifest["ops"] == {"msda": {"mode": "plugin", "nodes": 2, "expected_nodes": 2},  # one per encoder layer
                               "masked_attn": {"mode": "plugin", "nodes": 4, "expected_nodes": 4}}  # decoder layer
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    msda = [n for n in proto.graph.node if n.op_type == TRT_MSDA.op_type]
    masked = [n for n in proto.graph.node if n.op_type == M2F_MASKED_ATTENTION.op_type]
    assert len(msda) == 2 and len(masked) == 4  # one per encoder layer / decoder layer
    assert "GridSample" not in {n.op_type for n in proto.graph.node}
    assert not any(f.name == M2F_MASKED_ATTENTION.op_type for f in proto.functions)
    assert {"": 18, "m2f": 1, "trt.plugins": 1}.items() <= {o.domain: o.version for o in proto.opset_import}.items()
    shapes = _static_shapes(proto)
    for layer, node in enumerate(masked):  # graph order = decoder order; levels cycle 1/32, 1/16, 1/8
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        assert node.domain == "m2f" and attrs == {"plugin_namespace": b"m2f", "aot": 1}
        assert len(node.input) == 4 and len(node.output) == 1
        n_k = LEVEL_KEYS[layer % 3]
        q, k, v, mask = (shapes[name] for name in node.input)
        assert q == ((TensorProto.FLOAT, [1, 7, 4, 8])), (layer, q)  # (B, Nq, H, D)
        assert k == v == (TensorProto.FLOAT, [1, n_k, 4, 8]), (layer, k, v)  # (B, Nk, H, D)
        assert mask == (TensorProto.FLOAT, [1, 7, n_k]), (layer, mask)  # (B, Nq, Nk)
        assert shapes[node.output[0]][1] == [*masked_attention_output_shape(q[1], k[1], v[1], mask[1])]
    code = main(["export", "check", str(path)])
    printed = capsys.readouterr().out
    assert code == 0 and "2 MultiscaleDeformableAttnPlugin_TRT nodes" in printed and \
        "4 masked_attention_logits nodes" in printed, printed


def _static_shapes(proto: onnx.ModelProto) -> dict[str, tuple[int, list[int]]]:
    inferred = onnx.shape_inference.infer_shapes(proto)
    out = {}
    for vi in (*inferred.graph.input, *inferred.graph.output, *inferred.graph.value_info):
        t = vi.type.tensor_type
        out[vi.name] = (t.elem_type, [d.dim_value for d in t.shape.dim])
    for init in inferred.graph.initializer:
        out[init.name] = (init.data_type, list(init.dims))
    return out


def test_check_report_lists_both_plugin_kinds(tensorrt_target_export, tmp_path):
    from m2f.export import check_onnx
    from m2f.export.targets.onnxruntime import REFERENCE_PLUGINS

    path, _ = tensorrt_target_export
    report = check_onnx(path, report=tmp_path / "report.json")
    assert report.verdict == "pass", report.reasons
    assert report.plugins["masked_attn"]["count"] == 4 and report.plugins["masked_attn"]["problems"] == []
    assert report.plugins["msda"]["count"] == 2 and report.plugins["msda"]["problems"] == []
    assert report.targets["tensorrt"]["plugin_ops"] == {"m2f::masked_attention_logits": 4,
                                                       "trt.plugins::MultiscaleDeformableAttnPlugin_TRT": 2}
    runs = report.parity["runs"]  # ONNX Runtime ran the plugin nodes through their reference functions
    assert len(runs) == 1 and REFERENCE_PLUGINS in runs[0]["runtime"], runs
    assert all(e["rel_err"] <= 1e-4 for e in runs[0]["outputs"].values()), runs
    assert report.manifest["ops"]["masked_attn"]["mode"] == "plugin" and report.target == "tensorrt"
    assert json.loads((tmp_path / "report.json").read_text())["verdict"] == "pass"


def test_check_fails_a_plugin_graph_whose_plugin_output_is_miswired(tensorrt_target_export, tmp_path):
    """Parity, not only structure: scaling one masked-attention plugin node's output (as a wrong layout or
    input order would change it) fails the check with the outputs' relative errors."""
    from m2f.export import check_onnx
    from m2f.export.manifest import artifact_stamp, manifest_path

    path, _ = tensorrt_target_export
    proto = onnx.load(str(path))
    node = next(n for n in proto.graph.node if n.op_type == M2F_MASKED_ATTENTION.op_type)
    wired = node.output[0]
    node.output[0] = wired + "_unscaled"
    proto.graph.initializer.append(helper.make_tensor("miswire_gain", TensorProto.FLOAT, [], [1.5]))
    proto.graph.node.insert(list(proto.graph.node).index(node) + 1,
                            helper.make_node("Mul", [wired + "_unscaled", "miswire_gain"], [wired]))
    tampered = tmp_path / "miswired.onnx"
    onnx.save(proto, str(tampered))
    manifest = json.loads(manifest_path(path).read_text())
    manifest_path(tampered).write_text(json.dumps({**manifest, "artifact": artifact_stamp(tampered)}))
    report = check_onnx(tampered)
    assert report.verdict == "fail" and any("pred_logits: rel_err" in r for r in report.reasons), \
        report.reasons


def test_plugin_graph_computes_the_model_in_onnxruntime(tiny_checkpoint, tmp_path):
    """The masked-attention plugin graph, with each plugin node run by a reference ONNX function, against PyTorch:
    checks the node's inputs, their order and layout and the output wiring numerically (deformable attention
    decomposed so that ONNX Runtime runs everything else)."""
    pytest.importorskip("onnxruntime")
    import m2f
    from m2f.export import to_onnx
    from m2f.export.check import CheckSize, run_parity
    from m2f.export.onnx_export import OnnxExportModule
    from m2f.export.targets.onnxruntime import OnnxRuntimeRunner

    ckpt, seed = tiny_checkpoint
    model = m2f.from_pretrained(str(ckpt), backend="torch", device="cpu").eval()
    path = tmp_path / "masked_plugin.onnx"
    result = to_onnx(model, path, height=HEIGHT, width=WIDTH, msda="decomposed", masked_attn="plugin")
    assert result.manifest.ops["masked_attn"].nodes == 4 and result.manifest.op_mode("msda") == "decomposed"
    proto = onnx.load(str(path))
    assert sum(n.op_type == M2F_MASKED_ATTENTION.op_type for n in proto.graph.node) == 4
    module = OnnxExportModule(model).eval()
    runs = run_parity(OnnxRuntimeRunner(path, reference_plugins=True), module, [CheckSize(1, HEIGHT, WIDTH)],
                      ["pred_logits", "pred_masks"])
    for name, entry in runs[0]["outputs"].items():
        print(f"{name}: rel_err {entry['rel_err']:.2e} (unstable draws skipped: {runs[0]['unstable_draws_skipped']})")
        assert entry["finite"] and entry["rel_err"] <= 1e-4, (name, entry, f"model seed {seed}", runs[0]["seed"])


# ---------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------


def test_cli_masked_attn_flag(tmp_path, capsys):
    from m2f.cli import main
    from m2f.export import targets
    from m2f.export.onnx_export import validate_export_args

    assert {t.name: t.op_modes["masked_attn"] for t in targets.all_targets()} == {
        "onnxruntime": "standard", "tensorrt": "plugin", "openvino": "standard"}
    code = main(["export", "onnx", "--checkpoint", str(tmp_path / "c"), "--output", str(tmp_path / "m.onnx"),
                 "--masked-attn", "fused"])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("m2f: error: ") and "--masked-attn" in lines[0], err
    assert "standard, plugin" in lines[0] and list(tmp_path.iterdir()) == []
    with pytest.raises(InputError, match="--masked-attn"):
        validate_export_args(64, 64, 1, 18, "none", masked_attn="Plugin")
    assert validate_export_args(64, 64, 1, 18, "none", masked_attn="plugin") == {"msda": "decomposed",
                                                                                 "masked_attn": "plugin"}
    assert validate_export_args(64, 64, 1, 18, "none", "tensorrt") == {"msda": "plugin", "masked_attn": "plugin"}


# ---------------------------------------------------------------------------------------------------
# TensorRT (skipped without TensorRT and a GPU)
# ---------------------------------------------------------------------------------------------------


@pytest.mark.tensorrt
@pytest.mark.parametrize("precision,tol", [("fp32", 1e-4), ("fp16", 2e-2)])
def test_tensorrt_engine_with_masked_attention_plugin(tiny_checkpoint, precision, tol, tmp_path):
    import numpy as np
    import onnxruntime as ort

    from m2f.export import TensorRTRunner, build_engine
    from m2f.export.onnx_export import export_checkpoint

    ckpt, seed = tiny_checkpoint
    standard = export_checkpoint(ckpt, tmp_path / "s.onnx", height=HEIGHT, width=WIDTH, dynamic=True).path
    plugin = export_checkpoint(ckpt, tmp_path / "p.onnx", height=HEIGHT, width=WIDTH, dynamic=True, msda="plugin",
                               masked_attn="plugin").path
    engine = build_engine(plugin, tmp_path / "p.engine", precision=precision, min_shape=(1, 3, 64, 64),
                          opt_shape=(1, 3, HEIGHT, WIDTH), max_shape=(2, 3, 128, 128))
    manifest = json.loads(Path(str(engine) + ".json").read_text())
    assert manifest["ops"]["masked_attn"]["mode"] == "plugin" and manifest["m2f_plugin_nodes"] == 6
    session = ort.InferenceSession(str(standard), providers=["CPUExecutionProvider"])
    with TensorRTRunner(engine) as runner:
        for shape in ((1, 3, HEIGHT, WIDTH), (2, 3, 128, 96)):
            x = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
            got, ref = runner.infer(x), dict(zip(["pred_logits", "pred_masks"], session.run(None, {"pixel_values": x})))
            for name in ref:
                err = np.linalg.norm(got[name].astype(np.float64) - ref[name]) / np.linalg.norm(ref[name])
                assert err <= tol, (name, shape, precision, err, seed)


def test_registration_without_tensorrt_is_a_clear_error(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "tensorrt", None)  # absent, even where TensorRT (or only its stubs) is installed
    from m2f.errors import BackendUnavailableError
    from m2f.export.plugin_kernels import register_tensorrt_plugins

    with pytest.raises(BackendUnavailableError, match="TensorRT"):
        register_tensorrt_plugins()
