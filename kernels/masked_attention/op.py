"""``torch.library`` registration of the Triton masked attention: custom ops with fake kernels and autograd.

Ops (each returns ``(out, lse)``; ``lse`` is the base-2 log-sum-exp the backward recomputes from, float32 (float64 for
float64 inputs), and is not differentiable):

* ``m2f::masked_attention(Tensor q, Tensor k, Tensor v, Tensor allow) -> (Tensor, Tensor)``
* ``m2f::masked_attention_from_logits(Tensor q, Tensor k, Tensor v, Tensor mask_logits) -> (Tensor, Tensor)``
* ``m2f::masked_attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse,
  Tensor mask, bool mask_is_logits) -> (Tensor, Tensor, Tensor)``

``out`` is (B, H, Nq, D) with (B, Nq, H, D) memory, so ``out.transpose(1, 2).reshape(B, Nq, H * D)`` is free.
The mask (bool or logits) gets no gradient: Mask2Former detaches it. Opaque to ``torch.compile`` (one graph break-
free call each); works with torch 2.11 and 2.13.
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import triton_kernels as tk


def _fake_outputs(q: Tensor) -> tuple[Tensor, Tensor]:
    B, H, n_q, _ = q.shape
    return tk.new_output(q), q.new_empty((B, H, n_q), dtype=tk.stats_dtype(q.dtype))


@torch.library.custom_op("m2f::masked_attention", mutates_args=())
def masked_attention_op(q: Tensor, k: Tensor, v: Tensor, allow: Tensor) -> tuple[Tensor, Tensor]:
    return tk.masked_attention_fwd(q, k, v, allow, mask_is_logits=False)


@torch.library.custom_op("m2f::masked_attention_from_logits", mutates_args=())
def masked_attention_from_logits_op(q: Tensor, k: Tensor, v: Tensor, mask_logits: Tensor) -> tuple[Tensor, Tensor]:
    return tk.masked_attention_fwd(q, k, v, mask_logits, mask_is_logits=True)


@torch.library.custom_op("m2f::masked_attention_backward", mutates_args=())
def masked_attention_backward_op(
    grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, mask: Tensor, mask_is_logits: bool
) -> tuple[Tensor, Tensor, Tensor]:
    return tk.masked_attention_bwd(grad_out, q, k, v, out, lse, mask, mask_is_logits)


@masked_attention_op.register_fake
def _(q, k, v, allow):
    return _fake_outputs(q)


@masked_attention_from_logits_op.register_fake
def _(q, k, v, mask_logits):
    return _fake_outputs(q)


@masked_attention_backward_op.register_fake
def _(grad_out, q, k, v, out, lse, mask, mask_is_logits):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, mask = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, mask, out, lse)
    ctx.mark_non_differentiable(lse)


def _make_backward(mask_is_logits: bool):
    def backward(ctx, grad_out, grad_lse):
        q, k, v, mask, out, lse = ctx.saved_tensors
        dq, dk, dv = masked_attention_backward_op(grad_out, q, k, v, out, lse, mask, mask_is_logits)
        return dq, dk, dv, None

    return backward


masked_attention_op.register_autograd(_make_backward(False), setup_context=_setup_context)
masked_attention_from_logits_op.register_autograd(_make_backward(True), setup_context=_setup_context)
