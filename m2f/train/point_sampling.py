"""Point sampling of mask logits (PointRend, as Mask2Former trains with it).

Coordinates are (x, y) in [0, 1] over the whole mask; :func:`point_sample` reads them with
``grid_sample(bilinear, align_corners=False, padding_mode="zeros")`` exactly as detectron2's
``point_sample`` does, so points within half a pixel of the border blend with zero padding, as officially.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F


def point_sample(features: torch.Tensor, coords: torch.Tensor, align_corners: bool = False) -> torch.Tensor:
    """Bilinear samples of ``features`` (N, C, H, W) at ``coords`` (N, P, 2) in [0, 1] -> (N, C, P)."""
    grid = 2.0 * coords.unsqueeze(2) - 1.0  # (N, P, 1, 2) in [-1, 1]
    return F.grid_sample(features, grid, mode="bilinear", padding_mode="zeros", align_corners=align_corners).squeeze(3)


def logit_uncertainty(logits: torch.Tensor) -> torch.Tensor:
    """Uncertainty of binary mask logits: -|logit| (highest at the 0.5 probability boundary)."""
    return -logits.abs()


def uncertain_point_coords(
    logits: torch.Tensor,  # (N, 1, H, W)
    num_points: int,
    oversample_ratio: float = 3.0,
    importance_sample_ratio: float = 0.75,
    uncertainty: Callable[[torch.Tensor], torch.Tensor] = logit_uncertainty,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """PointRend's training points: oversample uniformly, keep the most uncertain ``importance_sample_ratio``
    of ``num_points``, fill the rest uniformly. Returns (N, num_points, 2) in [0, 1]."""
    n = logits.shape[0]
    num_sampled = int(num_points * oversample_ratio)
    coords = torch.rand(n, num_sampled, 2, device=logits.device, generator=generator)
    scores = uncertainty(point_sample(logits, coords))  # (N, 1, S)
    num_uncertain = int(importance_sample_ratio * num_points)
    num_random = num_points - num_uncertain
    # the chosen set is what matters (losses are means over points); unsorted top-k is ~3x faster on CPU
    top = torch.topk(scores[:, 0, :], k=num_uncertain, dim=1, sorted=False).indices  # (N, U)
    coords = torch.gather(coords, 1, top.unsqueeze(-1).expand(-1, -1, 2))  # (N, U, 2)
    if num_random > 0:
        extra = torch.rand(n, num_random, 2, device=logits.device, generator=generator)
        coords = torch.cat([coords, extra], dim=1)
    return coords
