"""Image loading and batching: EXIF, error messages, detectron2's resize rule, normalisation and padding."""
from __future__ import annotations


import numpy as np
import pytest
import torch
from PIL import Image

from m2f.config import Mask2FormerConfig
from m2f.errors import InputError
from m2f.preprocess import load_image, padded_shape, preprocess, resized_shape
from tests.utils import rel_err




def _random_image(rng: torch.Generator, h: int, w: int) -> np.ndarray:
    return torch.randint(0, 256, (h, w, 3), generator=rng, dtype=torch.uint8).numpy()


def test_load_png_roundtrip_and_exif_orientation(tmp_path, rng):
    arr = _random_image(rng, 13, 21)
    Image.fromarray(arr).save(tmp_path / "plain.png")
    np.testing.assert_array_equal(load_image(tmp_path / "plain.png"), arr)

    exif = Image.Exif()
    exif[0x0112] = 6  # orientation 6: the camera was rotated; display = rotate 90 degrees clockwise
    Image.fromarray(arr).save(tmp_path / "rotated.png", exif=exif)
    loaded = load_image(tmp_path / "rotated.png")
    assert loaded.shape == (21, 13, 3), f"seed {rng.seed_value}"
    np.testing.assert_array_equal(loaded, np.rot90(arr, k=-1))


def test_load_grayscale_and_rgba_become_rgb(tmp_path, rng):
    gray = _random_image(rng, 7, 9)[..., 0]
    Image.fromarray(gray).save(tmp_path / "g.png")
    loaded = load_image(tmp_path / "g.png")
    assert loaded.shape == (7, 9, 3) and loaded.dtype == np.uint8
    np.testing.assert_array_equal(loaded[..., 1], gray)
    rgba = np.concatenate([_random_image(rng, 7, 9), np.full((7, 9, 1), 128, np.uint8)], axis=2)
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "a.png")
    np.testing.assert_array_equal(load_image(tmp_path / "a.png"), rgba[..., :3])


