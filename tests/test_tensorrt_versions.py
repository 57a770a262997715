"""`m2f export tensorrt` across TensorRT versions, without TensorRT: a stub ``tensorrt`` module per version (only the
API that version has), the removed-in-11 API kept out of every branch 11.x can reach (AST walk), and mypy over the
TensorRT modules against tensorrt-stubs."""
from __future__ import annotations

import ast
import importlib.util
import json
import subprocess
import sys
import types
from pathlib import Path

import onnx
import pytest
from onnx import TensorProto, helper

from m2f.cli import main
from m2f.export.manifest import write_manifest
from m2f.export.plugins import M2F_MASKED_ATTENTION, TRT_MSDA
from tests.utils import full_manifest

ROOT = Path(__file__).resolve().parents[1]
TENSORRT_MODULES = [ROOT / "export" / name for name in ("_trt.py", "tensorrt_build.py", "runner.py", "plugins.py")]

# Removed from TensorRT's Python API in 11.x. Source: NVIDIA, "Migrating from TensorRT 10.x to 11.x", Python API
# reference, "Removed Python APIs and Replacements"
# (https://docs.nvidia.com/deeplearning/tensorrt/latest/api/migration/tensorrt-10x-to-11x-python-api-reference.html),
# and the IInt8*Calibrator classes named by the same guide's INT8 calibration -> explicit quantization section.
REMOVED_IN_11 = {
    "BuilderFlag.FP16", "BuilderFlag.INT8", "BuilderFlag.FP8", "BuilderFlag.BF16", "BuilderFlag.INT4",
    "BuilderFlag.FP4", "BuilderFlag.OBEY_PRECISION_CONSTRAINTS", "BuilderFlag.PREFER_PRECISION_CONSTRAINTS",
    "BuilderFlag.DIRECT_IO",
    "IBuilderConfig.int8_calibrator", "IBuilderConfig.set_calibration_profile", "IBuilderConfig.get_calibration_profile",
    "IBuilderConfig.set_quantization_flag", "IBuilderConfig.get_quantization_flag", "IBuilderConfig.quantization_flags",
    "IBuilderConfig.clear_quantization_flag", "ICudaEngine.device_memory_size",
    "IInt8Calibrator", "IInt8EntropyCalibrator", "IInt8EntropyCalibrator2", "IInt8MinMaxCalibrator",
    "IInt8LegacyCalibrator",
}
WEAK_ONLY_PREFIX = "_trt10_"  # functions only TensorRT 10.x may call (guarded by weak_typing_available)


# ---------------------------------------------------------------------------------------------------
# A stub tensorrt per version
# ---------------------------------------------------------------------------------------------------


def fake_tensorrt(version: str, calls: list) -> types.ModuleType:
    """The parts of TensorRT's Python API m2f's build uses, as ``version`` has them (11.x: no weak typing)."""
    major = int(version.split(".")[0])
    trt = types.ModuleType("tensorrt")
    trt.__version__ = version
    flags = ["TF32"] + (["FP16", "BF16", "INT8"] if major < 11 else [])
    trt.BuilderFlag = types.SimpleNamespace(**{f: f for f in flags})
    if major < 11:
        trt.NetworkDefinitionCreationFlag = types.SimpleNamespace(STRONGLY_TYPED=5)
    trt.MemoryPoolType = types.SimpleNamespace(WORKSPACE=0)

    class Logger:
        WARNING = 2

        def __init__(self, severity):
            pass

    class Cache:
        def serialize(self):
            return b"cache"

    class Config:
        __slots__ = ("flags",)  # no int8_calibrator / set_calibration_profile unless 10.x adds them below

        def __init__(self):
            self.flags = []

        def set_memory_pool_limit(self, pool, size):
            pass

        def set_flag(self, flag):
            calls.append(("set_flag", flag))

        def add_optimization_profile(self, profile):
            pass

        def create_timing_cache(self, data):
            return Cache()

        def set_timing_cache(self, cache, ignore_mismatch):
            pass

        def get_timing_cache(self):
            return Cache()

    class Profile:
        def set_shape(self, name, lo, opt, hi):
            calls.append(("profile", name, lo, opt, hi))

    class Builder:
        def __init__(self, logger):
            pass

        def create_network(self, flags):
            calls.append(("create_network", flags))
            return object()

        def create_builder_config(self):
            return Config()

        def create_optimization_profile(self):
            return Profile()

        def build_serialized_network(self, network, config):
            return b"engine"

    class OnnxParser:
        num_errors = 0

        def __init__(self, network, logger):
            pass

        def parse(self, data, path):
            calls.append(("parse", onnx.ModelProto.FromString(data)))
            return True

    trt.Logger, trt.Builder, trt.OnnxParser = Logger, Builder, OnnxParser
    trt.init_libnvinfer_plugins = lambda logger, namespace: True
    return trt


