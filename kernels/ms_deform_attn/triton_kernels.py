"""Fused Triton kernels for multi-scale deformable attention (forward and backward).

Semantics: those of the official ``MSDeformAttnFunction`` / ``naive.ms_deform_attn_torch``: for every query q,
head m, level l and point p, bilinearly sample level l of the value map at ``sampling_locations[q, m, l, p]``
= (x, y) in [0, 1] (pixel centres at (i + 0.5) / W, i.e. grid_sample's align_corners=False) with each of the
4 corners that falls outside the map contributing zero (grid_sample's padding_mode="zeros"), and sum the
samples with ``attention_weights[q, m, l, p]``. Non-finite inputs as ``naive.py`` defines them: a corner outside
the map is never read; a point not strictly inside (-1, W) x (-1, H) in pixel units (NaN / inf locations
included) is skipped, weight and all, as in the official CUDA op; everything else follows IEEE arithmetic.

Layout (all contiguous, as the official op and TensorRT's MultiscaleDeformableAttnPlugin_TRT):
    value               (N, S, M, D)         S = sum_l H_l * W_l, levels stacked at level_start_index
    spatial_shapes      (L, 2) int32/int64   (H, W) per level; read on the device (no host sync)
    level_start_index   (L,)   int32/int64
    sampling_locations  (N, Q, M, L, P, 2)   (x, y)
    attention_weights   (N, Q, M, L, P)
    output              (N, Q, M * D)

Dtypes: value fp32 / fp16 / bf16 / fp64; locations and weights each either value's dtype or fp32. All
arithmetic (coordinates, bilinear weights, the weighted sum, every gradient) is fp32, or fp64 when value is fp64
(``ACC``: slow on GPUs, meant for gradcheck); the output and each gradient are stored in the dtype of the tensor
they belong to. grad_value is accumulated with atomics into an fp32 (fp64) buffer (the caller casts it). Any L,
P, M, D (D need not be a power of two: the channel tail is masked).

Grid: one program per (block of BLOCK_Q queries, batch * head). A program holds a (BLOCK_Q, BLOCK_D) fp32
accumulator; each corner read is one row of D contiguous elements of value (128 B at D = 32 fp32), so the
gathers vectorise along the channel axis (16-byte loads when rows are 16-byte aligned, ``ROW_ALIGNED``). The
4 corners of a point share one computed row offset (+1 column, +W rows). Levels and points are runtime loops
(H, W and start read once per level): unrolling the points (tl.static_range) multiplied the compile time
(20-90 s per kernel on this CPU) and the register use, without a GPU here to show a gain.

Roofline at Mask2Former's 1024 x 1024 input (res3..res5 at strides 8/16/32: Q = S = 128² + 64² + 32² = 21504,
M = 8 heads, L = 3 levels, P = 4 points, D = 32 channels), batch 1 — the bytes the op must move:
    value       Q * M * D          = 5,505,024 elements
    locations   Q * M * L * P * 2  = 4,128,768
    weights     Q * M * L * P      = 2,064,384
    output      Q * M * D          = 5,505,024
    forward:  17,203,200 elements = 68.8 MB in fp32, 34.4 MB in fp16/bf16 (value, locations, weights, output
              in the half type): ~21 us / ~10 us at an H100 SXM's 3.35 TB/s. The value tensor (22 MB fp32)
              fits in the H100's 50 MB L2, so the 8.3 M corner rows read (1.06 GB at 128 B) mostly hit L2.
    backward: reads grad_out, value, locations, weights and writes grad_value, grad_locations, grad_weights:
              28,901,376 elements = 115.6 MB fp32 / 57.8 MB half (+ the fp32 grad_value buffer when value is
              half). ``bench/ms_deform_attn.py`` reports effective GB/s against these numbers (``min_bytes``).

Tested: Triton's CPU interpreter (triton 3.9) against the float64 grid_sample reference, including fp64 and
non-finite inputs (tests/test_kernel_fuzz.py); compiled ahead of time for sm_90 (H100) and sm_87 (Jetson Orin)
with no spills (tests/test_msda_aot.py). Ran on an H100 on 2026-11-24 in fp32 / fp16 / bf16; fp64 has NOT run on
a GPU (interpreter only).
"""
from __future__ import annotations

