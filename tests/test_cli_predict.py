"""``m2f predict``: input validation (nothing written on bad input), naming, batching by padded size, and the
written files. End-to-end tests with a real saved m2f model are at the bottom."""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from m2f.cli import main
from m2f.cli.predict import ImageEntry, group_into_batches, image_ids_for, output_names, predict_entries, unique_stems
from m2f.config import Mask2FormerConfig
from m2f.outputs import rgb_to_id
from tests.utils import fresh_seed, resnet_config




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
    assert image_ids_for(["000000000139", "000000000285"]) == [139, 285], "COCO file names keep COCO's ids"
    assert image_ids_for(["139", "frame_7"]) == [1, 2] and image_ids_for(["7", "007"]) == [1, 2], "else 1, 2, ..."
    assert output_names("a", "panoptic") == {
        "overlay": "a_overlay.png", "panoptic_png": "a_panoptic.png", "panoptic_json": "a_panoptic.json",
        "panoptic_color": "a_panoptic_color.png",
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
        "folder without images": ([str(tmp_path / "folder"), "--checkpoint", str(missing_ckpt)],
                                  "folder holds no images or videos"),
        "url": (["https://example.com/cat.jpg", "--checkpoint", str(missing_ckpt)],
                "https://example.com/cat.jpg is a URL; m2f reads local files only: download it first"),
        "pattern matching nothing": ([str(tmp_path / "nothing*.jpg"), "--checkpoint", str(missing_ckpt)],
                                     "matches no file"),
        "bad --every": ([str(good), "--every", "0", "--checkpoint", str(missing_ckpt)], "--every must be at least 1"),
        "missing checkpoint": ([str(good), "--checkpoint", str(missing_ckpt)], "no_such_checkpoint"),
        "bad batch size": ([str(good), "--checkpoint", str(missing_ckpt), "--batch-size", "0"], "--batch-size"),
        "no resize and a size": ([str(good), "--checkpoint", str(missing_ckpt), "--no-resize", "--max-size", "100"],
                                 "--no-resize contradicts --resize-shortest / --max-size"),
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
        test_size=(48, 160),  # about the test images' size: no notes on them
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
        _assert_same_output(results[1] / name, results[3] / name, f"{name}, batch sizes 1 and 3, seed {rng.seed_value}")


def _assert_same_output(a: Path, b: Path, what: str) -> None:
    """Equal up to float32 batch-reduction noise: a batch of 3 sums in another order than a batch of 1, so scores
    may differ in the last bits (seen: 1e-7) and a pixel on a near-tie may flip; structure must be identical."""
    if a.suffix == ".json":
        _assert_json_close(json.loads(a.read_text()), json.loads(b.read_text()), what)
    else:
        pa, pb = np.asarray(Image.open(a)), np.asarray(Image.open(b))
        assert pa.shape == pb.shape, what
        differing = np.any(pa != pb, axis=-1) if pa.ndim == 3 else pa != pb
        assert differing.mean() <= 1e-3, f"{what}: {differing.mean():.2%} of pixels differ"


def _assert_json_close(a, b, what: str) -> None:
    if isinstance(a, float) or isinstance(b, float):
        assert abs(a - b) <= 1e-5 * max(abs(a), abs(b)) + 1e-6, f"{what}: {a} != {b}"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), f"{what}: keys {sorted(a)} != {sorted(b)}"
        for key in a:
            _assert_json_close(a[key], b[key], f"{what} [{key!r}]")
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), f"{what}: lengths differ"
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_json_close(x, y, f"{what} [{i}]")
    else:
        assert a == b, f"{what}: {a!r} != {b!r}"


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


# ---------------------------------------------------------------------------------------------------------------
# end to end: a tiny random m2f model saved with save_pretrained, run through `m2f predict`
# ---------------------------------------------------------------------------------------------------------------

# (H, W) and format: padded sizes 64x64 (four images) and 32x96 (one)
E2E_IMAGES = [("a.png", 40, 60), ("b.jpg", 33, 64), ("c.png", 64, 64), ("d.jpg", 50, 50), ("e.png", 20, 90)]


