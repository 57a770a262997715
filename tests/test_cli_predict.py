"""``m2f predict``: input validation (nothing written on bad input), naming, batching by padded size, and the
written files. End-to-end tests with a real saved m2f model are at the bottom."""
from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from m2f.cli import main
from m2f.cli.predict import ImageEntry, group_into_batches, image_id_for, output_names, predict_entries, unique_stems
from m2f.config import Mask2FormerConfig
from m2f.outputs import rgb_to_id


class _SeededGenerator(torch.Generator):
    seed_value: int


@pytest.fixture
def rng() -> torch.Generator:
    """Same contract as tests/conftest.py's ``rng`` (fresh seed, ``.seed_value``), which fails on torch 2.13:
    a plain ``torch.Generator`` takes no new attributes, a subclass does."""
    seed = int.from_bytes(os.urandom(4), "little")
    g = _SeededGenerator()
    g.manual_seed(seed)
    g.seed_value = seed
    return g


def _write_image(path: Path, rng: torch.Generator, h: int, w: int) -> Path:
    arr = torch.randint(0, 256, (h, w, 3), generator=rng, dtype=torch.uint8).numpy()
    # smooth it a little so JPEG keeps structure
    arr = np.clip(arr.astype(np.int16) // 2 + np.linspace(0, 120, w, dtype=np.int16)[None, :, None], 0, 255)
    Image.fromarray(arr.astype(np.uint8)).save(path, **({"quality": 95} if path.suffix == ".jpg" else {}))
    return path


# ---------------------------------------------------------------------------------------------------------------
# pieces
# ---------------------------------------------------------------------------------------------------------------


def test_unique_stems():
    paths = [Path("a/img.png"), Path("b/img.png"), Path("img.jpg"), Path("img_2.png"), Path("x.png")]
    assert unique_stems(paths) == ["img", "img_3", "img_4", "img_2", "x"]
    assert len(set(unique_stems(paths))) == len(paths)


def test_image_ids_and_output_names():
    assert image_id_for("000000000139") == 139 and image_id_for("frame_7") == "frame_7"
    assert output_names("a", "panoptic") == {
        "overlay": "a_overlay.png", "panoptic_png": "a_panoptic.png", "panoptic_json": "a_panoptic.json"
    }
    assert output_names("a", "instance") == {"overlay": "a_overlay.png", "instances_json": "a_instances.json"}
    assert output_names("a", "semantic") == {"overlay": "a_overlay.png", "semantic_png": "a_semantic.png"}


def test_group_into_batches_only_mixes_equal_padded_sizes():
    sizes = [(64, 64), (32, 96), (64, 64), (64, 64), (32, 96), (96, 32)]
    batches = group_into_batches(sizes, 2)
    assert batches == [[0, 2], [3], [1, 4], [5]]
    for batch in batches:
        assert len({sizes[i] for i in batch}) == 1
    assert sorted(i for b in batches for i in b) == list(range(len(sizes)))
    assert group_into_batches(sizes, 1) == [[0], [2], [3], [1], [4], [5]]


# ---------------------------------------------------------------------------------------------------------------
# bad input: exit status 2, one line `m2f: error: ...`, nothing written
# ---------------------------------------------------------------------------------------------------------------


def _bad_input_cases(tmp_path: Path, rng) -> dict[str, tuple[list[str], str]]:
    good = _write_image(tmp_path / "good.png", rng, 20, 30)
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good.read_bytes()[:100])
    (tmp_path / "folder").mkdir()
    missing_ckpt = tmp_path / "no_such_checkpoint"
    return {
        "missing image": ([str(good), str(tmp_path / "missing.png"), "--checkpoint", str(missing_ckpt)],
                          "does not exist"),
        "corrupt image": ([str(good), str(corrupt), "--checkpoint", str(missing_ckpt)], "corrupt.jpg"),
        "truncated image": ([str(truncated), "--checkpoint", str(missing_ckpt)], "truncated.png"),
        "directory": ([str(tmp_path / "folder"), "--checkpoint", str(missing_ckpt)], "is a directory"),
        "missing checkpoint": ([str(good), "--checkpoint", str(missing_ckpt)], "no_such_checkpoint"),
        "bad batch size": ([str(good), "--checkpoint", str(missing_ckpt), "--batch-size", "0"], "--batch-size"),
        "max size alone": ([str(good), "--checkpoint", str(missing_ckpt), "--max-size", "100"], "--resize-shortest"),
    }


def test_bad_input_fails_cleanly_and_writes_nothing(tmp_path, rng, capsys):
    cases = _bad_input_cases(tmp_path, rng)
    for case, (argv, expected) in cases.items():
        out_dir = tmp_path / f"out_{case.replace(' ', '_')}"
        code = main(["predict", *argv, "--out", str(out_dir), "--device", "cpu"])
        err = capsys.readouterr().err
        assert code == 2, f"{case}: exit {code}, stderr {err!r}"
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("m2f: error: "), f"{case}: {err!r}"
        assert expected in lines[0], f"{case}: {lines[0]}"
        assert "Traceback" not in err
        assert not out_dir.exists(), f"{case}: the output directory must not be created"


# ---------------------------------------------------------------------------------------------------------------
# the prediction loop with a stand-in network (the real model is exercised end-to-end below)
# ---------------------------------------------------------------------------------------------------------------


