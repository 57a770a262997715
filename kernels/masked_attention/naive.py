"""Plain-PyTorch masked attention: the reference every fast version is tested against.

softmax(M + q kᵀ / sqrt(d)) v with M = 0 where ``allow`` and -inf elsewhere; a query row with no allowed key
attends to every key (Mask2Former's rule for queries whose predicted mask is empty). Heads share ``allow``
when it is (B, Nq, Nk). Pure tensor ops (no data-dependent indexing), so it traces and exports.

Non-finite inputs (these semantics define every backend): a forbidden key contributes nothing, even when its K or V
is inf / NaN; everything else follows IEEE arithmetic (an allowed inf / NaN value reaches its rows' outputs, an
allowed inf score makes its row NaN, as does a row whose allowed scores are all -inf; an allowed inf value
counts even where its probability underflows to 0). Gradients are meaningful for finite allowed inputs; non-finite values of
forbidden keys leave them unchanged (a non-finite K of a forbidden key still makes dQ NaN: q kᵀ's backward multiplies
it by a zero).
"""
from __future__ import annotations

import torch


def normalize_allow(allow: torch.Tensor, num_heads: int) -> torch.Tensor:
    """(B, Nq, Nk) or (B, H, Nq, Nk) bool -> (B, 1 or H, Nq, Nk) with empty rows opened to every key."""
    if allow.dtype != torch.bool:
        raise TypeError(f"allow must be a bool tensor, got {allow.dtype}")
    if allow.dim() == 3:
        allow = allow.unsqueeze(1)
    elif allow.dim() != 4 or allow.shape[1] not in (1, num_heads):
        raise ValueError(f"allow must be (B, Nq, Nk) or (B, {num_heads}, Nq, Nk), got {tuple(allow.shape)}")
    return allow | ~allow.any(dim=-1, keepdim=True)


def masked_attention_torch(
    q: torch.Tensor,  # (B, H, Nq, D)
    k: torch.Tensor,  # (B, H, Nk, D)
    v: torch.Tensor,  # (B, H, Nk, D)
    allow: torch.Tensor,  # (B, Nq, Nk) or (B, H, Nq, Nk) bool, True = may attend
) -> torch.Tensor:  # (B, H, Nq, D)
    allow = normalize_allow(allow, q.shape[1])
    scores = torch.matmul(q, k.transpose(-1, -2)) * (q.shape[-1] ** -0.5)  # (B, H, Nq, Nk)
    scores = scores.masked_fill(~allow, float("-inf"))
    # softmax in float32 for half inputs, in the input precision otherwise (float64 references stay float64)
    probs = torch.softmax(scores.float() if scores.element_size() < 4 else scores, dim=-1)
    # A forbidden key's probability is 0, and 0 times an inf / NaN value would be NaN: values enter the product
    # finite, and the non-finite ones of allowed keys are added back per (row, channel): +inf where an allowed key
    # holds NaN or +inf, -inf where one holds NaN or -inf; the IEEE sum makes NaN of both.
    finite = torch.isfinite(v)
    out = torch.matmul(probs.to(v.dtype), torch.where(finite, v, 0))
    counts = torch.matmul(allow.to(v.dtype), torch.cat(((~finite & (v != -torch.inf)).to(v.dtype),
                                                         (~finite & (v != torch.inf)).to(v.dtype)), dim=-1))
    up, down = (counts > 0).chunk(2, dim=-1)  # (B, H, Nq, D) each
    return out + torch.where(up, torch.inf, 0.0) + torch.where(down, -torch.inf, 0.0)  # inf + -inf = NaN


def masked_attention_from_logits_torch(
    q: torch.Tensor,  # (B, H, Nq, D)
    k: torch.Tensor,  # (B, H, Nk, D)
    v: torch.Tensor,  # (B, H, Nk, D)
    mask_logits: torch.Tensor,  # (B, Nq, Nk) previous layer's mask logits at the keys' resolution
) -> torch.Tensor:  # (B, H, Nq, D)
    """Same as :func:`masked_attention_torch` with allow = (mask_logits >= 0), i.e. sigmoid >= 0.5."""
    return masked_attention_torch(q, k, v, mask_logits >= 0)
