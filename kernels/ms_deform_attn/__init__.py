"""Multi-scale deformable attention (Deformable DETR / Mask2Former pixel decoder).

``naive.py`` holds the plain-PyTorch reference; the Triton kernel and its ``torch.library`` op live beside it.
"""
from __future__ import annotations

import torch

from .._backend import resolve_backend
from .naive import Shapes, level_shapes, ms_deform_attn_torch


def ms_deform_attn(
    value: torch.Tensor,  # (N, S, M, D)
    spatial_shapes: torch.Tensor | Shapes,  # (L, 2) int (H, W), or a sequence of (H, W)
    level_start_index: torch.Tensor | None,  # (L,) int: offset of each level in S (derived when None)
    sampling_locations: torch.Tensor,  # (N, Lq, M, L, P, 2), (x, y) in [0, 1]
    attention_weights: torch.Tensor,  # (N, Lq, M, L, P)
    backend: str = "auto",
) -> torch.Tensor:  # (N, Lq, M * D)
    """Multi-scale deformable attention with the official op's argument layout."""
    backend = resolve_backend(backend, value.device)
    if backend == "torch":
        return ms_deform_attn_torch(value, spatial_shapes, sampling_locations, attention_weights)
    from m2f.errors import BackendUnavailableError

    raise BackendUnavailableError(
        "the Triton ms_deform_attn kernel is not available in this build; use backend='torch'"
    )


__all__ = ["ms_deform_attn", "ms_deform_attn_torch", "level_shapes"]
