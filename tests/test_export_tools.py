"""m2f.export pieces that need no model: TensorRT op list, plugin nodes / shape rules / PTX, triton-repo,
NumPy post-processing, engine-builder argument handling, TensorRT absence."""
from __future__ import annotations

import hashlib
import importlib.util
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from m2f.errors import BackendUnavailableError, InputError
from m2f.export import postprocess_numpy as pp
from m2f.export import tensorrt_onnx_ops
from m2f.export import targets
from m2f.export.check import double_tensors, op_census, plugin_nodes
from m2f.export.manifest import manifest_path, read_manifest, write_manifest
from m2f.export.plugins import (
    M2F_MSDA,
    MSDA,
    MSDA_INPUTS,
    PLUGINS,
    TRT_MSDA,
    masked_attention_output_shape,
    msda_output_shape,
)
from m2f.export.tensorrt_build import default_profile, parse_shape, retarget_msda_nodes
from m2f.export.triton_repo import write_triton_repo
from tests.utils import fresh_seed, full_manifest

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper  # noqa: E402


@pytest.fixture
def seeded() -> tuple[torch.Generator, int]:
    """(generator, seed) with a fresh seed per test."""
    seed = fresh_seed()
    return torch.Generator().manual_seed(seed), seed


# ---------------------------------------------------------------------------------------------------
# TensorRT op list and graph checks
# ---------------------------------------------------------------------------------------------------


def test_tensorrt_op_list_is_consistent():
    assert not tensorrt_onnx_ops.SUPPORTED & tensorrt_onnx_ops.UNSUPPORTED
    for op in ("GridSample", "LayerNormalization", "TopK", "Resize", "Einsum", "InstanceNormalization", "MatMul"):
        assert op in tensorrt_onnx_ops.SUPPORTED, op
    for op in ("Unique", "SequenceConstruct", "Col2Im"):
        assert op in tensorrt_onnx_ops.UNSUPPORTED, op
    assert set(tensorrt_onnx_ops.RESTRICTIONS) <= tensorrt_onnx_ops.SUPPORTED


def test_tensorrt_support_flags_unsupported_ops_and_allows_plugins():
    trt = targets.get("tensorrt")
    plugin_keys = frozenset(spec.node.key for spec in PLUGINS)
    census = {"Conv": 3, "GridSample": 6, "Unique": 1, "trt.plugins::MultiscaleDeformableAttnPlugin_TRT": 6}
    out = trt.support(census, 17, plugin_keys)
    assert out["unsupported_ops"] == ["Unique"] and not out["ok"]
    assert out["plugin_ops"] == {"trt.plugins::MultiscaleDeformableAttnPlugin_TRT": 6}
    assert "GridSample" in out["restrictions_to_mind"]
    assert trt.support({"Conv": 1}, 17, plugin_keys)["ok"]
    assert not trt.support({"Conv": 1}, 25, plugin_keys)["opset_supported"]
    # a custom node that is no m2f plugin is an op TensorRT cannot import
    assert trt.support({"x::Foo": 1}, 17, plugin_keys)["unsupported_ops"] == ["x::Foo"]
    assert targets.get("onnxruntime").ops is None and targets.get("openvino").ops is None


def _msda_graph(n_nodes: int = 2, attributes: dict | None = None, shapes_dtype=TensorProto.INT32) -> onnx.ModelProto:
    """A graph of TRT MSDA plugin nodes fed by typed graph inputs (N=1, S=30, M=2, D=4, Lq=5, L=2, P=3)."""
    inputs = [
        helper.make_tensor_value_info("value", TensorProto.FLOAT, [1, 30, 2, 4]),
        helper.make_tensor_value_info("spatial_shapes", shapes_dtype, [2, 2]),
        helper.make_tensor_value_info("level_start_index", TensorProto.INT32, [2]),
        helper.make_tensor_value_info("sampling_locations", TensorProto.FLOAT, [1, 5, 2, 2, 3, 2]),
        helper.make_tensor_value_info("attention_weights", TensorProto.FLOAT, [1, 5, 2, 2, 3]),
    ]
    nodes, outputs = [], []
    for i in range(n_nodes):
        nodes.append(helper.make_node(TRT_MSDA.op_type, [v.name for v in inputs], [f"out{i}"], name=f"msda{i}",
                                      domain=TRT_MSDA.domain, **(attributes or {})))
        outputs.append(helper.make_tensor_value_info(f"out{i}", TensorProto.FLOAT, [1, 5, 2, 4]))
    graph = helper.make_graph(nodes, "g", inputs, outputs)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(TRT_MSDA.domain, 1)])


