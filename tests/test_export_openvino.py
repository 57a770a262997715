"""The OpenVINO target: `m2f export openvino` (static / dynamic, fp32 / fp16) of a tiny model and int8 (NNCF) of the
default model, its manifest and atomic directory, `m2f export check` against PyTorch, `m2f predict --openvino`,
`m2f eval --openvino`, `m2f bench model --openvino --onnx`, and the one-line refusals."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from m2f.cli import main
from m2f.errors import InputError
from m2f.export.manifest import manifest_path, read_manifest
from tests.utils import fresh_seed, save_tiny_checkpoint

pytest.importorskip("openvino")
pytest.importorskip("onnxruntime")

HEIGHT, WIDTH = 64, 96


def _cli(capsys, argv: list[str]) -> tuple[int, str, str]:
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _one_line_error(code: int, err: str, *needles: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("m2f: error: "), err
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory, "openvino_tiny_checkpoint")


@pytest.fixture(scope="module")
def exported(tiny_checkpoint, tmp_path_factory):
    """The tiny model as a static ONNX file, and fp32 and fp16 OpenVINO directories converted from it."""
    from m2f.export.onnx_export import export_checkpoint
    from m2f.export.targets.openvino import build_openvino

    work = tmp_path_factory.mktemp("ov")
    ckpt, seed = tiny_checkpoint
    onnx_path = export_checkpoint(ckpt, work / "tiny.onnx", height=HEIGHT, width=WIDTH, target="openvino").path
    fp32 = build_openvino(onnx_path, work / "tiny_ov")
    fp16 = build_openvino(onnx_path, work / "tiny_ov_fp16", precision="fp16")
    return onnx_path, fp32, fp16, seed


def test_export_writes_one_directory_with_its_manifest(exported):
    onnx_path, fp32, fp16, _ = exported
    assert sorted(p.name for p in fp32.iterdir()) == ["manifest.json", "model.bin", "model.xml"]
    assert not [p for p in fp32.parent.iterdir() if p.name.startswith(".")]  # no temporary left
    manifest = read_manifest(fp32, kind="openvino")
    source = read_manifest(onnx_path, kind="onnx")
    assert manifest_path(fp32) == fp32 / "manifest.json"
    assert (manifest.kind, manifest.target, manifest.precision) == ("openvino", "openvino", "fp32")
    assert manifest.outputs == source.outputs and manifest.config == source.config and manifest.ops == source.ops
    assert manifest.details["source_onnx"] == str(onnx_path.resolve()) and manifest.versions["openvino"]
    assert read_manifest(fp16, kind="openvino").precision == "fp16"
    assert (fp16 / "model.bin").stat().st_size < 0.7 * (fp32 / "model.bin").stat().st_size  # float16 weights


def test_check_compares_openvino_with_pytorch(exported, tiny_checkpoint, tmp_path, capsys):
    _, fp32, fp16, seed = exported
    code, out, err = _cli(capsys, ["export", "check", str(fp32), "--report", str(tmp_path / "r.json")])
    assert code == 0, (out, err)
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["format"] == "m2f-check-report/1" and report["target"] == "openvino"
    assert report["verdict"] == "pass" and report["parity"]["rtol"] == 1e-4, report
    for run in report["parity"]["runs"]:
        for name, entry in run["outputs"].items():
            if "rel_err" in entry:
                assert entry["rel_err"] <= 1e-4, (name, entry, f"model seed {seed}, input seed {run['seed']}")
    from m2f.export.check import check_model

    # float16 weights: within fp16's bound (the verdict is not asserted: the semantic agreement of a tiny random
    # model sits on near-ties)
    half = check_model(fp16)
    assert half.parity["rtol"] == 2e-2
    for run in half.parity["runs"]:
        for name in ("pred_logits", "pred_masks"):
            assert run["outputs"][name]["rel_err"] <= 2e-2, (name, run["outputs"][name], f"model seed {seed}")


def test_dynamic_export_from_the_checkpoint(tiny_checkpoint, tmp_path, capsys):
    ckpt, seed = tiny_checkpoint
    out = tmp_path / "dyn_ov"
    code, printed, err = _cli(capsys, ["export", "openvino", "--checkpoint", str(ckpt), "--output", str(out),
                                       "--height", str(HEIGHT), "--width", str(WIDTH), "--dynamic"])
    assert code == 0, err
    assert "openvino, fp32" in printed and sorted(p.name for p in tmp_path.iterdir()) == ["dyn_ov"]
    from m2f.export.check import check_model

    report = check_model(out)
    sizes = {(r["batch"], r["height"], r["width"]) for r in report.parity["runs"]}
    assert report.verdict == "pass" and len(sizes) == 2, (report.reasons, f"model seed {seed}")


def test_predict_and_eval_run_the_openvino_model(exported, tiny_checkpoint, tmp_path, capsys):
    _, fp32, _, seed = exported
    ckpt, _ = tiny_checkpoint
    data = tmp_path / "data"
    assert main(["data", "synth", "--out", str(data), "--num", "3", "--seed", str(seed % 1000),
                 "--size", f"{HEIGHT}x{WIDTH}"]) == 0
    images = sorted(str(p) for p in (data / "images").iterdir())
    results = {}
    for flag, model in (("--checkpoint", ckpt), ("--openvino", fp32)):
        out = tmp_path / flag.strip("-")
        code, _, err = _cli(capsys, ["predict", *images, flag, str(model), "--out", str(out), "--task", "semantic",
                                     "--no-resize", "--quiet"])
        assert code == 0, err
        results[flag] = [np.asarray(Image.open(p)) for p in sorted(out.glob("*_semantic.png"))]
    for ref, got in zip(results["--checkpoint"], results["--openvino"]):
        assert np.mean(ref == got) > 0.99, f"seed {seed}"  # near-ties of the argmax may flip a few pixels
    # eval: the OpenVINO model scored against its PyTorch model as the ground truth
    code, _, err = _cli(capsys, ["eval", "--data", str(data), "--openvino", str(fp32), "--reference-checkpoint",
                                 str(ckpt), "--task", "semantic", "--json", str(tmp_path / "m.json"), "--quiet"])
    assert code == 0, err
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert metrics["model"] == str(fp32) and metrics["reference"] == str(ckpt)
    assert metrics["pACC"] > 99.0, (metrics, f"seed {seed}")  # same pixels up to near-ties of the argmax


def test_bench_model_times_openvino_onnxruntime_and_pytorch_in_one_run(exported, tiny_checkpoint, tmp_path, capsys):
    onnx_path, fp32, _, seed = exported
    ckpt, _ = tiny_checkpoint
    code, out, err = _cli(capsys, ["bench", "model", "--openvino", str(fp32), "--onnx", str(onnx_path),
                                   "--checkpoint", str(ckpt), "--out", str(tmp_path), "--rep-ms", "20",
                                   "--warmup-ms", "0", "--seed", str(seed)])
    assert code == 0, err
    result = json.loads(next(tmp_path.glob("*-model.json")).read_text())
    rows = {r["backend"]: r for r in result["rows"]}
    assert set(rows) == {"m2f-torch", "openvino", "onnxruntime"}, rows
    assert rows["openvino"]["extra"]["model"] == str(fp32)
    for row in rows.values():
        assert row["median_ms"] > 0 and row["rel_err"] <= 1e-4, (row, f"seed {seed}")


@pytest.mark.parametrize("extra,needle", [
    (["--precision", "int4"], "--precision must be one of fp32, fp16, int8"),
    (["--precision", "int8"], "--precision int8 needs --calib DIR"),
])
def test_bad_options_are_one_line_and_write_nothing(exported, tmp_path, capsys, extra, needle):
    onnx_path = exported[0]
    out = tmp_path / "ov"
    code, _, err = _cli(capsys, ["export", "openvino", "--onnx", str(onnx_path), "--output", str(out), *extra])
    _one_line_error(code, err, needle)
    assert list(tmp_path.iterdir()) == []


def test_plugin_graphs_and_tampered_directories_are_refused(exported, tmp_path, capsys):
    import shutil

    from m2f.export.targets.openvino import build_openvino

    onnx_path, fp32, _, _ = exported
    plugin = tmp_path / "plugin.onnx"
    shutil.copyfile(onnx_path, plugin)
    manifest = json.loads(manifest_path(onnx_path).read_text())
    manifest["ops"]["masked_attn"]["mode"] = "plugin"
    manifest_path(plugin).write_text(json.dumps(manifest))
    with pytest.raises(InputError, match="TensorRT plugin nodes .*masked_attn.* --target openvino"):
        build_openvino(plugin, tmp_path / "never")
    assert not (tmp_path / "never").exists()

    tampered = tmp_path / "tampered"
    shutil.copytree(fp32, tampered)
    data = bytearray((tampered / "model.bin").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (tampered / "model.bin").write_bytes(bytes(data))
    code, _, err = _cli(capsys, ["export", "check", str(tampered)])
    _one_line_error(code, err, str(tampered), "does not match its manifest", "re-export")


def test_int8_export_of_the_default_model_passes_check(tmp_path, capsys):
    """NNCF quantizes the shipped default model (calibrated on fresh synthetic images) and the IR passes
    `m2f export check` within the int8 bound, against the float32 PyTorch model (about 45 s on 2 shared cores)."""
    pytest.importorskip("nncf")
    from m2f.assets import default_checkpoint_path
    from m2f.export.check import FLOAT_RTOL

    seed = fresh_seed("openvino_int8_calib")
    calib = tmp_path / "calib"
    assert main(["data", "synth", "--out", str(calib), "--num", "4", "--seed", str(seed), "--size", "64x64",
                 "--quiet"]) == 0
    out = tmp_path / "ov_int8"
    code, stdout, err = _cli(capsys, ["export", "openvino", "--checkpoint", str(default_checkpoint_path()),
                                      "--output", str(out), "--height", "64", "--width", "64", "--precision", "int8",
                                      "--calib", str(calib / "images"), "--quiet"])
    assert code == 0, err
    # --quiet: the result lines only (the synth's and the export's), no progress, NNCF's bars included
    assert err == "" and [line.split()[0] for line in stdout.splitlines()] == ["wrote", "wrote"], (stdout, err)
    manifest = read_manifest(out, kind="openvino")
    assert manifest.precision == "int8" and "FakeQuantize nodes" in manifest.details["precision_note"], manifest
    code, stdout, err = _cli(capsys, ["export", "check", str(out), "--report", str(tmp_path / "r.json")])
    report = json.loads((tmp_path / "r.json").read_text())
    assert code == 0 and report["verdict"] == "pass", (stdout, err, f"calibration seed {seed}")
    assert report["parity"]["rtol"] == FLOAT_RTOL["int8"] and "int8 quantized layers" in stdout, stdout
    for run in report["parity"]["runs"]:
        for name, entry in run["outputs"].items():
            if "rel_err" in entry:
                assert entry["rel_err"] <= FLOAT_RTOL["int8"], (name, entry, f"calibration seed {seed}")


def test_int8_without_nncf_is_one_line_before_any_work(exported, tmp_path, capsys, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "nncf", None)  # as if not installed: `import nncf` raises ImportError
    (tmp_path / "calib").mkdir()
    out = tmp_path / "ov"
    for source in (["--onnx", str(exported[0])], ["--checkpoint", str(exported[0].parent / "never-read")]):
        code, _, err = _cli(capsys, ["export", "openvino", *source, "--output", str(out), "--precision", "int8",
                                     "--calib", str(tmp_path / "calib")])
        _one_line_error(code, err, "--precision int8 quantizes with NNCF, which is not installed: pip install nncf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calib"]
