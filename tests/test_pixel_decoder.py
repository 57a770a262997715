"""Pixel decoder: parity with Hugging Face's Mask2FormerPixelDecoder, official parameter names, init, export."""
from __future__ import annotations

import math

import pytest
import torch

from m2f.checkpoints.hf import pop_hf_pixel_decoder_state
from m2f.config import PixelDecoderConfig
from m2f.pixel_decoder import MSDeformAttnPixelDecoder, MultiScaleDeformableAttention, encoder_reference_points
from tests.utils import hf_config, perturb_, rel_err

hf_m2f = pytest.importorskip("transformers.models.mask2former.modeling_mask2former")

CHANNELS = {"res2": 16, "res3": 24, "res4": 40, "res5": 56}
STRIDES = {"res2": 4, "res3": 8, "res4": 16, "res5": 32}
# awkward, odd map sizes (as a 97 x 147 image would give)
SIZES = {"res2": (25, 37), "res3": (13, 19), "res4": (7, 10), "res5": (4, 5)}


def ours_config() -> PixelDecoderConfig:
    return PixelDecoderConfig(conv_dim=64, mask_dim=48, num_encoder_layers=2, num_heads=8, ffn_dim=96)


def build_pair(gen: torch.Generator):
    torch.manual_seed(gen.seed_value)
    hf = hf_m2f.Mask2FormerPixelDecoder(hf_config(), list(CHANNELS.values())).eval()
    with torch.no_grad():  # HF makes level_embed with torch.Tensor(...) (uninitialised memory: NaN in some processes)
        hf.level_embed.copy_(torch.randn(hf.level_embed.shape, generator=gen))  # and inits it in _init_weights only
    perturb_(hf, gen)
    ours = MSDeformAttnPixelDecoder(CHANNELS, STRIDES, ours_config()).eval()
    state = dict(hf.state_dict())
    converted = pop_hf_pixel_decoder_state(state, prefix="")
    assert not state, f"HF tensors left unconverted: {sorted(state)}"
    ours.load_state_dict(converted, strict=True)
    return hf, ours


def random_features(gen: torch.Generator, batch: int = 2, dtype=torch.float32) -> dict[str, torch.Tensor]:
    return {k: torch.randn(batch, CHANNELS[k], *SIZES[k], generator=gen).to(dtype) for k in CHANNELS}


def test_pixel_decoder_matches_transformers(rng):
    hf, ours = build_pair(rng)
    # HF's level_embed starts as uninitialised memory (seen: 1e23, NaN in full runs); build_pair draws it
    assert hf.level_embed.abs().max() < 10, f"seed {rng.seed_value}"
    feats = random_features(rng)
    with torch.no_grad():
        out = ours(feats)
        ref32 = hf(list(feats.values()))
        ref64 = hf.double()([f.double() for f in feats.values()])
    assert out.mask_features.shape == (2, 48, *SIZES["res2"])
    assert [tuple(f.shape[-2:]) for f in out.multi_scale_features] == [SIZES["res5"], SIZES["res4"], SIZES["res3"]]
    pairs = [(out.mask_features, ref32.mask_features, ref64.mask_features)] + list(
        zip(out.multi_scale_features, ref32.multi_scale_features, ref64.multi_scale_features)
    )
    for mine, r32, r64 in pairs:
        assert torch.isfinite(mine).all() and torch.isfinite(r64).all(), f"seed {rng.seed_value}"
        e32, e64 = rel_err(mine, r32), rel_err(mine, r64)
        assert e64 <= 1e-5, f"vs HF float64: rel_err {e64:.3g} (seed {rng.seed_value})"
        assert e32 <= 1e-5, f"vs HF float32: rel_err {e32:.3g} (seed {rng.seed_value})"


def test_pixel_decoder_parameter_names_are_official():
    ours = MSDeformAttnPixelDecoder(CHANNELS, STRIDES, ours_config())
    expected = set()
    for i in range(3):
        expected |= {f"input_proj.{i}.0.weight", f"input_proj.{i}.0.bias", f"input_proj.{i}.1.weight", f"input_proj.{i}.1.bias"}
    expected.add("transformer.level_embed")
    for i in range(2):
        p = f"transformer.encoder.layers.{i}."
        for sub in ("self_attn.sampling_offsets", "self_attn.attention_weights", "self_attn.value_proj",
                    "self_attn.output_proj", "norm1", "linear1", "linear2", "norm2"):
            expected |= {p + sub + ".weight", p + sub + ".bias"}
    expected |= {"adapter_1.weight", "adapter_1.norm.weight", "adapter_1.norm.bias"}
    expected |= {"layer_1.weight", "layer_1.norm.weight", "layer_1.norm.bias"}
    expected |= {"mask_features.weight", "mask_features.bias"}
    assert set(ours.state_dict()) == expected
    # the official input projection order is coarsest first
    assert ours.input_proj[0][0].in_channels == CHANNELS["res5"]
    assert ours.input_proj[2][0].in_channels == CHANNELS["res3"]


def test_deformable_attention_init_follows_deformable_detr():
    attn = MultiScaleDeformableAttention(d_model=64, n_levels=3, n_heads=8, n_points=4)
    bias = attn.sampling_offsets.bias.view(8, 3, 4, 2)
    for h in range(8):
        theta = 2 * math.pi * h / 8
        direction = torch.tensor([math.cos(theta), math.sin(theta)])
        direction = direction / direction.abs().max()
        for p in range(4):
            torch.testing.assert_close(bias[h, :, p], (direction * (p + 1)).expand(3, 2).float())
    assert not attn.sampling_offsets.weight.any() and not attn.attention_weights.weight.any()
    assert not attn.attention_weights.bias.any() and not attn.value_proj.bias.any()
    bound = math.sqrt(6 / (64 + 64))  # xavier uniform
    assert attn.value_proj.weight.abs().max() <= bound and attn.value_proj.weight.std() > bound / 4
    dec = MSDeformAttnPixelDecoder(CHANNELS, STRIDES, ours_config())
    assert dec.transformer.level_embed.std() > 0.5  # normal(0, 1)
    assert not dec.mask_features.bias.any() and not dec.input_proj[0][0].bias.any()


def test_reference_points_are_float32_pixel_centres():
    ref = encoder_reference_points([(3, 5), (2, 1)], torch.device("cpu"))
    assert ref.dtype == torch.float32 and ref.shape == (1, 17, 2)
    expected = [((x + 0.5) / 5, (y + 0.5) / 3) for y in range(3) for x in range(5)] + [(0.5, 0.25), (0.5, 0.75)]
    torch.testing.assert_close(ref[0].double(), torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-7)