@pytest.fixture(scope="module")
def e2e_images(tmp_path_factory) -> list[Path]:
    g = torch.Generator()
    g.manual_seed(fresh_seed("e2e_images"))
    folder = tmp_path_factory.mktemp("images")
    return [_write_image(folder / name, g, h, w) for name, h, w in E2E_IMAGES]


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory, e2e_images) -> tuple[Path, int]:
    """A small random Mask2Former (ResNet backbone), saved with m2f's save_pretrained.

    At its initialisation every query of a random decoder gives about the same output (so all say "no object", or
    all overlap and fail the overlap test): spread the query features and sharpen the class and mask heads, and
    draw fresh seeds until the first test image gets at least one panoptic segment, so the tests see real ones.
    """
    import m2f
    from m2f.checkpoints.native import save_pretrained
    from m2f.postprocess import panoptic
    from m2f.preprocess import load_image, preprocess

    config = resnet_config(
        hidden_sizes=(16, 32, 48, 64), dim=32, heads=4, ffn_dim=64, queries=10, decoder_layers=2,
        pixel_decoder={"norm_groups": 8},
        num_classes=6,
        class_names=("person", "car", "dog", "road", "sky", "grass"),
        thing_classes=(0, 1, 2),
        dataset_ids=(1, 3, 18, 149, 187, 193),
        default_task="panoptic",
        test_size=(48, 160),
        name="tiny-test",
    )
    probe = preprocess([load_image(e2e_images[0])], config)
    seeds = []
    for _ in range(30):
        seed = fresh_seed("tiny_checkpoint")
        seeds.append(seed)
        torch.manual_seed(seed)
        model = m2f.build_model(config).eval()
        with torch.no_grad():
            decoder = model.transformer_decoder
            decoder.query_feat.weight.normal_(0.0, 3.0)
            decoder.class_embed.weight.mul_(10.0)
            decoder.mask_embed.layers[-1].weight.mul_(10.0)
            out = model(probe.pixel_values)
        (result,) = panoptic(out.pred_logits, out.pred_masks, probe.image_sizes, probe.original_sizes,
                             probe.padded_size, thing_classes=config.thing_classes)
        if result.segments:
            path = tmp_path_factory.mktemp("ckpt") / "tiny"
            save_pretrained(model, path)
            return path, seed
    raise AssertionError(f"no random model among seeds {seeds} gave a panoptic segment")


def _predict(images, checkpoint, out, *extra) -> int:
    # at their own sizes (the padded-size groups of E2E_IMAGES) unless a test resizes
    resize = [] if "--resize-shortest" in extra else ["--no-resize"]
    return main(["predict", *map(str, images), "--checkpoint", str(checkpoint), "--out", str(out), "--device", "cpu",
                 *resize, *extra])


