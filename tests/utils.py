"""Shared test helpers."""
from __future__ import annotations

import torch


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖ / ‖ref‖ in float64; NaN anywhere makes it NaN, so `rel_err(...) <= tol` fails."""
    out64, ref64 = out.detach().double().cpu(), ref.detach().double().cpu()
    return float(torch.linalg.vector_norm(out64 - ref64) / torch.linalg.vector_norm(ref64).clamp_min(1e-300))


def poisoned_like(t: torch.Tensor) -> torch.Tensor:
    """An output buffer full of NaN: any element a kernel forgets to write shows up in the comparison."""
    return torch.full_like(t, float("nan"))