def test_msda_plugin_node_checks():
    model = _msda_graph(3)
    onnx.checker.check_model(model, full_check=True)
    info = plugin_nodes(MSDA, model)
    assert info["count"] == 3 and info["problems"] == []
    assert op_census(model) == {"trt.plugins::MultiscaleDeformableAttnPlugin_TRT": 3}
    # an attribute, or int64 spatial shapes, break the plugin's interface
    assert any("attributes" in p for p in plugin_nodes(MSDA, _msda_graph(1, {"foo": 1}))["problems"])
    assert any("spatial_shapes" in p for p in plugin_nodes(MSDA, _msda_graph(1, shapes_dtype=TensorProto.INT64))["problems"])


def test_double_tensors_found():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])
    y = helper.make_tensor_value_info("y", TensorProto.DOUBLE, [2])
    graph = helper.make_graph([helper.make_node("Cast", ["x"], ["y"], to=TensorProto.DOUBLE)], "g", [x], [y])
    assert double_tensors(helper.make_model(graph)) == ["y"]


def test_plugin_node_names_inputs_and_retarget():
    assert TRT_MSDA.op_type == "MultiscaleDeformableAttnPlugin_TRT" and TRT_MSDA.attributes == {}
    assert MSDA_INPUTS == ("value", "spatial_shapes", "level_start_index", "sampling_locations", "attention_weights")
    model = _msda_graph(2)
    assert retarget_msda_nodes(model) == 2
    for node in model.graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        assert (node.op_type, node.domain) == ("ms_deform_attn", "m2f")
        assert attrs == {"plugin_namespace": b"m2f", "aot": 1}
        assert list(node.input) == list(MSDA_INPUTS)
    assert any(o.domain == M2F_MSDA.domain for o in model.opset_import)


# ---------------------------------------------------------------------------------------------------
# Plugin shape rules and kernels
# ---------------------------------------------------------------------------------------------------


def test_msda_output_shape_rules():
    value, shapes, starts = (2, 21504, 8, 32), (3, 2), (3,)
    locs, weights = (2, 21504, 8, 3, 4, 2), (2, 21504, 8, 3, 4)
    assert msda_output_shape(value, shapes, starts, locs, weights) == (2, 21504, 8, 32)
    # symbolic dims (strings stand in for TensorRT's ShapeExprs) pass through unchecked
    assert msda_output_shape(("N", "S", 8, 32), shapes, starts, ("N", "Q", 8, 3, 4, 2), ("N", "Q", 8, 3, 4)) == ("N", "Q", 8, 32)
    with pytest.raises(ValueError, match="heads"):
        msda_output_shape(value, shapes, starts, (2, 21504, 4, 3, 4, 2), weights)
    with pytest.raises(ValueError, match="levels"):
        msda_output_shape(value, (4, 2), starts, locs, weights)
    with pytest.raises(ValueError, match="ranks"):
        msda_output_shape(value[:3], shapes, starts, locs, weights)


def test_masked_attention_output_shape_rules():
    q, kv, mask = (2, 100, 8, 32), (2, 1024, 8, 32), (2, 100, 1024)  # the plugin's (B, N, H, D) layout
    assert masked_attention_output_shape(q, kv, kv, mask) == q
    with pytest.raises(ValueError, match="keys of k / mask"):
        masked_attention_output_shape(q, kv, kv, (2, 100, 512))


