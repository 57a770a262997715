"""`m2f serve --engine`: a TensorRT engine served through TensorRTRunner (m2f.serve.engine.EnginePredictor).
Where TensorRT is absent the refusal is one line naming the install; the network call handles predictors of one
input size / one batch size / a largest batch (run_network); the real engine path is `tensorrt`-marked."""
from __future__ import annotations

import sys

import pytest
import torch

from m2f.cli import main
from m2f.errors import BackendUnavailableError, InputError
from tests.utils import rel_err

pytest.importorskip("ray.serve")
from m2f.serve.app import ModelSpec, load_predictor, run_network  # noqa: E402

def test_engine_without_tensorrt_is_one_line_naming_the_install(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # absent, even where TensorRT (or only its stubs) is installed
    engine = tmp_path / "m2f.engine"
    engine.write_bytes(b"not checked before TensorRT is imported")
    with pytest.raises(BackendUnavailableError, match=r"TensorRT >= 10.3 is not installed: pip install tensorrt"):
        load_predictor(ModelSpec(engine=str(engine)))
    assert main(["serve", "--engine", str(engine), "--port", "8123"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("m2f: error: TensorRT >= 10.3 is not installed: pip install tensorrt") and \
        err.count("\n") == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m2f.engine"]


def test_missing_engine_is_one_line(tmp_path, capsys):
    missing = tmp_path / "none.engine"
    with pytest.raises(InputError, match=r"engine .*none.engine not found; build one with `m2f export tensorrt`"):
        load_predictor(ModelSpec(engine=str(missing)))
    assert main(["serve", "--engine", str(missing)]) == 2
    assert "not found; build one with `m2f export tensorrt`" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


class _Recorder:
    """A predictor whose outputs are a function of each image alone; it records the shapes it was called with."""

    def __init__(self, fixed_size=None, fixed_batch=None, max_batch=None):
        self.fixed_size, self.fixed_batch, self.max_batch, self.calls = fixed_size, fixed_batch, max_batch, []

    def __call__(self, pixel_values):
        self.calls.append(tuple(pixel_values.shape))
        per_image = pixel_values.flatten(1)
        logits = torch.stack([per_image.sum(1), per_image.square().sum(1)], 1)[:, None]  # (B, 1, 2)
        masks = pixel_values[:, :1, ::4, ::4]  # (B, 1, H/4, W/4)
        return logits, masks


@pytest.mark.parametrize("fixed_size, fixed_batch, max_batch, calls", [
    (None, None, None, [(5, 3, 32, 64)]),
    ((64, 96), None, None, [(5, 3, 64, 96)]),
    (None, 2, None, [(2, 3, 32, 64)] * 3),  # the last chunk padded with a zero image
    (None, None, 3, [(3, 3, 32, 64), (2, 3, 32, 64)]),
])
def test_run_network_pads_and_chunks_to_what_the_predictor_takes(rng, fixed_size, fixed_batch, max_batch, calls):
    pixels = torch.randn(5, 3, 32, 64, generator=rng)
    reference = _Recorder()
    ref_logits, ref_masks = reference(pixels)
    predictor = _Recorder(fixed_size, fixed_batch, max_batch)
    network_input, logits, masks = run_network(predictor, pixels)
    assert predictor.calls == calls
    assert tuple(network_input.shape[-2:]) == (fixed_size or (32, 64))
    assert logits.shape == (5, 1, 2) and masks.shape[0] == 5
    # padding adds zeros only: sums are unchanged up to reduction order
    assert rel_err(logits, ref_logits) < 1e-5, f"seed {rng.seed_value}"
    assert rel_err(masks[..., :8, :16], ref_masks) == 0, f"seed {rng.seed_value}"


@pytest.mark.tensorrt
def test_engine_predictor_matches_onnxruntime_on_the_default_model(tmp_path, rng):
    from m2f.assets import default_checkpoint_path, sample_images
    from m2f.export import build_engine
    from m2f.export.onnx_export import export_checkpoint
    from m2f.preprocess import load_image, preprocess

    onnx_path = export_checkpoint(str(default_checkpoint_path()), tmp_path / "m2f.onnx", height=128, width=128,
                                  dynamic=True).path
    engine = build_engine(onnx_path, tmp_path / "m2f.engine", precision="fp32", min_shape=(1, 3, 128, 128),
                          opt_shape=(2, 3, 128, 128), max_shape=(2, 3, 128, 128))
    predictor = load_predictor(ModelSpec(engine=str(engine)))
    onnx = load_predictor(ModelSpec(onnx=str(onnx_path)))
    assert predictor.config.name == onnx.config.name and predictor.max_batch == 2
    images = [load_image(p) for p in sample_images()[:3]]
    pixels = preprocess(images, predictor.config).pixel_values
    pixels = pixels + 0.01 * torch.randn(pixels.shape, generator=rng)
    _, logits, masks = run_network(predictor, pixels)  # 3 images: chunks of the profile's max batch 2
    ref_logits, ref_masks = onnx(pixels)
    assert rel_err(logits, ref_logits) < 1e-4 and rel_err(masks, ref_masks) < 1e-4, f"seed {rng.seed_value}"
