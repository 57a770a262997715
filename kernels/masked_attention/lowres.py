"""Mask logits at the keys' resolution, computed at that resolution.

The official decoder computes full-resolution mask logits (stride 4), then resizes them to the next attention
level: ``interpolate(einsum("bqc,bchw->bqhw", mask_embed, mask_features), size)``. Bilinear resizing is linear in
its input, so that equals ``einsum(mask_embed, interpolate(mask_features, size))`` in exact arithmetic; the latter
is a (B, Q, C) x (B, C, h·w) matmul at the small size, and the resized features can be shared by the layers that
attend to the same level. In floating point the two differ by rounding only; the allowed/forbidden decision
(logit >= 0) flips only for logits within rounding of zero (tests/test_masked_attention.py measures how often).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def resize_mask_features(mask_features: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, h, w), bilinear with align_corners=False (the official mask resize)."""
    return F.interpolate(mask_features, size=size, mode="bilinear", align_corners=False)


def lowres_mask_logits(
    mask_embed: torch.Tensor,  # (B, Q, C)
    mask_features: torch.Tensor,  # (B, C, H, W) stride-4 pixel decoder features
    size: tuple[int, int],  # (h, w) of the attention level
) -> torch.Tensor:  # (B, Q, h, w)
    """Mask logits at ``size``: ``einsum(mask_embed, resize(mask_features))`` (= resize(einsum) up to rounding)."""
    if tuple(mask_features.shape[-2:]) == tuple(size):
        feats = mask_features
    else:
        feats = resize_mask_features(mask_features, size)
    return torch.einsum("bqc,bchw->bqhw", mask_embed, feats)


def official_mask_logits(
    mask_embed: torch.Tensor,  # (B, Q, C)
    mask_features: torch.Tensor,  # (B, C, H, W)
    size: tuple[int, int],
) -> torch.Tensor:  # (B, Q, h, w)
    """The official order of operations: full-resolution logits, then bilinear resize."""
    full = torch.einsum("bqc,bchw->bqhw", mask_embed, mask_features)
    return F.interpolate(full, size=size, mode="bilinear", align_corners=False)
