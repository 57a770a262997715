"""ms_deform_attn benchmark: the Triton op against the PyTorch (grid_sample) reference at Mask2Former's shapes.

Shapes are those of the pixel decoder's encoder for an input of H x W: levels res3..res5 at strides 8 / 16 / 32
(ceil(H / s) x ceil(W / s)), every pixel of the three levels a query (Q = S), 8 heads, 4 points, 32 channels per
head. Sampling locations are what the model produces: each query's own pixel centre plus offsets of a few
pixels at every level (so the caches see the model's access pattern, not uniform noise); weights are a softmax
over levels x points.

For each (size, batch, dtype) and pass ("fwd", and "fwd+bwd" unless ``backward=False``) the rows hold:
median / p90 time, peak CUDA memory, rel_err of the output (fwd) or of the worst of the three gradients
(fwd+bwd) against the float64 reference on the batch's first sample, and in ``extra``: ``min_mb`` (the bytes
the op must move: inputs read once, outputs written once; see ``min_bytes``), ``gbps`` (min_mb / time) and, on
the Triton row, ``speedup`` over the reference row. With ``device="cpu"`` only the reference is timed (Triton
needs CUDA), and the row says so in ``extra["measured"]``.

    m2f bench kernels --op ms_deform_attn [--sizes 512x512,800x1344,1024x1024] [--batch 1,8] [--no-backward]
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Sequence

import torch

from m2f.bench.common import BenchRow, bar_plot, peak_memory_mb, time_fn
from m2f.kernels import ms_deform_attn
from m2f.kernels.ms_deform_attn import shape_tensors

NUM_HEADS, NUM_POINTS, HEAD_DIM, STRIDES = 8, 4, 32, (8, 16, 32)
REFERENCE = "float64 torch (grid_sample) reference on the batch's first sample"


def level_shapes_for(height: int, width: int) -> list[tuple[int, int]]:
    """(H, W) of res3..res5 for an input of height x width (each stride-2 stage rounds up)."""
    return [(math.ceil(height / s), math.ceil(width / s)) for s in STRIDES]


def min_bytes(shapes: Sequence[tuple[int, int]], batch: int, dtype: torch.dtype, loc_dtype: torch.dtype,
              backward: bool = False, heads: int = NUM_HEADS, points: int = NUM_POINTS, head_dim: int = HEAD_DIM
              ) -> int:
    """Bytes the op must move (every input read once, every output written once), queries = all pixels.

    Forward: value, locations, weights in; output out. Backward: grad_out, value, locations, weights in;
    grad_value, grad_locations, grad_weights out. At 1024 x 1024, batch 1, float32: 68.8 MB forward.
    """
    keys = sum(h * w for h, w in shapes)
    queries, levels = keys, len(shapes)
    vs, ls = torch.empty((), dtype=dtype).element_size(), torch.empty((), dtype=loc_dtype).element_size()
    value = batch * keys * heads * head_dim * vs
    out = batch * queries * heads * head_dim * vs
    loc = batch * queries * heads * levels * points * 2 * ls
    weights = batch * queries * heads * levels * points * ls
    if not backward:
        return value + loc + weights + out
    return out + value + loc + weights + value + loc + weights


def make_inputs(shapes: Sequence[tuple[int, int]], batch: int, dtype: torch.dtype, device: torch.device,
                generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """value (N, S, M, D), locations (N, Q, M, L, P, 2), weights (N, Q, M, L, P) like the pixel decoder's."""
    keys = sum(h * w for h, w in shapes)
    levels = len(shapes)
    # Each query's reference point: its own pixel centre, normalised to [0, 1] (the same point on every level).
    refs = []
    for h, w in shapes:
        ys, xs = torch.meshgrid((torch.arange(h) + 0.5) / h, (torch.arange(w) + 0.5) / w, indexing="ij")
        refs.append(torch.stack((xs, ys), -1).reshape(-1, 2))
    ref = torch.cat(refs)  # (Q, 2)
    level_wh = torch.tensor([[w, h] for h, w in shapes], dtype=torch.float32)  # (L, 2)
    # Offsets of a few pixels at each level (the trained model's are of that order), normalised per level.
    offsets = 2.0 * torch.randn(batch, keys, NUM_HEADS, levels, NUM_POINTS, 2, generator=generator)
    loc = ref[None, :, None, None, None, :] + offsets / level_wh[None, None, None, :, None, :]
    logits = torch.randn(batch, keys, NUM_HEADS, levels * NUM_POINTS, generator=generator)
    weights = logits.softmax(-1).view(batch, keys, NUM_HEADS, levels, NUM_POINTS)
    value = torch.randn(batch, keys, NUM_HEADS, HEAD_DIM, generator=generator)
    return value.to(device, dtype), loc.to(device, dtype), weights.to(device, dtype)


