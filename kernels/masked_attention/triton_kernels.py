"""Triton kernels for Mask2Former's masked cross-attention, with the mask computed inside.

    out = softmax(M + q kᵀ / √d) v,   M = 0 where allowed, -inf elsewhere,
    a query row with no allowed key attends to every key (Mask2Former's rule for empty predicted masks).

The mask is never expanded over heads: it is a bool tensor (allowed ⇔ True) or the previous layer's mask logits
(any float dtype, allowed ⇔ logit >= 0, i.e. sigmoid >= 0.5), shaped (B, Nq, Nk) and shared by the heads, or
(B, H, Nq, Nk) per head (a head stride of 0 counts as shared). Scores are never materialised: online softmax with
float32 statistics and accumulators.

(The official code tests sigmoid(logit) < 0.5 in the logits' dtype. In float32 that equals logit < 0 except for
logits within ~2e-7 below 0; in bfloat16 / float16 sigmoid rounds to 0.5 for logits above -2^-8 / -2^-11
(measured on the CPU), so the official rule then also allows those keys. m2f applies logit >= 0 in every dtype.)

Design
  * One pre-pass packs the mask to bits and applies the empty-row rule. ``_pack_mask_kernel`` (one program per
    mask row) streams the row once, writes one int32 word per 32 keys and, for a row with no allowed key, then
    rewrites its words as "every key" (only those rows pay a second, 32x smaller, write). The attention kernels
    therefore see a plain bitmask: no empty-row logic, which composes with split-KV for free. Reading bits
    instead of the logits cuts the mask traffic of the attention pass by 8x (uint8) to 32x (float32 logits),
    and the H heads re-read the (B, Nq, Nk/32) words from L2. Alternatives considered: deciding empty rows
    inside the attention pass needs either the whole key range per program (no split-KV), a second softmax state
    over all keys (doubles the exp and PV work), or a fix-up pass over empty rows after the merge (two extra
    launches); all cost more than one streaming read of the mask.
  * Split-KV. ~100 queries give B·H·2 programs, far fewer than the SMs; the keys are split across programs that
    write normalised partials (o_s, lse_s), combined by ``_merge_kernel``. A split in which a row has no allowed
    key writes lse_s = -inf, o_s = 0 (weight 0 in the merge).
  * Skipping. With ``SKIP_EMPTY`` a key block that no row of the query tile may attend to is skipped (no K/V
    loads, no dots). A tile with an empty row never skips, so real masks skip little, and loads under the branch
    are not software-pipelined: the autotuner also tries the branch-free variant.
  * Program order. The head is the fastest grid axis: the H programs of one (batch, query tile, key split) read
    the same mask words back to back, from L2.
  * Backward (FlashAttention-2 style, recomputing probabilities from the saved log-sum-exp): ``_bwd_delta_kernel``
    (delta = rowsum(dO ∘ O)); ``_bwd_dkdv_kernel``, one program per key tile looping over the few query tiles;
    ``_bwd_dq_kernel``, split over keys like the forward (float32 partials summed). Extra memory:
    O(B·H·Nq·(D·splits + 1)) + the packed mask; never O(Nq·Nk) per head.

Dtypes: q, k, v float32 / float16 / bfloat16 / float64 (all the same); float32 accumulation (float64 for float64
inputs, with float64 lse / delta / partials: slow, meant for gradcheck); outputs in the input dtype. float32 and
float64 dots run in IEEE precision (no TF32): float32 results match a float32 reference to ~1e-6. On a GPU the
softmax scale is a float32 kernel argument, so float64 results there match a float64 reference to ~1e-7 only.

Non-finite inputs (the semantics of ``naive.py``): a forbidden key contributes nothing, even when its K or V is
inf / NaN (its score is replaced by -inf before use; its value enters the P·V dot as 0 and the inf / NaN values of
allowed keys are added back per row, on a branch taken only by tiles that hold any); everything else follows IEEE
arithmetic. Gradients are meaningful for finite allowed inputs; non-finite values of forbidden keys leave every
gradient unchanged (a non-finite K of a forbidden key still makes dQ NaN, on both backends).
Limits: head dim <= 256 (a constexpr; padded to a power of two >= 16, tail masked); any Nq, Nk >= 1; any strides;
batch / head offsets in int64, offsets inside one (batch, head) int32 (checked by the dispatcher). Tested in
Triton's interpreter (CPU, triton 3.9) and compiled ahead of time for sm_90 (H100) and sm_87 (Jetson Orin), see
tests/test_maskattn_aot.py. Ran on an H100 on 2026-11-24 in fp32 / fp16 / bf16; fp64 has NOT run on a GPU.
"""
from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from .._backend import triton_interpreter_enabled
from ..aot import KernelSpec
from ..common import DTYPE_NAMES, LOG2E, TRITON_TYPES, block_d

INTERPRET = triton_interpreter_enabled()

# Key-split granularity and the smallest split worth a program on a GPU; tiny under the interpreter so that the
# tests reach the split path with small shapes.
SPLIT_UNIT = 32 if INTERPRET else 128  # a multiple of 32 (whole mask words) and of every BLOCK_K
MIN_KEYS_PER_SPLIT = 32 if INTERPRET else 256
PACK_BLOCK_ROWS, PACK_BLOCK_WORDS = (16, 4) if INTERPRET else (1, 64)  # pre-pass tile: rows x words (x32 keys)
SMALL_BLOCK_Q = 16 if INTERPRET else 64  # merge / delta kernels


def _configs(entries):
    return [
        triton.Config({"BLOCK_Q": bq, "BLOCK_K": bk, "SKIP_EMPTY": skip}, num_warps=w, num_stages=s)
        for bq, bk, skip, w, s in entries
    ]


