"""Triton kernels for Mask2Former's masked cross-attention, with the mask computed inside the kernel.

    out = softmax(M + q kᵀ / √d) v,   M = 0 where allowed, -inf elsewhere,
    a query row with no allowed key attends to every key (Mask2Former's rule for empty predicted masks).

The mask is read in place, never expanded: either a bool tensor (read as uint8, allowed ⇔ != 0) or the previous
layer's mask logits (any float dtype, allowed ⇔ logit >= 0, i.e. sigmoid >= 0.5), shaped (B, Nq, Nk) and shared
by the heads, or (B, H, Nq, Nk) per head. Scores are never materialised: online softmax in float32.

Design
  * Empty rows. A row's emptiness is a property of the whole key range, but with split-KV no program sees the
    whole range. So emptiness is decided *before* the attention pass and the pass itself is single:
      - several key splits: ``_row_empty_kernel`` (one program per mask row, one streaming read of the mask)
        writes a (B, Hm, Nq) int8 flag; the attention programs load the flags of their rows and treat a flagged
        row as all-allowed.
      - one key split (small Nk, or enough programs already): the attention program pre-scans its rows' mask
        itself (``PRESCAN``), saving a launch; the repeated read of the mask row hits L2 / L1.
    The alternatives (a second softmax state for "all keys" carried through the pass, or a fix-up pass for
    empty rows after the merge) double the exp/PV work or add two launches.
  * Split-KV. ~100 queries give B·H·2 programs, far fewer than the SMs; the keys are split across programs that
    write normalised partials (o_s, lse_s) which ``_merge_kernel`` combines. A split whose rows see no allowed
    key writes lse_s = -inf, o_s = 0 (weight 0 in the merge); the empty-row flags make the global rule exact.
  * Skipping. With ``SKIP_EMPTY`` a key block no row of the tile may attend to is skipped (no K/V load, no dots).
    An empty row in the tile allows every block, so real masks skip little; the loads inside the ``if`` are not
    software-pipelined, hence the autotuner also tries the branch-free variant.
  * Program order. The head is the fastest grid axis: the H programs of one (batch, query tile, key split) read
    the same mask tile back to back, from L2.
  * Backward (FlashAttention-2 style, recomputation from the saved log-sum-exp): ``_bwd_delta_kernel``
    (delta = rowsum(dO ∘ O)); ``_bwd_dkdv_kernel``, one program per key tile looping over the (few) query tiles;
    ``_bwd_dq_kernel``, split over keys like the forward (partials summed in float32). Memory: O(B·H·(Nq+Nk)·D).

Dtypes: q, k, v float32 / float16 / bfloat16, all the same; float32 accumulation; the output in the input dtype.
float32 dots run in IEEE precision (no TF32), so float32 results match a float32 reference to ~1e-6.
Limits: head dim <= 256 (padded to a power of two >= 16, tail masked); any Nq, Nk >= 1; any strides (the
mask's head stride may be 0); batch/head offsets in int64.
Tested: Triton interpreter (CPU, triton 3.9); compiled ahead of time for sm_90 (H100) and sm_87 (Jetson Orin).
Not yet run on a GPU.
"""
from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from .._backend import triton_interpreter_enabled

INTERPRET = triton_interpreter_enabled()
LOG2E = 1.4426950408889634

# Key-split granularity and the smallest split worth a program (GPU); tiny under the interpreter so that the
# tests reach the split path with small shapes.
SPLIT_UNIT = 16 if INTERPRET else 128
MIN_KEYS_PER_SPLIT = 32 if INTERPRET else 256
ROW_EMPTY_BLOCK = 64 if INTERPRET else 2048


def _configs(entries):
    return [
        triton.Config({"BLOCK_Q": bq, "BLOCK_K": bk, "SKIP_EMPTY": skip}, num_warps=w, num_stages=s)
        for bq, bk, skip, w, s in entries
    ]


if INTERPRET:  # one small config: the interpreter is slow and does not benchmark
    FWD_CONFIGS = _configs([(16, 16, True, 1, 1)])
    DKDV_CONFIGS = _configs([(16, 16, True, 1, 1)])
    DQ_CONFIGS = _configs([(16, 16, True, 1, 1)])
else:
    FWD_CONFIGS = _configs([
        (64, 64, True, 4, 2), (64, 128, True, 4, 2), (128, 64, True, 8, 2),
        (64, 64, False, 4, 3), (64, 128, False, 4, 3), (128, 128, False, 8, 2),
    ])
    DKDV_CONFIGS = _configs([(32, 64, True, 4, 2), (64, 64, True, 4, 2), (64, 128, True, 8, 2), (32, 128, False, 4, 3)])
    DQ_CONFIGS = _configs([(64, 64, True, 4, 2), (64, 128, True, 4, 2), (64, 64, False, 4, 3)])

TUNE_KEY = ["n_q", "n_k", "head_dim", "keys_per_split", "MASK_IS_LOGITS"]  # + argument dtypes (autotuner)