def _graph(tmp_path: Path, node: str = "none", precision: str = "fp32") -> Path:
    """A small ONNX file with a manifest: an Identity, or one MSDA / masked-attention plugin node."""
    x = helper.make_tensor_value_info("pixel_values", TensorProto.FLOAT, [1, 3, 64, 64])
    y = helper.make_tensor_value_info("pred_logits", TensorProto.FLOAT, [1, 3, 64, 64])
    opsets = [helper.make_opsetid("", 18)]
    if node == "msda":
        nodes = [helper.make_node(TRT_MSDA.op_type, ["pixel_values"] * 5, ["pred_logits"], domain=TRT_MSDA.domain)]
        opsets.append(helper.make_opsetid(TRT_MSDA.domain, 1))
    elif node == "masked":
        nodes = [helper.make_node(M2F_MASKED_ATTENTION.op_type, ["pixel_values"] * 4, ["pred_logits"],
                                  domain=M2F_MASKED_ATTENTION.domain)]
        opsets.append(helper.make_opsetid(M2F_MASKED_ATTENTION.domain, 1))
    else:
        nodes = [helper.make_node("Identity", ["pixel_values"], ["pred_logits"])]
    path = tmp_path / "m.onnx"
    onnx.save(helper.make_model(helper.make_graph(nodes, "g", [x], [y]), opset_imports=opsets), str(path))
    write_manifest(path, full_manifest(msda="plugin" if node == "msda" else "decomposed",
                                       masked_attn="plugin" if node == "masked" else "standard", precision=precision))
    return path


def _build(monkeypatch, capsys, tmp_path, version: str | None, *args: str, node: str = "none",
           precision: str = "fp32"):
    calls: list = []
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt(version, calls) if version else None)
    onnx_path = _graph(tmp_path, node, precision)
    engine = tmp_path / "m.engine"
    code = main(["export", "tensorrt", "--onnx", str(onnx_path), "--output", str(engine), *args])
    out, err = capsys.readouterr()
    return code, out, err, calls, engine