def _bad_files(tmp_path, rng):
    good = tmp_path / "good.jpg"
    Image.fromarray(_random_image(rng, 64, 64)).save(good, quality=90)
    data = good.read_bytes()
    (tmp_path / "truncated.jpg").write_bytes(data[: len(data) // 2])
    png = tmp_path / "good.png"
    Image.fromarray(_random_image(rng, 64, 64)).save(png)
    (tmp_path / "truncated.png").write_bytes(png.read_bytes()[:200])
    (tmp_path / "garbage.png").write_bytes(bytes(range(256)) * 4)
    (tmp_path / "notes.txt").write_text("not an image\n")
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "adir").mkdir()
    return {
        "missing": (tmp_path / "nope.png", "does not exist"),
        "directory": (tmp_path / "adir", "is a directory"),
        "truncated jpeg": (tmp_path / "truncated.jpg", "corrupt or truncated"),
        "truncated png": (tmp_path / "truncated.png", "corrupt or truncated"),
        "garbage": (tmp_path / "garbage.png", "not in an image format"),
        "text": (tmp_path / "notes.txt", "not in an image format"),
        "empty": (tmp_path / "empty.jpg", "not in an image format"),
    }


def test_load_errors_are_one_line_and_name_the_file(tmp_path, rng):
    for case, (path, expected) in _bad_files(tmp_path, rng).items():
        with pytest.raises(InputError) as info:
            load_image(path)
        message = str(info.value)
        assert str(path) in message, case
        assert expected in message, f"{case}: {message}"
        assert "\n" not in message, case


def test_resized_shape_matches_detectron2_rule():
    # values worked out by hand from ResizeShortestEdge.get_output_shape
    assert resized_shape(480, 640, 800, 1333) == (800, 1067)  # 640 * 800/480 = 1066.67 -> 1067
    assert resized_shape(640, 480, 800, 1333) == (1067, 800)
    assert resized_shape(100, 1000, 800, 1333) == (133, 1333)  # long edge capped: 800*1333/8000 = 133.3
    assert resized_shape(512, 512, 512, 2048) == (512, 512)
    assert resized_shape(1024, 2048, 1024, None) == (1024, 2048)
    assert resized_shape(300, 301, 150, None) == (150, 151)  # 150.5 rounds half up


def test_padded_shape():
    assert padded_shape([(33, 64), (20, 65)], 32) == (64, 96)
    assert padded_shape([(32, 32)], 32) == (32, 32)
    assert padded_shape([(5, 7)], 0) == (5, 7)


def test_preprocess_normalises_and_pads_like_the_official_imagelist(rng):
    config = Mask2FormerConfig()
    images = [_random_image(rng, 37, 50), _random_image(rng, 20, 70)]
    batch = preprocess(images, config)
    assert batch.pixel_values.shape == (2, 3, 64, 96) and batch.pixel_values.dtype == torch.float32
    assert batch.image_sizes == [(37, 50), (20, 70)] and batch.original_sizes == batch.image_sizes
    mean = torch.tensor(config.pixel_mean, dtype=torch.float64).view(3, 1, 1)
    std = torch.tensor(config.pixel_std, dtype=torch.float64).view(3, 1, 1)
    for i, img in enumerate(images):
        h, w = img.shape[:2]
        ref = (torch.from_numpy(img).permute(2, 0, 1).double() - mean) / std
        got = batch.pixel_values[i]
        assert rel_err(got[:, :h, :w], ref) < 1e-6, f"seed {rng.seed_value}"
        assert got[:, h:, :].abs().sum() == 0 and got[:, :, w:].abs().sum() == 0, "padding must be zero"


def test_preprocess_matches_hf_image_processor(rng):
    transformers = pytest.importorskip("transformers")
    # HF pads to the batch maximum only (its size_divisor acts in its resize), so make that a multiple of 32
    images = [_random_image(rng, 45, 64), _random_image(rng, 64, 33)]
    processor_cls = getattr(transformers, "Mask2FormerImageProcessorPil", transformers.Mask2FormerImageProcessor)
    hf = processor_cls(do_resize=False, ignore_index=255)
    hf_values = hf(images=images, return_tensors="pt")["pixel_values"]
    ours = preprocess(images, Mask2FormerConfig()).pixel_values
    assert hf_values.shape == ours.shape
    assert rel_err(ours, hf_values) < 1e-6, f"seed {rng.seed_value}"


def test_preprocess_resize_uses_pil_bilinear_for_uint8_and_torch_for_float(rng):
    config = Mask2FormerConfig()
    img = _random_image(rng, 30, 45)
    batch = preprocess([img], config, resize_shortest=20, max_size=100)
    assert batch.image_sizes == [(20, 30)] and batch.original_sizes == [(30, 45)]
    expected = np.asarray(Image.fromarray(img).resize((30, 20), Image.BILINEAR))
    mean = np.array(config.pixel_mean).reshape(3, 1, 1)
    std = np.array(config.pixel_std).reshape(3, 1, 1)
    ref = torch.from_numpy((expected.transpose(2, 0, 1) - mean) / std)
    assert rel_err(batch.pixel_values[0, :, :20, :30], ref) < 1e-6

    float_img = torch.from_numpy(img).permute(2, 0, 1).float()
    fbatch = preprocess([float_img], config, resize_shortest=20)
    ref_f = torch.nn.functional.interpolate(float_img[None].double(), size=(20, 30), mode="bilinear",
                                            align_corners=False)[0]
    ref_f = (ref_f - torch.tensor(config.pixel_mean).double().view(3, 1, 1)) / torch.tensor(
        config.pixel_std).double().view(3, 1, 1)
    assert rel_err(fbatch.pixel_values[0, :, :20, :30], ref_f) < 1e-5


def test_preprocess_tensor_and_array_inputs_agree(rng):
    img = _random_image(rng, 17, 19)
    a = preprocess([img], Mask2FormerConfig()).pixel_values
    b = preprocess([torch.from_numpy(img).permute(2, 0, 1)], Mask2FormerConfig()).pixel_values
    assert torch.equal(a, b)


@pytest.mark.parametrize(
    "bad, match",
    [
        ([], "at least one image"),
        ([np.zeros((4, 4), np.uint8)], r"\(H, W, 3\)"),
        ([np.zeros((4, 4, 4), np.uint8)], r"\(H, W, 3\)"),
        ([torch.zeros(4, 4, 3)], r"\(3, H, W\)"),
        ([np.zeros((4, 4, 3), np.int64)], "dtype"),
        (["image.png"], "numpy array or a torch tensor"),
    ],
)
def test_preprocess_rejects_bad_inputs(bad, match):
    with pytest.raises(InputError, match=match):
        preprocess(bad, Mask2FormerConfig())


def test_preprocess_rejects_max_size_without_shortest():
    with pytest.raises(InputError, match="resize_shortest"):
        preprocess([np.ones((4, 4, 3), np.uint8)], Mask2FormerConfig(), max_size=100)
