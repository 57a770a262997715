"""Masked cross-attention of the Mask2Former transformer decoder.

``naive.py`` holds the plain-PyTorch reference; the Triton kernel and its ``torch.library`` op live beside it.
"""
from __future__ import annotations

import torch

from .._backend import resolve_backend
from .naive import masked_attention_from_logits_torch, masked_attention_torch, normalize_allow


def masked_attention(
    q: torch.Tensor,  # (B, H, Nq, D)
    k: torch.Tensor,  # (B, H, Nk, D)
    v: torch.Tensor,  # (B, H, Nk, D)
    allow: torch.Tensor,  # (B, Nq, Nk) or (B, H, Nq, Nk) bool, True = may attend
    backend: str = "auto",
) -> torch.Tensor:  # (B, H, Nq, D)
    """softmax(M + q kᵀ/√d) v; a row with no allowed key attends to all keys."""
    backend = resolve_backend(backend, q.device)
    if backend == "torch":
        return masked_attention_torch(q, k, v, allow)
    from m2f.errors import BackendUnavailableError

    raise BackendUnavailableError(
        "the Triton masked_attention kernel is not available in this build; use backend='torch'"
    )


def masked_attention_from_logits(
    q: torch.Tensor,  # (B, H, Nq, D)
    k: torch.Tensor,  # (B, H, Nk, D)
    v: torch.Tensor,  # (B, H, Nk, D)
    mask_logits: torch.Tensor,  # (B, Nq, Nk): allowed where logit >= 0 (sigmoid >= 0.5)
    backend: str = "auto",
) -> torch.Tensor:  # (B, H, Nq, D)
    """Masked attention taking the previous layer's mask logits at the keys' resolution instead of a bool."""
    backend = resolve_backend(backend, q.device)
    if backend == "torch":
        return masked_attention_from_logits_torch(q, k, v, mask_logits)
    from m2f.errors import BackendUnavailableError

    raise BackendUnavailableError(
        "the Triton masked_attention kernel is not available in this build; use backend='torch'"
    )


__all__ = ["masked_attention", "masked_attention_from_logits", "masked_attention_torch", "normalize_allow"]
