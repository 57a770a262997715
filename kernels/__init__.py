"""m2f.kernels: the two attention ops of Mask2Former, each with a plain-PyTorch reference and a Triton kernel.

* :func:`ms_deform_attn` - multi-scale deformable attention (pixel decoder), official op's argument layout.
* :func:`masked_attention` / :func:`masked_attention_from_logits` - masked cross-attention (transformer decoder).

``backend`` is "torch", "triton" or "auto" (Triton on CUDA, PyTorch elsewhere).
"""
from ._backend import BACKENDS, check_backend_name, resolve_backend
from .masked_attention import masked_attention, masked_attention_from_logits
from .ms_deform_attn import ms_deform_attn

__all__ = ["BACKENDS", "check_backend_name", "resolve_backend", "ms_deform_attn", "masked_attention", "masked_attention_from_logits"]
