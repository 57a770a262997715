"""Sine positional encoding of DETR / Mask2Former (``PositionEmbeddingSine(num_feats, normalize=True)``).

The official code builds it from an all-False padding mask (``cumsum`` of ones); without padding that is a plain
``arange``, which keeps the op free of data-dependent work so it traces and exports with symbolic H and W.
Computed in float32 in the same order of operations as the official code so results agree bit for bit in
practice.
"""
from __future__ import annotations

import math

import torch
from torch import nn


def sine_position_embedding(
    height: int,
    width: int,
    num_feats: int,
    *,
    temperature: float = 10000.0,
    scale: float = 2 * math.pi,
    device: torch.device | str | None = None,
) -> torch.Tensor:  # (1, 2 * num_feats, H, W) float32: y features first, then x
    """Normalised sine embedding of every pixel of an H x W map (coordinates 1..H, 1..W scaled to (0, 2π])."""
    eps = 1e-6
    y_embed = torch.arange(1, height + 1, dtype=torch.float32, device=device)  # (H,)
    x_embed = torch.arange(1, width + 1, dtype=torch.float32, device=device)  # (W,)
    y_embed = y_embed / (y_embed[-1:] + eps) * scale
    x_embed = x_embed / (x_embed[-1:] + eps) * scale

    dim_t = torch.arange(num_feats, dtype=torch.float32, device=device)
    dim_t = temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / num_feats)  # (F,)

    pos_y = y_embed[:, None] / dim_t  # (H, F)
    pos_x = x_embed[:, None] / dim_t  # (W, F)
    # interleave sin (even features) and cos (odd features) as the official code does
    pos_y = torch.stack((pos_y[:, 0::2].sin(), pos_y[:, 1::2].cos()), dim=2).flatten(1)  # (H, F)
    pos_x = torch.stack((pos_x[:, 0::2].sin(), pos_x[:, 1::2].cos()), dim=2).flatten(1)  # (W, F)
    pos = torch.cat(
        (pos_y[:, None, :].expand(height, width, num_feats), pos_x[None, :, :].expand(height, width, num_feats)),
        dim=2,
    )  # (H, W, 2F)
    return pos.permute(2, 0, 1).unsqueeze(0)


class PositionEmbeddingSine(nn.Module):
    """Module form of :func:`sine_position_embedding`; no parameters. Returns (1, 2F, H, W) for an input (B, C, H, W)."""

    def __init__(self, num_feats: int = 64, temperature: float = 10000.0, scale: float = 2 * math.pi) -> None:
        super().__init__()
        self.num_feats = num_feats
        self.temperature = temperature
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, C, H, W) -> (1, 2F, H, W) float32
        return sine_position_embedding(
            x.shape[-2], x.shape[-1], self.num_feats, temperature=self.temperature, scale=self.scale, device=x.device
        )

    def extra_repr(self) -> str:
        return f"num_feats={self.num_feats}, temperature={self.temperature}, normalize=True"