@pytest.mark.parametrize("task", ["panoptic", "instance", "semantic"])
def test_e2e_predict_writes_every_file(tmp_path, tiny_checkpoint, e2e_images, task, capsys):
    from pycocotools import mask as mask_util

    checkpoint, seed = tiny_checkpoint
    out = tmp_path / "out"
    assert _predict(e2e_images, checkpoint, out, "--task", task) == 0, capsys.readouterr().err
    index = json.loads((out / "predictions.json").read_text())
    run_info = index["info"]
    assert run_info["task"] == task and run_info["model"] == "tiny-test" and len(index["images"]) == len(e2e_images)
    assert [c["name"] for c in index["categories"]] == ["person", "car", "dog", "road", "sky", "grass"]
    expected_files = {"predictions.json"}
    config_ids = (1, 3, 18, 149, 187, 193)
    nonempty = 0
    for image_id, (item, (name, h, w)) in enumerate(zip(index["images"], E2E_IMAGES), start=1):
        stem = Path(name).stem
        assert item["path"].endswith(name) and item["file_name"] == name and item["id"] == image_id
        assert (item["height"], item["width"]) == (h, w)
        names = output_names(stem, task)
        assert {k: item[k] for k in names} == names
        expected_files.update(names.values())
        overlay = np.asarray(Image.open(out / names["overlay"]))
        assert overlay.shape == (h, w, 3) and overlay.dtype == np.uint8
        if task == "panoptic":
            ids = rgb_to_id(np.asarray(Image.open(out / names["panoptic_png"])))
            info = json.loads((out / names["panoptic_json"]).read_text())
            assert ids.shape == (h, w) and info["file_name"] == names["panoptic_png"] and info["image_id"] == image_id
            assert sorted(int(i) for i in np.unique(ids) if i) == sorted(s["id"] for s in info["segments_info"])
            for s in info["segments_info"]:
                assert s["area"] == int((ids == s["id"]).sum()) > 0
                assert s["category_id"] in config_ids and 0.8 < s["score"] <= 1.0
            nonempty += bool(info["segments_info"])
        elif task == "instance":
            anns = json.loads((out / names["instances_json"]).read_text())
            assert len(anns) > 0
            for ann in anns:
                assert ann["image_id"] == image_id and ann["category_id"] in (1, 3, 18), "panoptic model: things only"
                rle = {"size": ann["segmentation"]["size"], "counts": ann["segmentation"]["counts"].encode()}
                assert mask_util.decode(rle).shape == (h, w)
            assert [a["score"] for a in anns] == sorted((a["score"] for a in anns), reverse=True)
            nonempty += 1
        else:
            ids = np.asarray(Image.open(out / names["semantic_png"]))
            assert ids.shape == (h, w) and ids.dtype == np.uint8 and set(np.unique(ids).tolist()) <= set(config_ids)
            nonempty += 1
    assert nonempty > 0, f"checkpoint seed {seed}: no image produced any segment"  # the fixture ensures one
    assert set(os.listdir(out)) == expected_files, "exactly the planned files, no temporaries"
    assert index["files"] == sorted(expected_files), "the index lists what the run owns"


def test_e2e_batch_size_two_equals_batch_size_one(tmp_path, tiny_checkpoint, e2e_images, capsys):
    # Only images of the same padded size share a batch, so each image's input tensor is the same as at batch
    # size 1; what remains is float noise of batched convolutions (~1e-5 on the CPU), hence the tolerances.
    checkpoint, seed = tiny_checkpoint
    runs = {}
    for batch_size in (1, 2):
        out = tmp_path / f"bs{batch_size}"
        assert _predict(e2e_images, checkpoint, out, "--batch-size", str(batch_size)) == 0, capsys.readouterr().err
        runs[batch_size] = out
    for name, h, w in E2E_IMAGES:
        stem = Path(name).stem
        a = rgb_to_id(np.asarray(Image.open(runs[1] / f"{stem}_panoptic.png")))
        b = rgb_to_id(np.asarray(Image.open(runs[2] / f"{stem}_panoptic.png")))
        assert (a == b).mean() >= 0.999, f"{name}: checkpoint seed {seed}"
        ia = json.loads((runs[1] / f"{stem}_panoptic.json").read_text())["segments_info"]
        ib = json.loads((runs[2] / f"{stem}_panoptic.json").read_text())["segments_info"]
        assert [(s["id"], s["category_id"]) for s in ia] == [(s["id"], s["category_id"]) for s in ib], name
        assert [s["score"] for s in ia] == pytest.approx([s["score"] for s in ib], rel=1e-4), name


def test_e2e_resize_reports_at_original_size(tmp_path, tiny_checkpoint, e2e_images, capsys):
    checkpoint, _ = tiny_checkpoint
    out = tmp_path / "out"
    code = _predict(e2e_images[:2], checkpoint, out, "--task", "semantic", "--resize-shortest", "48",
                    "--max-size", "80")
    assert code == 0, capsys.readouterr().err
    index = json.loads((out / "predictions.json").read_text())
    assert index["info"]["resize_shortest"] == 48 and index["info"]["max_size"] == 80
    for name, h, w in E2E_IMAGES[:2]:
        assert np.asarray(Image.open(out / f"{Path(name).stem}_semantic.png")).shape == (h, w)


