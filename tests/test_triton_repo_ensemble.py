"""`m2f export triton-repo --ensemble`: the whole Triton Inference Server repository (Python pre-processing, the
model, Python post-processing, the ensemble). tritonserver cannot run here, so the Python models' functions
(export/triton_backend.py, as the repository embeds them) are chained with ONNX Runtime for the model step and
checked against the PyTorch pipeline of `m2f predict` / `m2f serve` on the shipped default model."""
from __future__ import annotations

import io
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper
from PIL import Image

from m2f.cli import main
from m2f.errors import InputError
from m2f.export import triton_backend
from m2f.export.manifest import write_manifest
from m2f.export.triton_ensemble import write_triton_ensemble
from tests.utils import full_manifest, rel_err

SIZE = 128  # the default model's test size (short edge): square images resize to the fixed graph's input


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """The default model, exported at a fixed 1x3x128x128 (the quickest export on a CPU), and its repository."""
    import m2f
    from m2f.assets import default_checkpoint_path
    from m2f.export.onnx_export import to_onnx

    model = m2f.from_pretrained(str(default_checkpoint_path()))
    folder = tmp_path_factory.mktemp("triton")
    path = to_onnx(model, folder / "m2f.onnx", height=SIZE, width=SIZE, optimize=False, simplify=False).path
    return model, path, write_triton_ensemble(path, folder / "repo", instance_kind="cpu")