def test_msda_launch_geometry():
    from m2f.export.plugin_kernels import aot_launch
    from m2f.kernels.ms_deform_attn.triton_kernels import AOT_CONFIGS

    dims = [[2, 5376, 8, 32], [3, 2], [3], [2, 5376, 8, 3, 4, 2], [2, 5376, 8, 3, 4]]
    launch = aot_launch(MSDA, dims, ["float32", "int32", "int32", "float32", "float32"])
    block_q, num_warps = AOT_CONFIGS["fwd"]["BLOCK_Q"], AOT_CONFIGS["fwd"]["num_warps"]
    assert launch.grid == (-(-5376 // block_q), 16, 1) and launch.block == 32 * num_warps
    assert launch.scalars == (5376, 5376, 8) and launch.kernel.constexprs["BLOCK_Q"] == block_q


@pytest.mark.skipif(importlib.util.find_spec("m2f.kernels.ms_deform_attn.triton_kernels") is None,
                    reason="the Triton MSDA kernel (msda branch) is not in this build")
@pytest.mark.parametrize("target", ["sm_90", "sm_87"])
def test_msda_plugin_kernel_compiles_to_ptx(target):
    from m2f.export.plugin_kernels import compile_plugin_kernel

    for dtype in ("float32", "float16"):
        kernel = compile_plugin_kernel(MSDA, target, dtype)
        entry = re.search(r"\.entry\s+(\w+)\((.*?)\)", kernel.ptx, re.S)
        assert entry is not None and entry.group(1) == kernel.name == "msda_trt_plugin_kernel"
        # QDP order: 5 input pointers, 3 int32 scalars, the output pointer (+ Triton's trailing scratch pointers)
        params = [p.strip().split()[1] for p in entry.group(2).split(",")]
        assert params[:9] == [".u64"] * 5 + [".u32"] * 3 + [".u64"], params
        assert kernel.spill_stores == 0 and kernel.spill_loads == 0, kernel.summary()
        assert f".target {target}" in kernel.ptx or f".target {target}a" in kernel.ptx


# ---------------------------------------------------------------------------------------------------
# TensorRT builder arguments; absence of TensorRT
# ---------------------------------------------------------------------------------------------------


def test_parse_shape_and_profile():
    assert parse_shape("2x3x512x640") == (2, 3, 512, 640)
    assert parse_shape("1×3×64×96") == (1, 3, 64, 96)
    for bad in ("1x4x512x512", "1x3x512", "axbxcxd"):
        with pytest.raises(InputError):
            parse_shape(bad)
    static = {"batch": 1, "height": 128, "width": 192, "dynamic": False}
    assert default_profile(static, None, None, None).max == (1, 3, 128, 192)
    with pytest.raises(InputError, match="--dynamic"):
        default_profile(static, None, None, (4, 3, 128, 192))
    dyn = {**static, "dynamic": True}
    prof = default_profile(dyn, (1, 3, 64, 64), None, (8, 3, 256, 256))
    assert prof.opt == (1, 3, 128, 192) and prof.min == (1, 3, 64, 64)
    with pytest.raises(InputError, match="min <= opt <= max"):
        default_profile(dyn, (1, 3, 256, 256), None, (8, 3, 256, 256))


@pytest.mark.parametrize("recorded", [32, 64, None])
def test_profile_sides_are_multiples_of_the_exports_divisibility(recorded):
    """The export records its input divisibility (backbone stride, at least size_divisibility); older manifests
    give the config's size_divisibility. Profile sides off it are refused naming it."""
    manifest = {"batch": 1, "height": 128, "width": 192, "dynamic": True, "config": {"size_divisibility": 64}}
    if recorded is not None:
        manifest["divisibility"] = recorded
    divisibility = recorded or 64
    fits = parse_shape(f"1x3x{4 * divisibility}x{6 * divisibility}")
    assert default_profile(manifest, None, None, fits).max == fits
    off = parse_shape(f"1x3x{divisibility + 32}x{2 * divisibility}") if divisibility > 32 else parse_shape("1x3x80x64")
    with pytest.raises(InputError, match=rf"^--min-shape 1x3x\d+x\d+: height and width must be multiples of "
                                         rf"{divisibility} \(the exported model's input divisibility\); pad the image$"):
        default_profile(manifest, off, None, None)


def test_tensorrt_missing_is_a_clear_error(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "tensorrt", None)  # absent, even where TensorRT (or only its stubs) is installed
    from m2f.export import TensorRTRunner
    from m2f.export.tensorrt_build import build_engine

    onnx_file = tmp_path / "m.onnx"
    onnx.save(_msda_graph(1), onnx_file)
    write_manifest(onnx_file, full_manifest("onnx"))
    with pytest.raises(BackendUnavailableError, match=r"TensorRT >= 10.3 is not installed: pip install tensorrt"):
        build_engine(onnx_file, tmp_path / "m.engine")
    assert not (tmp_path / "m.engine").exists()
    engine = tmp_path / "x.engine"
    engine.write_bytes(b"not an engine")
    with pytest.raises(BackendUnavailableError, match="TensorRT"):
        TensorRTRunner(engine)


# ---------------------------------------------------------------------------------------------------
# Triton Inference Server repository
# ---------------------------------------------------------------------------------------------------


def _io_model(path: Path, batch: int | str) -> None:
    x = helper.make_tensor_value_info("pixel_values", TensorProto.FLOAT, [batch, 3, "height", "width"])
    y = helper.make_tensor_value_info("pred_logits", TensorProto.FLOAT, [batch, 100, 134])
    z = helper.make_tensor_value_info("semantic_map", TensorProto.INT64, [batch, "height", "width"])
    nodes = [helper.make_node("ReduceMean", ["pixel_values"], ["pred_logits"], keepdims=0),
             helper.make_node("ArgMax", ["pixel_values"], ["semantic_map"], axis=1, keepdims=0)]
    onnx.save(helper.make_model(helper.make_graph(nodes, "g", [x], [y, z])), path)


def test_triton_repo_dynamic_batch(tmp_path):
    model = tmp_path / "m2f.onnx"
    _io_model(model, "batch")
    target = write_triton_repo(model, tmp_path / "repo", name="seg", max_batch=4)
    config = (target / "config.pbtxt").read_text()
    assert (target / "1" / "model.onnx").read_bytes() == model.read_bytes()
    assert 'platform: "onnxruntime_onnx"' in config and "max_batch_size: 4" in config
    assert "dynamic_batching { }" in config and "kind: KIND_GPU" in config
    # batch axis dropped from dims; symbolic axes as -1
    assert re.search(r'name: "pixel_values"\s+data_type: TYPE_FP32\s+dims: \[ 3, -1, -1 \]', config)
    assert re.search(r'name: "pred_logits"\s+data_type: TYPE_FP32\s+dims: \[ 100, 134 \]', config)
    assert re.search(r'name: "semantic_map"\s+data_type: TYPE_INT64\s+dims: \[ -1, -1 \]', config)
    with pytest.raises(Exception, match="--force"):
        write_triton_repo(model, tmp_path / "repo", name="seg")
    write_triton_repo(model, tmp_path / "repo", name="seg", max_batch=2, force=True)
    assert "max_batch_size: 2" in (target / "config.pbtxt").read_text()


def test_triton_repo_fixed_batch_and_engine(tmp_path):
    model = tmp_path / "fixed.onnx"
    _io_model(model, 1)
    config = (write_triton_repo(model, tmp_path / "repo") / "config.pbtxt").read_text()
    assert "max_batch_size: 0" in config and "dynamic_batching" not in config
    assert re.search(r'name: "pixel_values"\s+data_type: TYPE_FP32\s+dims: \[ 1, 3, -1, -1 \]', config)
    engine = tmp_path / "m2f.engine"
    engine.write_bytes(b"\0engine")
    with pytest.raises(InputError, match="manifest"):
        write_triton_repo(engine, tmp_path / "repo2")
    write_manifest(engine, full_manifest(
        "tensorrt", dynamic=True, max_batch=8,
        inputs=[{"name": "pixel_values", "dtype": "float32", "shape": ["batch", 3, "h", "w"]}],
        outputs=[{"name": "pred_masks", "dtype": "float16", "shape": ["batch", 100, "h4", "w4"]}]))
    target = write_triton_repo(engine, tmp_path / "repo2", max_batch=16)
    config = (target / "config.pbtxt").read_text()
    assert 'platform: "tensorrt_plan"' in config and "max_batch_size: 8" in config  # capped by the profile
    assert (target / "1" / "model.plan").exists() and "TYPE_FP16" in config
    for bad in (tmp_path / "missing.onnx", tmp_path / "repo"):
        with pytest.raises(InputError):
            write_triton_repo(bad, tmp_path / "repo3")
    assert not (tmp_path / "repo3").exists()


def test_manifest_roundtrip(tmp_path):
    f = tmp_path / "a.onnx"
    f.write_bytes(b"x")
    assert manifest_path(f) == tmp_path / "a.onnx.json"
    write_manifest(f, full_manifest("onnx", opset=17))
    m = read_manifest(f, kind="onnx")
    assert m.opset == 17 and m.versions["torch"] and m.created.endswith("+00:00")
    assert m.artifact == {"size": 1, "sha256": hashlib.sha256(b"x").hexdigest()}
    assert m.op_mode("msda") == "decomposed" and m.precision == "fp32" and m.target == "onnxruntime"
    assert read_manifest(f) == m  # frozen, and what is read is what was written
    (tmp_path / "b.onnx.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(InputError, match="not an m2f export manifest"):
        read_manifest(tmp_path / "b.onnx")
    assert read_manifest(tmp_path / "c.onnx", required=False) is None


# ---------------------------------------------------------------------------------------------------
# NumPy post-processing against PyTorch
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size_in,size_out", [((7, 13), (28, 52)), ((33, 17), (11, 9)), ((5, 5), (5, 5)), ((1, 3), (4, 2))])
def test_resize_bilinear_matches_torch(seeded, size_in, size_out):
    rng, seed = seeded
    x = torch.randn(3, *size_in, generator=rng)
    ref = F.interpolate(x[None], size=size_out, mode="bilinear", align_corners=False)[0]
    got = pp.resize_bilinear(x.numpy(), size_out)
    err = np.abs(got - ref.numpy()).max()
    assert err <= 1e-5, f"max err {err} (seed {seed})"


def test_softmax_sigmoid_match_torch(seeded):
    rng, seed = seeded
    x = torch.randn(4, 17, generator=rng) * 30
    assert np.allclose(pp.softmax(x.numpy()), torch.softmax(x, -1).numpy(), atol=1e-6, rtol=1e-5), f"seed {seed}"
    assert np.allclose(pp.sigmoid(x.numpy()), torch.sigmoid(x).numpy(), atol=1e-7, rtol=1e-5)


def _torch_reference_panoptic(cls, masks, things, thr=0.8, overlap=0.8):
    """The official MaskFormer.panoptic_inference, transcribed into torch as the reference."""
    scores, labels = F.softmax(cls, -1).max(-1)
    mask_pred = masks.sigmoid()
    keep = labels.ne(cls.shape[-1] - 1) & (scores > thr)
    cur_scores, cur_classes, cur_masks = scores[keep], labels[keep], mask_pred[keep]
    seg = torch.zeros(masks.shape[-2:], dtype=torch.int32)
    info, sid, stuff = [], 0, {}
    if cur_masks.shape[0] == 0:
        return seg, info
    ids = (cur_scores.view(-1, 1, 1) * cur_masks).argmax(0)
    for k in range(cur_classes.shape[0]):
        c = int(cur_classes[k])
        isthing = c in things
        area, orig = int((ids == k).sum()), int((cur_masks[k] >= 0.5).sum())
        m = (ids == k) & (cur_masks[k] >= 0.5)
        if area > 0 and orig > 0 and int(m.sum()) > 0:
            if area / orig < overlap:
                continue
            if not isthing:
                if c in stuff:
                    seg[m] = stuff[c]
                    continue
                stuff[c] = sid + 1
            sid += 1
            seg[m] = sid
            info.append({"id": sid, "isthing": isthing, "category_id": c})
    return seg, info


def test_panoptic_semantic_instance_match_torch(seeded):
    rng, seed = seeded
    Q, K, H, W = 12, 5, 24, 20
    cls = torch.randn(Q, K + 1, generator=rng) * 4
    cls[:, 0] += 6  # make some queries confident so segments survive the 0.8 threshold
    masks = torch.randn(Q, H, W, generator=rng) * 3
    things = (0, 2)
    seg_ref, info_ref = _torch_reference_panoptic(cls, masks, things)
    out = pp.panoptic_inference(cls.numpy(), masks.numpy(), things)
    assert np.array_equal(out.segmentation, seg_ref.numpy()), f"seed {seed}"
    assert [{k: s[k] for k in ("id", "isthing", "category_id")} for s in out.segments] == info_ref

    sem_ref = torch.einsum("qc,qhw->chw", F.softmax(cls, -1)[:, :-1], masks.sigmoid())
    assert np.allclose(pp.semantic_inference(cls.numpy(), masks.numpy()), sem_ref.numpy(), atol=1e-6)

    inst = pp.instance_inference(cls.numpy(), masks.numpy(), topk=7)
    scores = F.softmax(cls, -1)[:, :-1].flatten()
    top, idx = scores.topk(7)
    mp = masks[idx // K]
    fg = (mp > 0).float()
    ref = top * (mp.sigmoid().flatten(1) * fg.flatten(1)).sum(1) / (fg.flatten(1).sum(1) + 1e-6)
    order = torch.argsort(ref, descending=True, stable=True)
    assert np.array_equal(inst.labels, (idx % K)[order].numpy()), f"seed {seed}"
    assert np.array_equal(inst.query_indices, (idx // K)[order].numpy()), f"seed {seed}"
    assert np.allclose(inst.scores, ref[order].numpy(), rtol=1e-5, atol=1e-7)
    assert np.array_equal(inst.masks, (mp > 0)[order].numpy())


@pytest.mark.skipif(importlib.util.find_spec("m2f.postprocess") is None,
                    reason="m2f.postprocess (postprocess branch) is not in this build")
def _dispatch_case(rng: torch.Generator, default_task: str):
    """Raw outputs of a batch with padding and resize, and a 4-class config trained for ``default_task``."""
    from m2f.config import Mask2FormerConfig, PostProcessConfig

    B, Q, K = 2, 9, 4
    logits = torch.randn(B, Q, K + 1, generator=rng) * 4
    logits[:, :, 1] += 5  # confident queries so that panoptic segments survive the 0.8 threshold
    masks = torch.randn(B, Q, 16, 24, generator=rng) * 3  # padded input 64 x 96
    config = Mask2FormerConfig(num_classes=K, thing_classes=(1, 3), default_task=default_task,
                               postprocess=PostProcessConfig(instance_topk=10))
    return logits, masks, [(60, 90), (64, 80)], [(120, 180), (50, 70)], config


@pytest.mark.parametrize("default_task", ["panoptic", "semantic"])
def test_runner_postprocessing_follows_the_model_rules(seeded, default_task):
    """Exported-model runners post-process as `m2f predict` does on PyTorch outputs: semantic-only models infer
    before resizing (the runner used to resize first, whatever the model), thresholds and thing classes come from
    the config."""
    from m2f import postprocess as tp
    from m2f.export.runner import postprocess_outputs

    rng, seed = seeded
    logits, masks, image_sizes, original_sizes, config = _dispatch_case(rng, default_task)
    args = (logits, masks, image_sizes, original_sizes, (64, 96))
    semantic_only = default_task == "semantic"
    things = (1, 3) if not semantic_only else None
    expected = {
        "semantic": tp.semantic(*args, postprocess_before_inference=not semantic_only),
        "instance": tp.instance(*args, topk=10, thing_classes=things),
        "panoptic": tp.panoptic(*args, thing_classes=(1, 3)),
    }
    for task, want in expected.items():
        got = postprocess_outputs(logits.numpy(), masks.numpy(), (64, 96), task, config.to_dict(), image_sizes,
                                  original_sizes)
        for g, w in zip(got, want):
            for name, value in vars(w).items():
                if isinstance(value, torch.Tensor):
                    assert torch.equal(getattr(g, name), value), f"{task} {name}, seed {seed}"
                else:
                    assert getattr(g, name) == value, f"{task} {name}, seed {seed}"


def test_the_onnx_path_imports_no_triton():
    """Export, check, the target registry and the CLI import without Triton (only plugin_kernels needs it)."""
    import subprocess
    import sys

    code = ("import sys; import m2f.cli, m2f.export.onnx_export, m2f.export.check, m2f.export.targets as t; "
            "t.names(); sys.exit('triton' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