import triton
import triton.language as tl

from .._backend import triton_interpreter_enabled


def _configs(backward: bool) -> list[triton.Config]:
    if triton_interpreter_enabled():
        # The interpreter costs per op, not per element: one config with a large block, no tuning.
        return [triton.Config({"BLOCK_Q": 64}, num_warps=4, num_stages=1)]
    # (BLOCK_Q, num_warps) giving 4..16 (forward) / 4..8 (backward: more live tiles) fp32 elements of the
    # (BLOCK_Q, 32) tile per thread at D = 32. Measured with ptxas for sm_90: 16 per thread needs ~110 registers
    # in the forward, 32 needs ~210 and 64 spills; the backward needs ~100 at 8 and ~185 at 16. AOT_CONFIGS: the
    # ones the ahead-of-time build checks.
    pairs = [(16, 2), (16, 4), (32, 2), (32, 4), (32, 8), (64, 4), (64, 8), (128, 8)]
    if backward:
        pairs = [(bq, nw) for bq, nw in pairs if bq // nw <= 8]
    return [triton.Config({"BLOCK_Q": bq}, num_warps=nw, num_stages=1) for bq, nw in pairs]


# The fixed configs of ahead-of-time builds (aot_build.py; a TensorRT engine cannot autotune): no spills on
# sm_90 or sm_87. The forward's holds 16 elements per thread; the backward's 4, because on sm_87 ptxas caps
# the 8-per-thread backward configs at 128 registers and spills 8-16 bytes (measured).
AOT_CONFIGS = {"fwd": {"BLOCK_Q": 64, "num_warps": 4}, "bwd": {"BLOCK_Q": 32, "num_warps": 8}}

# Autotune keys are shapes only (never data): the config depends on the work per program and the grid size.
_KEY = ["num_queries", "num_heads", "NUM_LEVELS", "NUM_POINTS", "HEAD_DIM"]


@triton.autotune(configs=_configs(backward=False), key=_KEY)
@triton.jit
def ms_deform_attn_fwd_kernel(
    value_ptr,  # (N, S, M, D)
    shapes_ptr,  # (L, 2) int: (H, W)
    starts_ptr,  # (L,) int
    loc_ptr,  # (N, Q, M, L, P, 2)
    attn_ptr,  # (N, Q, M, L, P)
    out_ptr,  # (N, Q, M * D)
    num_keys,  # S
    num_queries,  # Q
    num_heads,  # M
    NUM_LEVELS: tl.constexpr,
    NUM_POINTS: tl.constexpr,
    HEAD_DIM: tl.constexpr,  # D
    BLOCK_D: tl.constexpr,  # next power of two >= D
    ROW_ALIGNED: tl.constexpr,  # value / out rows start on 16 bytes (checked by the launcher)
    BLOCK_Q: tl.constexpr,
):
    pid_q = tl.program_id(0)
    pid_nm = tl.program_id(1)
    i_n = pid_nm // num_heads
    i_m = pid_nm % num_heads

    o_q = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)  # (BLOCK_Q,)
    o_d = tl.arange(0, BLOCK_D)  # (BLOCK_D,)
    m_q = o_q < num_queries
    m_d = o_d < HEAD_DIM

    stride_key = num_heads * HEAD_DIM  # between rows of value (one key, all heads)
    stride_point = NUM_LEVELS * NUM_POINTS  # weights of one (query, head)
    # Batch offsets in int64 (N * S * M * D may exceed 2^31); offsets inside one batch element stay int32.
    i_n64 = i_n.to(tl.int64)
    p_value = value_ptr + i_n64 * num_keys * stride_key + i_m * HEAD_DIM
    o_nqm = i_n64 * num_queries * num_heads  # first (n, q, m) row of this batch element
    p_out = out_ptr + o_nqm * HEAD_DIM
    if ROW_ALIGNED:
        # Triton's JIT learns this from the arguments; an ahead-of-time build (TensorRT plugin) does not, and
        # without it every channel is its own scalar load. Row offsets below are multiples of D, so the hint
        # on the base carries to every corner row.
        p_value = tl.multiple_of(p_value, 16)
        p_out = tl.multiple_of(p_out, 16)
    o_qm = o_q * num_heads + i_m  # (BLOCK_Q,) row of (q, m) inside it
    p_attn_q = attn_ptr + o_nqm * stride_point + o_qm * stride_point
    p_loc_q = loc_ptr + o_nqm * (2 * stride_point) + o_qm * (2 * stride_point)

    ACC = tl.float64 if value_ptr.dtype.element_ty == tl.float64 else tl.float32  # arithmetic dtype
    b_acc = tl.zeros([BLOCK_Q, BLOCK_D], dtype=ACC)
    for i_l in range(NUM_LEVELS):
        level_h = tl.load(shapes_ptr + 2 * i_l).to(tl.int32)
        level_w = tl.load(shapes_ptr + 2 * i_l + 1).to(tl.int32)
        level_start = tl.load(starts_ptr + i_l).to(tl.int32)
        f_h = level_h.to(ACC)
        f_w = level_w.to(ACC)
        p_value_l = p_value + level_start * stride_key
        for i_p in range(NUM_POINTS):
            o_lp = i_l * NUM_POINTS + i_p
            b_x = tl.load(p_loc_q + 2 * o_lp, mask=m_q, other=0.0).to(ACC)  # (BLOCK_Q,)
            b_y = tl.load(p_loc_q + 2 * o_lp + 1, mask=m_q, other=0.0).to(ACC)
            b_a = tl.load(p_attn_q + o_lp, mask=m_q, other=0.0).to(ACC)
            # align_corners=False: pixel i covers [i, i + 1) in map units, its centre at i + 0.5.
            b_w_im = b_x * f_w - 0.5
            b_h_im = b_y * f_h - 0.5
            # A point wholly outside the map (NaN / inf included: their comparisons are False) is skipped:
            # moved to -2 (no corner in the map, finite weights, safe int casts) with weight 0, so neither its
            # location nor its weight, even inf / NaN, reaches the sums.
            m_point = (b_w_im > -1.0) & (b_w_im < f_w) & (b_h_im > -1.0) & (b_h_im < f_h)
            b_w_im = tl.where(m_point, b_w_im, -2.0)
            b_h_im = tl.where(m_point, b_h_im, -2.0)
            b_a = tl.where(m_point, b_a, 0.0)
            b_x0f = tl.floor(b_w_im)
            b_y0f = tl.floor(b_h_im)
            b_fx = b_w_im - b_x0f  # in [0, 1)
            b_fy = b_h_im - b_y0f
            b_x0 = b_x0f.to(tl.int32)  # in [-2, W - 1]
            b_y0 = b_y0f.to(tl.int32)
            b_x1 = b_x0 + 1
            b_y1 = b_y0 + 1
            # Each corner on its own: zero when outside the map (grid_sample padding_mode="zeros").
            m_x0 = (b_x0 >= 0) & (b_x0 < level_w)
            m_x1 = (b_x1 >= 0) & (b_x1 < level_w)
            m_y0 = m_q & (b_y0 >= 0) & (b_y0 < level_h)
            m_y1 = m_q & (b_y1 >= 0) & (b_y1 < level_h)
            o_00 = (b_y0 * level_w + b_x0) * stride_key  # (BLOCK_Q,) row offsets of the 4 corners
            o_01 = o_00 + stride_key
            o_10 = o_00 + level_w * stride_key
            o_11 = o_10 + stride_key
            m_00 = (m_y0 & m_x0)[:, None] & m_d[None, :]  # (BLOCK_Q, BLOCK_D)
            m_01 = (m_y0 & m_x1)[:, None] & m_d[None, :]
            m_10 = (m_y1 & m_x0)[:, None] & m_d[None, :]
            m_11 = (m_y1 & m_x1)[:, None] & m_d[None, :]
            b_v00 = tl.load(p_value_l + o_00[:, None] + o_d[None, :], mask=m_00, other=0.0)  # (BLOCK_Q, BLOCK_D)
            b_v01 = tl.load(p_value_l + o_01[:, None] + o_d[None, :], mask=m_01, other=0.0)
            b_v10 = tl.load(p_value_l + o_10[:, None] + o_d[None, :], mask=m_10, other=0.0)
            b_v11 = tl.load(p_value_l + o_11[:, None] + o_d[None, :], mask=m_11, other=0.0)
            b_gx = 1.0 - b_fx
            b_gy = 1.0 - b_fy
            # weight * bilinear sample, as the official op groups it (an inf weight times a sample is one
            # signed inf, not a sum of per-corner infs that could cancel to NaN).
            b_sample = b_gy[:, None] * (b_gx[:, None] * b_v00.to(ACC) + b_fx[:, None] * b_v01.to(ACC))
            b_sample += b_fy[:, None] * (b_gx[:, None] * b_v10.to(ACC) + b_fx[:, None] * b_v11.to(ACC))
            b_acc += b_a[:, None] * b_sample

    p_out = p_out + o_qm[:, None] * HEAD_DIM + o_d[None, :]  # (BLOCK_Q, BLOCK_D) of (N, Q, M, D)
    tl.store(p_out, b_acc.to(out_ptr.dtype.element_ty), mask=m_q[:, None] & m_d[None, :])


