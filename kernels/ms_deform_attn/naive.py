"""Plain-PyTorch multi-scale deformable attention: the reference every fast version is tested against.

Semantics of the official op (Deformable DETR's ``MSDeformAttnFunction``): for each query, head, level and
point, bilinearly sample the value map at ``sampling_locations`` (x, y in [0, 1], pixel centres at
(i + 0.5) / W, align_corners=False, zero outside the map) and sum with ``attention_weights``.

Non-finite inputs (these semantics define every backend; the float64 run of this function is the reference):
* A corner outside its map contributes exactly nothing: it is never read, so no weight multiplies it.
* A point whose sampling position is not strictly inside (-1, W) x (-1, H) in pixel units (x * W - 0.5), which
  includes NaN and inf locations, is skipped as in the official CUDA op: its attention weight, even inf or NaN,
  never multiplies, and it gets zero gradients.
* Every other point adds ``weight * bilinear sample``; non-finite values at in-bounds corners, and non-finite
  weights of points that are not skipped, propagate as IEEE arithmetic says.

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
    # Mixed dtypes (float32 locations with half value): compute in the wider one; grid_sample wants one dtype.
    dtype = torch.promote_types(torch.promote_types(value.dtype, sampling_locations.dtype), attention_weights.dtype)
    value_levels = value.to(dtype).split([h * w for h, w in shapes], dim=1)
    sampled, kept_weights = [], []
    for level, (h, w) in enumerate(shapes):
        loc = sampling_locations[:, :, :, level].to(dtype)  # (N, Lq, M, P, 2)
        # Pixel coordinates (centres at i + 0.5); comparisons with NaN are False, so NaN points are skipped.
        x_im, y_im = loc[..., 0] * w - 0.5, loc[..., 1] * h - 0.5
        inside = (x_im > -1) & (x_im < w) & (y_im > -1) & (y_im < h)  # (N, Lq, M, P)
        # Skipped points sample at -3 in grid units, outside every map: nothing is read and no NaN / inf
        # location reaches grid_sample (whose output and gradients would then be NaN).
        grid = torch.where(inside[..., None], 2 * loc - 1, -3.0)  # grid_sample wants [-1, 1]
        kept_weights.append(torch.where(inside, attention_weights[:, :, :, level].to(dtype), 0.0))
        # (N, H*W, M, D) -> (N*M, D, H, W). Contiguous: torch's CPU grid_sample reads garbage (NaN / huge
        # values) from this channel-minor layout in float16 / bfloat16 (seen with torch 2.13).
        v = value_levels[level].flatten(2).transpose(1, 2).reshape(N * M, D, h, w).contiguous()
        # (N, Lq, M, P, 2) -> (N*M, Lq, P, 2)
        g = grid.transpose(1, 2).flatten(0, 1)
        # (N*M, D, Lq, P)
        sampled.append(F.grid_sample(v, g, mode="bilinear", padding_mode="zeros", align_corners=False))
    # (N, Lq, M, L, P) -> (N*M, 1, Lq, L*P)
    weights = torch.stack(kept_weights, dim=3).transpose(1, 2).reshape(N * M, 1, Lq, L * P)
    out = (torch.stack(sampled, dim=-2).flatten(-2) * weights).sum(-1)  # (N*M, D, Lq)
    return out.view(N, M * D, Lq).transpose(1, 2).contiguous().to(value.dtype)