def test_e2e_bad_checkpoints_and_existing_outputs(tmp_path, tiny_checkpoint, e2e_images, capsys):
    checkpoint, _ = tiny_checkpoint
    text = tmp_path / "weights.pth"
    text.write_text("not a checkpoint\n")
    empty_dir = tmp_path / "empty_dir"
    empty_dir.mkdir()
    cases = {
        "text file": text,
        "an image": e2e_images[0],
        "empty directory": empty_dir,
        "missing path": tmp_path / "nowhere",
    }
    for case, bad in cases.items():
        out = tmp_path / f"out_{case.replace(' ', '_')}"
        code = _predict(e2e_images, bad, out)
        err = capsys.readouterr().err
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and lines[0].startswith("m2f: error: "), f"{case}: {err!r}"
        assert "Traceback" not in err and not out.exists(), case

    # a good checkpoint with one corrupt image among good ones: still nothing written
    corrupt = tmp_path / "z.png"
    corrupt.write_bytes(e2e_images[0].read_bytes()[:80])
    out = tmp_path / "out_corrupt"
    assert _predict([*e2e_images, corrupt], checkpoint, out) == 2
    assert "z.png" in capsys.readouterr().err and not out.exists()

    # existing outputs are not overwritten without --force, and nothing else is written either
    out = tmp_path / "out_existing"
    out.mkdir()
    (out / "b_overlay.png").write_bytes(b"keep me")
    assert _predict(e2e_images[:2], checkpoint, out) == 2
    err = capsys.readouterr().err
    assert "--force" in err and len(err.strip().splitlines()) == 1
    assert os.listdir(out) == ["b_overlay.png"] and (out / "b_overlay.png").read_bytes() == b"keep me"
    assert _predict(e2e_images[:2], checkpoint, out, "--force") == 0
    assert (out / "b_overlay.png").read_bytes() != b"keep me"


def test_e2e_subprocess(tmp_path, tiny_checkpoint, e2e_images):
    import subprocess
    import sys

    checkpoint, _ = tiny_checkpoint
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "m2f", "predict", str(e2e_images[0]), str(e2e_images[4]), "--checkpoint",
         str(checkpoint), "--out", str(out), "--device", "cpu", "--task", "instance", "--no-resize"],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    assert sorted(os.listdir(out)) == ["a_instances.json", "a_overlay.png", "e_instances.json", "e_overlay.png",
                                       "predictions.json"]
    bad = subprocess.run(
        [sys.executable, "-m", "m2f", "predict", str(e2e_images[0]), "--checkpoint", str(e2e_images[1]),
         "--out", str(tmp_path / "bad")],
        capture_output=True, text=True, timeout=600,
    )
    assert bad.returncode == 2 and bad.stderr.startswith("m2f: error: ") and len(bad.stderr.splitlines()) == 1
    assert not (tmp_path / "bad").exists()


# ---------------------------------------------------------------------------------------------------------------
# images as users give them, with the shipped default model (test size 128 / 512)
# ---------------------------------------------------------------------------------------------------------------


def test_default_resize_leaves_the_bundled_samples_unchanged(tmp_path, capsys):
    from m2f.assets import sample_images

    samples = [str(p) for p in sample_images()]
    default, plain = tmp_path / "default", tmp_path / "plain"
    assert main(["predict", *samples, "--out", str(default), "--device", "cpu"]) == 0
    assert main(["predict", *samples, "--out", str(plain), "--device", "cpu", "--no-resize"]) == 0
    assert "m2f: note" not in capsys.readouterr().err
    index = json.loads((default / "predictions.json").read_text())
    assert (index["info"]["resize_shortest"], index["info"]["max_size"]) == (128, 512)
    assert json.loads((plain / "predictions.json").read_text())["info"]["resize_shortest"] is None
    for name in sorted(os.listdir(default)):
        if name != "predictions.json":
            assert (default / name).read_bytes() == (plain / name).read_bytes(), name


def test_large_images_are_resized_to_the_test_size_and_reported_at_their_own(tmp_path, rng, capsys):
    image = _write_image(tmp_path / "wide.png", rng, 200, 900)  # -> 114 x 512 for the network
    out = tmp_path / "out"
    assert main(["predict", str(image), "--out", str(out), "--device", "cpu", "--quiet"]) == 0
    assert capsys.readouterr().err == ""
    assert rgb_to_id(np.asarray(Image.open(out / "wide_panoptic.png"))).shape == (200, 900)
    assert np.asarray(Image.open(out / "wide_overlay.png")).shape == (200, 900, 3)


