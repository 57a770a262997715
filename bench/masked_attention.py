"""masked_attention benchmark: the fused Triton op against what the official decoder (and its ports) run per layer.

Shapes are those of Mask2Former's transformer decoder for an input of H x W: 100 queries, 8 heads, hidden 256
(head dim 32), keys at 1/32, 1/16 and 1/8 of the input (the three attention levels), the previous layer's mask
logits at 1/4 (the mask features' resolution). Mask logits are smooth blobs (a random 8 x 8 field upsampled, plus
a per-query offset), so masks are object-like and some queries' masks are empty at a given level, as in the model.

Cases (each at every level; ``level`` and ``keys`` in ``extra``):

* ``masked_attention/fwd`` - attention core, mask building included. Backends:
    - ``m2f-triton``: ``interpolate`` of the logits to the level, then ``masked_attention_from_logits`` (the mask
      is computed inside the kernel);
    - ``sdpa-bool-mask``: the official mask building (interpolate, sigmoid, < 0.5, repeat over heads, the
      empty-row fix with ``torch.where``) then ``scaled_dot_product_attention`` with the (inverted) bool mask;
    - ``flex``: the same bool mask without the head repeat, ``create_block_mask`` and a compiled
      ``flex_attention`` (skipped with a note when FlexAttention is unavailable or fails);
    - ``m2f-torch``: the plain-PyTorch reference (``backend="torch"``).
* ``masked_attention/layer`` - the whole cross-attention call with input / output projections: the official
  ``nn.MultiheadAttention`` with its float mask building, against the same weights with ``m2f-triton``.
* ``masked_attention/fwd+bwd`` (unless ``backward=False``) - core forward and backward (grads of q, k, v).

rel_err: against the float32 PyTorch reference on the same (rounded) inputs; for ``fwd+bwd`` the worst of the
three gradients. ``speedup`` on ``m2f-triton`` rows: ``sdpa-bool-mask`` time / own time (``mha-official`` for
``layer``). With ``device="cpu"`` only the PyTorch baselines are timed (Triton needs CUDA, or the interpreter).

    m2f bench kernels --op masked_attention [--sizes 512x512,800x1344,1024x1024] [--batch 1,8] [--no-backward]
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from m2f.bench.common import BenchRow, bar_plot, peak_memory_mb, time_fn
from m2f.kernels._backend import triton_interpreter_enabled
from m2f.kernels.masked_attention import masked_attention_from_logits, masked_attention_torch

NUM_QUERIES, NUM_HEADS, HIDDEN = 100, 8, 256
HEAD_DIM = HIDDEN // NUM_HEADS
LEVEL_STRIDES = (32, 16, 8)
MASK_STRIDE = 4
WARMUP_MS, REP_MS = 25.0, 100.0  # per timing: the default run (54 shape groups, ~400 timings) must fit ~5 min
FLEX_COMPILE_BUDGET_S = 60.0  # stop trying FlexAttention after this much compile time (it recompiles per shape)
REFERENCE = "float32 torch reference (backend='torch') on the same inputs"


def level_sizes(height: int, width: int) -> list[tuple[int, int]]:
    """(h, w) of the three attention levels for an input of height x width (padded to a multiple of 32)."""
    return [(math.ceil(height / s), math.ceil(width / s)) for s in LEVEL_STRIDES]


def make_inputs(batch: int, height: int, width: int, level: tuple[int, int], dtype: torch.dtype,
                device: torch.device, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Decoder-shaped inputs: queries (B, Q, C), level features (B, Nk, C), stride-4 mask logits (B, Q, H/4, W/4)."""
    n_k = level[0] * level[1]
    mask_hw = (math.ceil(height / MASK_STRIDE), math.ceil(width / MASK_STRIDE))
    field = torch.randn(batch, NUM_QUERIES, 8, 8, generator=generator)
    offset = torch.randn(batch, NUM_QUERIES, 1, 1, generator=generator) * 2.0 - 1.0
    logits = F.interpolate(field, size=mask_hw, mode="bilinear", align_corners=False) * 3.0 + offset
    query = torch.randn(batch, NUM_QUERIES, HIDDEN, generator=generator)
    memory = torch.randn(batch, n_k, HIDDEN, generator=generator)
    return {"query": query.to(device, dtype), "memory": memory.to(device, dtype), "logits": logits.to(device, dtype)}


def split_heads(x: torch.Tensor) -> torch.Tensor:
    """(B, N, C) -> (B, H, N, D) view, as the decoder lays out q / k / v."""
    B, N, _ = x.shape
    return x.view(B, N, NUM_HEADS, HEAD_DIM).transpose(1, 2)


def official_mask(logits: torch.Tensor, level: tuple[int, int]) -> torch.Tensor:
    """The official per-layer mask building: (B·H, Q, Nk) bool, True = may NOT attend; empty rows opened."""
    attn_mask = F.interpolate(logits, size=level, mode="bilinear", align_corners=False)
    attn_mask = (attn_mask.sigmoid().flatten(2).unsqueeze(1).repeat(1, NUM_HEADS, 1, 1).flatten(0, 1) < 0.5).bool()
    attn_mask = attn_mask.detach()
    attn_mask[torch.where(attn_mask.sum(-1) == attn_mask.shape[-1])] = False
    return attn_mask


