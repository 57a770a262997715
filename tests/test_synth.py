"""The synthetic dataset generator: deterministic by seed, valid COCO panoptic, readable by the loaders."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from m2f.cli import main
from m2f.data.datasets import open_dataset
from m2f.data.synth import render_scene, rgb_to_id, write_dataset


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_different_seed_differs(tmp_path):
    a = write_dataset(tmp_path / "a", num=4, seed=11, size=(64, 80))
    b = write_dataset(tmp_path / "b", num=4, seed=11, size=(64, 80))
    c = write_dataset(tmp_path / "c", num=4, seed=12, size=(64, 80))
    fa, fb, fc = _files(a), _files(b), _files(c)
    assert len(fa) == 9  # 4 images, 4 panoptic PNGs, 1 json
    assert fa == fb
    assert fa.keys() == fc.keys()
    assert all(fa[k] != fc[k] for k in fa if k.endswith(".png"))


def test_scene_depends_only_on_seed_and_index():
    one = render_scene(5, 3, 64, 64)
    again = render_scene(5, 3, 64, 64)
    assert np.array_equal(one.image, again.image) and np.array_equal(one.segment_ids, again.segment_ids)
    assert not np.array_equal(one.image, render_scene(5, 4, 64, 64).image)


def test_panoptic_annotations_are_consistent(tmp_path):
    out = write_dataset(tmp_path / "d", num=6, seed=3)
    meta = json.loads((out / "panoptic.json").read_text())
    cats = {c["id"]: c for c in meta["categories"]}
    assert {c["isthing"] for c in cats.values()} == {0, 1}
    things_seen = 0
    for img, ann in zip(meta["images"], meta["annotations"]):
        assert img["id"] == ann["image_id"] and (img["height"], img["width"]) == (128, 128)
        rgb = np.asarray(Image.open(out / "images" / img["file_name"]))
        assert rgb.shape == (128, 128, 3) and rgb.dtype == np.uint8
        ids = rgb_to_id(np.asarray(Image.open(out / "panoptic" / ann["file_name"])))
        present = {int(i) for i in np.unique(ids)} - {0}
        assert present == {s["id"] for s in ann["segments_info"]}
        per_class = {}
        for s in ann["segments_info"]:
            assert s["area"] == int((ids == s["id"]).sum()) > 0
            assert s["category_id"] in cats and s["iscrowd"] == 0
            per_class.setdefault(s["category_id"], 0)
            per_class[s["category_id"]] += 1
            if cats[s["category_id"]]["isthing"]:
                things_seen += 1
        # stuff classes have one segment per image
        assert all(n == 1 for c, n in per_class.items() if not cats[c]["isthing"])
    assert things_seen >= 6


def test_loader_reads_generated_dataset(tmp_path):
    out = write_dataset(tmp_path / "d", num=3, seed=9)
    ds = open_dataset(out)
    assert ds.format == "panoptic" and len(ds) == 3 and ds.num_classes == 6
    sample = ds[1]
    assert sample.image.shape == (128, 128, 3)
    assert sample.masks.shape[0] == len(sample.labels) > 0
    assert not (sample.masks.sum(0) > 1).any()  # panoptic segments do not overlap


def test_cli_synth_and_refuses_to_overwrite(tmp_path, capsys):
    out = tmp_path / "s"
    assert main(["data", "synth", "--out", str(out), "--num", "2", "--seed", "1", "--size", "64x64"]) == 0
    assert (out / "panoptic.json").is_file()
    assert main(["data", "synth", "--out", str(out), "--num", "2"]) == 2
    assert "already exists" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["--size", "12x"], ["--size", "8x8"], ["--num", "0"], ["--seed", "-1"]])
def test_cli_synth_bad_arguments(tmp_path, capsys, argv):
    out = tmp_path / "bad"
    assert main(["data", "synth", "--out", str(out), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("m2f: error:") and "\n" not in err and "Traceback" not in err
    assert not out.exists() and not list(tmp_path.iterdir())


def test_bundled_samples_are_synth_seed_4242():
    """The demo images shipped in m2f/assets/samples are scenes 0.. of seed 4242 (never used to train or evaluate)."""
    from m2f.assets import sample_images

    paths = sample_images()
    assert len(paths) >= 3
    for i, path in enumerate(paths):
        assert path.name == f"synth_4242_{i}.png"
        assert np.array_equal(np.asarray(Image.open(path)), render_scene(4242, i).image)
