"""``m2f convert``: round trip from a HF directory, refusal to overwrite, one-line errors for bad inputs."""
from __future__ import annotations

import random
import subprocess
import sys

import pytest
import torch

import m2f
from m2f.cli import main
from tests.utils import d2_config, fresh_seed, hf_resnet_backbone, official_state, tiny_hf_model, write_pkl


def test_convert_hf_round_trip(tmp_path, rng, capsys):
    hf = tiny_hf_model(hf_resnet_backbone(), rng)
    hf.save_pretrained(tmp_path / "hf")
    assert main(["convert", str(tmp_path / "hf"), "--output", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out.strip()
    assert len(out.splitlines()) == 1 and "5 classes" in out and "7 queries" in out and "parameters" in out
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["m2f_config.json", "model.safetensors"]
    a, b = m2f.from_pretrained(tmp_path / "hf"), m2f.from_pretrained(tmp_path / "out")
    assert a.config == b.config
    x = torch.randn(1, 3, 64, 96, generator=rng)
    with torch.no_grad():
        ya, yb = a(x), b(x)
    torch.testing.assert_close(ya.pred_logits, yb.pred_logits, rtol=0, atol=0)
    torch.testing.assert_close(ya.pred_masks, yb.pred_masks, rtol=0, atol=0)

    # refuses to overwrite without --force, and leaves the existing output untouched
    before = (tmp_path / "out" / "model.safetensors").read_bytes()
    assert main(["convert", str(tmp_path / "hf"), "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("m2f: error: ") and "--force" in err and len(err.strip().splitlines()) == 1
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == before
    # --force overwrites; converting our own format again works too
    assert main(["convert", str(tmp_path / "out"), "--output", str(tmp_path / "out2")]) == 0
    assert main(["convert", str(tmp_path / "hf"), "--output", str(tmp_path / "out"), "--force"]) == 0
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".partial")]


def _bad_sources(d):
    (d / "rand.bin").write_bytes(random.Random(fresh_seed()).randbytes(512).replace(b"\x80", b"\x01").replace(b"PK", b"pk"))
    (d / "notes.txt").write_text("not a model\n")
    (d / "vit").mkdir()
    (d / "vit" / "config.json").write_text('{"model_type": "vit", "hidden_size": 8}')
    return {"missing": d / "missing", "random-bytes": d / "rand.bin", "text": d / "notes.txt", "other-model": d / "vit"}


@pytest.mark.parametrize("which", ["missing", "random-bytes", "text", "other-model"])
def test_convert_bad_inputs_fail_cleanly(tmp_path, capsys, which):
    src = _bad_sources(tmp_path)[which]
    out = tmp_path / "sub" / "out"
    assert main(["convert", str(src), "--output", str(out)]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert err.startswith("m2f: error: ") and len(err.splitlines()) == 1, err
    assert "Traceback" not in captured.err and captured.out == ""
    assert not out.exists() and not (tmp_path / "sub").exists()


def test_convert_unknown_preset(tmp_path, capsys):
    (tmp_path / "x.pkl").write_bytes(b"\x80\x02}q\x00.")
    assert main(["convert", str(tmp_path / "x.pkl"), "--output", str(tmp_path / "o"), "--preset", "r51-coco"]) == 2
    assert "unknown preset 'r51-coco'" in capsys.readouterr().err


def test_python_m_m2f_convert_exit_code_and_stderr(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "m2f", "convert", str(tmp_path / "missing"), "--output", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("m2f: error: ") and "does not exist" in lines[0]
    assert "Traceback" not in proc.stderr and not (tmp_path / "out").exists()


def _tiny_d2_checkpoint(tmp_path, rng):

    return write_pkl(tmp_path / "model_final.pkl", official_state(d2_config(), rng))


def test_convert_detectron2_without_preset_asks_for_one(tmp_path, rng, capsys):
    src = _tiny_d2_checkpoint(tmp_path, rng)
    assert main(["convert", str(src), "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--preset" in err and "m2f presets" in err
    assert not (tmp_path / "out").exists()


def test_convert_detectron2_with_a_preset_of_another_size(tmp_path, rng, capsys):
    pytest.importorskip("m2f.labels", reason="presets need m2f.labels (written on another branch)")
    src = _tiny_d2_checkpoint(tmp_path, rng)
    # every difference is reported on one line, nothing is written
    assert main(["convert", str(src), "--output", str(tmp_path / "out"), "--preset", "r50-coco-panoptic"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("m2f: error: ") and len(err.splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "out").exists()
