"""Masked cross-attention of the Mask2Former transformer decoder.

``naive.py`` holds the plain-PyTorch reference; ``triton_kernels.py`` the fused Triton kernels (the mask, bool or
logits, packed to bits by a pre-pass that also applies the empty-row rule; split-KV flash attention; FA2-style
backward; see its header); ``op.py`` their ``torch.library`` ops (``m2f::masked_attention``: bool mask, (B, H, N, D);
``m2f::masked_attention_from_logits``) with fake kernels and autograd; ``plugin_kernel.py`` a single-kernel
forward (mask logits read in place, empty-row rule inside) for the TensorRT plugin ``m2f::masked_attention_logits``
((B, N, H, D), see m2f.export.plugins), which can launch only one kernel.
"""
from __future__ import annotations

import torch

from m2f.errors import InputError

from .._backend import resolve_backend
from .naive import masked_attention_from_logits_torch, masked_attention_torch, normalize_allow

_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
MAX_HEAD_DIM = 256
INT32_SPAN = 2**31  # offsets inside one (batch, head) slice are int32 in the kernels


def _slice_span(t: torch.Tensor) -> int:
    """Largest element offset inside one (batch, head) slice of a (B, H, ...) tensor, plus one."""
    return 1 + sum((size - 1) * abs(stride) for size, stride in zip(t.shape[2:], t.stride()[2:]))


def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, mask_name: str,
                  backend: str) -> None:
    """Raise InputError naming the problem when the shapes, dtypes or devices do not fit together."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise InputError(f"{name} must be 4-D (B, H, N, D), got shape {tuple(t.shape)}")
    B, H, n_q, D = q.shape
    if k.shape[:2] != (B, H) or k.shape[3] != D or v.shape != k.shape:
        raise InputError(
            f"q {tuple(q.shape)}, k {tuple(k.shape)} and v {tuple(v.shape)} do not fit: expected q (B, H, Nq, D) "
            "and k, v both (B, H, Nk, D)"
        )
    n_k = k.shape[2]
    if n_q == 0 or n_k == 0 or D == 0 or B == 0 or H == 0:
        raise InputError(f"empty attention: q {tuple(q.shape)}, k {tuple(k.shape)}; every size must be >= 1")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in _DTYPES:
        raise InputError(f"q, k, v must share one dtype of float32, float16, bfloat16 or float64, got {q.dtype}, "
                         f"{k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device == mask.device):
        raise InputError(f"q, k, v and {mask_name} must be on one device, got {q.device}, {k.device}, {v.device}, "
                         f"{mask.device}")
    if mask.shape not in ((B, n_q, n_k), (B, H, n_q, n_k), (B, 1, n_q, n_k)):
        raise InputError(
            f"{mask_name} must be (B, Nq, Nk) = {(B, n_q, n_k)} or (B, H, Nq, Nk) = {(B, H, n_q, n_k)}, "
            f"got {tuple(mask.shape)}"
        )
    if backend == "triton":
        if D > MAX_HEAD_DIM:
            raise InputError(f"the Triton kernel supports head dim <= {MAX_HEAD_DIM}, got {D}; use backend='torch'")
        mask4 = mask if mask.dim() == 4 else mask.unsqueeze(1)
        for name, t in (("q", q), ("k", k), ("v", v), (mask_name, mask4)):
            if _slice_span(t) >= INT32_SPAN:
                raise InputError(
                    f"{name} {tuple(t.shape)} with strides {t.stride()} spans {_slice_span(t)} elements per (batch, "
                    "head), more than the Triton kernel's int32 offsets reach (2^31); split the keys or queries, or "
                    "use backend='torch'"
                )


def masked_attention(
    q: torch.Tensor,  # (B, H, Nq, D)
    k: torch.Tensor,  # (B, H, Nk, D)
    v: torch.Tensor,  # (B, H, Nk, D)
    allow: torch.Tensor,  # (B, Nq, Nk) or (B, H, Nq, Nk) bool, True = may attend
    backend: str = "auto",
) -> torch.Tensor:  # (B, H, Nq, D)
    """softmax(M + q kᵀ/√d) v; a row with no allowed key attends to all keys."""
    backend = resolve_backend(backend, q.device)
    if allow.dtype != torch.bool:
        raise InputError(f"allow must be a bool tensor, got {allow.dtype}; for mask logits use "
                         "masked_attention_from_logits")
    _check_inputs(q, k, v, allow, "allow", backend)
    if backend == "torch":
        return masked_attention_torch(q, k, v, allow)
    from .op import masked_attention_op

    return masked_attention_op(q, k, v, allow)[0]


def masked_attention_from_logits(
    q: torch.Tensor,  # (B, H, Nq, D)
    k: torch.Tensor,  # (B, H, Nk, D)
    v: torch.Tensor,  # (B, H, Nk, D)
    mask_logits: torch.Tensor,  # (B, Nq, Nk) (or (B, H, Nq, Nk)): allowed where logit >= 0 (sigmoid >= 0.5)
    backend: str = "auto",
) -> torch.Tensor:  # (B, H, Nq, D)
    """Masked attention taking the previous layer's mask logits at the keys' resolution instead of a bool.

    The logits are detached (no gradient flows into them, as in Mask2Former).
    """
    backend = resolve_backend(backend, q.device)
    if not mask_logits.is_floating_point():
        raise InputError(f"mask_logits must be a floating tensor, got {mask_logits.dtype}; for a bool mask use "
                         "masked_attention")
    _check_inputs(q, k, v, mask_logits, "mask_logits", backend)
    mask_logits = mask_logits.detach()
    if backend == "torch":
        return masked_attention_from_logits_torch(q, k, v, mask_logits)
    from .op import masked_attention_from_logits_op

    return masked_attention_from_logits_op(q, k, v, mask_logits)[0]


__all__ = [
    "masked_attention",
    "masked_attention_from_logits",
    "masked_attention_torch",
    "masked_attention_from_logits_torch",
    "normalize_allow",
]
