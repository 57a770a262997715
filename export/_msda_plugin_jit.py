"""The QDP-ordered MSDA plugin kernel (inputs, int32 scalars, output), in a module of its own so that
:mod:`m2f.export.plugins` (and with it ONNX export) imports without Triton; see ``plugins.msda_plugin_kernel``."""
from __future__ import annotations

from typing import Any

import triton
import triton.language as tl

# m2f's MSDA kernel body (the JITFunction behind its autotuner), bound by plugins.msda_plugin_kernel() on first use.
_msda_body: Any = None


@triton.jit
def msda_trt_plugin_kernel(
    value_ptr, shapes_ptr, starts_ptr, loc_ptr, attn_ptr,  # inputs: (N, S, M, D), (L, 2), (L,), locations, weights
    num_keys, num_queries, num_heads,  # int32 scalars: S, Lq, M
    out_ptr,  # output (N, Lq, M, D)
    NUM_LEVELS: tl.constexpr, NUM_POINTS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    ROW_ALIGNED: tl.constexpr, BLOCK_Q: tl.constexpr,
):
    _msda_body(value_ptr, shapes_ptr, starts_ptr, loc_ptr, attn_ptr, out_ptr, num_keys, num_queries, num_heads,
               NUM_LEVELS, NUM_POINTS, HEAD_DIM, BLOCK_D, ROW_ALIGNED, BLOCK_Q)
