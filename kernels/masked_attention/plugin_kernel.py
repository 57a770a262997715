"""Single-kernel masked attention for the TensorRT plugin ``m2f::masked_attention``.

    out = softmax(M + q kᵀ / √d) v,   M = 0 where mask_logit >= 0, -inf elsewhere,
    a query row with no allowed key attends to every key (Mask2Former's rule for empty predicted masks).

A TensorRT ahead-of-time Python plugin launches exactly one kernel, while the library's Triton masked attention
(``triton_kernels.py``) is a pipeline (pack the mask to bits + empty-row rule, split-KV forward, merge). This kernel
does it all in one launch, at the price of the split-KV parallelism and the packed mask:

  * One program per (batch·head, query tile); heads are the fastest grid axis, so the H programs of one query
    tile read the same mask rows back to back (from L2).
  * Pass 1 (cheap, no K/V): streams the tile's mask logits to find rows with no allowed key. It stops as soon as
    every row of the tile has one, so only tiles holding an empty row (or a row whose only allowed keys come
    late) read their whole mask rows twice.
  * Pass 2: online softmax over all keys with allow = (logit >= 0) | row_empty, float32 statistics and
    accumulators. With ``SKIP_EMPTY`` a key block that no row of the tile may attend to skips its K/V loads
    and dots.

Layout (TensorRT's linear format, contiguous; "BNHD": the projections' own layout, so the ONNX graph needs no
transpose around the plugin): q (B, Nq, H, D), k / v (B, Nk, H, D), mask logits (B, Nq, Nk) shared by the
heads, out (B, Nq, H, D). Arguments follow TensorRT's QDP calling convention: input pointers, int32 scalars,
output pointer.

Dtypes: q, k, v, out float32 / float16 / bfloat16 (one dtype); mask logits any float dtype (compared in float32);
float32 accumulation; float32 dots in IEEE precision (no TF32). Limits: head dim a constexpr (padded to a power
of two >= 16, tail masked); any Nq, Nk >= 1; batch offsets in int64, offsets inside one batch element in int32
(Nq·H·D, Nk·H·D, Nq·Nk < 2^31). Tested in Triton's interpreter (CPU, triton 3.9) against a float64 reference and
compiled ahead of time for sm_90 (H100) and sm_87 (Jetson Orin) (tests/test_export_trt_masked_attention.py); not
yet run on a GPU. The tile configs below are compile-checked (registers, no spills), not tuned on a GPU.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .._backend import triton_interpreter_enabled
from ..common import DTYPE_NAMES, ITEMSIZE, LOG2E, TRITON_TYPES, block_d

INTERPRET = triton_interpreter_enabled()

# Reductions through tl.reduce with the standard combine functions (as in triton_kernels.py): the same compiled
# code as tl.max / tl.sum, without the interpreter's cost of a nested @jit call per tile.
_MAX = tl.standard._elementwise_max
_SUM = tl.standard._sum_combine


@dataclass(frozen=True)
class PluginTile:
    """Compile-time tile of the plugin kernel and its launch width (TensorRT cannot autotune a Triton kernel)."""

    block_q: int  # queries per program
    block_k: int  # keys per step of the attention pass
    scan_k: int  # keys per step of the empty-row pass
    skip_empty: bool
    num_warps: int
    num_stages: int


# float32 dots in IEEE precision run on the FMA units and need small tiles to stay within 255 registers; half
# dots run on tensor cores. Few query tiles (Mask2Former has 100-200 queries) keep the tiles short in Q so that
# B·H·cdiv(Nq, BLOCK_Q) programs still spread over the SMs.
PLUGIN_TILES = {
    "float32": PluginTile(block_q=32, block_k=32, scan_k=128, skip_empty=True, num_warps=4, num_stages=2),
    "half": PluginTile(block_q=32, block_k=64, scan_k=128, skip_empty=True, num_warps=4, num_stages=2),
}
# Tiny tiles under the interpreter, so that small test shapes reach every tail and several tiles.
INTERPRETER_TILE = PluginTile(block_q=16, block_k=16, scan_k=32, skip_empty=True, num_warps=1, num_stages=1)


def plugin_tile(dtype: str) -> PluginTile:
    """The tile for q / k / v of ``dtype`` ("float32", "float16", "bfloat16")."""
    if dtype not in ("float32", "float16", "bfloat16"):
        raise ValueError(f"the masked-attention plugin kernel takes float32, float16 or bfloat16, got {dtype}")
    return PLUGIN_TILES["float32" if dtype == "float32" else "half"]


@triton.jit
def masked_attention_plugin_kernel(
    Q,  # (B, Nq, H, D) input
    K,  # (B, Nk, H, D) input
    V,  # (B, Nk, H, D) input
    MASK,  # (B, Nq, Nk) mask logits, input: allowed where >= 0
    n_q, n_k, num_heads,  # int32 scalars
    OUT,  # (B, Nq, H, D) output, q's dtype
    QK_SCALE: tl.constexpr,  # log2(e) / √D: scores in base 2
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,  # HEAD_DIM rounded up to a power of two >= 16
    ROW_ALIGNED: tl.constexpr,  # every (token, head) row of q / k / v / out starts on 16 bytes
    DOT_PRECISION: tl.constexpr,  # "ieee" for float32 inputs
    DOT_DTYPE: tl.constexpr,  # the input dtype (float32 for bfloat16 under the interpreter, see _dot_dtype)
    BLOCK_Q: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SCAN_K: tl.constexpr,
    SKIP_EMPTY: tl.constexpr,
):
    # grid: (B * H, cdiv(Nq, BLOCK_Q)); heads fastest
    pid_bh = tl.program_id(0)
    pid_q = tl.program_id(1)
    b = (pid_bh // num_heads).to(tl.int64)
    h = pid_bh % num_heads

    offs_q = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    offs_d = tl.arange(0, BLOCK_D)
    q_in = offs_q < n_q
    d_in = offs_d < HEAD_DIM
    row = num_heads * HEAD_DIM  # elements between two tokens of q / k / v / out

    p_q = Q + b * n_q * row + h * HEAD_DIM
    p_k = K + b * n_k * row + h * HEAD_DIM
    p_v = V + b * n_k * row + h * HEAD_DIM
    p_o = OUT + b * n_q * row + h * HEAD_DIM
    if ROW_ALIGNED:
        # Triton's JIT learns alignment from the arguments; an ahead-of-time build does not, and without the hint
        # every channel is its own scalar load. Row offsets are multiples of HEAD_DIM, so it carries to each row.
        p_q = tl.multiple_of(p_q, 16)
        p_k = tl.multiple_of(p_k, 16)
        p_v = tl.multiple_of(p_v, 16)
        p_o = tl.multiple_of(p_o, 16)
    p_m = MASK + b * n_q * n_k + offs_q[:, None] * n_k  # (BQ, 1) start of each mask row

    # Pass 1: rows of the tile with no allowed key (rows past Nq count as having one).
    offs_s = tl.arange(0, SCAN_K)
    b_found = (~q_in).to(tl.int32)  # (BQ,)
    n_open = tl.reduce(1 - b_found, 0, _SUM)
    start = n_open * 0
    while (start < n_k) & (n_open > 0):
        key = start + offs_s
        b_m = tl.load(p_m + key[None, :], mask=q_in[:, None] & (key < n_k)[None, :], other=-1.0)  # (BQ, SCAN_K)
        # float32 compare: the interpreter compares bfloat16 bit patterns
        b_found = b_found | tl.reduce((b_m.to(tl.float32) >= 0).to(tl.int32), 1, _MAX)
        n_open = tl.reduce(1 - b_found, 0, _SUM)
        start += SCAN_K
    b_empty = b_found == 0  # (BQ,) these rows attend to every key

    # Pass 2: online softmax over the keys.
    b_q = tl.load(p_q + offs_q[:, None] * row + offs_d[None, :], mask=q_in[:, None] & d_in[None, :], other=0.0)
    offs_k = tl.arange(0, BLOCK_K)
    m_i = tl.full([BLOCK_Q], -1.0e30, dtype=tl.float32)  # finite: exp2(m_old - m_new) never sees inf - inf
    l_i = tl.zeros([BLOCK_Q], dtype=tl.float32)
    acc = tl.zeros([BLOCK_Q, BLOCK_D], dtype=tl.float32)
    for k_start in range(0, n_k, BLOCK_K):
        key = k_start + offs_k
        k_in = key < n_k
        b_m = tl.load(p_m + key[None, :], mask=q_in[:, None] & k_in[None, :], other=-1.0)  # (BQ, BK)
        b_allow = ((b_m.to(tl.float32) >= 0) | b_empty[:, None]) & (q_in[:, None] & k_in[None, :])
        if SKIP_EMPTY:
            run = tl.reduce(tl.reduce(b_allow.to(tl.int32), 1, _MAX), 0, _MAX) > 0
        else:
            run = True
        if run:
            kv_mask = k_in[:, None] & d_in[None, :]
            b_k = tl.load(p_k + key[:, None] * row + offs_d[None, :], mask=kv_mask, other=0.0)  # (BK, BD)
            b_v = tl.load(p_v + key[:, None] * row + offs_d[None, :], mask=kv_mask, other=0.0)  # (BK, BD)
            # (BQ, BD) x (BD, BK) -> (BQ, BK), base-2 scores
            b_s = tl.dot(b_q.to(DOT_DTYPE), tl.trans(b_k.to(DOT_DTYPE)), input_precision=DOT_PRECISION) * QK_SCALE
            b_s = tl.where(b_allow, b_s, float("-inf"))
            m_new = tl.maximum(m_i, tl.reduce(b_s, 1, _MAX))
            b_p = tl.math.exp2(b_s - m_new[:, None])  # forbidden keys: exp2(-inf) = 0
            alpha = tl.math.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.reduce(b_p, 1, _SUM)
            # (BQ, BK) x (BK, BD) -> (BQ, BD); p rounded to the input dtype as in FlashAttention
            b_pv = tl.dot(b_p.to(b_v.dtype).to(DOT_DTYPE), b_v.to(DOT_DTYPE), input_precision=DOT_PRECISION)
            acc = acc * alpha[:, None] + b_pv
            m_i = m_new

    # Every row in range has an allowed key (or is empty, hence allows all), so l_i > 0 there.
    b_o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(p_o + offs_q[:, None] * row + offs_d[None, :], b_o.to(OUT.dtype.element_ty),
             mask=q_in[:, None] & d_in[None, :])


# ---------------------------------------------------------------------------------------------------------------
# Compile-time parameters (shared by the Python launcher and the TensorRT plugin's ahead-of-time build)
# ---------------------------------------------------------------------------------------------------------------

_TL_DTYPES = {"float32": tl.float32, "float16": tl.float16, "bfloat16": tl.bfloat16}


def _dot_dtype(dtype: str, interpret: bool):
    """Operand dtype of the dots: the input dtype, except bfloat16 under the interpreter, whose tl.dot (triton 3.9)
    multiplies bfloat16 bit patterns as integers; there the operands (already bfloat16 values) go to float32."""
    if interpret and dtype == "bfloat16":
        return tl.float32
    return _TL_DTYPES[dtype]


def plugin_constexprs(head_dim: int, dtype: str, tile: PluginTile | None = None, interpret: bool = False) -> dict:
    """Compile-time arguments of :func:`masked_attention_plugin_kernel` for q / k / v of ``dtype``.

    ROW_ALIGNED holds when a (token, head) row is a multiple of 16 bytes: TensorRT's buffers are 256-byte
    aligned, so every row then starts aligned (the Python launcher also checks the pointers)."""
    tile = tile or plugin_tile(dtype)
    return {
        "QK_SCALE": LOG2E / math.sqrt(head_dim), "HEAD_DIM": head_dim, "BLOCK_D": block_d(head_dim),
        "ROW_ALIGNED": head_dim * ITEMSIZE[dtype] % 16 == 0,
        "DOT_PRECISION": "ieee" if dtype == "float32" else "tf32",  # the latter only matters for float32
        "DOT_DTYPE": _dot_dtype(dtype, interpret),
        "BLOCK_Q": tile.block_q, "BLOCK_K": tile.block_k, "SCAN_K": tile.scan_k, "SKIP_EMPTY": tile.skip_empty,
    }


def plugin_signature(dtype: str, mask_dtype: str | None = None) -> dict[str, str]:
    """Triton signature in the QDP order: 4 input pointers, 3 int32 scalars, the output pointer, constexprs."""
    t = "*" + TRITON_TYPES[dtype]
    m = "*" + TRITON_TYPES[mask_dtype or dtype]
    consts = ("QK_SCALE", "HEAD_DIM", "BLOCK_D", "ROW_ALIGNED", "DOT_PRECISION", "DOT_DTYPE", "BLOCK_Q", "BLOCK_K",
              "SCAN_K", "SKIP_EMPTY")
    return {"Q": t, "K": t, "V": t, "MASK": m, "n_q": "i32", "n_k": "i32", "num_heads": "i32", "OUT": t,
            **{c: "constexpr" for c in consts}}


def plugin_grid(batch, num_heads, n_q, block_q: int, cdiv=None) -> tuple:
    """(B·H, cdiv(Nq, BLOCK_Q), 1), over ints or TensorRT's symbolic dims (pass ``cdiv`` for those)."""
    cdiv = cdiv or (lambda a, b: (a + b - 1) // b)
    return batch * num_heads, cdiv(n_q, block_q), 1


# ---------------------------------------------------------------------------------------------------------------
# Python launcher (tests; the same kernel TensorRT runs)
# ---------------------------------------------------------------------------------------------------------------



def masked_attention_plugin(
    q: torch.Tensor,  # (B, Nq, H, D)
    k: torch.Tensor,  # (B, Nk, H, D)
    v: torch.Tensor,  # (B, Nk, H, D)
    mask_logits: torch.Tensor,  # (B, Nq, Nk): allowed where >= 0
    out: torch.Tensor | None = None,  # (B, Nq, H, D) buffer to write (tests pass one poisoned with NaN)
    tile: PluginTile | None = None,
) -> torch.Tensor:  # (B, Nq, H, D) in q's dtype
    """Launch the plugin kernel on torch tensors in the plugin's layout (contiguous), as TensorRT would."""
    B, n_q, H, D = q.shape
    n_k = k.shape[1]
    if k.shape != (B, n_k, H, D) or v.shape != k.shape or mask_logits.shape != (B, n_q, n_k):
        raise ValueError(f"shapes do not fit the plugin layout: q {tuple(q.shape)} (B, Nq, H, D), k {tuple(k.shape)}, "
                         f"v {tuple(v.shape)} (B, Nk, H, D), mask {tuple(mask_logits.shape)} (B, Nq, Nk)")
    if q.dtype not in DTYPE_NAMES or not (q.dtype == k.dtype == v.dtype) or not mask_logits.is_floating_point():
        raise ValueError(f"q, k, v must share float32 / float16 / bfloat16, mask a float dtype; got {q.dtype}, "
                         f"{k.dtype}, {v.dtype}, {mask_logits.dtype}")
    q, k, v, mask_logits = (t.contiguous() for t in (q, k, v, mask_logits))
    out = torch.empty_like(q) if out is None else out
    if out.shape != q.shape or out.dtype != q.dtype or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous {q.dtype} tensor of shape {tuple(q.shape)}")
    dtype = DTYPE_NAMES[q.dtype]
    tile = tile or (INTERPRETER_TILE if INTERPRET else plugin_tile(dtype))
    consts = plugin_constexprs(D, dtype, tile, interpret=INTERPRET)
    consts["ROW_ALIGNED"] = consts["ROW_ALIGNED"] and all(t.data_ptr() % 16 == 0 for t in (q, k, v, out))
    grid = plugin_grid(B, H, n_q, tile.block_q)
    masked_attention_plugin_kernel[grid](q, k, v, mask_logits, n_q, n_k, H, out, **consts,
                                         num_warps=tile.num_warps, num_stages=tile.num_stages)
    return out
