"""Mask logits computed at the keys' resolution (einsum with resized features) against the official order
(resize of the full-resolution einsum): equal in exact arithmetic, equal to rounding in floating point."""
from __future__ import annotations

import pytest
import torch

from m2f.kernels.masked_attention import lowres_mask_logits, official_mask_logits
from tests.test_masked_attention import rng  # noqa: F401  (seeded generator fixture)
from tests.utils import rel_err

# stride-4 feature size -> attention level sizes (1/32, 1/16, 1/8 of the input): 256x256 and 800x1344 inputs
LEVELS = {(64, 64): [(8, 8), (16, 16), (32, 32)], (200, 336): [(25, 42), (50, 84), (100, 168)]}


@pytest.mark.parametrize("feature_size", list(LEVELS))
def test_lowres_equals_official_to_rounding(rng, feature_size):  # noqa: F811
    B, Q, C = 2, 20, 64
    embed = torch.randn(B, Q, C, generator=rng, dtype=torch.float64)
    feats = torch.randn(B, C, *feature_size, generator=rng, dtype=torch.float64)
    for size in LEVELS[feature_size]:
        official = official_mask_logits(embed, feats, size)
        assert official.shape == (B, Q, *size)
        # float64: bilinear resizing is linear, so the two orders agree to float64 rounding
        err = rel_err(lowres_mask_logits(embed, feats, size), official)
        assert err <= 1e-13, f"{size} seed {rng.seed_value}: {err}"
        err = rel_err(lowres_mask_logits(embed.float(), feats.float(), size), official)
        assert err <= 1e-6, f"{size} seed {rng.seed_value}: {err}"
    # same size: no resize at all
    assert torch.equal(lowres_mask_logits(embed, feats, feature_size),
                       torch.einsum("bqc,bchw->bqhw", embed, feats))


def test_allowed_decision_flips_only_within_rounding_of_zero(rng):  # noqa: F811
    """float32: the mask decision (logit >= 0) of the two orders differs only for logits within float32 rounding
    of zero; on random data that is < 1e-5 of the entries (measured: ~5e-7, i.e. 1 in 2 million)."""
    B, Q, C = 2, 50, 256
    embed = torch.randn(B, Q, C, generator=rng, dtype=torch.float64)
    feats = torch.randn(B, C, 64, 64, generator=rng, dtype=torch.float64)
    total = flips = 0
    for size in LEVELS[(64, 64)]:
        truth = official_mask_logits(embed, feats, size)
        official = official_mask_logits(embed.float(), feats.float(), size)
        lowres = lowres_mask_logits(embed.float(), feats.float(), size)
        differ = (official >= 0) != (lowres >= 0)
        total += differ.numel()
        flips += int(differ.sum())
        if differ.any():
            # both orders are within float32 rounding of the float64 truth at the flipped entries
            scale = float(truth.abs().max())
            assert float(truth[differ].abs().max()) <= 1e-5 * scale, f"seed {rng.seed_value}"
    assert flips <= 1e-5 * total, f"seed {rng.seed_value}: {flips} of {total} decisions differ"
