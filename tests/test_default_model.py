"""The shipped default model (m2f/assets/default): loads, is small, and still segments unseen synthetic scenes.

TRAINING.md records PQ 88.30 on 200 images of seed 2; this checks a 40-image slice of the same unseen seed with the
same `m2f eval` path, so that a broken asset, converter or post-processing change shows up in CI.
"""
from __future__ import annotations

import json

import m2f
from m2f.assets import default_checkpoint_path, sample_images
from m2f.cli import main


def test_default_model_is_small_and_loads():
    path = default_checkpoint_path()
    assert (path / "model.safetensors").stat().st_size <= 20 * 2**20
    assert (path / "TRAINING.md").is_file()
    model = m2f.from_pretrained(path)
    assert not model.training
    assert model.config.num_classes == 6 and len(sample_images()) >= 2


def test_default_model_pq_on_unseen_synthetic_scenes(tmp_path, capsys):
    data, report = tmp_path / "synth-test", tmp_path / "pq.json"
    assert main(["data", "synth", "--out", str(data), "--num", "40", "--seed", "2"]) == 0
    assert main(["eval", "--data", str(data), "--json", str(report), "--quiet"]) == 0
    result = json.loads(report.read_text())
    print(f"default model on 40 images of seed 2: PQ {result['PQ']:.2f} (things {result['PQ_th']:.2f}, "
          f"stuff {result['PQ_st']:.2f})")
    assert result["num_images"] == 40
    assert result["PQ"] >= 80.0, result