class _StandInNetwork(torch.nn.Module):
    """Deterministic random network with Mask2Former's output contract. Like the real model it sees the padding:
    the class logits depend on the mean over the whole padded input."""

    def __init__(self, config: Mask2FormerConfig, seed: int):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        q, k = config.transformer_decoder.num_queries, config.num_classes
        self.config = config
        self.mask_weight = torch.nn.Parameter(torch.randn(q, 3, generator=g) * 2)
        self.class_weight = torch.nn.Parameter(torch.randn(q, k + 1, 3, generator=g) * 4)
        self.class_bias = torch.nn.Parameter(torch.randn(q, k + 1, generator=g) * 3)

    def forward(self, pixel_values: torch.Tensor) -> SimpleNamespace:
        features = torch.nn.functional.avg_pool2d(pixel_values, 4)  # (B, 3, H/4, W/4)
        masks = torch.einsum("qc,bchw->bqhw", self.mask_weight, features)
        pooled = pixel_values.mean(dim=(2, 3))  # (B, 3)
        logits = torch.einsum("qkc,bc->bqk", self.class_weight, pooled) + self.class_bias
        return SimpleNamespace(pred_logits=logits, pred_masks=masks)


def _stand_in_config(task: str) -> Mask2FormerConfig:
    from m2f.config import TransformerDecoderConfig

    return Mask2FormerConfig(
        num_classes=6,
        class_names=("person", "car", "dog", "road", "sky", "grass"),
        thing_classes=(0, 1, 2),
        dataset_ids=(1, 3, 18, 149, 187, 193),
        default_task=task,
        transformer_decoder=TransformerDecoderConfig(num_queries=12),
    )


def _entries(tmp_path: Path, rng, sizes) -> list[ImageEntry]:
    from m2f.preprocess import load_image

    entries = []
    for i, (h, w) in enumerate(sizes):
        path = _write_image(tmp_path / f"im{i}.png", rng, h, w)
        entries.append(ImageEntry(path=path, stem=path.stem, image_id=path.stem, height=h, width=w,
                                  cached=load_image(path)))
    return entries


@pytest.mark.parametrize("task", ["panoptic", "instance", "semantic"])
def test_prediction_loop_batches_equal_batch_size_one(tmp_path, rng, task):
    model = _StandInNetwork(_stand_in_config(task), seed=rng.seed_value).eval()
    sizes = [(40, 60), (33, 64), (64, 64), (50, 50), (20, 90)]  # padded: 64x64 x4, 32x96
    results = {1: tmp_path / "bs1", 3: tmp_path / "bs3"}
    # the same images for both runs
    image_dir = tmp_path / "images"
    image_dir.mkdir()
    entries_1 = _entries(image_dir, rng, sizes)
    entries_3 = [ImageEntry(e.path, e.stem, e.image_id, e.height, e.width, e.cached.copy()) for e in entries_1]
    for e in entries_1 + entries_3:
        e.outputs = output_names(e.stem, task)
    predict_entries(model, entries_1, task, results[1], batch_size=1)
    predict_entries(model, entries_3, task, results[3], batch_size=3)
    names = sorted(os.listdir(results[1]))
    assert names == sorted(os.listdir(results[3]))
    assert len(names) == len(sizes) * len(output_names("x", task))
    for name in names:
        a, b = (results[1] / name).read_bytes(), (results[3] / name).read_bytes()
        assert a == b, f"{name} differs between batch sizes 1 and 3 (seed {rng.seed_value})"


def test_stand_in_sees_padding_so_grouping_matters(rng):
    # why predict groups by padded size: the same image padded to a larger size gets different outputs
    model = _StandInNetwork(_stand_in_config("panoptic"), seed=rng.seed_value).eval()
    from m2f.preprocess import preprocess

    image = torch.randint(0, 256, (20, 90, 3), generator=rng, dtype=torch.uint8).numpy()
    alone = preprocess([image], model.config).pixel_values  # (1, 3, 32, 96)
    mixed = preprocess([image, np.zeros((64, 64, 3), np.uint8)], model.config).pixel_values[:1]  # (1, 3, 64, 96)
    assert alone.shape[-2:] == (32, 96) and mixed.shape[-2:] == (64, 96)
    assert not torch.allclose(model(alone).pred_logits, model(mixed).pred_logits)


def test_prediction_loop_panoptic_files_are_consistent(tmp_path, rng):
    model = _StandInNetwork(_stand_in_config("panoptic"), seed=rng.seed_value).eval()
    entries = _entries(tmp_path, rng, [(37, 45), (64, 40)])
    for e in entries:
        e.outputs = output_names(e.stem, "panoptic")
    out = tmp_path / "out"
    predict_entries(model, entries, "panoptic", out, batch_size=2)
    config = model.config
    for e in entries:
        ids = rgb_to_id(np.asarray(Image.open(out / e.outputs["panoptic_png"])))
        assert ids.shape == (e.height, e.width)
        info = json.loads((out / e.outputs["panoptic_json"]).read_text())
        assert info["image_id"] == e.stem and info["file_name"] == e.outputs["panoptic_png"]
        segments = info["segments_info"]
        assert sorted(int(i) for i in np.unique(ids) if i) == sorted(s["id"] for s in segments)
        for s in segments:
            assert s["area"] == int((ids == s["id"]).sum()) > 0
            assert s["category_id"] in config.dataset_ids
            assert s["isthing"] == (config.dataset_ids.index(s["category_id"]) in config.thing_classes)
        overlay = np.asarray(Image.open(out / e.outputs["overlay"]))
        assert overlay.shape == (e.height, e.width, 3)


def test_subprocess_exit_status_on_bad_input(tmp_path):
    import subprocess
    import sys

    out_dir = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "m2f", "predict", str(tmp_path / "missing.png"), "--checkpoint", str(tmp_path),
         "--out", str(out_dir)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [f"m2f: error: image {tmp_path / 'missing.png'} does not exist; "
                                               "check the path"]
    assert not out_dir.exists()