def _one_line(code: int, err: str, *needles: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("m2f: error: "), err
    for needle in needles:
        assert needle in lines[0], lines[0]


def _engine_files(tmp_path: Path) -> set[str]:
    return {p.name for p in tmp_path.iterdir()} - {"m.onnx", "m.onnx.json"}


@pytest.mark.parametrize("version, needle", [(None, "TensorRT >= 10.3 is not installed"),
                                             ("10.2.0", "TensorRT 10.2.0 is too old")])
def test_absent_or_too_old(monkeypatch, capsys, tmp_path, version, needle):
    code, _, err, calls, _ = _build(monkeypatch, capsys, tmp_path, version)
    _one_line(code, err, needle, "pip install tensorrt")
    assert not calls and not _engine_files(tmp_path)


def test_stubs_only_package_is_not_a_tensorrt(monkeypatch, capsys, tmp_path):
    """tensorrt-stubs installs a tensorrt/ folder of .pyi files: importable as a namespace package, no runtime."""
    monkeypatch.setitem(sys.modules, "tensorrt", types.ModuleType("tensorrt"))
    onnx_path = _graph(tmp_path)
    code = main(["export", "tensorrt", "--onnx", str(onnx_path), "--output", str(tmp_path / "m.engine")])
    _one_line(code, capsys.readouterr().err, "no runtime", "pip install tensorrt")
    assert not _engine_files(tmp_path)


@pytest.mark.parametrize("flag", ["--fp16", "--bf16", "--int8"])
def test_11x_refuses_weak_typing_flags_naming_the_export(monkeypatch, capsys, tmp_path, flag):
    extra = ["--calib", str(tmp_path)] if flag == "--int8" else []
    code, _, err, calls, _ = _build(monkeypatch, capsys, tmp_path, "11.4.0", flag, *extra)
    _one_line(code, err, "TensorRT 11.4.0 builds strongly typed networks only",
              f"m2f export onnx --precision {flag[2:]}")
    assert not calls and not _engine_files(tmp_path)


@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_11x_builds_strongly_typed_from_the_graph(monkeypatch, capsys, tmp_path, precision):
    code, out, err, calls, engine = _build(monkeypatch, capsys, tmp_path, "11.4.0", precision=precision)
    assert code == 0, err
    assert ("create_network", 0) in calls  # strongly typed is the only mode: no flag exists to ask for it
    assert not [c for c in calls if c[0] == "set_flag"]
    manifest = json.loads(engine.with_name("m.engine.json").read_text())
    assert (manifest["typing"], manifest["precision"]) == ("strong", precision)
    assert "strongly typed" in out


def test_10x_takes_both_routes(monkeypatch, capsys, tmp_path):
    code, _, err, calls, engine = _build(monkeypatch, capsys, tmp_path, "10.13.0")
    assert code == 0, err
    assert ("create_network", 1 << 5) in calls  # the STRONGLY_TYPED creation flag
    engine.unlink()
    code, _, err, calls, _ = _build(monkeypatch, capsys, tmp_path, "10.13.0", "--fp16", "--force")
    assert code == 0, err
    assert ("create_network", 0) in calls and ("set_flag", "FP16") in calls


def test_10x_refuses_a_weak_flag_on_a_low_precision_graph(monkeypatch, capsys, tmp_path):
    code, _, err, calls, _ = _build(monkeypatch, capsys, tmp_path, "10.13.0", "--fp16", precision="fp16")
    _one_line(code, err, "already a fp16 graph", "without --fp16")
    assert not _engine_files(tmp_path)


@pytest.mark.parametrize("version, plugin_version", [("10.3.0", "1"), ("10.10.0", "1"), ("10.11.0", "2"),
                                                     ("11.4.0", "2")])
def test_tensorrt_msda_plugin_version(monkeypatch, capsys, tmp_path, version, plugin_version):
    code, _, err, calls, engine = _build(monkeypatch, capsys, tmp_path, version, "--plugins", "tensorrt", node="msda")
    assert code == 0, err
    parsed = next(c[1] for c in calls if c[0] == "parse")
    node = next(n for n in parsed.graph.node if n.op_type == TRT_MSDA.op_type)
    assert {a.name: a.s.decode() for a in node.attribute}["plugin_version"] == plugin_version
    assert json.loads(engine.with_name("m.engine.json").read_text())["msda_plugin_version"] == plugin_version


@pytest.mark.parametrize("node, args", [("masked", []), ("msda", ["--plugins", "m2f"])])
def test_jetpack6_tensorrt_refuses_m2f_python_plugins_in_one_line(monkeypatch, capsys, tmp_path, node, args):
    code, _, err, calls, _ = _build(monkeypatch, capsys, tmp_path, "10.3.0", *args, node=node)
    _one_line(code, err, "need TensorRT >= 10.9", "--plugins tensorrt", "--masked-attn standard")
    assert not [c for c in calls if c[0] == "parse"] and not _engine_files(tmp_path)


# ---------------------------------------------------------------------------------------------------
# The API each branch can reach
# ---------------------------------------------------------------------------------------------------


def _chain(node: ast.AST) -> str | None:
    """"BuilderFlag.FP16" for ``trt.BuilderFlag.FP16``; None for attribute chains not rooted at ``trt``."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    return ".".join(reversed(parts)) if isinstance(node, ast.Name) and node.id in ("trt", "tensorrt") else None


def removed_api_used(tree: ast.AST) -> dict[str, set[str]]:
    """function name -> the removed-in-11 names it touches (``trt.X.Y`` chains and removed member names)."""
    members = {name.split(".", 1)[1] for name in REMOVED_IN_11 if name.startswith(("IBuilderConfig.", "ICudaEngine."))}
    used: dict[str, set[str]] = {}
    for func in ast.walk(tree):
        if not isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            continue
        for node in ast.walk(func):
            if isinstance(node, ast.Attribute):
                chain = _chain(node)
                if chain in REMOVED_IN_11:
                    used.setdefault(func.name, set()).add(chain)
                elif node.attr in members:
                    used.setdefault(func.name, set()).add(node.attr)
    return used


def _parents(tree: ast.AST) -> dict[ast.AST, ast.AST]:
    return {child: parent for parent in ast.walk(tree) for child in ast.iter_child_nodes(parent)}


@pytest.mark.parametrize("path", TENSORRT_MODULES, ids=lambda p: p.name)
def test_no_removed_api_outside_the_10x_only_functions(path):
    tree = ast.parse(path.read_text(encoding="utf-8"))
    used = removed_api_used(tree)
    # a 10.x-only function's nested helpers (the calibrator class) belong to it
    outer = {n.name for f in ast.walk(tree) if isinstance(f, ast.FunctionDef) and f.name.startswith(WEAK_ONLY_PREFIX)
             for n in ast.walk(f) if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
    offending = {f: names for f, names in used.items() if not f.startswith(WEAK_ONLY_PREFIX) and f not in outer}
    assert not offending, f"{path.name}: removed-in-11 TensorRT API reachable on 11.x: {offending}"
    parents = _parents(tree)
    for call in ast.walk(tree):
        if isinstance(call, ast.Call) and isinstance(call.func, ast.Name) and call.func.id.startswith(WEAK_ONLY_PREFIX):
            node, guarded = call, False
            while node in parents:
                node = parents[node]
                if isinstance(node, ast.FunctionDef) and node.name.startswith(WEAK_ONLY_PREFIX):
                    guarded = True  # called from another 10.x-only function
                if isinstance(node, ast.If) and "weak_typing_available" in ast.unparse(node.test):
                    guarded = True
            assert guarded, f"{path.name}:{call.lineno}: {call.func.id} called outside a weak_typing_available() guard"


def test_the_walk_sees_the_10x_branch():
    """The check above is not vacuous: the weak-typing functions do use the removed API, and the walk finds it."""
    used = removed_api_used(ast.parse((ROOT / "export" / "tensorrt_build.py").read_text(encoding="utf-8")))
    found = set().union(*(v for f, v in used.items()))
    assert {"BuilderFlag.FP16", "BuilderFlag.INT8", "int8_calibrator", "set_calibration_profile",
            "IInt8EntropyCalibrator2"} <= found, used


def test_mypy_against_tensorrt_stubs():
    if importlib.util.find_spec("mypy") is None:
        pytest.skip("mypy is not installed: make install-test")
    stubs = importlib.util.find_spec("tensorrt_stubs")
    if stubs is None:
        pytest.skip("tensorrt-stubs is not installed: make install-test (pip install --no-deps tensorrt-stubs)")
    result = subprocess.run([sys.executable, "-m", "mypy", "--no-incremental"], cwd=ROOT, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