# Note on style: the mask test is written out in each kernel rather than in a @triton.jit helper, pointers advance
# by increments, and reductions call tl.reduce with the standard combine functions (tl.max / tl.sum are @jit
# wrappers of exactly that): under TRITON_INTERPRET=1 every nested jit call costs ~5 ms (the interpreter re-patches
# the language) and every integer multiply is overflow-checked, which the tests would pay per tile. Compiled code
# is the same.
_MAX = tl.standard._elementwise_max
_SUM = tl.standard._sum_combine


@triton.jit
def _row_empty_kernel(
    MASK,  # (B, Hm, Nq, Nk) bool-as-uint8 or logits
    ROW_EMPTY,  # (B, Hm, Nq) int8 out: 1 = no allowed key, the row attends to all keys
    stride_mb, stride_mh, stride_mq, stride_mk,
    mask_heads, n_q, n_k,
    MASK_IS_LOGITS: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # grid: (Nq, B * Hm): one program streams one mask row.
    pid_q = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // mask_heads).to(tl.int64)
    hm = (pid_bh % mask_heads).to(tl.int64)
    offs = tl.arange(0, BLOCK_N)
    p_m = MASK + b * stride_mb + hm * stride_mh + pid_q.to(tl.int64) * stride_mq + offs * stride_mk
    step = BLOCK_N * stride_mk
    b_any = tl.zeros([BLOCK_N], dtype=tl.int1)
    for start in range(0, n_k, BLOCK_N):
        k_in = offs < n_k - start
        b_m = tl.load(p_m, mask=k_in, other=0)
        if MASK_IS_LOGITS:
            b_ok = b_m.to(tl.float32) >= 0  # sigmoid(logit) >= 0.5 (via float32: the interpreter compares bf16 bits)
        else:
            b_ok = b_m != 0
        b_any = b_any | (b_ok & k_in)
        p_m += step
    empty = (tl.reduce(b_any.to(tl.int32), 0, _MAX) == 0).to(tl.int8)
    tl.store(ROW_EMPTY + pid_bh.to(tl.int64) * n_q + pid_q, empty)


@triton.jit
def _fwd_kernel(
    Q,  # (B, H, Nq, D)
    K,  # (B, H, Nk, D)
    V,  # (B, H, Nk, D)
    MASK,  # (B, Hm, Nq, Nk) bool-as-uint8 or logits; Hm = 1 (head stride 0) or H
    ROW_EMPTY,  # (B, Hm, Nq) int8 from _row_empty_kernel (unused when PRESCAN)
    OUT,  # one split: (B, H, Nq, D) in q's dtype; several: partials (B, H, S, Nq, D) float32
    LSE,  # one split: (B, H, Nq) float32 (base 2); several: (B, H, S, Nq) float32
    stride_qb, stride_qh, stride_qq, stride_qd,
    stride_kb, stride_kh, stride_kk, stride_kd,
    stride_vb, stride_vh, stride_vk, stride_vd,
    stride_mb, stride_mh, stride_mq, stride_mk,
    stride_eb, stride_eh,  # ROW_EMPTY (query stride 1); stride_eh = 0 when the heads share the mask
    stride_ob, stride_oh, stride_os, stride_oq, stride_od,
    stride_lb, stride_lh, stride_ls,  # LSE (query stride 1)
    n_q, n_k, head_dim, keys_per_split, qk_scale,  # qk_scale = log2(e) / √d
    MASK_IS_LOGITS: tl.constexpr,
    PRESCAN: tl.constexpr,  # decide empty rows here (only valid with a single key split)
    DOT_PRECISION: tl.constexpr,
    DOT_DTYPE: tl.constexpr,  # the input dtype; float32 for bfloat16 under the interpreter (see _dot_dtype)
    BLOCK_Q: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
    SKIP_EMPTY: tl.constexpr,
):
    # grid: (H, cdiv(Nq, BLOCK_Q) * n_splits, B); heads fastest so that they share the mask tile in L2.
    h = tl.program_id(0).to(tl.int64)
    n_q_tiles = tl.cdiv(n_q, BLOCK_Q)
    pid_q = tl.program_id(1) % n_q_tiles
    split = tl.program_id(1) // n_q_tiles
    b = tl.program_id(2).to(tl.int64)

    offs_q = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    offs_k = tl.arange(0, BLOCK_K)
    offs_d = tl.arange(0, BLOCK_D)
    q_in = offs_q < n_q
    d_in = offs_d < head_dim
    k_start = split * keys_per_split
    k_end = tl.minimum(k_start + keys_per_split, n_k)

    b_q = tl.load(
        Q + b * stride_qb + h * stride_qh + offs_q[:, None] * stride_qq + offs_d[None, :] * stride_qd,
        mask=q_in[:, None] & d_in[None, :], other=0.0,
    )  # (BQ, BD)
    p_mask_row = MASK + b * stride_mb + h * stride_mh + offs_q[:, None] * stride_mq + offs_k[None, :] * stride_mk
    m_step = BLOCK_K * stride_mk

    if PRESCAN:  # single split: this program sees every key, so it can decide empty rows itself
        b_seen = tl.zeros([BLOCK_Q, BLOCK_K], dtype=tl.int1)
        p_m = p_mask_row
        for start in range(0, n_k, BLOCK_K):
            in_range = q_in[:, None] & (offs_k < n_k - start)[None, :]
            b_m = tl.load(p_m, mask=in_range, other=0)
            if MASK_IS_LOGITS:
                b_ok = b_m.to(tl.float32) >= 0
            else:
                b_ok = b_m != 0
            b_seen = b_seen | (b_ok & in_range)
            p_m += m_step
        b_open = (tl.reduce(b_seen.to(tl.int32), 1, _MAX) == 0) & q_in  # (BQ,) rows attending to all keys
    else:
        b_open = tl.load(ROW_EMPTY + b * stride_eb + h * stride_eh + offs_q, mask=q_in, other=0) != 0

    m_i = tl.full([BLOCK_Q], -1.0e30, dtype=tl.float32)  # finite: exp2(m_old - m_new) never sees inf - inf
    l_i = tl.zeros([BLOCK_Q], dtype=tl.float32)
    acc = tl.zeros([BLOCK_Q, BLOCK_D], dtype=tl.float32)
    p_m = p_mask_row + k_start * stride_mk
    p_k = K + b * stride_kb + h * stride_kh + (k_start + offs_k)[:, None] * stride_kk + offs_d[None, :] * stride_kd
    p_v = V + b * stride_vb + h * stride_vh + (k_start + offs_k)[:, None] * stride_vk + offs_d[None, :] * stride_vd
    k_step = BLOCK_K * stride_kk
    v_step = BLOCK_K * stride_vk
    for start in range(k_start, k_end, BLOCK_K):
        k_in = offs_k < k_end - start
        in_range = q_in[:, None] & k_in[None, :]
        b_m = tl.load(p_m, mask=in_range, other=0)
        if MASK_IS_LOGITS:
            b_allow = b_m.to(tl.float32) >= 0  # sigmoid(logit) >= 0.5
        else:
            b_allow = b_m != 0
        b_allow = (b_allow & in_range) | (b_open[:, None] & k_in[None, :])  # (BQ, BK)
        if SKIP_EMPTY:
            run = tl.reduce(b_allow.to(tl.int32), None, _MAX) > 0
        else:
            run = True
        if run:
            kv_mask = k_in[:, None] & d_in[None, :]
            b_k = tl.load(p_k, mask=kv_mask, other=0.0)  # (BK, BD)
            b_v = tl.load(p_v, mask=kv_mask, other=0.0)  # (BK, BD)
            # (BQ, BD) x (BD, BK) -> (BQ, BK), base-2 scores
            b_s = tl.dot(b_q.to(DOT_DTYPE), tl.trans(b_k.to(DOT_DTYPE)), input_precision=DOT_PRECISION) * qk_scale
            b_s = tl.where(b_allow, b_s, float("-inf"))
            m_new = tl.maximum(m_i, tl.reduce(b_s, 1, _MAX))
            b_p = tl.math.exp2(b_s - m_new[:, None])  # masked entries: exp2(-inf) = 0
            alpha = tl.math.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.reduce(b_p, 1, _SUM)
            # (BQ, BK) x (BK, BD) -> (BQ, BD)
            acc = acc * alpha[:, None] + tl.dot(b_p.to(b_v.dtype).to(DOT_DTYPE), b_v.to(DOT_DTYPE), input_precision=DOT_PRECISION)
            m_i = m_new
        p_m += m_step
        p_k += k_step
        p_v += v_step

    has_keys = l_i > 0  # False only for a row with no allowed key in this split (never with one split)
    l_safe = tl.where(has_keys, l_i, 1.0)
    b_o = acc / l_safe[:, None]
    b_lse = tl.where(has_keys, m_i + tl.math.log2(l_safe), float("-inf"))
    p_o = OUT + b * stride_ob + h * stride_oh + split * stride_os + offs_q[:, None] * stride_oq + offs_d[None, :] * stride_od
    tl.store(p_o, b_o.to(OUT.dtype.element_ty), mask=q_in[:, None] & d_in[None, :])
    tl.store(LSE + b * stride_lb + h * stride_lh + split * stride_ls + offs_q, b_lse, mask=q_in)


@triton.jit
def _merge_kernel(
    O_PART,  # (B, H, S, Nq, D) float32, normalised per split
    LSE_PART,  # (B, H, S, Nq) float32, base 2; -inf for a split with no allowed key (contiguous)
    OUT,  # (B, H, Nq, D) in q's dtype
    LSE,  # (B, H, Nq) float32 (contiguous)
    stride_pb, stride_ph, stride_ps, stride_pq,  # O_PART (dim stride 1)
    stride_ob, stride_oh, stride_oq, stride_od,
    n_heads, n_q, head_dim, n_splits,
    BLOCK_Q: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # grid: (cdiv(Nq, BLOCK_Q), B * H)
    pid_q = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // n_heads
    h = bh % n_heads
    offs_q = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    offs_d = tl.arange(0, BLOCK_D)
    q_in = offs_q < n_q
    io_mask = q_in[:, None] & (offs_d < head_dim)[None, :]
    m_i = tl.full([BLOCK_Q], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_Q], dtype=tl.float32)
    acc = tl.zeros([BLOCK_Q, BLOCK_D], dtype=tl.float32)
    p_o = O_PART + b * stride_pb + h * stride_ph + offs_q[:, None] * stride_pq + offs_d[None, :]
    p_lse = LSE_PART + bh * n_splits * n_q + offs_q
    for s in range(0, n_splits):
        b_lse = tl.load(p_lse, mask=q_in, other=float("-inf"))
        b_o = tl.load(p_o, mask=io_mask, other=0.0)
        m_new = tl.maximum(m_i, b_lse)
        alpha = tl.math.exp2(m_i - m_new)
        w = tl.math.exp2(b_lse - m_new)
        acc = acc * alpha[:, None] + w[:, None] * b_o
        l_i = l_i * alpha + w
        m_i = m_new
        p_o += stride_ps
        p_lse += n_q
    l_safe = tl.where(l_i > 0, l_i, 1.0)
    b_out = acc / l_safe[:, None]
    p_out = OUT + b * stride_ob + h * stride_oh + offs_q[:, None] * stride_oq + offs_d[None, :] * stride_od
    tl.store(p_out, b_out.to(OUT.dtype.element_ty), mask=io_mask)
    tl.store(LSE + bh * n_q + offs_q, m_i + tl.math.log2(l_safe), mask=q_in)


@triton.jit
def _bwd_delta_kernel(
    OUT,  # (B, H, Nq, D)
    DO,  # (B, H, Nq, D)
    DELTA,  # (B, H, Nq) float32 out: rowsum(dO ∘ O)
    stride_ob, stride_oh, stride_oq, stride_od,
    stride_gb, stride_gh, stride_gq, stride_gd,
    n_heads, n_q, head_dim,
    BLOCK_Q: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # grid: (cdiv(Nq, BLOCK_Q), B * H)
    pid_q = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // n_heads
    h = bh % n_heads
    offs_q = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    offs_d = tl.arange(0, BLOCK_D)
    q_in = offs_q < n_q
    io_mask = q_in[:, None] & (offs_d < head_dim)[None, :]
    b_o = tl.load(OUT + b * stride_ob + h * stride_oh + offs_q[:, None] * stride_oq + offs_d[None, :] * stride_od,
                  mask=io_mask, other=0.0).to(tl.float32)
    b_do = tl.load(DO + b * stride_gb + h * stride_gh + offs_q[:, None] * stride_gq + offs_d[None, :] * stride_gd,
                   mask=io_mask, other=0.0).to(tl.float32)
    tl.store(DELTA + bh * n_q + offs_q, tl.reduce(b_o * b_do, 1, _SUM), mask=q_in)


@triton.jit
def _bwd_dkdv_kernel(
    Q,  # (B, H, Nq, D)
    K,  # (B, H, Nk, D)
    V,  # (B, H, Nk, D)
    DO,  # (B, H, Nq, D)
    MASK,  # (B, Hm, Nq, Nk)
    ROW_EMPTY,  # (B, Hm, Nq) int8
    LSE,  # (B, H, Nq) float32, base 2 (contiguous)
    DELTA,  # (B, H, Nq) float32 (contiguous)
    DK,  # (B, H, Nk, D) out
    DV,  # (B, H, Nk, D) out
    stride_qb, stride_qh, stride_qq, stride_qd,
    stride_kb, stride_kh, stride_kk, stride_kd,
    stride_vb, stride_vh, stride_vk, stride_vd,
    stride_gb, stride_gh, stride_gq, stride_gd,
    stride_mb, stride_mh, stride_mq, stride_mk,
    stride_eb, stride_eh,
    stride_dkb, stride_dkh, stride_dkk, stride_dkd,
    stride_dvb, stride_dvh, stride_dvk, stride_dvd,
    n_heads, n_q, n_k, head_dim, keys_per_split, qk_scale, sm_scale,
    MASK_IS_LOGITS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    DOT_DTYPE: tl.constexpr,  # the input dtype; float32 for bfloat16 under the interpreter (see _dot_dtype)
    BLOCK_Q: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
    SKIP_EMPTY: tl.constexpr,
):
    # grid: (H, cdiv(Nk, BLOCK_K), B): one key tile per program, looping over all query tiles (Nq is small).
    # Tiles are kept transposed, (BK, BQ), so that the dots below need no transposed accumulators.
    h = tl.program_id(0).to(tl.int64)
    pid_k = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_q = tl.arange(0, BLOCK_Q)
    offs_d = tl.arange(0, BLOCK_D)
    k_in = offs_k < n_k
    d_in = offs_d < head_dim
    kv_mask = k_in[:, None] & d_in[None, :]
    b_k = tl.load(K + b * stride_kb + h * stride_kh + offs_k[:, None] * stride_kk + offs_d[None, :] * stride_kd,
                  mask=kv_mask, other=0.0)  # (BK, BD)
    b_v = tl.load(V + b * stride_vb + h * stride_vh + offs_k[:, None] * stride_vk + offs_d[None, :] * stride_vd,
                  mask=kv_mask, other=0.0)  # (BK, BD)
    b_dk = tl.zeros([BLOCK_K, BLOCK_D], dtype=tl.float32)
    b_dv = tl.zeros([BLOCK_K, BLOCK_D], dtype=tl.float32)
    bh = b * n_heads + h
    p_m = MASK + b * stride_mb + h * stride_mh + offs_k[:, None] * stride_mk + offs_q[None, :] * stride_mq  # (BK, BQ)
    p_e = ROW_EMPTY + b * stride_eb + h * stride_eh + offs_q
    p_q = Q + b * stride_qb + h * stride_qh + offs_q[:, None] * stride_qq + offs_d[None, :] * stride_qd
    p_do = DO + b * stride_gb + h * stride_gh + offs_q[:, None] * stride_gq + offs_d[None, :] * stride_gd
    p_lse = LSE + bh * n_q + offs_q
    p_delta = DELTA + bh * n_q + offs_q
    m_step = BLOCK_Q * stride_mq
    q_step = BLOCK_Q * stride_qq
    do_step = BLOCK_Q * stride_gq
    for q0 in range(0, n_q, BLOCK_Q):
        q_in = offs_q < n_q - q0
        in_range = k_in[:, None] & q_in[None, :]
        b_open = tl.load(p_e, mask=q_in, other=0) != 0
        b_m = tl.load(p_m, mask=in_range, other=0)
        if MASK_IS_LOGITS:
            b_allow = b_m.to(tl.float32) >= 0
        else:
            b_allow = b_m != 0
        b_allow = (b_allow | b_open[None, :]) & in_range  # (BK, BQ)
        if SKIP_EMPTY:
            run = tl.reduce(b_allow.to(tl.int32), None, _MAX) > 0
        else:
            run = True
        if run:
            qd_mask = q_in[:, None] & d_in[None, :]
            b_q = tl.load(p_q, mask=qd_mask, other=0.0)  # (BQ, BD)
            b_do = tl.load(p_do, mask=qd_mask, other=0.0)  # (BQ, BD)
            b_lse = tl.load(p_lse, mask=q_in, other=0.0)
            b_delta = tl.load(p_delta, mask=q_in, other=0.0)
            # (BK, BD) x (BD, BQ) -> (BK, BQ)
            b_st = tl.dot(b_k.to(DOT_DTYPE), tl.trans(b_q.to(DOT_DTYPE)), input_precision=DOT_PRECISION) * qk_scale
            b_pt = tl.where(b_allow, tl.math.exp2(b_st - b_lse[None, :]), 0.0)
            # (BK, BQ) x (BQ, BD) -> (BK, BD)
            b_dv += tl.dot(b_pt.to(b_do.dtype).to(DOT_DTYPE), b_do.to(DOT_DTYPE), input_precision=DOT_PRECISION)
            # (BK, BD) x (BD, BQ) -> (BK, BQ)
            b_dpt = tl.dot(b_v.to(DOT_DTYPE), tl.trans(b_do.to(DOT_DTYPE)), input_precision=DOT_PRECISION)
            b_dst = b_pt * (b_dpt - b_delta[None, :])
            # (BK, BQ) x (BQ, BD) -> (BK, BD)
            b_dk += tl.dot(b_dst.to(b_q.dtype).to(DOT_DTYPE), b_q.to(DOT_DTYPE), input_precision=DOT_PRECISION)
        p_m += m_step
        p_e += BLOCK_Q
        p_q += q_step
        p_do += do_step
        p_lse += BLOCK_Q
        p_delta += BLOCK_Q
    b_dk = b_dk * sm_scale
    tl.store(DK + b * stride_dkb + h * stride_dkh + offs_k[:, None] * stride_dkk + offs_d[None, :] * stride_dkd,
             b_dk.to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + b * stride_dvb + h * stride_dvh + offs_k[:, None] * stride_dvk + offs_d[None, :] * stride_dvd,
             b_dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _bwd_dq_kernel(
    Q,  # (B, H, Nq, D)
    K,  # (B, H, Nk, D)
    V,  # (B, H, Nk, D)
    DO,  # (B, H, Nq, D)
    MASK,  # (B, Hm, Nq, Nk)
    ROW_EMPTY,  # (B, Hm, Nq) int8
    LSE,  # (B, H, Nq) float32, base 2 (contiguous)
    DELTA,  # (B, H, Nq) float32 (contiguous)
    DQ,  # one split: (B, H, Nq, D) in q's dtype; several: (B, H, S, Nq, D) float32 partials
    stride_qb, stride_qh, stride_qq, stride_qd,
    stride_kb, stride_kh, stride_kk, stride_kd,
    stride_vb, stride_vh, stride_vk, stride_vd,
    stride_gb, stride_gh, stride_gq, stride_gd,
    stride_mb, stride_mh, stride_mq, stride_mk,
    stride_eb, stride_eh,
    stride_db, stride_dh, stride_ds, stride_dq, stride_dd,
    n_heads, n_q, n_k, head_dim, keys_per_split, qk_scale, sm_scale,
    MASK_IS_LOGITS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    DOT_DTYPE: tl.constexpr,  # the input dtype; float32 for bfloat16 under the interpreter (see _dot_dtype)
    BLOCK_Q: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
    SKIP_EMPTY: tl.constexpr,
):
    # grid: (H, cdiv(Nq, BLOCK_Q) * n_splits, B), like the forward.
    h = tl.program_id(0).to(tl.int64)
    n_q_tiles = tl.cdiv(n_q, BLOCK_Q)
    pid_q = tl.program_id(1) % n_q_tiles
    split = tl.program_id(1) // n_q_tiles
    b = tl.program_id(2).to(tl.int64)
    offs_q = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    offs_k = tl.arange(0, BLOCK_K)
    offs_d = tl.arange(0, BLOCK_D)
    q_in = offs_q < n_q
    d_in = offs_d < head_dim
    qd_mask = q_in[:, None] & d_in[None, :]
    bh = b * n_heads + h
    b_q = tl.load(Q + b * stride_qb + h * stride_qh + offs_q[:, None] * stride_qq + offs_d[None, :] * stride_qd,
                  mask=qd_mask, other=0.0)  # (BQ, BD)
    b_do = tl.load(DO + b * stride_gb + h * stride_gh + offs_q[:, None] * stride_gq + offs_d[None, :] * stride_gd,
                   mask=qd_mask, other=0.0)  # (BQ, BD)
    b_lse = tl.load(LSE + bh * n_q + offs_q, mask=q_in, other=0.0)
    b_delta = tl.load(DELTA + bh * n_q + offs_q, mask=q_in, other=0.0)
    b_open = tl.load(ROW_EMPTY + b * stride_eb + h * stride_eh + offs_q, mask=q_in, other=0) != 0
    k_start = split * keys_per_split
    k_end = tl.minimum(k_start + keys_per_split, n_k)
    p_m = MASK + b * stride_mb + h * stride_mh + offs_q[:, None] * stride_mq + (k_start + offs_k)[None, :] * stride_mk
    p_k = K + b * stride_kb + h * stride_kh + (k_start + offs_k)[:, None] * stride_kk + offs_d[None, :] * stride_kd
    p_v = V + b * stride_vb + h * stride_vh + (k_start + offs_k)[:, None] * stride_vk + offs_d[None, :] * stride_vd
    m_step = BLOCK_K * stride_mk
    k_step = BLOCK_K * stride_kk
    v_step = BLOCK_K * stride_vk
    b_dq = tl.zeros([BLOCK_Q, BLOCK_D], dtype=tl.float32)
    for start in range(k_start, k_end, BLOCK_K):
        k_in = offs_k < k_end - start
        in_range = q_in[:, None] & k_in[None, :]
        b_m = tl.load(p_m, mask=in_range, other=0)
        if MASK_IS_LOGITS:
            b_allow = b_m.to(tl.float32) >= 0
        else:
            b_allow = b_m != 0
        b_allow = (b_allow | b_open[:, None]) & in_range  # (BQ, BK)
        if SKIP_EMPTY:
            run = tl.reduce(b_allow.to(tl.int32), None, _MAX) > 0
        else:
            run = True
        if run:
            kv_mask = k_in[:, None] & d_in[None, :]
            b_k = tl.load(p_k, mask=kv_mask, other=0.0)  # (BK, BD)
            b_v = tl.load(p_v, mask=kv_mask, other=0.0)  # (BK, BD)
            # (BQ, BD) x (BD, BK) -> (BQ, BK)
            b_s = tl.dot(b_q.to(DOT_DTYPE), tl.trans(b_k.to(DOT_DTYPE)), input_precision=DOT_PRECISION) * qk_scale
            b_p = tl.where(b_allow, tl.math.exp2(b_s - b_lse[:, None]), 0.0)
            # (BQ, BD) x (BD, BK) -> (BQ, BK)
            b_dp = tl.dot(b_do.to(DOT_DTYPE), tl.trans(b_v.to(DOT_DTYPE)), input_precision=DOT_PRECISION)
            b_ds = b_p * (b_dp - b_delta[:, None])
            # (BQ, BK) x (BK, BD) -> (BQ, BD)
            b_dq += tl.dot(b_ds.to(b_k.dtype).to(DOT_DTYPE), b_k.to(DOT_DTYPE), input_precision=DOT_PRECISION)
        p_m += m_step
        p_k += k_step
        p_v += v_step
    b_dq = b_dq * sm_scale
    p_dq = DQ + b * stride_db + h * stride_dh + split * stride_ds + offs_q[:, None] * stride_dq + offs_d[None, :] * stride_dd
    tl.store(p_dq, b_dq.to(DQ.dtype.element_ty), mask=qd_mask)


_fwd_tuned = triton.autotune(configs=FWD_CONFIGS, key=[*TUNE_KEY, "PRESCAN"])(_fwd_kernel)
_dkdv_tuned = triton.autotune(configs=DKDV_CONFIGS, key=TUNE_KEY)(_bwd_dkdv_kernel)
_dq_tuned = triton.autotune(configs=DQ_CONFIGS, key=TUNE_KEY)(_bwd_dq_kernel)


# ---------------------------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def plan_splits(batch_heads: int, n_q: int, n_k: int, device: torch.device, keys_per_split: int | None = None
                ) -> tuple[int, int]:
    """(keys_per_split, n_splits): split the keys until ~2 waves of programs fill the GPU.

    ``keys_per_split`` forces a split size (tests use it to reach the split path with small shapes).
    """
    if keys_per_split is None:
        sms = _num_sms(device.index or 0) if device.type == "cuda" else 4
        q_tiles = triton.cdiv(n_q, 16 if INTERPRET else 64)
        want = triton.cdiv(2 * sms, batch_heads * q_tiles)
        splits = max(1, min(want, n_k // MIN_KEYS_PER_SPLIT))
        keys_per_split = triton.cdiv(triton.cdiv(n_k, splits), SPLIT_UNIT) * SPLIT_UNIT
    if keys_per_split <= 0:
        raise ValueError(f"keys_per_split must be positive, got {keys_per_split}")
    keys_per_split = min(keys_per_split, n_k)
    return keys_per_split, triton.cdiv(n_k, keys_per_split)


def scratch(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Uninitialised intermediate buffer (the tests replace this to poison every intermediate)."""
    return torch.empty(shape, dtype=dtype, device=device)


def scratch_like(t: torch.Tensor) -> torch.Tensor:
    """Uninitialised buffer with ``t``'s shape, dtype and strides (replaced by the tests, like :func:`scratch`)."""
    return torch.empty_like(t)


def _block_d(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))


def _dot_precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # the latter only matters for float32 inputs


_TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


def _dot_dtype(dtype: torch.dtype):
    """Operand dtype of the dots: the input dtype, except bfloat16 under the interpreter, whose tl.dot (triton 3.9)
    multiplies bfloat16 bit patterns as integers; there the operands (already rounded to bfloat16) go to float32,
    where bfloat16 products are exact, as in the tensor cores."""
    if INTERPRET and dtype == torch.bfloat16:
        return tl.float32
    return _TL_DTYPES[dtype]


def mask_view(mask: torch.Tensor, num_heads: int) -> tuple[torch.Tensor, int]:
    """(B, Nq, Nk) or (B, H, Nq, Nk) mask -> (B, Hm, Nq, Nk) view (bool read as uint8) and Hm (1 = shared)."""
    if mask.dim() == 3:
        mask = mask.unsqueeze(1)
    if mask.shape[1] == 1 or mask.stride(1) == 0:
        mask = mask[:, :1]
    if mask.dtype == torch.bool:
        mask = mask.view(torch.uint8)
    return mask, mask.shape[1]


def row_empty_flags(mask4: torch.Tensor, mask_is_logits: bool) -> torch.Tensor:
    """(B, Hm, Nq) int8, 1 where a row of the (B, Hm, Nq, Nk) mask allows no key."""
    B, Hm, n_q, n_k = mask4.shape
    flags = scratch((B, Hm, n_q), torch.int8, mask4.device)
    _row_empty_kernel[(n_q, B * Hm)](
        mask4, flags, *mask4.stride(), Hm, n_q, n_k,
        MASK_IS_LOGITS=mask_is_logits, BLOCK_N=min(ROW_EMPTY_BLOCK, max(16, triton.next_power_of_2(n_k))),
        num_warps=1 if INTERPRET else 4,
    )
    return flags


def _flag_strides(flags: torch.Tensor, mask_heads: int) -> tuple[int, int]:
    return flags.stride(0), (flags.stride(1) if mask_heads > 1 else 0)


def _mask_strides(mask4: torch.Tensor, mask_heads: int) -> tuple[int, int, int, int]:
    sb, sh, sq, sk = mask4.stride()
    return sb, (sh if mask_heads > 1 else 0), sq, sk


def new_output(q: torch.Tensor) -> torch.Tensor:
    """(B, H, Nq, D) output laid out as (B, Nq, H, D) in memory, so that merging the heads is a free view."""
    B, H, n_q, D = q.shape
    return scratch((B, n_q, H, D), q.dtype, q.device).transpose(1, 2)


def masked_attention_fwd(
    q: torch.Tensor,  # (B, H, Nq, D)
    k: torch.Tensor,  # (B, H, Nk, D)
    v: torch.Tensor,  # (B, H, Nk, D)
    mask: torch.Tensor,  # (B, Nq, Nk) / (B, H, Nq, Nk): bool, or float logits when mask_is_logits
    mask_is_logits: bool,
    keys_per_split: int | None = None,
    config: dict | None = None,  # force one config, e.g. {"BLOCK_Q": 16, "BLOCK_K": 16, "SKIP_EMPTY": False}
    out: torch.Tensor | None = None,  # (B, H, Nq, D) buffer to write (tests pass one poisoned with NaN)
) -> tuple[torch.Tensor, torch.Tensor]:  # out (B, H, Nq, D) in q's dtype, lse (B, H, Nq) float32 base 2
    B, H, n_q, D = q.shape
    n_k = k.shape[2]
    mask4, Hm = mask_view(mask, H)
    kps, n_splits = plan_splits(B * H, n_q, n_k, q.device, keys_per_split)
    out = new_output(q) if out is None else out
    prescan = n_splits == 1
    flags = mask4.new_empty((1, 1, 1), dtype=torch.int8) if prescan else row_empty_flags(mask4, mask_is_logits)
    if n_splits == 1:
        o_buf, lse = out, scratch((B, H, n_q), torch.float32, q.device)
        o_strides = (out.stride(0), out.stride(1), 0, out.stride(2), out.stride(3))
        l_strides = (lse.stride(0), lse.stride(1), 0)
    else:
        o_buf = scratch((B, H, n_splits, n_q, D), torch.float32, q.device)
        lse_part = scratch((B, H, n_splits, n_q), torch.float32, q.device)
        o_strides = o_buf.stride()
        l_strides = lse_part.stride()[:3]
    args = (
        q, k, v, mask4, flags, o_buf, lse if n_splits == 1 else lse_part,
        *q.stride(), *k.stride(), *v.stride(), *_mask_strides(mask4, Hm), *_flag_strides(flags, Hm),
        *o_strides, *l_strides,
        n_q, n_k, D, kps, LOG2E / math.sqrt(D),
    )
    consts = dict(MASK_IS_LOGITS=mask_is_logits, PRESCAN=prescan, DOT_PRECISION=_dot_precision(q.dtype), DOT_DTYPE=_dot_dtype(q.dtype),
                  BLOCK_D=_block_d(D))

    def grid(meta):
        return (H, triton.cdiv(n_q, meta["BLOCK_Q"]) * n_splits, B)

    _launch(_fwd_kernel, _fwd_tuned, grid, args, consts, config)
    if n_splits > 1:
        lse = scratch((B, H, n_q), torch.float32, q.device)
        block_q = 16 if INTERPRET else 64
        _merge_kernel[(triton.cdiv(n_q, block_q), B * H)](
            o_buf, lse_part, out, lse, *o_buf.stride()[:4], *out.stride(), H, n_q, D, n_splits,
            BLOCK_Q=block_q, BLOCK_D=_block_d(D), num_warps=1 if INTERPRET else 4,
        )
    return out, lse


def masked_attention_bwd(
    grad_out: torch.Tensor,  # (B, H, Nq, D)
    q: torch.Tensor,  # (B, H, Nq, D)
    k: torch.Tensor,  # (B, H, Nk, D)
    v: torch.Tensor,  # (B, H, Nk, D)
    out: torch.Tensor,  # (B, H, Nq, D) forward output
    lse: torch.Tensor,  # (B, H, Nq) float32 base-2 log-sum-exp from the forward
    mask: torch.Tensor,
    mask_is_logits: bool,
    keys_per_split: int | None = None,
    config: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # dq, dk, dv shaped like q, k, v
    B, H, n_q, D = q.shape
    n_k = k.shape[2]
    mask4, Hm = mask_view(mask, H)
    flags = row_empty_flags(mask4, mask_is_logits)
    lse = lse.contiguous()
    delta = scratch((B, H, n_q), torch.float32, q.device)
    block_q = 16 if INTERPRET else 64
    _bwd_delta_kernel[(triton.cdiv(n_q, block_q), B * H)](
        out, grad_out, delta, *out.stride(), *grad_out.stride(), H, n_q, D,
        BLOCK_Q=block_q, BLOCK_D=_block_d(D), num_warps=1 if INTERPRET else 4,
    )
    common = (
        *q.stride(), *k.stride(), *v.stride(), *grad_out.stride(), *_mask_strides(mask4, Hm),
        *_flag_strides(flags, Hm),
    )
    consts = dict(MASK_IS_LOGITS=mask_is_logits, DOT_PRECISION=_dot_precision(q.dtype), DOT_DTYPE=_dot_dtype(q.dtype),
                  BLOCK_D=_block_d(D))
    scales = (LOG2E / math.sqrt(D), 1.0 / math.sqrt(D))

    dk, dv = scratch_like(k), scratch_like(v)
    _launch(
        _bwd_dkdv_kernel, _dkdv_tuned, lambda meta: (H, triton.cdiv(n_k, meta["BLOCK_K"]), B),
        (q, k, v, grad_out, mask4, flags, lse, delta, dk, dv, *common, *dk.stride(), *dv.stride(),
         H, n_q, n_k, D, n_k, *scales),
        consts, config,
    )

    kps, n_splits = plan_splits(B * H, n_q, n_k, q.device, keys_per_split)
    dq = scratch_like(q)
    if n_splits == 1:
        dq_buf = dq
        dq_strides = (dq.stride(0), dq.stride(1), 0, dq.stride(2), dq.stride(3))
    else:
        dq_buf = scratch((B, H, n_splits, n_q, D), torch.float32, q.device)
        dq_strides = dq_buf.stride()
    _launch(
        _bwd_dq_kernel, _dq_tuned, lambda meta: (H, triton.cdiv(n_q, meta["BLOCK_Q"]) * n_splits, B),
        (q, k, v, grad_out, mask4, flags, lse, delta, dq_buf, *common, *dq_strides, H, n_q, n_k, D, kps, *scales),
        consts, config,
    )
    if n_splits > 1:
        dq.copy_(dq_buf.sum(dim=2))
    return dq, dk, dv


def _launch(kernel, tuned, grid, args, consts, config):
    if config is None:
        tuned[grid](*args, **consts)
    else:
        meta = {k: v for k, v in config.items() if k not in ("num_warps", "num_stages")}
        kernel[grid({**consts, **meta})](
            *args, **consts, **meta, num_warps=config.get("num_warps", 4), num_stages=config.get("num_stages", 2)
        )