def _supported(dtype: torch.dtype, device: torch.device) -> str | None:
    """Why ``dtype`` cannot be benchmarked on ``device`` (None when it can)."""
    if device.type == "cuda" and dtype == torch.bfloat16 and torch.cuda.get_device_capability(device) < (8, 0):
        return "bfloat16 needs an sm_80+ GPU"
    if device.type == "cpu" and dtype != torch.float32:
        try:
            v, l, a = make_inputs([(2, 2)], 1, dtype, device, torch.Generator().manual_seed(0))
            ms_deform_attn(v, [(2, 2)], None, l[:, :4], a[:, :4], backend="torch")
        except RuntimeError as exc:
            return f"torch's CPU grid_sample: {exc}".splitlines()[0]
    return None


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out64, ref64 = out.detach().double().cpu(), ref.detach().double().cpu()
    return float(torch.linalg.vector_norm(out64 - ref64) / torch.linalg.vector_norm(ref64).clamp_min(1e-300))


def run(sizes: Sequence[tuple[int, int]], batches: Sequence[int], dtypes: Sequence[torch.dtype],
        device: torch.device, backward: bool = True) -> list[BenchRow]:
    device = torch.device(device)
    backends = ["triton", "torch"] if device.type == "cuda" else ["torch"]
    generator = torch.Generator().manual_seed(0)
    rows: list[BenchRow] = []
    for dtype in dtypes:
        reason = _supported(dtype, device)
        if reason is not None:
            print(f"ms_deform_attn bench: skipping {dtype} on {device}: {reason}")
            continue
        for height, width in sizes:
            shapes = level_shapes_for(height, width)
            shapes_t, starts_t = shape_tensors(shapes, None, device)
            for batch in batches:
                value, loc, weights = make_inputs(shapes, batch, dtype, device, generator)
                grad_out = torch.randn(batch, loc.shape[1], NUM_HEADS * HEAD_DIM, generator=generator).to(device, dtype)
                # float64 reference on the first sample (its gradients too when backward is timed).
                leaves64 = [t[:1].detach().double().requires_grad_(backward) for t in (value, loc, weights)]
                ref_out = ms_deform_attn(*leaves64[:1], shapes, None, *leaves64[1:], backend="torch")
                ref_grads = None
                if backward:
                    ref_grads = torch.autograd.grad(ref_out, leaves64, grad_out[:1].double())
                passes = ["fwd", "fwd+bwd"] if backward else ["fwd"]
                for pass_name in passes:
                    timed: dict[str, BenchRow] = {}
                    for backend in backends:
                        fn, check = _case(backend, pass_name, value, shapes, shapes_t, starts_t, loc, weights, grad_out)
                        err = check(ref_out, ref_grads)
                        timing = time_fn(fn)
                        nbytes = min_bytes(shapes, batch, dtype, dtype, backward=False)
                        if pass_name == "fwd+bwd":
                            nbytes += min_bytes(shapes, batch, dtype, dtype, backward=True)
                        extra = {
                            "min_mb": nbytes / 1e6,
                            "gbps": nbytes / (timing.median_ms * 1e-3) / 1e9,
                            "queries": int(loc.shape[1]),
                            "levels": [list(hw) for hw in shapes],
                            "reference": REFERENCE,
                            "rel_err_of": "output" if pass_name == "fwd" else "worst of grad value/locations/weights",
                        }
                        if device.type == "cpu":
                            extra["measured"] = ("CPU wall clock of the torch (grid_sample) reference only; "
                                                 "Triton needs CUDA")
                        row = BenchRow(
                            suite="kernels", case=f"ms_deform_attn/{pass_name}",
                            backend="triton" if backend == "triton" else "torch-grid_sample",
                            dtype=str(dtype).replace("torch.", ""), batch=batch, height=height, width=width,
                            median_ms=timing.median_ms, p90_ms=timing.p90_ms, peak_mem_mb=peak_memory_mb(fn),
                            rel_err=err, extra=extra,
                        )
                        timed[backend] = row
                        rows.append(row)
                    if "triton" in timed and "torch" in timed:
                        timed["triton"].extra["speedup"] = timed["torch"].median_ms / timed["triton"].median_ms
                del value, loc, weights, grad_out, leaves64, ref_out, ref_grads
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    return rows


def _case(backend, pass_name, value, shapes, shapes_t, starts_t, loc, weights, grad_out
          ) -> tuple[Callable[[], object], Callable[..., float]]:
    """The function to time and a check returning its rel_err against the float64 reference of sample 0."""
    if backend == "triton":  # the official tensor layout: no host-to-device copy of the shapes per call
        op = lambda v, l, a: ms_deform_attn(v, shapes_t, starts_t, l, a, backend="triton")  # noqa: E731
    else:
        op = lambda v, l, a: ms_deform_attn(v, shapes, None, l, a, backend="torch")  # noqa: E731
    if pass_name == "fwd":
        def fn():
            return op(value, loc, weights)

        def check(ref_out, ref_grads):
            with torch.no_grad():
                return _rel_err(fn()[:1], ref_out)
        return torch.no_grad()(fn), check

    leaves = [t.detach().requires_grad_() for t in (value, loc, weights)]

    def fn_bwd():
        return torch.autograd.grad(op(*leaves), leaves, grad_out)

    def check_bwd(ref_out, ref_grads):
        return max(_rel_err(g[:1], r) for g, r in zip(fn_bwd(), ref_grads))
    return fn_bwd, check_bwd


def plot(rows: Sequence[BenchRow], path: Path) -> None:
    bar_plot(rows, path, title="ms_deform_attn: Triton vs PyTorch grid_sample (median, lower is better)")