# GPU configs, (BLOCK_Q, BLOCK_K, SKIP_EMPTY, warps, stages). Half-precision dots run on tensor cores; float32
# dots in IEEE precision run on FMA units and need small tiles to stay within 255 registers (see the AOT report).
GPU_CONFIGS = {
    "fwd": {
        "half": [(64, 64, True, 4, 2), (64, 128, True, 4, 2), (128, 64, True, 8, 2), (64, 64, False, 4, 3),
                 (64, 128, False, 4, 3), (128, 64, False, 8, 3)],
        "fp32": [(32, 32, True, 4, 2), (32, 32, False, 4, 3), (64, 32, True, 8, 2), (32, 64, True, 8, 2)],
    },
    "dkdv": {
        "half": [(32, 64, True, 4, 2), (64, 64, True, 4, 2), (32, 128, True, 8, 2), (32, 64, False, 4, 3)],
        "fp32": [(32, 32, True, 4, 2), (32, 64, True, 8, 2), (32, 32, False, 4, 3)],
    },
    "dq": {
        "half": [(64, 64, True, 4, 2), (128, 64, True, 8, 2), (64, 64, False, 4, 3)],
        "fp32": [(32, 32, True, 4, 2), (32, 32, False, 4, 3), (64, 32, True, 8, 2)],
    },
}
INTERPRETER_CONFIG = (16, 32, True, 1, 1)  # one small config: the interpreter is slow and does not benchmark


def _tuning(kind: str):
    """Autotuner arguments for one kernel: every GPU config, pruned at launch to those of the input dtype."""
    if INTERPRET:
        return dict(configs=_configs([INTERPRETER_CONFIG]))
    half, fp32 = _configs(GPU_CONFIGS[kind]["half"]), _configs(GPU_CONFIGS[kind]["fp32"])
    fp32_ids = {id(c) for c in fp32}

    def prune(configs, named_args, **kwargs):
        want_fp32 = named_args["Q"].dtype in (torch.float32, torch.float64)  # float64: the small fp32 tiles
        return [c for c in configs if (id(c) in fp32_ids) == want_fp32]

    return dict(configs=half + fp32, prune_configs_by={"early_config_prune": prune})


TUNE_KEY = ["n_q", "n_k", "keys_per_split", "HEAD_DIM"]  # + the argument dtypes (added by the autotuner)

# Style note: the mask test is written out in each kernel rather than in a @triton.jit helper, and reductions call
# tl.reduce with the standard combine functions (tl.max / tl.sum are @jit wrappers of exactly that). Compiled code
# is the same; under TRITON_INTERPRET=1 every nested jit call costs ~5 ms (the interpreter re-patches the
# language), which the tests would pay per tile.
_MAX = tl.standard._elementwise_max
_SUM = tl.standard._sum_combine


@triton.jit
def _pack_mask_kernel(
    MASK,  # (B, Hm, Nq, Nk) bool-as-uint8 or logits
    BITS,  # (B, Hm, Nq, W) int32 out, W = cdiv(Nk, 32): bit j of word w = key 32w + j may be attended
    stride_mb, stride_mh, stride_mq, stride_mk,
    mask_heads, n_q, n_k, n_words,
    MASK_IS_LOGITS: tl.constexpr,
    BLOCK_R: tl.constexpr,  # mask rows per program (1 on a GPU: one program streams one row)
    BLOCK_W: tl.constexpr,  # words per step
):
    # grid: (cdiv(Nq, BLOCK_R), B * Hm)
    pid_r = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // mask_heads).to(tl.int64)
    hm = (pid_bh % mask_heads).to(tl.int64)
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    r_in = rows < n_q
    offs_w = tl.arange(0, BLOCK_W)
    offs_j = tl.arange(0, 32)
    p_row = MASK + b * stride_mb + hm * stride_mh + rows[:, None, None].to(tl.int64) * stride_mq  # (BR, 1, 1)
    p_out = BITS + (pid_bh.to(tl.int64) * n_q + rows[:, None]) * n_words  # (BR, 1)
    b_any = tl.zeros([BLOCK_R], dtype=tl.int32)
    for w0 in range(0, n_words, BLOCK_W):
        key = (w0 + offs_w)[None, :, None] * 32 + offs_j[None, None, :]  # (1, BW, 32)
        in_range = r_in[:, None, None] & (key < n_k)
        b_m = tl.load(p_row + key * stride_mk, mask=in_range, other=0)  # (BR, BW, 32)
        if MASK_IS_LOGITS:
            # sigmoid(logit) >= 0.5. bfloat16 via float32 (the interpreter compares its bits); float64 in place (a
            # tiny negative logit would round to -0.0 in float32 and count as allowed).
            b_ok = (b_m.to(tl.float32) if MASK.dtype.element_ty == tl.bfloat16 else b_m) >= 0
        else:
            b_ok = b_m != 0
        # distinct powers of two: their sum is their bitwise or
        b_word = tl.reduce((b_ok & in_range).to(tl.uint32) << offs_j[None, None, :].to(tl.uint32), 2, _SUM)
        w_in = r_in[:, None] & (w0 + offs_w < n_words)[None, :]
        tl.store(p_out + (w0 + offs_w)[None, :], b_word.to(tl.int32, bitcast=True), mask=w_in)
        b_any = b_any | tl.reduce((b_word != 0).to(tl.int32), 1, _MAX)
    b_empty = (b_any == 0) & r_in  # (BR,) rows with no allowed key attend to every key
    if tl.reduce(b_empty.to(tl.int32), 0, _MAX) > 0:
        ones = tl.full([1, BLOCK_W], 1, dtype=tl.int32)
        for w0 in range(0, n_words, BLOCK_W):
            n_valid = n_k - (w0 + offs_w)[None, :] * 32  # keys in each word, >= 1 for words in range
            b_word = tl.where(n_valid >= 32, -1, (ones << tl.minimum(tl.maximum(n_valid, 0), 31)) - 1)
            w_in = b_empty[:, None] & (w0 + offs_w < n_words)[None, :]
            tl.store(p_out + (w0 + offs_w)[None, :], tl.broadcast_to(b_word, [BLOCK_R, BLOCK_W]), mask=w_in)


