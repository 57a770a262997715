"""Plain-PyTorch multi-scale deformable attention: the reference every fast version is tested against.

Semantics of the official op (Deformable DETR's ``MSDeformAttnFunction``): for each query, head, level and
point, bilinearly sample the value map at ``sampling_locations`` (x, y in [0, 1], pixel centres at
(i + 0.5) / W, align_corners=False, zero outside the map) and sum with ``attention_weights``.

Exports to ONNX as GridSample (opset >= 16) with no data-dependent indexing when ``spatial_shapes`` is given
as a sequence of (H, W) pairs (ints or symbolic sizes), which is how the model calls it.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

Shapes = Sequence[tuple[int, int]]


def level_shapes(spatial_shapes: torch.Tensor | Shapes) -> list[tuple[int, int]]:
    """(H, W) of every level as Python / symbolic ints (a tensor is read back, so only in eager mode)."""
    if isinstance(spatial_shapes, torch.Tensor):
        return [(int(h), int(w)) for h, w in spatial_shapes.tolist()]
    return [(h, w) for h, w in spatial_shapes]


def ms_deform_attn_torch(
    value: torch.Tensor,  # (N, S, M, D), S = sum of H_l * W_l
    spatial_shapes: torch.Tensor | Shapes,  # (L, 2) as (H, W)
    sampling_locations: torch.Tensor,  # (N, Lq, M, L, P, 2) as (x, y) in [0, 1]
    attention_weights: torch.Tensor,  # (N, Lq, M, L, P)
) -> torch.Tensor:  # (N, Lq, M * D)
    shapes = level_shapes(spatial_shapes)
    N, _, M, D = value.shape
    _, Lq, _, L, P, _ = sampling_locations.shape
    value_levels = value.split([h * w for h, w in shapes], dim=1)
    grids = 2 * sampling_locations - 1  # grid_sample wants [-1, 1]
    sampled = []
    for level, (h, w) in enumerate(shapes):
        # (N, H*W, M, D) -> (N*M, D, H, W). Contiguous: torch's CPU grid_sample reads garbage (NaN / huge
        # values) from this channel-minor layout in float16 / bfloat16 (seen with torch 2.13).
        v = value_levels[level].flatten(2).transpose(1, 2).reshape(N * M, D, h, w).contiguous()
        # (N, Lq, M, P, 2) -> (N*M, Lq, P, 2)
        g = grids[:, :, :, level].transpose(1, 2).flatten(0, 1)
        # (N*M, D, Lq, P)
        sampled.append(F.grid_sample(v, g, mode="bilinear", padding_mode="zeros", align_corners=False))
    # (N, Lq, M, L, P) -> (N*M, 1, Lq, L*P)
    weights = attention_weights.transpose(1, 2).reshape(N * M, 1, Lq, L * P)
    out = (torch.stack(sampled, dim=-2).flatten(-2) * weights).sum(-1)  # (N*M, D, Lq)
    return out.view(N, M * D, Lq).transpose(1, 2).contiguous()
