"""ONNX export end to end: full-size random-weight R50 / Swin-T panoptic models and tiny Hugging Face checkpoints,
exported, checked (onnx.checker, op census, TensorRT op list) and run in ONNX Runtime against PyTorch at the
export size and, for dynamic graphs, at another size and batch. Exports are shared through module-scoped fixtures
(exporting a full-size Mask2Former takes a minute or more on two CPU cores)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import m2f
from m2f.cli import main
from m2f.config import BACKBONE_PRESETS, Mask2FormerConfig

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from m2f.export import check_onnx, to_onnx  # noqa: E402
from m2f.export.plugins import TRT_MSDA  # noqa: E402
from tests.utils import fresh_seed, has_tensorrt_runtime, tiny_hf_checkpoint  # noqa: E402

HEIGHT, WIDTH = 128, 192  # export size of the full-size models (multiples of 32, non-square)
RTOL = 1e-4


def _full_model(backbone: str, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return m2f.build_model(Mask2FormerConfig(backbone=BACKBONE_PRESETS[backbone], num_classes=133), backend="torch").eval()


def _assert_parity(report: dict, sizes: int, seed: int) -> None:
    """``report``: a check report's JSON form."""
    runs = report["parity"]["runs"]
    for run in runs:  # shown with -s: the measured errors
        errs = {n: e.get("rel_err", e.get("mismatch")) for n, e in run["outputs"].items()}
        print(f"{Path(report['file']).name} {run['batch']}x3x{run['height']}x{run['width']}: {errs}")
    assert len(runs) == sizes, runs
    for run in runs:
        for name, entry in run["outputs"].items():
            if "rel_err" in entry:
                assert entry["finite"] and entry["rel_err"] <= RTOL, (
                    f"{name} at {run['batch']}x{run['height']}x{run['width']}: rel_err {entry['rel_err']:.3g} "
                    f"(model seed {seed}, input seed {run['seed']})")
            else:
                assert entry["mismatch"] <= 2e-3, (name, entry, seed)
    assert report["verdict"] == "pass", report["reasons"]


def _export_and_check(tmp_path_factory, backbone: str, dynamic: bool) -> tuple[dict, object, int]:
    seed = fresh_seed()
    model = _full_model(backbone, seed)
    path = tmp_path_factory.mktemp(backbone) / f"{backbone}.onnx"
    result = to_onnx(model, path, height=HEIGHT, width=WIDTH, batch=1, dynamic=dynamic)
    report = check_onnx(path, model=model)
    return result.manifest.to_json(), report, seed


FULL = os.environ.get("M2F_EXPORT_FULL", "") not in ("", "0")
full_only = pytest.mark.skipif(
    not FULL, reason="dynamic export of a full-size model takes minutes on 2 CPU cores (dynamic shapes are covered by "
                     "the tiny HF Swin / ResNet tests, full architectures by the static R50 test); M2F_EXPORT_FULL=1")


@pytest.mark.slow
@pytest.mark.parametrize("backbone,dynamic", [
    ("r50", False),
    pytest.param("r50", True, marks=full_only),
    pytest.param("swin-t", True, marks=full_only),
])
def test_full_size_export_matches_pytorch(backbone, dynamic, tmp_path_factory):
    manifest, report, seed = _export_and_check(tmp_path_factory, backbone, dynamic)
    print(json.dumps([{k: v for k, v in r.items() if k != "outputs"} | {
        n: e.get("rel_err") for n, e in r["outputs"].items()} for r in report.parity["runs"]]))
    # export size (1x3x128x192) and, for a dynamic file, another size and batch (2x3x160x160) from the same file
    _assert_parity(report.to_json(), sizes=2 if dynamic else 1, seed=seed)
    sizes = {(r["batch"], r["height"], r["width"]) for r in report.parity["runs"]}
    assert (1, HEIGHT, WIDTH) in sizes
    if dynamic:
        assert any(s[0] > 1 and s[1:] != (HEIGHT, WIDTH) for s in sizes)
    # portable graph: no float64, no data-dependent ops, every op importable by TensorRT's parser
    structure = report.structure
    assert structure["checker"]["ok"] and structure["double_tensors"] == [] and structure["data_dependent_ops"] == []
    assert report.targets["tensorrt"]["ok"], report.targets["tensorrt"]
    assert structure["census"].get("GridSample") == 6 * 3  # 6 encoder layers x 3 levels, deformable attention decomposed
    assert "NonZero" not in structure["census"]
    shape_in = manifest["inputs"][0]["shape"]
    assert manifest["inputs"][0]["name"] == "pixel_values"
    if dynamic:  # symbolic batch / height / width in, batch-symbolic outputs
        assert all(isinstance(d, str) for d in (shape_in[0], *shape_in[2:]))
        assert isinstance(manifest["outputs"][1]["shape"][0], str)
    else:
        assert shape_in == [1, 3, HEIGHT, WIDTH]
    assert [o["name"] for o in manifest["outputs"]] == ["pred_logits", "pred_masks"]
    assert manifest["outputs"][0]["shape"][1:] == [100, 134]
    assert manifest["opset"] == 18 and manifest["ops"]["msda"]["mode"] == "decomposed" and manifest["dtype"] == "float32"


