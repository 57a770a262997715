"""Image loading and batching: EXIF, 16-bit / transparent / CMYK / multi-frame files, error messages, detectron2's
resize rule, normalisation and padding, notes on tiny images, the memory estimate."""
from __future__ import annotations

import struct
import warnings
import zlib
from contextlib import contextmanager

import numpy as np
import pytest
import torch
from PIL import Image

from m2f.config import Mask2FormerConfig
from m2f.errors import InputError
from m2f.preprocess import InputNote, inference_bytes, load_image, padded_shape, preprocess, resized_shape
from tests.utils import rel_err


@contextmanager
def _no_note():
    with warnings.catch_warnings():
        warnings.simplefilter("error", InputNote)
        yield


def _random_image(rng: torch.Generator, h: int, w: int) -> np.ndarray:
    return torch.randint(0, 256, (h, w, 3), generator=rng, dtype=torch.uint8).numpy()


def test_load_png_roundtrip_and_exif_orientation(tmp_path, rng):
    arr = _random_image(rng, 13, 21)
    Image.fromarray(arr).save(tmp_path / "plain.png")
    with _no_note():
        loaded = load_image(tmp_path / "plain.png")
    np.testing.assert_array_equal(loaded, arr)
    assert loaded.flags.writeable, "torch.from_numpy warns on read-only arrays"

    exif = Image.Exif()
    exif[0x0112] = 6  # orientation 6: the camera was rotated; display = rotate 90 degrees clockwise
    Image.fromarray(arr).save(tmp_path / "rotated.png", exif=exif)
    loaded = load_image(tmp_path / "rotated.png")
    assert loaded.shape == (21, 13, 3), f"seed {rng.seed_value}"
    np.testing.assert_array_equal(loaded, np.rot90(arr, k=-1))


def test_load_grayscale_and_opaque_rgba_become_rgb_without_a_note(tmp_path, rng):
    gray = _random_image(rng, 7, 9)[..., 0]
    Image.fromarray(gray).save(tmp_path / "g.png")
    rgba = np.concatenate([_random_image(rng, 7, 9), np.full((7, 9, 1), 255, np.uint8)], axis=2)
    Image.fromarray(rgba).save(tmp_path / "a.png")
    with _no_note():
        loaded = load_image(tmp_path / "g.png")
        opaque = load_image(tmp_path / "a.png")
    assert loaded.shape == (7, 9, 3) and loaded.dtype == np.uint8
    np.testing.assert_array_equal(loaded, np.repeat(gray[..., None], 3, axis=2))
    np.testing.assert_array_equal(opaque, rgba[..., :3])