@triton.jit
def _fwd_kernel(
    Q,  # (B, H, Nq, D)
    K,  # (B, H, Nk, D)
    V,  # (B, H, Nk, D)
    BITS,  # (B, Hm, Nq, W) int32 packed mask from _pack_mask_kernel (empty rows already opened)
    OUT,  # one split: (B, H, Nq, D) in q's dtype; several: partials (B, H, S, Nq, D) float32
    LSE,  # one split: (B, H, Nq) float32 (base 2); several: (B, H, S, Nq) float32
    stride_qb, stride_qh, stride_qq, stride_qd,
    stride_kb, stride_kh, stride_kk, stride_kd,
    stride_vb, stride_vh, stride_vk, stride_vd,
    stride_bb, stride_bh, stride_bq,  # BITS (word stride 1); stride_bh = 0 when the heads share the mask
    stride_ob, stride_oh, stride_os, stride_oq, stride_od,
    stride_lb, stride_lh, stride_ls,  # LSE (query stride 1)
    n_q, n_k, keys_per_split, qk_scale,  # qk_scale = log2(e) / √d
    DOT_PRECISION: tl.constexpr,
    DOT_DTYPE: tl.constexpr,  # the input dtype (float32 for bfloat16 under the interpreter, see _dot_dtype)
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,  # HEAD_DIM rounded up to a power of two >= 16
    BLOCK_Q: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SKIP_EMPTY: tl.constexpr,
):
    # grid: (H, cdiv(Nq, BLOCK_Q) * n_splits, B); heads fastest so that they share the mask words in L2.
    h = tl.program_id(0).to(tl.int64)
    n_q_tiles = tl.cdiv(n_q, BLOCK_Q)
    pid_q = tl.program_id(1) % n_q_tiles
    split = tl.program_id(1) // n_q_tiles
    b = tl.program_id(2).to(tl.int64)

    offs_q = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    offs_k = tl.arange(0, BLOCK_K)
    offs_d = tl.arange(0, BLOCK_D)
    q_in = offs_q < n_q
    d_in = offs_d < HEAD_DIM
    k_start = split * keys_per_split
    k_end = tl.minimum(k_start + keys_per_split, n_k)

    b_q = tl.load(Q + b * stride_qb + h * stride_qh + offs_q[:, None] * stride_qq + offs_d[None, :] * stride_qd,
                  mask=q_in[:, None] & d_in[None, :], other=0.0)  # (BQ, BD)
    bits_base = BITS + b * stride_bb + h * stride_bh
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh

    offs_w = tl.arange(0, BLOCK_K // 32)
    offs_j = tl.arange(0, 32)
    n_words = tl.cdiv(n_k, 32)
    ACC = tl.float64 if Q.dtype.element_ty == tl.float64 else tl.float32  # statistics / accumulators
    m_i = tl.full([BLOCK_Q], -1.0e30, dtype=ACC)  # finite: exp2(m_old - m_new) never sees inf - inf
    l_i = tl.zeros([BLOCK_Q], dtype=ACC)
    acc = tl.zeros([BLOCK_Q, BLOCK_D], dtype=ACC)
    any_bad = 0  # a non-finite value seen in this split
    for start in range(k_start, k_end, BLOCK_K):  # start is a multiple of 32: whole words
        key = start + offs_k
        k_in = key < k_end
        in_range = q_in[:, None] & k_in[None, :]
        word = start // 32 + offs_w
        b_w = tl.load(bits_base + offs_q[:, None] * stride_bq + word[None, :],
                      mask=q_in[:, None] & (word < n_words)[None, :], other=0)  # (BQ, BK / 32)
        # (BQ, BK / 32, 32) -> (BQ, BK): key 32 w + j is bit j of word w
        b_allow = (tl.reshape((b_w[:, :, None] >> offs_j[None, None, :]) & 1, (BLOCK_Q, BLOCK_K)) != 0) & in_range
        if SKIP_EMPTY:
            run = tl.reduce((b_w != 0).to(tl.int32), None, _MAX) > 0
        else:
            run = True
        if run:
            kv_mask = k_in[:, None] & d_in[None, :]
            b_k = tl.load(k_base + key[:, None] * stride_kk + offs_d[None, :] * stride_kd, mask=kv_mask, other=0.0)
            b_v = tl.load(v_base + key[:, None] * stride_vk + offs_d[None, :] * stride_vd, mask=kv_mask, other=0.0)
            # (BQ, BD) x (BD, BK) -> (BQ, BK), base-2 scores
            b_s = tl.dot(b_q.to(DOT_DTYPE), tl.trans(b_k.to(DOT_DTYPE)), input_precision=DOT_PRECISION) * qk_scale
            b_s = tl.where(b_allow, b_s, float("-inf"))
            m_new = tl.maximum(m_i, tl.reduce(b_s, 1, _MAX))
            b_p = tl.math.exp2(b_s - m_new[:, None])  # forbidden keys: exp2(-inf) = 0
            alpha = tl.math.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.reduce(b_p, 1, _SUM)
            # (BQ, BK) x (BK, BD) -> (BQ, BD); p rounded to the input dtype as in FlashAttention. Non-finite
            # values enter the dot as 0 (a forbidden key's p = 0 times inf would be NaN); the allowed ones are
            # added after the loop.
            b_v_ok = (b_v == b_v) & (tl.abs(b_v) != float("inf"))  # isfinite
            any_bad = any_bad | tl.reduce((~b_v_ok & kv_mask).to(tl.int32), None, _MAX)
            b_v = tl.where(b_v_ok, b_v, 0.0)
            b_pv = tl.dot(b_p.to(b_v.dtype).to(DOT_DTYPE), b_v.to(DOT_DTYPE), input_precision=DOT_PRECISION)
            acc = acc * alpha[:, None] + b_pv
            m_i = m_new
    if any_bad > 0:  # rare: inf / NaN among this split's values; a second pass keeps them off the main loop
        # Per (row, channel): +inf if an allowed key holds NaN or +inf, then -inf if one holds NaN or -inf; their
        # IEEE sum is NaN for a NaN or for +inf meeting -inf (an allowed inf counts even where p underflows).
        for start in range(k_start, k_end, BLOCK_K):
            key = start + offs_k
            k_in = key < k_end
            word = start // 32 + offs_w
            b_w = tl.load(bits_base + offs_q[:, None] * stride_bq + word[None, :],
                          mask=q_in[:, None] & (word < n_words)[None, :], other=0)
            b_allow = (tl.reshape((b_w[:, :, None] >> offs_j[None, None, :]) & 1, (BLOCK_Q, BLOCK_K)) != 0)
            b_allow_f = (b_allow & q_in[:, None] & k_in[None, :]).to(DOT_DTYPE)
            b_v = tl.load(v_base + key[:, None] * stride_vk + offs_d[None, :] * stride_vd,
                          mask=k_in[:, None] & d_in[None, :], other=0.0)
            b_bad = (b_v != b_v) | (tl.abs(b_v) == float("inf"))
            b_hits = tl.dot(b_allow_f, (b_bad & (b_v != float("-inf"))).to(DOT_DTYPE), input_precision=DOT_PRECISION)
            acc += tl.where(b_hits > 0, float("inf"), 0.0)
            b_hits = tl.dot(b_allow_f, (b_bad & (b_v != float("inf"))).to(DOT_DTYPE), input_precision=DOT_PRECISION)
            acc += tl.where(b_hits > 0, float("-inf"), 0.0)

    # l = 0: a split in which the row has no allowed key (weight 0 in the merge), or, with one split, a row whose
    # allowed scores are all -inf: every row has an allowed key, so that is IEEE's softmax 0 / 0 = NaN (so is the
    # merge's when no split contributed).
    has_keys = (l_i > 0) | (keys_per_split >= n_k)
    l_safe = tl.where(has_keys, l_i, 1.0)
    b_o = tl.where((l_i == 0)[:, None] & has_keys[:, None], float("nan"), acc / l_safe[:, None])
    b_lse = tl.where(has_keys, m_i + tl.math.log2(l_safe), float("-inf"))
    p_o = OUT + b * stride_ob + h * stride_oh + split * stride_os
    p_o = p_o + offs_q[:, None] * stride_oq + offs_d[None, :] * stride_od
    tl.store(p_o, b_o.to(OUT.dtype.element_ty), mask=q_in[:, None] & d_in[None, :])
    tl.store(LSE + b * stride_lb + h * stride_lh + split * stride_ls + offs_q, b_lse.to(LSE.dtype.element_ty),
             mask=q_in)


@triton.jit
def _merge_kernel(
    O_PART,  # (B, H, S, Nq, D) float32, normalised per split (contiguous)
    LSE_PART,  # (B, H, S, Nq) float32, base 2; -inf for a split with no allowed key (contiguous)
    OUT,  # (B, H, Nq, D) in q's dtype
    LSE,  # (B, H, Nq) float32 (contiguous)
    stride_ob, stride_oh, stride_oq, stride_od,
    n_heads, n_q, n_splits,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_Q: tl.constexpr,
):
    # grid: (cdiv(Nq, BLOCK_Q), B * H)
    pid_q = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // n_heads
    h = bh % n_heads
    offs_q = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    offs_d = tl.arange(0, BLOCK_D)
    q_in = offs_q < n_q
    io_mask = q_in[:, None] & (offs_d < HEAD_DIM)[None, :]
    ACC = O_PART.dtype.element_ty  # float32, float64 for float64 inputs
    m_i = tl.full([BLOCK_Q], -1.0e30, dtype=ACC)
    l_i = tl.zeros([BLOCK_Q], dtype=ACC)
    acc = tl.zeros([BLOCK_Q, BLOCK_D], dtype=ACC)
    for s in range(0, n_splits):
        row = bh * n_splits + s
        b_lse = tl.load(LSE_PART + row * n_q + offs_q, mask=q_in, other=float("-inf"))
        b_o = tl.load(O_PART + (row * n_q + offs_q[:, None]) * HEAD_DIM + offs_d[None, :], mask=io_mask, other=0.0)
        m_new = tl.maximum(m_i, b_lse)
        alpha = tl.math.exp2(m_i - m_new)
        w = tl.math.exp2(b_lse - m_new)
        # inf / NaN partials pass whatever their weight (an allowed inf value counts even where p underflows)
        b_fin = (b_o == b_o) & (tl.abs(b_o) != float("inf"))
        acc_fin = (acc == acc) & (tl.abs(acc) != float("inf"))
        acc = tl.where(acc_fin, acc * alpha[:, None], acc) + tl.where(b_fin, w[:, None] * b_o, b_o)
        l_i = l_i * alpha + w
        m_i = m_new
    # l = 0 only when no split had a finite score (every row has an allowed key): 0 / 0 = NaN, as the softmax
    p_out = OUT + b * stride_ob + h * stride_oh + offs_q[:, None] * stride_oq + offs_d[None, :] * stride_od
    tl.store(p_out, tl.where((l_i == 0)[:, None], float("nan"), acc / l_i[:, None]).to(OUT.dtype.element_ty),
             mask=io_mask)
    tl.store(LSE + bh * n_q + offs_q, (m_i + tl.math.log2(l_i)).to(LSE.dtype.element_ty), mask=q_in)


@triton.jit
def _bwd_delta_kernel(
    OUT,  # (B, H, Nq, D)
    DO,  # (B, H, Nq, D)
    DELTA,  # (B, H, Nq) float32 out: rowsum(dO ∘ O)
    stride_ob, stride_oh, stride_oq, stride_od,
    stride_gb, stride_gh, stride_gq, stride_gd,
    n_heads, n_q,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_Q: tl.constexpr,
):
    # grid: (cdiv(Nq, BLOCK_Q), B * H)
    pid_q = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // n_heads
    h = bh % n_heads
    offs_q = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    offs_d = tl.arange(0, BLOCK_D)
    q_in = offs_q < n_q
    io_mask = q_in[:, None] & (offs_d < HEAD_DIM)[None, :]
    b_o = tl.load(OUT + b * stride_ob + h * stride_oh + offs_q[:, None] * stride_oq + offs_d[None, :] * stride_od,
                  mask=io_mask, other=0.0).to(DELTA.dtype.element_ty)
    b_do = tl.load(DO + b * stride_gb + h * stride_gh + offs_q[:, None] * stride_gq + offs_d[None, :] * stride_gd,
                   mask=io_mask, other=0.0).to(DELTA.dtype.element_ty)
    tl.store(DELTA + bh * n_q + offs_q, tl.reduce(b_o * b_do, 1, _SUM), mask=q_in)


@triton.jit
def _bwd_dkdv_kernel(
    Q,  # (B, H, Nq, D)
    K,  # (B, H, Nk, D)
    V,  # (B, H, Nk, D)
    DO,  # (B, H, Nq, D)
    BITS,  # (B, Hm, Nq, W) int32 packed mask
    LSE,  # (B, H, Nq) float32, base 2 (contiguous)
    DELTA,  # (B, H, Nq) float32 (contiguous)
    DK,  # (B, H, Nk, D) out
    DV,  # (B, H, Nk, D) out
    stride_qb, stride_qh, stride_qq, stride_qd,
    stride_kb, stride_kh, stride_kk, stride_kd,
    stride_vb, stride_vh, stride_vk, stride_vd,
    stride_gb, stride_gh, stride_gq, stride_gd,
    stride_bb, stride_bh, stride_bq,
    stride_dkb, stride_dkh, stride_dkk, stride_dkd,
    stride_dvb, stride_dvh, stride_dvk, stride_dvd,
    n_heads, n_q, n_k, keys_per_split, qk_scale, sm_scale,
    DOT_PRECISION: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SKIP_EMPTY: tl.constexpr,
):
    # grid: (H, cdiv(Nk, BLOCK_K), B): one key tile per program, looping over all query tiles (Nq is small).
    # Tiles are kept transposed, (BK, BQ), so that the dots need no transposed accumulators.
    h = tl.program_id(0).to(tl.int64)
    pid_k = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    key = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_q0 = tl.arange(0, BLOCK_Q)
    offs_d = tl.arange(0, BLOCK_D)
    k_in = key < n_k
    d_in = offs_d < HEAD_DIM
    kv_mask = k_in[:, None] & d_in[None, :]
    b_k = tl.load(K + b * stride_kb + h * stride_kh + key[:, None] * stride_kk + offs_d[None, :] * stride_kd,
                  mask=kv_mask, other=0.0)  # (BK, BD)
    b_v = tl.load(V + b * stride_vb + h * stride_vh + key[:, None] * stride_vk + offs_d[None, :] * stride_vd,
                  mask=kv_mask, other=0.0)  # (BK, BD)
    # Non-finite values as 0: a forbidden key's (p = 0) must not turn dP into NaN (gradients are meaningful for
    # finite allowed inputs; forbidden keys, finite or not, get zero gradients and affect no other).
    b_v = tl.where((b_v == b_v) & (tl.abs(b_v) != float("inf")), b_v, 0.0)
    ACC = tl.float64 if Q.dtype.element_ty == tl.float64 else tl.float32  # statistics / accumulators
    b_dk = tl.zeros([BLOCK_K, BLOCK_D], dtype=ACC)
    b_dv = tl.zeros([BLOCK_K, BLOCK_D], dtype=ACC)
    bh = b * n_heads + h
    bits_base = BITS + b * stride_bb + h * stride_bh
    word = pid_k * (BLOCK_K // 32) + tl.arange(0, BLOCK_K // 32)
    offs_j = tl.arange(0, 32)
    n_words = tl.cdiv(n_k, 32)
    q_base = Q + b * stride_qb + h * stride_qh
    do_base = DO + b * stride_gb + h * stride_gh
    for q0 in range(0, n_q, BLOCK_Q):
        offs_q = q0 + offs_q0
        q_in = offs_q < n_q
        b_w = tl.load(bits_base + word[:, None] + offs_q[None, :] * stride_bq,
                      mask=(word < n_words)[:, None] & q_in[None, :], other=0)  # (BK / 32, BQ)
        # (BK / 32, 32, BQ) -> (BK, BQ): key 32 w + j is bit j of word w (bits past Nk are clear)
        b_allow = tl.reshape((b_w[:, None, :] >> offs_j[None, :, None]) & 1, (BLOCK_K, BLOCK_Q)) != 0
        if SKIP_EMPTY:
            run = tl.reduce((b_w != 0).to(tl.int32), None, _MAX) > 0
        else:
            run = True
        if run:
            qd_mask = q_in[:, None] & d_in[None, :]
            b_q = tl.load(q_base + offs_q[:, None] * stride_qq + offs_d[None, :] * stride_qd, mask=qd_mask, other=0.0)
            b_do = tl.load(do_base + offs_q[:, None] * stride_gq + offs_d[None, :] * stride_gd, mask=qd_mask, other=0.0)
            b_lse = tl.load(LSE + bh * n_q + offs_q, mask=q_in, other=0.0)
            b_delta = tl.load(DELTA + bh * n_q + offs_q, mask=q_in, other=0.0)
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
    b_dk = b_dk * sm_scale
    tl.store(DK + b * stride_dkb + h * stride_dkh + key[:, None] * stride_dkk + offs_d[None, :] * stride_dkd,
             b_dk.to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + b * stride_dvb + h * stride_dvh + key[:, None] * stride_dvk + offs_d[None, :] * stride_dvd,
             b_dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _bwd_dq_kernel(
    Q,  # (B, H, Nq, D)
    K,  # (B, H, Nk, D)
    V,  # (B, H, Nk, D)
    DO,  # (B, H, Nq, D)
    BITS,  # (B, Hm, Nq, W) int32 packed mask
    LSE,  # (B, H, Nq) float32, base 2 (contiguous)
    DELTA,  # (B, H, Nq) float32 (contiguous)
    DQ,  # one split: (B, H, Nq, D) in q's dtype; several: (B, H, S, Nq, D) float32 partials
    stride_qb, stride_qh, stride_qq, stride_qd,
    stride_kb, stride_kh, stride_kk, stride_kd,
    stride_vb, stride_vh, stride_vk, stride_vd,
    stride_gb, stride_gh, stride_gq, stride_gd,
    stride_bb, stride_bh, stride_bq,
    stride_db, stride_dh, stride_ds, stride_dq, stride_dd,
    n_heads, n_q, n_k, keys_per_split, qk_scale, sm_scale,
    DOT_PRECISION: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_K: tl.constexpr,
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
    d_in = offs_d < HEAD_DIM
    qd_mask = q_in[:, None] & d_in[None, :]
    bh = b * n_heads + h
    b_q = tl.load(Q + b * stride_qb + h * stride_qh + offs_q[:, None] * stride_qq + offs_d[None, :] * stride_qd,
                  mask=qd_mask, other=0.0)  # (BQ, BD)
    b_do = tl.load(DO + b * stride_gb + h * stride_gh + offs_q[:, None] * stride_gq + offs_d[None, :] * stride_gd,
                   mask=qd_mask, other=0.0)  # (BQ, BD)
    b_lse = tl.load(LSE + bh * n_q + offs_q, mask=q_in, other=0.0)
    b_delta = tl.load(DELTA + bh * n_q + offs_q, mask=q_in, other=0.0)
    k_start = split * keys_per_split
    k_end = tl.minimum(k_start + keys_per_split, n_k)
    bits_base = BITS + b * stride_bb + h * stride_bh
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    offs_w = tl.arange(0, BLOCK_K // 32)
    offs_j = tl.arange(0, 32)
    n_words = tl.cdiv(n_k, 32)
    ACC = tl.float64 if Q.dtype.element_ty == tl.float64 else tl.float32  # statistics / accumulators
    b_dq = tl.zeros([BLOCK_Q, BLOCK_D], dtype=ACC)
    for start in range(k_start, k_end, BLOCK_K):  # start is a multiple of 32: whole words
        key = start + offs_k
        k_in = key < k_end
        in_range = q_in[:, None] & k_in[None, :]
        word = start // 32 + offs_w
        b_w = tl.load(bits_base + offs_q[:, None] * stride_bq + word[None, :],
                      mask=q_in[:, None] & (word < n_words)[None, :], other=0)  # (BQ, BK / 32)
        # (BQ, BK / 32, 32) -> (BQ, BK): key 32 w + j is bit j of word w
        b_allow = (tl.reshape((b_w[:, :, None] >> offs_j[None, None, :]) & 1, (BLOCK_Q, BLOCK_K)) != 0) & in_range
        if SKIP_EMPTY:
            run = tl.reduce((b_w != 0).to(tl.int32), None, _MAX) > 0
        else:
            run = True
        if run:
            kv_mask = k_in[:, None] & d_in[None, :]
            b_k = tl.load(k_base + key[:, None] * stride_kk + offs_d[None, :] * stride_kd, mask=kv_mask, other=0.0)
            b_v = tl.load(v_base + key[:, None] * stride_vk + offs_d[None, :] * stride_vd, mask=kv_mask, other=0.0)
            b_v = tl.where((b_v == b_v) & (tl.abs(b_v) != float("inf")), b_v, 0.0)  # as in _bwd_dkdv_kernel
            # (BQ, BD) x (BD, BK) -> (BQ, BK)
            b_s = tl.dot(b_q.to(DOT_DTYPE), tl.trans(b_k.to(DOT_DTYPE)), input_precision=DOT_PRECISION) * qk_scale
            b_p = tl.where(b_allow, tl.math.exp2(b_s - b_lse[:, None]), 0.0)
            # (BQ, BD) x (BD, BK) -> (BQ, BK)
            b_dp = tl.dot(b_do.to(DOT_DTYPE), tl.trans(b_v.to(DOT_DTYPE)), input_precision=DOT_PRECISION)
            b_ds = b_p * (b_dp - b_delta[:, None])
            # (BQ, BK) x (BK, BD) -> (BQ, BD)
            b_dq += tl.dot(b_ds.to(b_k.dtype).to(DOT_DTYPE), b_k.to(DOT_DTYPE), input_precision=DOT_PRECISION)
    b_dq = b_dq * sm_scale
    p_dq = DQ + b * stride_db + h * stride_dh + split * stride_ds
    p_dq = p_dq + offs_q[:, None] * stride_dq + offs_d[None, :] * stride_dd
    tl.store(p_dq, b_dq.to(DQ.dtype.element_ty), mask=qd_mask)


_fwd_tuned = triton.autotune(key=TUNE_KEY, **_tuning("fwd"))(_fwd_kernel)
_dkdv_tuned = triton.autotune(key=TUNE_KEY, **_tuning("dkdv"))(_bwd_dkdv_kernel)
_dq_tuned = triton.autotune(key=TUNE_KEY, **_tuning("dq"))(_bwd_dq_kernel)


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
        q_tiles = triton.cdiv(n_q, SMALL_BLOCK_Q)
        want = triton.cdiv(2 * sms, batch_heads * q_tiles)
        splits = max(1, min(want, n_k // MIN_KEYS_PER_SPLIT))
        keys_per_split = triton.cdiv(triton.cdiv(n_k, splits), SPLIT_UNIT) * SPLIT_UNIT
    if keys_per_split <= 0 or keys_per_split % 32:
        raise ValueError(f"keys_per_split must be a positive multiple of 32 (whole mask words), got {keys_per_split}")
    keys_per_split = min(keys_per_split, n_k)
    return keys_per_split, triton.cdiv(n_k, keys_per_split)


def scratch(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Uninitialised intermediate buffer (the tests replace this to poison every intermediate)."""
    return torch.empty(shape, dtype=dtype, device=device)


def scratch_like(t: torch.Tensor) -> torch.Tensor:
    """Uninitialised buffer with ``t``'s shape, dtype and strides (replaced by the tests, like :func:`scratch`)."""
    return torch.empty_like(t)


def _dot_precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype in (torch.float32, torch.float64) else "tf32"  # tf32 would only matter for float32


_TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16,
              torch.float64: tl.float64}


def stats_dtype(dtype: torch.dtype) -> torch.dtype:
    """dtype of lse, delta and the split partials: float32, float64 for float64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _dot_dtype(dtype: torch.dtype):
    """Operand dtype of the dots: the input dtype, except bfloat16 under the interpreter, whose tl.dot (triton 3.9)
    multiplies bfloat16 bit patterns as integers; there the operands (already rounded to bfloat16) go to float32,
    where their products are exact, as in the tensor cores."""
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


def pack_mask(mask: torch.Tensor, mask_is_logits: bool, num_heads: int) -> torch.Tensor:
    """(B, Nq, Nk) / (B, H, Nq, Nk) mask -> (B, Hm, Nq, cdiv(Nk, 32)) int32 bits with empty rows opened."""
    mask4, Hm = mask_view(mask, num_heads)
    B, _, n_q, n_k = mask4.shape
    n_words = triton.cdiv(n_k, 32)
    bits = scratch((B, Hm, n_q, n_words), torch.int32, mask.device)
    _pack_mask_kernel[(triton.cdiv(n_q, PACK_BLOCK_ROWS), B * Hm)](
        mask4, bits, *mask4.stride(), Hm, n_q, n_k, n_words, MASK_IS_LOGITS=mask_is_logits,
        BLOCK_R=PACK_BLOCK_ROWS, BLOCK_W=min(PACK_BLOCK_WORDS, triton.next_power_of_2(n_words)),
        num_warps=1 if INTERPRET else 4,
    )
    return bits


def _bits_strides(bits: torch.Tensor) -> tuple[int, int, int]:
    return bits.stride(0), (bits.stride(1) if bits.shape[1] > 1 else 0), bits.stride(2)


def new_output(q: torch.Tensor) -> torch.Tensor:
    """(B, H, Nq, D) output laid out as (B, Nq, H, D) in memory, so that merging the heads is a free view."""
    B, H, n_q, D = q.shape
    return scratch((B, n_q, H, D), q.dtype, q.device).transpose(1, 2)


def _consts(dtype: torch.dtype, head_dim: int) -> dict:
    return dict(DOT_PRECISION=_dot_precision(dtype), DOT_DTYPE=_dot_dtype(dtype), HEAD_DIM=head_dim,
                BLOCK_D=block_d(head_dim))


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
    bits = pack_mask(mask, mask_is_logits, H)
    kps, n_splits = plan_splits(B * H, n_q, n_k, q.device, keys_per_split)
    out = new_output(q) if out is None else out
    if n_splits == 1:
        o_buf, lse_buf = out, scratch((B, H, n_q), stats_dtype(q.dtype), q.device)
        o_strides = (out.stride(0), out.stride(1), 0, out.stride(2), out.stride(3))
        l_strides = (lse_buf.stride(0), lse_buf.stride(1), 0)
    else:
        o_buf = scratch((B, H, n_splits, n_q, D), stats_dtype(q.dtype), q.device)
        lse_buf = scratch((B, H, n_splits, n_q), stats_dtype(q.dtype), q.device)
        o_strides = o_buf.stride()
        l_strides = lse_buf.stride()[:3]
    args = (
        q, k, v, bits, o_buf, lse_buf, *q.stride(), *k.stride(), *v.stride(), *_bits_strides(bits),
        *o_strides, *l_strides, n_q, n_k, kps, LOG2E / math.sqrt(D),
    )
    _launch(_fwd_kernel, _fwd_tuned, lambda meta: (H, triton.cdiv(n_q, meta["BLOCK_Q"]) * n_splits, B),
            args, _consts(q.dtype, D), config)
    if n_splits == 1:
        return out, lse_buf
    lse = scratch((B, H, n_q), stats_dtype(q.dtype), q.device)
    _merge_kernel[(triton.cdiv(n_q, SMALL_BLOCK_Q), B * H)](
        o_buf, lse_buf, out, lse, *out.stride(), H, n_q, n_splits,
        HEAD_DIM=D, BLOCK_D=block_d(D), BLOCK_Q=SMALL_BLOCK_Q, num_warps=1 if INTERPRET else 4,
    )
    return out, lse


def masked_attention_bwd(
    grad_out: torch.Tensor,  # (B, H, Nq, D)
    q: torch.Tensor,  # (B, H, Nq, D)
    k: torch.Tensor,  # (B, H, Nk, D)
    v: torch.Tensor,  # (B, H, Nk, D)
    out: torch.Tensor,  # (B, H, Nq, D) forward output
    lse: torch.Tensor,  # (B, H, Nq) float32 base-2 log-sum-exp from the forward
    mask: torch.Tensor,  # the forward's mask
    mask_is_logits: bool,
    keys_per_split: int | None = None,
    config: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # dq, dk, dv shaped like q, k, v
    B, H, n_q, D = q.shape
    n_k = k.shape[2]
    bits = pack_mask(mask, mask_is_logits, H)
    lse = lse.contiguous()
    delta = scratch((B, H, n_q), stats_dtype(q.dtype), q.device)
    _bwd_delta_kernel[(triton.cdiv(n_q, SMALL_BLOCK_Q), B * H)](
        out, grad_out, delta, *out.stride(), *grad_out.stride(), H, n_q,
        HEAD_DIM=D, BLOCK_D=block_d(D), BLOCK_Q=SMALL_BLOCK_Q, num_warps=1 if INTERPRET else 4,
    )
    common = (*q.stride(), *k.stride(), *v.stride(), *grad_out.stride(), *_bits_strides(bits))
    scales = (LOG2E / math.sqrt(D), 1.0 / math.sqrt(D))
    consts = _consts(q.dtype, D)

    dk, dv = scratch_like(k), scratch_like(v)
    _launch(
        _bwd_dkdv_kernel, _dkdv_tuned, lambda meta: (H, triton.cdiv(n_k, meta["BLOCK_K"]), B),
        (q, k, v, grad_out, bits, lse, delta, dk, dv, *common, *dk.stride(), *dv.stride(), H, n_q, n_k, n_k, *scales),
        consts, config,
    )

    kps, n_splits = plan_splits(B * H, n_q, n_k, q.device, keys_per_split)
    dq = scratch_like(q)
    if n_splits == 1:
        dq_buf, dq_strides = dq, (dq.stride(0), dq.stride(1), 0, dq.stride(2), dq.stride(3))
    else:
        dq_buf = scratch((B, H, n_splits, n_q, D), stats_dtype(q.dtype), q.device)
        dq_strides = dq_buf.stride()
    _launch(
        _bwd_dq_kernel, _dq_tuned, lambda meta: (H, triton.cdiv(n_q, meta["BLOCK_Q"]) * n_splits, B),
        (q, k, v, grad_out, bits, lse, delta, dq_buf, *common, *dq_strides, H, n_q, n_k, kps, *scales),
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


# ---------------------------------------------------------------------------------------------------------------
# Ahead-of-time compilation specs (tests, TensorRT plugins)
# ---------------------------------------------------------------------------------------------------------------

_PTR = {dtype: "*" + TRITON_TYPES[name] for dtype, name in DTYPE_NAMES.items()}
_UNIT_STRIDES = ("stride_qd", "stride_kd", "stride_vd", "stride_mk", "stride_od", "stride_gd", "stride_dkd",
                 "stride_dvd", "stride_dd")
_SCALARS = ("qk_scale", "sm_scale")


def aot_specs(dtype: torch.dtype = torch.float16, mask_dtype: torch.dtype | None = None, head_dim: int = 32,
              configs: dict | None = None) -> dict[str, KernelSpec]:
    """Every kernel of the op by name, as an ``m2f.kernels.aot.KernelSpec`` (for sm_90; ``.for_target`` for
    others) whose ``divisible_by_16`` lists the integer and pointer arguments Triton would mark divisible by 16 at
    a launch on contiguous tensors whose sizes are multiples of 16 (Nq excepted: 100 / 200 in the presets).

    Inner strides (head dim, key dim of the mask) are 1, as Triton specialises them at launch. ``configs`` maps
    "fwd" / "dkdv" / "dq" to a (BLOCK_Q, BLOCK_K, SKIP_EMPTY, warps, stages) tuple; default: the first GPU config
    of the dtype's list.
    """
    mask_dtype = mask_dtype or dtype
    group = "fp32" if dtype == torch.float32 else "half"
    pick = {kind: (configs or {}).get(kind, GPU_CONFIGS[kind][group][0]) for kind in ("fwd", "dkdv", "dq")}
    t = _PTR[dtype]
    m = "*u8" if mask_dtype == torch.bool else _PTR[mask_dtype]
    base = dict(DOT_PRECISION=_dot_precision(dtype), DOT_DTYPE=_TL_DTYPES[dtype], HEAD_DIM=head_dim,
                BLOCK_D=block_d(head_dim))

    def tile(kind):
        bq, bk, skip, w, s = pick[kind]
        return dict(BLOCK_Q=bq, BLOCK_K=bk, SKIP_EMPTY=skip), w, s

    def spec(name, fn, pointers, constexprs, warps, stages):
        sig, consts, divisible = {}, {}, []
        for arg in _arg_names(fn):
            if arg in constexprs:
                sig[arg], consts[arg] = "constexpr", constexprs[arg]
            elif arg in _UNIT_STRIDES:
                sig[arg], consts[arg] = "constexpr", 1
            elif arg in pointers:
                sig[arg] = pointers[arg]
                divisible.append(arg)
            elif arg in _SCALARS:
                sig[arg] = "fp32"
            else:
                sig[arg] = "i32"
                if arg not in ("n_q", "mask_heads", "n_heads", "n_splits"):
                    divisible.append(arg)
        return name, KernelSpec(fn, sig, consts, num_warps=warps, num_stages=stages, divisible_by_16=tuple(divisible))

    fwd, fw, fs = tile("fwd")
    dkdv, kw, ks = tile("dkdv")
    dq, qw, qs = tile("dq")
    small = dict(HEAD_DIM=head_dim, BLOCK_D=block_d(head_dim), BLOCK_Q=64)
    attn = dict(Q=t, K=t, V=t, BITS="*i32")
    return dict([
        spec("pack_mask", _pack_mask_kernel, dict(MASK=m, BITS="*i32"),
             dict(MASK_IS_LOGITS=mask_dtype != torch.bool, BLOCK_R=1, BLOCK_W=64), 4, 1),
        spec("fwd", _fwd_kernel, dict(attn, OUT=t, LSE="*fp32"), {**base, **fwd}, fw, fs),
        spec("fwd_split", _fwd_kernel, dict(attn, OUT="*fp32", LSE="*fp32"), {**base, **fwd}, fw, fs),
        spec("merge", _merge_kernel, dict(O_PART="*fp32", LSE_PART="*fp32", OUT=t, LSE="*fp32"), small, 4, 1),
        spec("bwd_delta", _bwd_delta_kernel, dict(OUT=t, DO=t, DELTA="*fp32"), small, 4, 1),
        spec("bwd_dkdv", _bwd_dkdv_kernel, dict(attn, DO=t, LSE="*fp32", DELTA="*fp32", DK=t, DV=t),
             {**base, **dkdv}, kw, ks),
        spec("bwd_dq_split", _bwd_dq_kernel, dict(attn, DO=t, LSE="*fp32", DELTA="*fp32", DQ="*fp32"),
             {**base, **dq}, qw, qs),
    ])


def _arg_names(fn) -> list[str]:
    names = getattr(fn, "arg_names", None)
    if names is None:  # interpreter wrapper
        import inspect

        names = list(inspect.signature(fn.fn).parameters)
    return list(names)