def resized_logits(logits: torch.Tensor, level: tuple[int, int]) -> torch.Tensor:
    """(B, Q, h·w) logits at the level's resolution (what m2f passes to the fused kernel)."""
    return F.interpolate(logits, size=level, mode="bilinear", align_corners=False).flatten(2)


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out64, ref64 = out.detach().double().cpu(), ref.detach().double().cpu()
    return float(torch.linalg.vector_norm(out64 - ref64) / torch.linalg.vector_norm(ref64).clamp_min(1e-300))


class _Flex:
    """Compiled FlexAttention, or the reason it is not available; gives up after FLEX_COMPILE_BUDGET_S."""

    def __init__(self, device: torch.device):
        self.note: str | None = None
        self.spent_s = 0.0
        if device.type != "cuda":
            self.note = "FlexAttention skipped: benchmarked on CUDA only"
            return
        try:
            from torch.nn.attention.flex_attention import create_block_mask, flex_attention
        except ImportError as exc:
            self.note = f"FlexAttention skipped: {exc}"
            return
        self.create_block_mask = create_block_mask
        self.attend = torch.compile(flex_attention)  # automatic dynamic shapes after the first recompile
        # Past dynamo's recompile limit (8) flex_attention silently runs unfused, materialising the scores: at
        # 1024x1024 / batch 8 that took minutes on an H100 (2026-11-24) and stopped the run. Allow one compile per
        # shape group instead.
        from torch._dynamo import config as dynamo_config

        for name in ("recompile_limit", "cache_size_limit"):
            if hasattr(dynamo_config, name):
                setattr(dynamo_config, name, max(64, getattr(dynamo_config, name)))

    def case(self, q, k, v, logits, level) -> Callable[[], torch.Tensor] | None:
        if self.note is not None:
            return None
        if self.spent_s > FLEX_COMPILE_BUDGET_S:
            self.note = f"FlexAttention skipped for the remaining shapes: over {FLEX_COMPILE_BUDGET_S:.0f} s compiling"
            return None
        B, _, n_q, _ = q.shape
        n_k = k.shape[2]

        def fn():
            allow = F.interpolate(logits, size=level, mode="bilinear", align_corners=False).sigmoid().flatten(2) >= 0.5
            allow = allow | ~allow.any(-1, keepdim=True)  # (B, Q, Nk), empty rows opened

            def mask_mod(b, h, q_idx, kv_idx):
                return allow[b, q_idx, kv_idx]

            block_mask = self.create_block_mask(mask_mod, B, None, n_q, n_k, device=q.device)
            return self.attend(q, k, v, block_mask=block_mask)

        start = time.perf_counter()
        try:
            with torch.no_grad():  # as it is timed: a grad-mode change would be one more recompile per shape
                fn()
            torch.cuda.synchronize()
        except Exception as exc:  # noqa: BLE001 - any failure of an optional baseline is reported, not raised
            self.note = f"FlexAttention skipped: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
            return None
        finally:
            self.spent_s += time.perf_counter() - start
        return fn


def run(sizes: Sequence[tuple[int, int]], batches: Sequence[int], dtypes: Sequence[torch.dtype],
        device: torch.device, backward: bool = True) -> list[BenchRow]:
    device = torch.device(device)
    with_triton = device.type == "cuda" or triton_interpreter_enabled()
    flex = _Flex(device)
    generator = torch.Generator().manual_seed(0)
    rows: list[BenchRow] = []
    for dtype in dtypes:
        for height, width in sizes:
            for level in level_sizes(height, width):
                for batch in batches:
                    rows += _group(batch, height, width, level, dtype, device, generator, with_triton, flex, backward)
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
    if flex.note:
        print(f"masked_attention bench: {flex.note}")
        for row in rows:
            row.extra["flex_note"] = flex.note
    return rows


