"""`m2f export ...` on bad input: one line on stderr, exit status 2, no traceback, no file left behind."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from m2f.cli import main


def _run(capsys, argv: list[str]) -> tuple[int, str, str]:
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def _assert_one_line_error(code: int, err: str, *needles: str) -> None:
    assert code == 2, err
    lines = [l for l in err.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("m2f: error: "), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], lines[0]


def _files(tmp_path: Path) -> set[str]:
    return {p.name for p in tmp_path.iterdir()}


def test_missing_checkpoint(tmp_path, capsys):
    code, _, err = _run(capsys, ["export", "onnx", "--checkpoint", str(tmp_path / "nope.safetensors"),
                                 "--output", str(tmp_path / "m.onnx")])
    _assert_one_line_error(code, err, "nope.safetensors", "does not exist")
    assert _files(tmp_path) == set()


@pytest.mark.parametrize("height,width", [(100, 128), (128, 200), (0, 128)])
def test_size_not_multiple_of_32(tmp_path, capsys, height, width):
    ckpt = tmp_path / "ckpt.safetensors"
    ckpt.write_bytes(b"irrelevant: the size is checked first")
    code, _, err = _run(capsys, ["export", "onnx", "--checkpoint", str(ckpt), "--output", str(tmp_path / "m.onnx"),
                                 "--height", str(height), "--width", str(width)])
    _assert_one_line_error(code, err, "multiples of 32")
    assert _files(tmp_path) == {"ckpt.safetensors"}


@pytest.mark.parametrize("opset", ["11", "17", "30"])
def test_unsupported_opset(tmp_path, capsys, opset):
    code, _, err = _run(capsys, ["export", "onnx", "--checkpoint", str(tmp_path / "c"), "--output",
                                 str(tmp_path / "m.onnx"), "--opset", opset])
    _assert_one_line_error(code, err, f"opset {opset}", "18..24")
    assert _files(tmp_path) == set()


@pytest.mark.parametrize("flag,value,needle", [("--msda", "fused", "--msda"), ("--postprocess", "panoptic", "--postprocess"),
                                               ("--target", "tflite", "--target"), ("--batch", "0", "--batch")])
def test_bad_choices(tmp_path, capsys, flag, value, needle):
    code, _, err = _run(capsys, ["export", "onnx", "--checkpoint", str(tmp_path / "c"), "--output",
                                 str(tmp_path / "m.onnx"), flag, value])
    _assert_one_line_error(code, err, needle)


def test_existing_output_needs_force(tmp_path, capsys):
    out = tmp_path / "m.onnx"
    out.write_bytes(b"keep me")
    code, _, err = _run(capsys, ["export", "onnx", "--checkpoint", str(tmp_path / "c"), "--output", str(out)])
    _assert_one_line_error(code, err, "already exists", "--force")
    assert out.read_bytes() == b"keep me"


def test_check_and_triton_repo_and_tensorrt_bad_input(tmp_path, capsys):
    code, _, err = _run(capsys, ["export", "check", str(tmp_path / "missing.onnx")])
    _assert_one_line_error(code, err, "missing.onnx", "not found")
    code, _, err = _run(capsys, ["export", "triton-repo", "--model", str(tmp_path / "m.onnx"), "--output",
                                 str(tmp_path / "repo")])
    _assert_one_line_error(code, err, "not found")
    code, _, err = _run(capsys, ["export", "tensorrt", "--onnx", str(tmp_path / "m.onnx"), "--output",
                                 str(tmp_path / "m.engine"), "--min-shape", "1x3x100x100"])
    # the exported model's manifest holds the divisibility a shape is checked against (test_export_tools)
    _assert_one_line_error(code, err, "m.onnx", "not found")
    code, _, err = _run(capsys, ["export", "tensorrt", "--onnx", str(tmp_path / "m.onnx"), "--output",
                                 str(tmp_path / "m.engine"), "--int8"])
    _assert_one_line_error(code, err)
    assert _files(tmp_path) == set()


def test_real_subprocess_one_line_error(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "M2F_DEBUG"}
    proc = subprocess.run(
        [sys.executable, "-m", "m2f", "export", "onnx", "--checkpoint", str(tmp_path / "missing"), "--output",
         str(tmp_path / "m.onnx"), "--height", "500"],
        capture_output=True, text=True, env=env, timeout=300,
    )
    _assert_one_line_error(proc.returncode, proc.stderr, "multiples of 32")
    assert proc.stdout == "" and _files(tmp_path) == set()