# ---------------------------------------------------------------------------------------------------
# Plugin mode
# ---------------------------------------------------------------------------------------------------


def _has_msda_op() -> bool:
    try:
        import m2f.kernels.ms_deform_attn.op  # noqa: F401
    except ImportError:
        return False
    return hasattr(torch.ops.m2f, "ms_deform_attn")


@pytest.mark.slow
@pytest.mark.skipif(not _has_msda_op(), reason="the m2f::ms_deform_attn custom op (msda branch) is not in this build")
def test_plugin_mode_graph(tmp_path):
    seed = fresh_seed()
    model = _full_model("r50", seed)
    path = tmp_path / "r50_plugin.onnx"
    result = to_onnx(model, path, height=HEIGHT, width=WIDTH, msda="plugin")
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    nodes = [n for n in proto.graph.node if n.op_type == TRT_MSDA.op_type]
    assert len(nodes) == 6 == result.manifest.ops["msda"].nodes  # one per encoder layer
    assert "GridSample" not in {n.op_type for n in proto.graph.node}
    for node in nodes:
        assert node.domain == "trt.plugins" and len(node.input) == 5 and len(node.output) == 1 and not node.attribute
    report = check_onnx(path, model=model)
    assert report.plugins["msda"]["count"] == 6 and report.plugins["msda"]["problems"] == [], report.plugins
    assert report.verdict == "pass" and len(report.parity["runs"]) == 1, report.reasons  # through the functions
    assert report.targets["tensorrt"]["plugin_ops"] == {"trt.plugins::MultiscaleDeformableAttnPlugin_TRT": 6}


# ---------------------------------------------------------------------------------------------------
# Tiny Hugging Face checkpoints through the CLI (export -> check -> report), post-processing in the graph
# ---------------------------------------------------------------------------------------------------


def _tiny_hf_dir(tmp_path_factory, backbone: str) -> tuple[Path, int]:
    pytest.importorskip("transformers")
    seed = fresh_seed()
    return tiny_hf_checkpoint(tmp_path_factory.mktemp(f"hf_{backbone}") / "checkpoint", backbone, seed), seed


@pytest.fixture(scope="module")
def hf_swin(tmp_path_factory):
    return _tiny_hf_dir(tmp_path_factory, "swin")


@pytest.fixture(scope="module")
def hf_resnet(tmp_path_factory):
    return _tiny_hf_dir(tmp_path_factory, "resnet")


def _cli_export_and_check(ckpt: Path, out: Path, postprocess: str, seed: int, capsys) -> dict:
    code = main(["export", "onnx", "--checkpoint", str(ckpt), "--output", str(out), "--height", "96", "--width", "160",
                 "--dynamic", "--postprocess", postprocess])
    assert code == 0, capsys.readouterr().err
    report_path = out.with_name(out.stem + ".check.json")
    code = main(["export", "check", str(out), "--report", str(report_path)])
    printed = capsys.readouterr().out
    report = json.loads(report_path.read_text())
    assert code == 0, (printed, report["reasons"])
    _assert_parity(report, sizes=2, seed=seed)
    manifest = json.loads(out.with_name(out.name + ".json").read_text())
    assert manifest["source"]["path"] == str(ckpt.resolve()) and len(manifest["source"]["sha256"]) == 64
    expected = {"none": [], "semantic": ["semantic_probs", "semantic_map"],
                "instance": ["instance_scores", "instance_labels", "instance_masks"]}[postprocess]
    assert [o["name"] for o in manifest["outputs"]] == ["pred_logits", "pred_masks", *expected]
    return manifest


def test_hf_swin_checkpoint_cli_export_and_check(hf_swin, tmp_path, capsys):
    ckpt, seed = hf_swin
    out = tmp_path / "swin.onnx"
    _cli_export_and_check(ckpt, out, "none", seed, capsys)
    # the printed / recorded seed replays the check's inputs exactly
    first = json.loads(out.with_name(out.stem + ".check.json").read_text())["parity"]["runs"]
    replay = tmp_path / "replay.json"
    assert main(["export", "check", str(out), "--report", str(replay), "--seed", str(first[0]["seed"])]) == 0
    printed = capsys.readouterr().out
    again = json.loads(replay.read_text())["parity"]["runs"]
    assert f"inputs of --seed {first[0]['seed']}" in printed, printed
    assert [r["outputs"] for r in again] == [r["outputs"] for r in first], (seed, first, again)