def _group(batch, height, width, level, dtype, device, generator, with_triton, flex, backward) -> list[BenchRow]:
    x = make_inputs(batch, height, width, level, dtype, device, generator)
    n_k = level[0] * level[1]
    mha = torch.nn.MultiheadAttention(HIDDEN, NUM_HEADS, dropout=0.0).to(device, dtype).eval()
    w_q, w_k, w_v = mha.in_proj_weight.chunk(3)
    b_q, b_k, b_v = mha.in_proj_bias.chunk(3)
    q = split_heads(F.linear(x["query"], w_q, b_q)).detach()
    k = split_heads(F.linear(x["memory"], w_k, b_k)).detach()
    v = split_heads(F.linear(x["memory"], w_v, b_v)).detach()
    logits = x["logits"]
    allow32 = resized_logits(logits, level).float() >= 0
    ref = masked_attention_torch(q.float(), k.float(), v.float(), allow32)
    common = dict(batch=batch, height=height, width=width, dtype=str(dtype).replace("torch.", ""))
    extra = {"level": f"{level[0]}x{level[1]}", "keys": n_k, "queries": NUM_QUERIES, "heads": NUM_HEADS,
             "reference": REFERENCE,
             "allowed_frac": float(allow32.float().mean()),
             "empty_rows_frac": float((~allow32.any(-1)).float().mean())}
    rows: list[BenchRow] = []

    def record(case: str, backend: str, fn: Callable[[], object], err: float | None, **more) -> BenchRow:
        timing = time_fn(fn, warmup_ms=WARMUP_MS, rep_ms=REP_MS)
        row = BenchRow(suite="kernels", case=case, backend=backend, median_ms=timing.median_ms, p90_ms=timing.p90_ms,
                       peak_mem_mb=peak_memory_mb(fn), rel_err=err, extra={**extra, **more}, **common)
        rows.append(row)
        return row

    # --- attention core, mask building included ---
    core: dict[str, Callable[[], torch.Tensor]] = {}
    if with_triton:
        core["m2f-triton"] = lambda: masked_attention_from_logits(q, k, v, resized_logits(logits, level),
                                                                  backend="triton")
    core["sdpa-bool-mask"] = lambda: F.scaled_dot_product_attention(
        q, k, v, attn_mask=official_mask(logits, level).view(batch, NUM_HEADS, NUM_QUERIES, n_k).logical_not())
    flex_fn = flex.case(q, k, v, logits, level)
    if flex_fn is not None:
        core["flex"] = flex_fn
    core["m2f-torch"] = lambda: masked_attention_from_logits(q, k, v, resized_logits(logits, level), backend="torch")
    timed = {}
    with torch.no_grad():
        for backend, fn in core.items():
            timed[backend] = record("masked_attention/fwd", backend, fn, _rel_err(fn(), ref))
    _speedup(timed, "m2f-triton", "sdpa-bool-mask")

    # --- the whole cross-attention call (projections included), official module vs the same weights ---
    layer = {"mha-official": lambda: mha(x["query"].transpose(0, 1), x["memory"].transpose(0, 1),
                                         x["memory"].transpose(0, 1), attn_mask=official_mask(logits, level),
                                         need_weights=False)[0].transpose(0, 1)}
    if with_triton:
        def ours():
            qq = split_heads(F.linear(x["query"], w_q, b_q))
            kk = split_heads(F.linear(x["memory"], w_k, b_k))
            vv = split_heads(F.linear(x["memory"], w_v, b_v))
            out = masked_attention_from_logits(qq, kk, vv, resized_logits(logits, level), backend="triton")
            return mha.out_proj(out.transpose(1, 2).reshape(batch, NUM_QUERIES, HIDDEN))
        layer["m2f-triton"] = ours
    timed = {}
    with torch.no_grad():
        layer_ref = layer["mha-official"]().float()
        for backend, fn in layer.items():
            err = None if backend == "mha-official" else _rel_err(fn(), layer_ref)
            timed[backend] = record("masked_attention/layer", backend, fn, err,
                                    rel_err_of="output vs mha-official in the same dtype")
    _speedup(timed, "m2f-triton", "mha-official")

    # --- forward + backward of the core (grads of q, k, v) ---
    if backward:
        grad_out = torch.randn(q.shape, generator=generator).to(device, dtype)
        leaves32 = [t.float().requires_grad_() for t in (q, k, v)]
        ref_grads = torch.autograd.grad(masked_attention_torch(*leaves32, allow32), leaves32, grad_out.float())
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        bwd = {}
        if with_triton:
            bwd["m2f-triton"] = lambda: masked_attention_from_logits(*leaves, resized_logits(logits, level),
                                                                     backend="triton")
        bwd["sdpa-bool-mask"] = lambda: F.scaled_dot_product_attention(
            *leaves, attn_mask=official_mask(logits, level).view(batch, NUM_HEADS, NUM_QUERIES, n_k).logical_not())
        timed = {}
        for backend, forward in bwd.items():
            def fn(forward=forward):
                return torch.autograd.grad(forward(), leaves, grad_out)

            err = max(_rel_err(g, r) for g, r in zip(fn(), ref_grads))
            timed[backend] = record("masked_attention/fwd+bwd", backend, fn, err,
                                    rel_err_of="worst of grad q / k / v")
        _speedup(timed, "m2f-triton", "sdpa-bool-mask")
    if device.type == "cpu":
        for row in rows:
            row.extra["measured"] = "CPU wall clock" + ("" if with_triton else "; Triton needs CUDA, not timed")
    return rows


def _speedup(timed: dict[str, BenchRow], ours: str, baseline: str) -> None:
    if ours in timed and baseline in timed:
        timed[ours].extra["speedup"] = timed[baseline].median_ms / timed[ours].median_ms


def plot(rows: Sequence[BenchRow], path: Path) -> None:
    bar_plot(rows, path, title="masked_attention: fused Triton vs SDPA / MHA / Flex (median, lower is better)",
             group=lambda r: f"{r.case} {r.dtype} b{r.batch} {r.height}×{r.width} keys {r.extra.get('level', '')}")