@triton.autotune(configs=_configs(backward=True), key=_KEY, reset_to_zero=["grad_value_ptr"])
@triton.jit
def ms_deform_attn_bwd_kernel(
    grad_out_ptr,  # (N, Q, M * D)
    value_ptr,  # (N, S, M, D)
    shapes_ptr,  # (L, 2) int: (H, W)
    starts_ptr,  # (L,) int
    loc_ptr,  # (N, Q, M, L, P, 2)
    attn_ptr,  # (N, Q, M, L, P)
    grad_value_ptr,  # (N, S, M, D) fp32 (fp64 for fp64 value), zero-filled: accumulated with atomics
    grad_loc_ptr,  # (N, Q, M, L, P, 2) in the locations' dtype: written once
    grad_attn_ptr,  # (N, Q, M, L, P) in the weights' dtype: written once
    num_keys,  # S
    num_queries,  # Q
    num_heads,  # M
    NUM_LEVELS: tl.constexpr,
    NUM_POINTS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ROW_ALIGNED: tl.constexpr,  # value / grad_out / grad_value rows start on 16 bytes (checked by the launcher)
    BLOCK_Q: tl.constexpr,
):
    pid_q = tl.program_id(0)
    pid_nm = tl.program_id(1)
    i_n = pid_nm // num_heads
    i_m = pid_nm % num_heads

    o_q = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    o_d = tl.arange(0, BLOCK_D)
    m_q = o_q < num_queries
    m_d = o_d < HEAD_DIM

    stride_key = num_heads * HEAD_DIM
    stride_point = NUM_LEVELS * NUM_POINTS
    i_n64 = i_n.to(tl.int64)
    o_value = i_n64 * num_keys * stride_key + i_m * HEAD_DIM
    p_value = value_ptr + o_value
    p_grad_value = grad_value_ptr + o_value
    o_nqm = i_n64 * num_queries * num_heads
    p_go = grad_out_ptr + o_nqm * HEAD_DIM
    if ROW_ALIGNED:  # see the forward kernel
        p_value = tl.multiple_of(p_value, 16)
        p_grad_value = tl.multiple_of(p_grad_value, 16)
        p_go = tl.multiple_of(p_go, 16)
    o_qm = o_q * num_heads + i_m
    p_attn_q = attn_ptr + o_nqm * stride_point + o_qm * stride_point
    p_loc_q = loc_ptr + o_nqm * (2 * stride_point) + o_qm * (2 * stride_point)
    p_grad_attn_q = grad_attn_ptr + o_nqm * stride_point + o_qm * stride_point
    p_grad_loc_q = grad_loc_ptr + o_nqm * (2 * stride_point) + o_qm * (2 * stride_point)

    m_qd = m_q[:, None] & m_d[None, :]
    p_go = p_go + o_qm[:, None] * HEAD_DIM + o_d[None, :]
    ACC = tl.float64 if value_ptr.dtype.element_ty == tl.float64 else tl.float32  # arithmetic dtype
    b_go = tl.load(p_go, mask=m_qd, other=0.0).to(ACC)  # (BLOCK_Q, BLOCK_D)

    for i_l in range(NUM_LEVELS):
        level_h = tl.load(shapes_ptr + 2 * i_l).to(tl.int32)
        level_w = tl.load(shapes_ptr + 2 * i_l + 1).to(tl.int32)
        level_start = tl.load(starts_ptr + i_l).to(tl.int32)
        f_h = level_h.to(ACC)
        f_w = level_w.to(ACC)
        p_value_l = p_value + level_start * stride_key
        p_grad_value_l = p_grad_value + level_start * stride_key
        for i_p in range(NUM_POINTS):
            o_lp = i_l * NUM_POINTS + i_p
            b_x = tl.load(p_loc_q + 2 * o_lp, mask=m_q, other=0.0).to(ACC)  # (BLOCK_Q,)
            b_y = tl.load(p_loc_q + 2 * o_lp + 1, mask=m_q, other=0.0).to(ACC)
            b_a = tl.load(p_attn_q + o_lp, mask=m_q, other=0.0).to(ACC)
            # align_corners=False: pixel i covers [i, i + 1) in map units, its centre at i + 0.5.
            b_w_im = b_x * f_w - 0.5
            b_h_im = b_y * f_h - 0.5
            # A point wholly outside the map (NaN / inf included: their comparisons are False) is skipped:
            # moved to -2 (no corner in the map, finite weights, safe int casts) with weight 0, so neither its
            # location nor its weight, even inf / NaN, reaches the sums.
            m_point = (b_w_im > -1.0) & (b_w_im < f_w) & (b_h_im > -1.0) & (b_h_im < f_h)
            b_w_im = tl.where(m_point, b_w_im, -2.0)
            b_h_im = tl.where(m_point, b_h_im, -2.0)
            b_a = tl.where(m_point, b_a, 0.0)
            b_x0f = tl.floor(b_w_im)
            b_y0f = tl.floor(b_h_im)
            b_fx = b_w_im - b_x0f  # in [0, 1)
            b_fy = b_h_im - b_y0f
            b_x0 = b_x0f.to(tl.int32)  # in [-2, W - 1]
            b_y0 = b_y0f.to(tl.int32)
            b_x1 = b_x0 + 1
            b_y1 = b_y0 + 1
            m_x0 = (b_x0 >= 0) & (b_x0 < level_w)
            m_x1 = (b_x1 >= 0) & (b_x1 < level_w)
            m_y0 = m_q & (b_y0 >= 0) & (b_y0 < level_h)
            m_y1 = m_q & (b_y1 >= 0) & (b_y1 < level_h)
            m_00 = (m_y0 & m_x0)[:, None] & m_d[None, :]
            m_01 = (m_y0 & m_x1)[:, None] & m_d[None, :]
            m_10 = (m_y1 & m_x0)[:, None] & m_d[None, :]
            m_11 = (m_y1 & m_x1)[:, None] & m_d[None, :]
            o_00 = (b_y0 * level_w + b_x0) * stride_key
            o_01 = o_00 + stride_key
            o_10 = o_00 + level_w * stride_key
            o_11 = o_10 + stride_key
            b_gx = 1.0 - b_fx
            b_gy = 1.0 - b_fy
            # Every gradient but grad_value needs a corner only through s_c = <grad_out, value row c> (one
            # number per query), so each corner tile dies right after its load: ~half the registers of keeping
            # all four. Corners outside the map read as 0, exactly grid_sample's zero padding.
            b_v = tl.load(p_value_l + o_00[:, None] + o_d[None, :], mask=m_00, other=0.0)  # (BLOCK_Q, BLOCK_D)
            b_s00 = tl.sum(b_go * b_v.to(ACC), axis=1)  # (BLOCK_Q,)
            b_v = tl.load(p_value_l + o_01[:, None] + o_d[None, :], mask=m_01, other=0.0)
            b_s01 = tl.sum(b_go * b_v.to(ACC), axis=1)
            b_v = tl.load(p_value_l + o_10[:, None] + o_d[None, :], mask=m_10, other=0.0)
            b_s10 = tl.sum(b_go * b_v.to(ACC), axis=1)
            b_v = tl.load(p_value_l + o_11[:, None] + o_d[None, :], mask=m_11, other=0.0)
            b_s11 = tl.sum(b_go * b_v.to(ACC), axis=1)
            # d out / d attn = <grad_out, bilinear sample>.
            b_grad_a = b_gy * (b_gx * b_s00 + b_fx * b_s01) + b_fy * (b_gx * b_s10 + b_fx * b_s11)
            # d sample / d fx = gy (v01 - v00) + fy (v11 - v10); fx = x * W - 0.5 - floor(.), so d fx / d x = W.
            b_grad_x = b_a * f_w * (b_gy * (b_s01 - b_s00) + b_fy * (b_s11 - b_s10))
            b_grad_y = b_a * f_h * (b_gx * (b_s10 - b_s00) + b_fx * (b_s11 - b_s01))
            tl.store(p_grad_attn_q + o_lp, b_grad_a.to(grad_attn_ptr.dtype.element_ty), mask=m_q)
            tl.store(p_grad_loc_q + 2 * o_lp, b_grad_x.to(grad_loc_ptr.dtype.element_ty), mask=m_q)
            tl.store(p_grad_loc_q + 2 * o_lp + 1, b_grad_y.to(grad_loc_ptr.dtype.element_ty), mask=m_q)

            # d out / d value at each corner = attn * bilinear weight * grad_out; scattered with atomics.
            b_ago = b_a[:, None] * b_go
            p_gv = p_grad_value_l + o_d[None, :]
            gv_ty = grad_value_ptr.dtype.element_ty
            tl.atomic_add(p_gv + o_00[:, None], ((b_gy * b_gx)[:, None] * b_ago).to(gv_ty), mask=m_00, sem="relaxed")
            tl.atomic_add(p_gv + o_01[:, None], ((b_gy * b_fx)[:, None] * b_ago).to(gv_ty), mask=m_01, sem="relaxed")
            tl.atomic_add(p_gv + o_10[:, None], ((b_fy * b_gx)[:, None] * b_ago).to(gv_ty), mask=m_10, sem="relaxed")
            tl.atomic_add(p_gv + o_11[:, None], ((b_fy * b_fx)[:, None] * b_ago).to(gv_ty), mask=m_11, sem="relaxed")