def _png16(path, values: np.ndarray) -> None:
    """A 16-bit PNG written by hand (Pillow cannot write 48 / 64-bit ones): gray (H, W), RGB or RGBA (H, W, C)."""
    color_type = {1: 0, 3: 2, 4: 6}[1 if values.ndim == 2 else values.shape[2]]
    h, w = values.shape[:2]
    rows = b"".join(b"\x00" + values[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", w, h, 16, color_type, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows))
                     + chunk(b"IEND", b""))


def _random_16bit(rng, *shape) -> np.ndarray:
    return torch.randint(0, 65536, shape, generator=rng, dtype=torch.int32).numpy().astype(np.uint16)


def test_16bit_images_keep_their_top_8_bits(tmp_path, rng):
    gray = _random_16bit(rng, 6, 10)
    rgb = _random_16bit(rng, 6, 10, 3)
    gray[0, :4] = [0, 255, 256, 65535]  # the edges: 0 -> 0, 255 -> 0, 256 -> 1, 65535 -> 255
    Image.fromarray(gray).save(tmp_path / "gray16.png")  # mode I;16
    Image.frombytes("I;16B", (10, 6), gray.astype(">u2").tobytes()).save(tmp_path / "gray16b.tif")
    Image.fromarray(gray.astype(np.int32)).save(tmp_path / "gray32.tif")  # mode I holding 16-bit data
    _png16(tmp_path / "rgb48.png", rgb)
    expected_gray = np.repeat((gray >> 8).astype(np.uint8)[..., None], 3, axis=2)
    assert expected_gray[0, :4, 0].tolist() == [0, 0, 1, 255]
    cases = {"gray16.png": expected_gray, "gray16b.tif": expected_gray, "gray32.tif": expected_gray,
             "rgb48.png": (rgb >> 8).astype(np.uint8)}
    for name, expected in cases.items():
        with _no_note():
            loaded = load_image(tmp_path / name)
        assert loaded.dtype == np.uint8, name
        np.testing.assert_array_equal(loaded, expected, err_msg=f"{name}, seed {rng.seed_value}")


def test_float_and_32bit_pixels_are_refused(tmp_path, rng):
    wide = _random_16bit(rng, 4, 5).astype(np.int32)
    wide[0, 0] = 70000
    Image.fromarray(wide).save(tmp_path / "wide.tif")
    Image.fromarray(wide.astype(np.float32) / 70000).save(tmp_path / "float.tif")
    for name, expected in (("wide.tif", "32-bit integer pixels"), ("float.tif", "floating-point pixels")):
        with pytest.raises(InputError, match=expected) as info:
            load_image(tmp_path / name)
        assert name in str(info.value) and "save it as an 8- or 16-bit PNG" in str(info.value)


def _over_white(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """float64 reference: rgb * a + 255 * (1 - a), rounded to nearest."""
    a = alpha.astype(np.float64)[..., None] / 255
    return np.floor(rgb.astype(np.float64) * a + 255.0 * (1 - a) + 0.5).astype(np.uint8)


def test_transparent_pixels_are_composited_over_white_with_a_note(tmp_path, rng):
    rgb = _random_image(rng, 8, 12)
    alpha = _random_image(rng, 8, 12)[..., 0]
    alpha[0, :3] = [0, 255, 128]
    Image.fromarray(np.dstack([rgb, alpha])).save(tmp_path / "rgba.png")
    Image.fromarray(np.dstack([rgb[..., 0], alpha])).convert("LA").save(tmp_path / "la.png")
    rgb16, alpha16 = _random_16bit(rng, 8, 12, 3), _random_16bit(rng, 8, 12)
    _png16(tmp_path / "rgba64.png", np.dstack([rgb16, alpha16]))
    # palette with transparency: index 0 is transparent
    indices = (_random_image(rng, 8, 12)[..., 0] % 4).astype(np.uint8)
    palette = np.array([[10, 20, 30], [200, 0, 0], [0, 200, 0], [0, 0, 200]], np.uint8)
    indices[0, 0], indices[0, 1] = 0, 1
    p = Image.frombytes("P", (12, 8), indices.tobytes())
    p.putpalette(palette.flatten().tolist())
    p.save(tmp_path / "palette.png", transparency=0)
    palette_alpha = np.where(indices == 0, 0, 255).astype(np.uint8)
    cases = {
        "rgba.png": _over_white(rgb, alpha),
        "la.png": _over_white(np.repeat(rgb[..., :1], 3, axis=2), alpha),
        "rgba64.png": _over_white((rgb16 >> 8).astype(np.uint8), (alpha16 >> 8).astype(np.uint8)),
        "palette.png": _over_white(palette[indices], palette_alpha),
    }
    for name, expected in cases.items():
        with pytest.warns(InputNote, match=r"has transparent pixels \(\d+% of the image\); composited over white"):
            loaded = load_image(tmp_path / name)
        np.testing.assert_array_equal(loaded, expected, err_msg=f"{name}, seed {rng.seed_value}")
    loaded = load_image(tmp_path / "rgba.png")
    assert loaded[0, :3].tolist()[:2] == [[255, 255, 255], rgb[0, 1].tolist()], "alpha 0 -> white, 255 -> itself"


def test_cmyk_is_converted_with_a_note(tmp_path, rng):
    cmyk = np.dstack([_random_image(rng, 6, 7), _random_image(rng, 6, 7)[..., :1]])
    Image.frombytes("CMYK", (7, 6), cmyk.tobytes()).save(tmp_path / "cmyk.tif")
    with pytest.warns(InputNote, match=r"cmyk.tif is CMYK; converted to RGB without colour management"):
        loaded = load_image(tmp_path / "cmyk.tif")
    expected = np.asarray(Image.frombytes("CMYK", (7, 6), cmyk.tobytes()).convert("RGB"))
    np.testing.assert_array_equal(loaded, expected)


def test_multi_frame_files_give_their_first_frame_with_a_note(tmp_path, rng):
    frames = [_random_image(rng, 9, 11) for _ in range(3)]
    first, *rest = (Image.fromarray(f) for f in frames)
    first.save(tmp_path / "pages.tif", save_all=True, append_images=rest)
    first.save(tmp_path / "anim.gif", save_all=True, append_images=rest)
    first.save(tmp_path / "anim.png", save_all=True, append_images=rest)
    for name in ("pages.tif", "anim.gif", "anim.png"):
        with pytest.warns(InputNote, match=rf"{name} has 3 frames; m2f segments the first only"):
            loaded = load_image(tmp_path / name)
        with Image.open(tmp_path / name) as img:  # a GIF frame is palette-quantised: compare with its decoding
            expected = np.asarray(img.convert("RGB"))
        np.testing.assert_array_equal(loaded, expected, err_msg=name)
    np.testing.assert_array_equal(load_image(tmp_path / "pages.tif"), frames[0])


def test_decompression_bombs_are_one_line(tmp_path, rng, monkeypatch):
    Image.fromarray(_random_image(rng, 20, 20)).save(tmp_path / "bomb.png")  # 400 pixels > 2 x the limit
    small = _random_image(rng, 12, 12)
    Image.fromarray(small).save(tmp_path / "large.png")  # 144: over the warning limit, under the error one
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(InputError, match=r"bomb.png is too large to decode safely \(.*\); downscale it first, or "
                                         r"raise PIL.Image.MAX_IMAGE_PIXELS") as info:
        load_image(tmp_path / "bomb.png")
    assert "\n" not in str(info.value)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = load_image(tmp_path / "large.png")
    assert [w.category for w in caught] == [InputNote], [str(w.message) for w in caught]
    assert "large.png is very large" in str(caught[0].message) and "decoding it anyway" in str(caught[0].message)
    np.testing.assert_array_equal(loaded, small)


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


def test_preprocess_notes_images_far_smaller_than_the_model_input(rng):
    config = Mask2FormerConfig(test_size=(128, 512))
    tiny = _random_image(rng, 16, 20)
    with pytest.warns(InputNote, match=r"a.png is 16x20, far smaller than the model's input size \(short edge 128\); "
                                       r"it is not resized"):
        plain = preprocess([tiny], config, names=["image a.png"])
    with pytest.warns(InputNote, match=r"image 0 is 16x20, .*short edge 96\); it is upscaled 6.0x"):
        preprocess([tiny], config, resize_shortest=96)
    with _no_note():
        quiet = preprocess([_random_image(rng, 33, 40)], config)
        preprocess([tiny], config, resize_shortest=64)  # 4x: not far enough to say so
    assert plain.image_sizes == [(16, 20)] and quiet.image_sizes == [(33, 40)], "notes change nothing"


def test_inference_bytes_scale_with_pixels_and_match_the_failure_seen():
    from m2f.assets import default_checkpoint_path
    from m2f.checkpoints import from_pretrained

    config = from_pretrained(default_checkpoint_path()).config
    # `m2f predict` of an 8000x6000 photo without resizing failed inside grid_sample after 11 GB
    big = inference_bytes(config, (6016, 8000), (6000, 8000), "panoptic")
    assert big > 11e9, big
    resized = inference_bytes(config, (128, 192), (6000, 8000), "panoptic")
    assert resized < big / 10, (resized, big)
    small = inference_bytes(config, (128, 128), (128, 128), "panoptic")
    assert 0 < small < inference_bytes(config, (256, 256), (256, 256), "panoptic") / 3.5
    # semantic holds every class's probabilities at the original size
    assert inference_bytes(config, (128, 128), (4000, 4000), "semantic") > 4 * config.num_classes * 4000 * 4000