def _png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def test_repository_layout_configs_and_standalone_backend(exported):
    _, onnx_path, repo = exported
    assert sorted(p.name for p in repo.iterdir()) == ["m2f", "m2f_ensemble", "m2f_post", "m2f_pre"]
    model, pre, post, ensemble = (repo / n / "config.pbtxt" for n in ("m2f", "m2f_pre", "m2f_post", "m2f_ensemble"))
    assert (repo / "m2f" / "1" / "model.onnx").read_bytes() == Path(onnx_path).read_bytes()
    assert "kind: KIND_CPU" in model.read_text() and "max_batch_size: 0" in model.read_text()  # fixed batch 1
    pre_text, post_text, ensemble_text = pre.read_text(), post.read_text(), ensemble.read_text()
    assert 'backend: "python"' in pre_text and "max_batch_size: 0" in pre_text
    assert re.search(r'name: "IMAGE"\s+data_type: TYPE_STRING\s+dims: \[ 1, 1 \]', pre_text)
    assert re.search(r'name: "pixel_values"\s+data_type: TYPE_FP32\s+dims: \[ 1, 3, 128, 128 \]', pre_text)
    assert re.search(r'name: "image_info"\s+data_type: TYPE_INT32\s+dims: \[ 1, 6 \]', pre_text)
    assert re.search(r'name: "pred_masks"\s+data_type: TYPE_FP32\s+dims: \[ 1, 20, 32, 32 \]', post_text)
    assert re.search(r'name: "SEGMENTS"\s+data_type: TYPE_STRING\s+dims: \[ 1, 1 \]', post_text)
    assert 'platform: "ensemble"' in ensemble_text and "dynamic_batching" not in ensemble_text
    steps = re.findall(r'model_name: "(\w+)"', ensemble_text)
    assert steps == ["m2f_pre", "m2f", "m2f_post"], ensemble_text
    assert 'input_map { key: "image_info" value: "image_info" }' in ensemble_text
    assert (repo / "m2f_ensemble" / "1").is_dir()
    for stage in ("m2f_pre", "m2f_post"):
        version = repo / stage / "1"
        compile((version / "model.py").read_text(), str(version / "model.py"), "exec")
        for module in ("triton_backend.py", "postprocess_numpy.py"):
            assert (version / "m2f_triton" / module).read_bytes() == (Path(triton_backend.__file__).parent /
                                                                       module).read_bytes()
        settings = json.loads((version / "m2f_settings.json").read_text())
        assert settings["input_size"] == [SIZE, SIZE] and settings["task"] == "panoptic"
    # the server's Python has numpy and Pillow, neither torch nor m2f: the embedded copy needs neither
    code = ("import sys; sys.modules['torch'] = sys.modules['m2f'] = None; sys.path.insert(0, sys.argv[1]); "
            "from m2f_triton import triton_backend; print(triton_backend.resized_shape(64, 100, 128, 512))")
    done = subprocess.run([sys.executable, "-I", "-c", code, str(repo / "m2f_pre" / "1")], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "(128, 200)", done.stderr


def _segments_close(got: list[dict], ref: list[dict], seed: int) -> None:
    from pycocotools import mask as mask_util

    assert [(s["label"], s["id"], s["isthing"], s["name"], s["category_id"]) for s in got] == \
        [(s["label"], s["id"], s["isthing"], s["name"], s["category_id"]) for s in ref], f"seed {seed}"
    for g, r in zip(got, ref):
        a = mask_util.decode({"size": g["mask"]["size"], "counts": g["mask"]["counts"].encode()}).astype(bool)
        b = mask_util.decode({"size": r["mask"]["size"], "counts": r["mask"]["counts"].encode()}).astype(bool)
        # ONNX Runtime and PyTorch differ in the last float bits: a pixel at an exact tie may change owner
        assert (a & b).sum() >= 0.999 * (a | b).sum() and a.sum() == g["area"], (g["label"], seed)
        assert abs(g["score"] - r["score"]) <= 1e-4 * r["score"], (g["score"], r["score"], seed)


def _decode(segment: dict) -> np.ndarray:
    from pycocotools import mask as mask_util

    return mask_util.decode({"size": segment["mask"]["size"], "counts": segment["mask"]["counts"].encode()}) > 0


def _same_task_segments(task: str, got: list[dict], ref: list[dict], size: tuple[int, int], seed: int) -> None:
    """Semantic: the label maps agree on >= 99.9% of pixels. Instance: each of the 10 best reference instances has
    a twin (label, mask IoU >= 0.99, score within 1e-4); float noise may reorder near-equal scores."""
    if task == "semantic":
        maps = []
        for segments in (got, ref):
            labels = np.full(size, -1)
            for s in segments:
                labels[_decode(s)] = s["label"]
            maps.append(labels)
        assert (maps[0] == maps[1]).mean() >= 0.999 and (maps[0] >= 0).all(), f"seed {seed}"
        return
    assert len(got) == len(ref), f"seed {seed}"
    for r in sorted(ref, key=lambda s: -s["score"])[:10]:
        mask = _decode(r)
        assert any(g["label"] == r["label"] and abs(g["score"] - r["score"]) <= 1e-4
                   and (mask & _decode(g)).sum() >= 0.99 * (mask | _decode(g)).sum() for g in got), (r["label"], seed)


def test_chained_functions_give_the_pytorch_pipeline_segments(exported, rng, tmp_path):
    import onnxruntime as ort

    from m2f.assets import sample_images
    from m2f.evaluation.evaluate import TorchPredictor
    from m2f.labels import labels_for_config
    from m2f.preprocess import load_image, preprocess
    from m2f.serve.encode import postprocess_batch, segments_json

    model, onnx_path, repo = exported
    config = model.config
    settings = json.loads((repo / "m2f_post" / "1" / "m2f_settings.json").read_text())
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    torch_predictor, labels = TorchPredictor(model, config), labels_for_config(config)
    odd = torch.randint(0, 256, (77, 77, 3), generator=rng, dtype=torch.uint8).numpy()  # upscaled to 128x128
    bodies = [p.read_bytes() for p in sample_images()] + [_png(odd)]
    for index, body in enumerate(bodies):
        pre = triton_backend.run_pre({"IMAGE": np.asarray([[body]], dtype=object)}, settings)
        (tmp_path / f"{index}.png").write_bytes(body)
        image = load_image(tmp_path / f"{index}.png")  # as `m2f predict` reads it
        batch = preprocess([image], config, resize_shortest=config.test_size[0], max_size=config.test_size[1])
        assert rel_err(torch.from_numpy(pre["pixel_values"]), batch.pixel_values) <= 1e-7, f"seed {rng.seed_value}"
        logits, masks = session.run(["pred_logits", "pred_masks"], {"pixel_values": pre["pixel_values"]})
        answer = triton_backend.run_post({"pred_logits": logits, "pred_masks": masks,
                                          "image_info": pre["image_info"]}, settings)["SEGMENTS"]
        assert answer.shape == (1, 1)
        got = json.loads(answer[0, 0])
        assert (got["task"], got["height"], got["width"]) == ("panoptic", *image.shape[:2])
        ref_logits, ref_masks = torch_predictor(batch.pixel_values)
        ref = segments_json("panoptic", postprocess_batch("panoptic", config, ref_logits, ref_masks, batch)[0], labels)
        if index < len(bodies) - 1:  # the random image may have none
            assert ref, "the default model finds segments in its sample images"
        _segments_close(got["segments"], ref, rng.seed_value)
        for task in ("semantic", "instance"):  # the other tasks of the same network outputs
            answer = triton_backend.postprocess(logits[0], masks[0], pre["image_info"][0], {**settings, "task": task})
            other = segments_json(task, postprocess_batch(task, config, ref_logits, ref_masks, batch)[0], labels)
            _same_task_segments(task, json.loads(answer)["segments"], other, image.shape[:2], rng.seed_value)


def test_preprocess_is_m2f_predicts_for_any_size_and_batch(rng):
    """Non-square, upscaled and downscaled images, alone and as one batch padded to its largest (dynamic graph)."""
    from m2f.assets import default_checkpoint_path
    from m2f.cli.train import load_config
    from m2f.preprocess import preprocess, resized_shape

    config = load_config(str(default_checkpoint_path() / "m2f_config.json"))
    settings = triton_backend.settings_from_config(config)
    sizes = [(61, 97), (300, 131), (40, 900)]
    images = [torch.randint(0, 256, (*size, 3), generator=rng, dtype=torch.uint8).numpy() for size in sizes]
    for group in ([images[0]], [images[1]], images):
        pixels, info = triton_backend.preprocess(group, settings)
        ref = preprocess(group, config, resize_shortest=config.test_size[0], max_size=config.test_size[1])
        assert pixels.shape == tuple(ref.pixel_values.shape), f"seed {rng.seed_value}"
        assert rel_err(torch.from_numpy(pixels), ref.pixel_values) <= 1e-7, f"seed {rng.seed_value}"
        assert [tuple(row[:2]) for row in info] == ref.image_sizes
        assert [tuple(row[2:4]) for row in info] == ref.original_sizes
        assert all(tuple(row[4:]) == pixels.shape[-2:] for row in info)
    for height, width in [(1, 1), (7, 3000), (128, 129), (511, 127), *(tuple(torch.randint(1, 2000, (2,),
                                                                              generator=rng).tolist())
                                                                        for _ in range(20))]:
        assert triton_backend.resized_shape(height, width, 128, 512) == resized_shape(height, width, 128, 512), \
            (height, width, f"seed {rng.seed_value}")


def test_rle_is_cocos(rng):
    from pycocotools import mask as mask_util

    shapes = [(1, 1), (3, 5), (37, 29), (64, 70)]
    masks = [torch.rand(shape, generator=rng).numpy() > threshold for shape in shapes for threshold in (0.05, 0.5)]
    masks += [np.zeros((9, 7), bool), np.ones((9, 7), bool), np.eye(40, 33, dtype=bool)]
    long_runs = np.zeros((50, 60), bool)
    long_runs[5:45, 10:50] = True  # runs of thousands: several 5-bit groups, negative differences
    masks.append(long_runs)
    for mask in masks:
        ref = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
        got = triton_backend.rle(mask)
        assert got == {"size": list(mask.shape), "counts": ref["counts"].decode("ascii")}, \
            (mask.shape, f"seed {rng.seed_value}")


@pytest.mark.parametrize("body, needle", [
    (b"", "no image (empty IMAGE)"),
    (b"plain text, not pixels" * 3, "not an image Pillow can read"),
    ("truncated", "truncated or corrupt"),
    ("too-wide", "does not fit the model's fixed input 128x128; export the model with --dynamic"),
])
def test_bad_images_are_one_line_request_errors(exported, rng, body, needle):
    settings = json.loads((exported[2] / "m2f_pre" / "1" / "m2f_settings.json").read_text())
    pixels = torch.randint(0, 256, (48, 96, 3), generator=rng, dtype=torch.uint8).numpy()
    body = {"truncated": _png(pixels)[:200], "too-wide": _png(pixels)}.get(body, body)
    with pytest.raises(triton_backend.RequestError, match=re.escape(needle)) as caught:
        triton_backend.run_pre({"IMAGE": np.asarray([[body]], dtype=object)}, settings)
    assert "\n" not in str(caught.value)


def _raw_model(path: Path, outputs: tuple[str, ...] = ("pred_logits", "pred_masks")) -> None:
    """A dynamic-batch graph with m2f's input and the given outputs (shapes as an export's)."""
    x = helper.make_tensor_value_info("pixel_values", TensorProto.FLOAT, ["batch", 3, "height", "width"])
    shapes = {"pred_logits": ["batch", 20, 7], "pred_masks": ["batch", 20, "h4", "w4"],
              "semantic_map": ["batch", "height", "width"]}
    ys = [helper.make_tensor_value_info(n, TensorProto.FLOAT, shapes[n]) for n in outputs]
    nodes = [helper.make_node("Identity", ["pixel_values"], [n]) for n in outputs]
    onnx.save(helper.make_model(helper.make_graph(nodes, "g", [x], ys)), path)


def test_dynamic_batch_repository_batches_every_model_alike(tmp_path, capsys):
    from m2f.assets import default_checkpoint_path

    model = tmp_path / "seg.onnx"
    _raw_model(model)
    config = str(default_checkpoint_path() / "m2f_config.json")
    assert main(["export", "triton-repo", "--model", str(model), "--output", str(tmp_path / "repo"), "--ensemble",
                 "--max-batch", "4", "--config", config, "--task", "semantic"]) == 0
    assert "seg, seg_ensemble, seg_post, seg_pre" in capsys.readouterr().out
    texts = {n: (tmp_path / "repo" / n / "config.pbtxt").read_text() for n in ("seg", "seg_pre", "seg_post",
                                                                               "seg_ensemble")}
    assert all("max_batch_size: 4" in text for text in texts.values()), texts
    assert "dynamic_batching { }" in texts["seg"] and "kind: KIND_GPU" in texts["seg"]
    assert re.search(r'name: "pixel_values"\s+data_type: TYPE_FP32\s+dims: \[ 3, -1, -1 \]', texts["seg_pre"])
    assert re.search(r'name: "IMAGE"\s+data_type: TYPE_STRING\s+dims: \[ 1 \]', texts["seg_ensemble"])
    settings = json.loads((tmp_path / "repo" / "seg_post" / "1" / "m2f_settings.json").read_text())
    assert settings["task"] == "semantic" and "input_size" not in settings
    assert main(["export", "triton-repo", "--model", str(model), "--output", str(tmp_path / "repo"), "--ensemble",
                 "--config", config]) == 2
    assert "--force" in capsys.readouterr().err  # an existing repository is kept, whole
    assert (tmp_path / "repo" / "seg_ensemble" / "config.pbtxt").read_text() == texts["seg_ensemble"]


def test_tensorrt_plan_repository_takes_the_engines_config_and_profile(tmp_path):
    from m2f.assets import default_checkpoint_path
    from m2f.cli.train import load_config

    config = load_config(str(default_checkpoint_path() / "m2f_config.json"))
    engine = tmp_path / "seg.engine"
    engine.write_bytes(b"\0engine")
    write_manifest(engine, full_manifest(
        "tensorrt", dynamic=True, max_batch=2, config=config.to_dict(),
        inputs=[{"name": "pixel_values", "dtype": "float32", "shape": ["batch", 3, "h", "w"]}],
        outputs=[{"name": "pred_logits", "dtype": "float32", "shape": ["batch", 20, 7]},
                 {"name": "pred_masks", "dtype": "float16", "shape": ["batch", 20, "h4", "w4"]}]))
    repo = write_triton_ensemble(engine, tmp_path / "repo", max_batch=8)
    model = (repo / "seg" / "config.pbtxt").read_text()
    assert 'platform: "tensorrt_plan"' in model and "kind: KIND_GPU" in model and (repo / "seg/1/model.plan").exists()
    post = (repo / "seg_post" / "config.pbtxt").read_text()
    assert "max_batch_size: 2" in post and "max_batch_size: 2" in (repo / "seg_ensemble/config.pbtxt").read_text()
    assert re.search(r'name: "pred_masks"\s+data_type: TYPE_FP16\s+dims: \[ 20, -1, -1 \]', post)  # as the plan gives
    settings = json.loads((repo / "seg_pre" / "1" / "m2f_settings.json").read_text())
    assert settings["model"] == config.name and settings["test_size"] == list(config.test_size)


def test_refusals_are_one_line_and_leave_nothing(tmp_path, capsys):
    from m2f.assets import default_checkpoint_path

    config = str(default_checkpoint_path() / "m2f_config.json")
    in_graph = tmp_path / "post.onnx"
    _raw_model(in_graph, ("pred_logits", "semantic_map"))
    with pytest.raises(InputError, match=r"the ensemble needs pixel_values -> pred_logits, pred_masks: export "
                                         r"with --postprocess none"):
        write_triton_ensemble(in_graph, tmp_path / "repo", config=config)
    engine = tmp_path / "m2f.engine"
    engine.write_bytes(b"\0engine")
    write_manifest(engine, full_manifest("tensorrt", dynamic=True, max_batch=8))
    assert main(["export", "triton-repo", "--model", str(engine), "--output", str(tmp_path / "repo"), "--ensemble",
                 "--instance-kind", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "--instance-kind cpu cannot run a TensorRT plan (GPU only)" in err and err.count("\n") == 1, err
    assert main(["export", "triton-repo", "--model", str(in_graph), "--output", str(tmp_path / "repo"),
                 "--task", "instance"]) == 2
    assert "--task and --config describe the ensemble's post-processing; add --ensemble" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m2f.engine", "m2f.engine.json", "post.onnx"]
