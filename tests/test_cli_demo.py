"""``m2f demo``: segments the bundled samples, exports, verifies ONNX Runtime against PyTorch, writes a summary."""
from __future__ import annotations

import json

from m2f.cli import main


def test_demo_writes_predictions_and_verifies_the_onnx_export(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--repeats", "1"]) == 0
    summary = json.loads((out / "demo.json").read_text())
    samples = summary["images"]
    assert len(samples) >= 2
    overlays = [name for name in summary["outputs"] if name.endswith("_overlay.png")]
    assert len(overlays) == len(samples)
    for name in summary["outputs"]:
        assert (out / name).stat().st_size > 0
    onnx = summary["onnx"]
    assert onnx["rel_err"]["pred_logits"] <= 1e-4 and onnx["rel_err"]["pred_masks"] <= 1e-4, onnx
    assert onnx["identical_panoptic"] == f"{len(samples)}/{len(samples)}", onnx
    assert (out / "model.onnx").stat().st_size > 0
    assert set(summary["timings_ms"]) == {"PyTorch eager", "ONNX Runtime"}
    assert "ONNX Runtime" in capsys.readouterr().out


def test_demo_replaces_its_output_dir_only_on_success(tmp_path, capsys):
    out = tmp_path / "demo"
    out.mkdir()
    (out / "old.txt").write_text("kept until a run succeeds")
    assert main(["demo", "--out", str(out), "--repeats", "0"]) == 2  # rejected before any work
    assert "--repeats must be at least 1" in capsys.readouterr().err
    assert (out / "old.txt").exists()
    # a file the demo did not write is never deleted: the folder is refused, kept as it was
    assert main(["demo", "--out", str(out), "--repeats", "1", "--no-export"]) == 2
    assert "holds old.txt, which `m2f demo` did not write" in capsys.readouterr().err
    assert (out / "old.txt").read_text() == "kept until a run succeeds"
    # an earlier demo's folder is replaced as a whole: none of its files stays stale
    (out / "old.txt").unlink()
    (out / "predictions").mkdir()
    (out / "predictions" / "gone_overlay.png").write_bytes(b"an earlier demo's")
    assert main(["demo", "--out", str(out), "--repeats", "1", "--no-export"]) == 0
    assert not (out / "predictions" / "gone_overlay.png").exists() and (out / "demo.json").exists()