# ----------------------------------------------------------------------------------------------------------
# Launchers: contiguous tensors in, freshly allocated tensors out (tests may pass pre-poisoned buffers).
# ----------------------------------------------------------------------------------------------------------
def rows_aligned(head_dim: int, *tensors) -> bool:
    """Every row of D channels of every tensor starts on a 16-byte boundary (vector loads are safe)."""
    return all(t.data_ptr() % 16 == 0 and head_dim * t.element_size() % 16 == 0 for t in tensors)


def check_buffers(**tensors) -> None:
    """The kernels compute flat offsets: every tensor they touch must be contiguous (the op makes them so)."""
    from m2f.errors import InputError

    for name, t in tensors.items():
        if t is not None and not t.is_contiguous():
            raise InputError(
                f"ms_deform_attn kernels: {name} {tuple(t.shape)} has strides {t.stride()} but must be contiguous; "
                "call .contiguous() on it"
            )


def _grid(num_queries: int, batch_heads: int):
    return lambda meta: (triton.cdiv(num_queries, meta["BLOCK_Q"]), batch_heads)


def ms_deform_attn_fwd(
    value,  # (N, S, M, D)
    spatial_shapes,  # (L, 2) int
    level_start_index,  # (L,) int
    sampling_locations,  # (N, Q, M, L, P, 2)
    attention_weights,  # (N, Q, M, L, P)
    out=None,  # optional (N, Q, M * D) buffer in value's dtype, every element overwritten
):  # -> (N, Q, M * D)
    import torch

    N, S, M, D = value.shape
    _, Q, _, L, P, _ = sampling_locations.shape
    if out is None:
        out = torch.empty((N, Q, M * D), dtype=value.dtype, device=value.device)
    check_buffers(value=value, spatial_shapes=spatial_shapes, level_start_index=level_start_index,
                  sampling_locations=sampling_locations, attention_weights=attention_weights, out=out)
    if N * Q * M == 0:
        return out
    ms_deform_attn_fwd_kernel[_grid(Q, N * M)](
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights, out,
        S, Q, M, NUM_LEVELS=L, NUM_POINTS=P, HEAD_DIM=D, BLOCK_D=triton.next_power_of_2(D),
        ROW_ALIGNED=rows_aligned(D, value, out),
    )
    return out


