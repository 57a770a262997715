"""``model(x)`` refuses what it cannot run on (wrong type, dtype, device, rank, channels, empty batch, too small an
image) with one InputError naming the fix, and keeps running what it can (odd sizes, a bfloat16 model)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import m2f
from m2f.config import Mask2FormerConfig, PixelDecoderConfig, ResNetConfig, TransformerDecoderConfig
from m2f.errors import InputError
from m2f.preprocess import preprocess
from tests.utils import fresh_seed, seeded_generator

# conv_dim == norm_groups: one channel per GroupNorm group, so a 1x1 res5 map is too small
CONFIG = Mask2FormerConfig(
    backbone=ResNetConfig(depths=(1, 1, 1, 1), stem_channels=8, hidden_sizes=(16, 16, 32, 32)),
    pixel_decoder=PixelDecoderConfig(conv_dim=16, mask_dim=16, num_encoder_layers=1, num_heads=2, ffn_dim=16,
                                     norm_groups=16),
    transformer_decoder=TransformerDecoderConfig(hidden_dim=16, num_queries=3, num_heads=2, ffn_dim=16, num_layers=1),
    num_classes=2,
)


@pytest.fixture(scope="module")
def model() -> m2f.Mask2Former:
    torch.manual_seed(fresh_seed("test_model_inputs.model"))
    return m2f.build_model(CONFIG).eval()


def _images(rng: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=rng)


BAD_INPUTS = [
    ("uint8", lambda g: (_images(g, 1, 3, 64, 64) * 50 + 128).clamp(0, 255).to(torch.uint8), r"is torch\.uint8, not normalised floats; prepare images with m2f\.preprocess\.preprocess"),
    ("int64", lambda g: (_images(g, 1, 3, 64, 64) * 50).long(), r"is torch\.int64, not normalised floats"),
    ("bool", lambda g: _images(g, 1, 3, 64, 64) > 0, r"is torch\.bool, not normalised floats"),
    ("float64", lambda g: _images(g, 1, 3, 64, 64).double(), r"is torch\.float64 but the model is torch\.float32; pass pixel_values\.to\(torch\.float32\)"),
    ("float16", lambda g: _images(g, 1, 3, 64, 64).half(), r"is torch\.float16 but the model is torch\.float32"),
    ("numpy", lambda g: _images(g, 1, 3, 64, 64).numpy(), r"must be a torch\.Tensor, got ndarray; prepare images with m2f\.preprocess"),
    ("rank-3", lambda g: _images(g, 3, 64, 64), r"must be \(B, 3, H, W\) normalised RGB, got shape \(3, 64, 64\)"),
    ("channels-last", lambda g: _images(g, 1, 64, 64, 3), r"must be \(B, 3, H, W\) .*got shape \(1, 64, 64, 3\)"),
    ("gray", lambda g: _images(g, 1, 1, 64, 64), r"got shape \(1, 1, 64, 64\)"),
    ("empty-batch", lambda g: _images(g, 0, 3, 64, 64), r"empty batch \(B = 0\); pass at least one image"),
    ("too-small", lambda g: _images(g, 1, 3, 32, 20), r"32x20 is too small for this model: its 1/32 feature map \(1x1\)"),
    ("other-device", lambda g: torch.empty(1, 3, 64, 64, device="meta"), r"is on meta but the model is on cpu; pass pixel_values\.to\(model\.device\)"),
]


@pytest.mark.parametrize("make, message", [case[1:] for case in BAD_INPUTS], ids=[case[0] for case in BAD_INPUTS])
def test_bad_inputs_raise_one_line_input_errors(model, rng, make, message):
    with pytest.raises(InputError, match=message) as info:
        model(make(rng))
    assert "\n" not in str(info.value)


def test_odd_sizes_and_a_bfloat16_model_keep_working(model, rng):
    x = _images(rng, 2, 3, 33, 70)  # not a multiple of 32, res5 is 2x3: the model runs on it
    with torch.no_grad():
        out = model(x)
    assert out.pred_masks.shape == (2, 3, 9, 18)
    assert torch.isfinite(out.pred_masks).all(), f"seed {rng.seed_value}"
    low = m2f.build_model(CONFIG).eval().to(torch.bfloat16)
    with torch.no_grad():
        out = low(x.to(torch.bfloat16))
    assert out.pred_logits.dtype == torch.bfloat16 and torch.isfinite(out.pred_logits.float()).all(), (
        f"seed {rng.seed_value}"
    )


def test_numpy_images_are_accepted_through_preprocess(model):
    gen = np.random.default_rng(seeded_generator().seed_value)
    image = gen.integers(0, 256, size=(40, 50, 3), dtype=np.uint8)
    batch = preprocess([image], model.config)
    with torch.no_grad():
        out = model(batch.pixel_values)
    assert out.pred_masks.shape[:2] == (1, 3)