def test_unusual_images_are_noted_one_line_each(tmp_path, rng, capsys):
    tiny = _write_image(tmp_path / "tiny.png", rng, 16, 16)
    rgba = torch.randint(0, 256, (64, 64, 4), generator=rng, dtype=torch.uint8).numpy()
    rgba[:16, :, 3], rgba[16:, :, 3] = 0, 255
    Image.fromarray(rgba).save(tmp_path / "cutout.png")
    frames = [Image.fromarray(torch.randint(0, 256, (64, 64, 3), generator=rng, dtype=torch.uint8).numpy())
              for _ in range(2)]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    images = [str(tiny), str(tmp_path / "cutout.png"), str(tmp_path / "anim.gif")]
    out = tmp_path / "out"
    assert main(["predict", *images, "--out", str(out), "--device", "cpu"]) == 0
    lines = capsys.readouterr().err.strip().splitlines()
    notes = [line for line in lines if line.startswith("m2f: note: ")]
    progress = [line for line in lines if line.startswith("m2f: predict: ")]  # stderr is no terminal: plain lines
    assert len(notes) + len(progress) == len(lines), lines
    assert progress[-1].startswith("m2f: predict: 3/3 img"), lines
    expected = [f"image {tmp_path / 'cutout.png'} has transparent pixels (25% of the image); composited over white",
                f"image {tmp_path / 'anim.gif'} has 2 frames; m2f segments the first only",
                f"image {tiny} is 16x16, far smaller than the model's input size (short edge 128); it is upscaled 8.0x"]
    for text in expected:
        assert sum(text in line for line in notes) == 1, (text, notes)
    assert len(json.loads((out / "predictions.json").read_text())["images"]) == 3

    assert main(["predict", *images, "--out", str(tmp_path / "quiet"), "--device", "cpu", "--quiet"]) == 0
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("task, option, expected", [
    ("panoptic", {"object_mask_threshold": 1.0}, r"no segment found in image .*im0.png: no query passed the "
                                                  r"model's object_mask_threshold 1.0"),
    ("instance", {}, r"no instance in image .*im0.png scores at least --min-score 2.0; the overlay shows none"),
])
def test_empty_predictions_are_noted(tmp_path, rng, task, option, expected):
    from m2f.config import PostProcessConfig
    from m2f.preprocess import InputNote

    config = _stand_in_config(task).replace(postprocess=PostProcessConfig(**option))
    model = _StandInNetwork(config, seed=rng.seed_value).eval()
    entries = _entries(tmp_path, rng, [(40, 60)])
    with pytest.warns(InputNote, match=expected):
        predict_entries(model, entries, task, tmp_path / "out", min_score=2.0)
    assert len(os.listdir(tmp_path / "out")) == len(output_names("x", task)), "the outputs are still written"


def test_runs_that_cannot_fit_are_refused_before_anything_is_written(tmp_path, rng, capsys, monkeypatch):
    import m2f.preprocess

    monkeypatch.setattr(m2f.preprocess, "available_memory_bytes", lambda device: 50 * 10**6)
    big = _write_image(tmp_path / "big.png", rng, 600, 800)  # no resize: ~180 MB; at the test size: ~10 MB
    cases = {
        "no resize": (["--no-resize"], r"image \S+big.png \(600x800, network input 608x800\) needs about 0.\d GB, "
                                       r"more than the 0.1 GB available on cpu; use drop --no-resize \(the model's "
                                       r"test size is 128 / 512\), or downscale the image"),
        "explicit size, batch": (["--resize-shortest", "600", "--batch-size", "2"],
                                 r"batch of 2\) needs about .* GB, more than the 0.1 GB available on cpu; use a "
                                 r"smaller --batch-size, a smaller --resize-shortest / --max-size, or downscale"),
    }
    for case, (options, expected) in cases.items():
        out = tmp_path / f"out_{case.replace(' ', '_').replace(',', '')}"
        code = main(["predict", str(big), str(big), "--out", str(out), "--device", "cpu", *options])
        lines = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and lines[0].startswith("m2f: error: "), (case, lines)
        assert re.search(expected, lines[0]), (case, lines[0])
        assert not out.exists(), case
    out = tmp_path / "fits"
    assert main(["predict", str(big), "--out", str(out), "--device", "cpu"]) == 0, capsys.readouterr().err