def ms_deform_attn_bwd(
    grad_out,  # (N, Q, M * D)
    value,  # (N, S, M, D)
    spatial_shapes,  # (L, 2) int
    level_start_index,  # (L,) int
    sampling_locations,  # (N, Q, M, L, P, 2)
    attention_weights,  # (N, Q, M, L, P)
    grad_loc=None,  # optional buffers, every element overwritten
    grad_attn=None,
):  # -> (grad_value, grad_locations, grad_weights), each in its input's dtype
    import torch

    N, S, M, D = value.shape
    _, Q, _, L, P, _ = sampling_locations.shape
    acc_dtype = torch.float64 if value.dtype == torch.float64 else torch.float32
    grad_value = torch.zeros(value.shape, dtype=acc_dtype, device=value.device)  # atomics accumulate here
    if grad_loc is None:
        grad_loc = torch.empty_like(sampling_locations)
    if grad_attn is None:
        grad_attn = torch.empty_like(attention_weights)
    check_buffers(grad_out=grad_out, value=value, spatial_shapes=spatial_shapes, level_start_index=level_start_index,
                  sampling_locations=sampling_locations, attention_weights=attention_weights, grad_loc=grad_loc,
                  grad_attn=grad_attn)
    if N * Q * M > 0:
        ms_deform_attn_bwd_kernel[_grid(Q, N * M)](
            grad_out, value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
            grad_value, grad_loc, grad_attn,
            S, Q, M, NUM_LEVELS=L, NUM_POINTS=P, HEAD_DIM=D, BLOCK_D=triton.next_power_of_2(D),
            ROW_ALIGNED=rows_aligned(D, grad_out, value, grad_value),
        )
    return grad_value.to(value.dtype), grad_loc, grad_attn