@pytest.mark.parametrize("postprocess", ["semantic", "instance"])
def test_hf_resnet_checkpoint_cli_export_with_postprocess(hf_resnet, postprocess, tmp_path, capsys):
    ckpt, seed = hf_resnet
    manifest = _cli_export_and_check(ckpt, tmp_path / f"resnet_{postprocess}.onnx", postprocess, seed, capsys)
    if postprocess == "instance":
        assert manifest["outputs"][2]["shape"][1] == min(100, 7 * 5)  # top-k over Q x K
    else:
        assert manifest["outputs"][2]["shape"][1] == 5  # K classes
    # a real subprocess: check the file again, and refuse to overwrite it without --force
    out = tmp_path / f"resnet_{postprocess}.onnx"
    if postprocess == "semantic":
        proc = subprocess.run([sys.executable, "-m", "m2f", "export", "check", str(out)], capture_output=True,
                              text=True, timeout=900)
        assert proc.returncode == 0 and ": pass" in proc.stdout, proc.stdout + proc.stderr[-2000:]
        again = subprocess.run([sys.executable, "-m", "m2f", "export", "onnx", "--checkpoint", str(ckpt), "--output",
                                str(out)], capture_output=True, text=True, timeout=300)
        assert again.returncode == 2 and again.stderr.startswith("m2f: error: ") and "--force" in again.stderr


def test_pipeline_workdir(hf_resnet, tmp_path, capsys):
    ckpt, seed = hf_resnet
    work = tmp_path / "work"
    if not has_tensorrt_runtime():  # TensorRT stages refused before any work is done
        code = main(["export", "pipeline", "--checkpoint", str(ckpt), "--workdir", str(work), "--tensorrt"])
        err = capsys.readouterr().err  # no TensorRT, or only tensorrt-stubs (a test extra): no runtime either way
        assert code == 2 and ("TensorRT >= 10.3 is not installed" in err or "has no runtime" in err), err
        assert list(tmp_path.iterdir()) == []
    code = main(["export", "pipeline", "--checkpoint", str(ckpt), "--workdir", str(work), "--height", "64",
                 "--width", "96"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert sorted(p.name for p in work.iterdir()) == ["check.json", "model.onnx", "model.onnx.json", "pipeline.json"]
    record = json.loads((work / "pipeline.json").read_text())
    assert [s["stage"] for s in record["stages"]] == ["export", "check"] and record["verdict"] == "pass"
    assert all(s["status"] == "ok" for s in record["stages"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["work"]  # no .partial / .failed left


def test_non_checkpoint_file_is_a_clean_error(tmp_path, capsys):
    bogus = tmp_path / "notes.safetensors"
    bogus.write_text("this is not a checkpoint")
    code = main(["export", "onnx", "--checkpoint", str(bogus), "--output", str(tmp_path / "m.onnx")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("m2f: error: ") and len(err.strip().splitlines()) == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.safetensors"]


def test_failed_export_leaves_no_file(tmp_path, monkeypatch):
    model = torch.nn.Conv2d(3, 3, 1)  # not a Mask2Former: the export fails inside the exporter
    with pytest.raises(Exception):
        to_onnx(model, tmp_path / "x.onnx", height=64, width=64)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------------
# TensorRT (skipped without TensorRT and a GPU)
# ---------------------------------------------------------------------------------------------------


@pytest.mark.tensorrt
@pytest.mark.parametrize("plugins", ["m2f", "tensorrt"])
def test_tensorrt_engine_matches_onnxruntime(hf_resnet, plugins, tmp_path):
    import numpy as np
    import onnxruntime as ort

    from m2f.export import TensorRTRunner, build_engine
    from m2f.export.onnx_export import export_checkpoint

    ckpt, seed = hf_resnet
    decomposed = export_checkpoint(ckpt, tmp_path / "d.onnx", height=96, width=160, dynamic=True).path
    plugin = export_checkpoint(ckpt, tmp_path / "p.onnx", height=96, width=160, dynamic=True, msda="plugin").path
    engine = build_engine(plugin, tmp_path / "p.engine", precision="fp32", plugins=plugins,
                          min_shape=(1, 3, 64, 64), opt_shape=(1, 3, 96, 160), max_shape=(2, 3, 128, 192))
    session = ort.InferenceSession(str(decomposed), providers=["CPUExecutionProvider"])
    with TensorRTRunner(engine) as runner:
        for shape in ((1, 3, 96, 160), (2, 3, 128, 128)):
            x = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
            got, ref = runner.infer(x), dict(zip(["pred_logits", "pred_masks"], session.run(None, {"pixel_values": x})))
            for name in ref:
                err = np.linalg.norm(got[name] - ref[name]) / np.linalg.norm(ref[name])
                assert err <= 1e-4, (name, shape, err, seed)
