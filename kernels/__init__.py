"""m2f.kernels: the two attention ops of Mask2Former, each with a plain-PyTorch reference and a Triton kernel.

* :func:`ms_deform_attn` - multi-scale deformable attention (pixel decoder), official op's argument layout.
* :func:`masked_attention` / :func:`masked_attention_from_logits` - masked cross-attention (transformer decoder).

``backend`` is "torch", "triton" or "auto" (Triton on CUDA, PyTorch elsewhere).
"""
if __name__ != "m2f.kernels":
    # Where a checkout's root is on sys.path (its working directory, pytest), this folder is also importable as
    # top-level ``kernels``: the name of Hugging Face's kernel-hub package, which ``import transformers`` probes by
    # importing it. Run under that second name, the ops' modules would define the m2f:: torch.library ops again,
    # which deletes m2f.kernels' definitions and leaves its op handles dangling (garbage, crashes). So under any
    # other name this package is empty and has no submodules.
    __path__: list[str] = []
    __all__: list[str] = []
else:
    from ._backend import BACKENDS, check_backend_name, resolve_backend
    from .masked_attention import masked_attention, masked_attention_from_logits
    from .ms_deform_attn import ms_deform_attn

    __all__ = ["BACKENDS", "check_backend_name", "resolve_backend", "ms_deform_attn", "masked_attention",
               "masked_attention_from_logits"]
