"""Fuzz both attention ops over random small shapes with far-out / NaN / inf sampling locations and inf / NaN
values: the Triton kernels (interpreter on the CPU) against the torch backend and the float64 reference.

Every case draws its own seed from the session seed and builds all its inputs from it alone (``_case_generator``),
so the seed in a failure message regenerates that case. Results
are compared by :func:`tests.utils.mismatch`: NaN / +inf / -inf positions exactly, finite values by relative error.
Inputs stay clear of the places where float32 and float64 could legitimately disagree on a non-finite position:
sampling locations keep away from the bilinear kinks (:func:`tests.utils.off_kink_locations`) and magnitudes stay far
from overflow, so a failure is a real disagreement, never chance.
"""
from __future__ import annotations

import warnings

import pytest
import torch

from m2f.kernels import masked_attention_from_logits, ms_deform_attn
from m2f.kernels.masked_attention import masked_attention_torch, normalize_allow, triton_kernels as tk
from m2f.kernels.ms_deform_attn import ms_deform_attn_torch
from tests.utils import fresh_seed, mismatch, off_kink_locations

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
F32_TOL = 2e-5
F64_TOL = 1e-10
SPECIALS = (float("nan"), float("inf"), -float("inf"))
FAR_LOCATIONS = (float("nan"), float("inf"), -float("inf"), 1e30, -1e30, 3e38, 1e4, -1e4, 2.5, -1.5)
MSDA_CASES = 130  # x 2 test functions' worth of comparisons: Triton vs float64 and vs the torch backend
MASKATTN_CASES = 110


def _case_generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randint(gen, lo, hi):  # inclusive
    return int(torch.randint(lo, hi + 1, (1,), generator=gen))


def _sprinkle(t, gen, fraction):
    """``t`` with about ``fraction`` of its elements replaced by NaN / inf / -inf (in place, returned)."""
    hit = torch.rand(t.shape, generator=gen) < fraction
    t[hit] = torch.tensor(SPECIALS, dtype=t.dtype)[torch.randint(3, (int(hit.sum()),), generator=gen)]
    return t


def _msda_case(gen):
    L = _randint(gen, 1, 4)
    shapes = [(_randint(gen, 1, 7), _randint(gen, 1, 7)) for _ in range(L)]
    n, q, m, d, p = _randint(gen, 1, 2), _randint(gen, 1, 70), _randint(gen, 1, 3), _randint(gen, 1, 9), \
        _randint(gen, 1, 4)
    dtype = torch.float64 if torch.rand(1, generator=gen) < 0.15 else torch.float32
    S = sum(h * w for h, w in shapes)
    value = torch.randn(n, S, m, d, generator=gen, dtype=torch.float64)
    loc = off_kink_locations(shapes, (n, q, m, p), gen)
    attn = 0.1 + torch.rand(n, q, m, L, p, generator=gen, dtype=torch.float64)
    far = torch.rand(loc.shape, generator=gen) < 0.1  # one or both coordinates far out, NaN or inf
    loc[far] = torch.tensor(FAR_LOCATIONS, dtype=torch.float64)[
        torch.randint(len(FAR_LOCATIONS), (int(far.sum()),), generator=gen)]
    kind = _randint(gen, 0, 3)  # 0: all finite but the locations, 1: bad values, 2: bad weights, 3: both
    if kind in (1, 3):
        _sprinkle(value, gen, 0.03)
    if kind in (2, 3):
        _sprinkle(attn, gen, 0.03)
    as_tensor = torch.rand(1, generator=gen) < 0.5
    return shapes, as_tensor, value.to(dtype), loc.to(dtype), attn.to(dtype)


def _three_way_mismatches(where: str, triton: torch.Tensor, torch_backend: torch.Tensor, want: torch.Tensor,
                          tol: float) -> list[str]:
    """Each backend against the float64 reference, and against each other (twice the bound: both may err)."""
    pairs = (("triton vs float64", triton, want, tol), ("torch backend vs float64", torch_backend, want, tol),
             ("triton vs torch backend", triton, torch_backend, 2 * tol))
    return [f"{where}: {name}: {problem}" for name, a, b, t in pairs if (problem := mismatch(a, b, t))]


def test_fuzz_ms_deform_attn():
    failures = []
    for _ in range(MSDA_CASES):
        seed = fresh_seed()
        shapes, as_tensor, value, loc, attn = _msda_case(_case_generator(seed))
        shapes_arg = torch.tensor(shapes, dtype=torch.int32, device=DEVICE) if as_tensor else shapes
        value, loc, attn = (t.to(DEVICE) for t in (value, loc, attn))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # the interpreter's numpy on inf / NaN
            got = ms_deform_attn(value, shapes_arg, None, loc, attn, backend="triton")
        torch_backend = ms_deform_attn(value, shapes_arg, None, loc, attn, backend="torch")
        want = ms_deform_attn_torch(value.double().cpu(), shapes, loc.double().cpu(), attn.double().cpu())
        tol = F64_TOL if value.dtype == torch.float64 else F32_TOL
        where = f"case seed {seed}: shapes {shapes}, value {tuple(value.shape)} {value.dtype}, P {loc.shape[4]}"
        failures += _three_way_mismatches(where, got, torch_backend, want, tol)
    assert not failures, f"{len(failures)} of {MSDA_CASES} cases failed:\n" + "\n".join(failures[:10])


def _maskattn_case(gen):
    B, H, n_q, n_k = _randint(gen, 1, 2), _randint(gen, 1, 3), _randint(gen, 1, 20), _randint(gen, 1, 80)
    D = _randint(gen, 1, 40)
    dtype = torch.float64 if torch.rand(1, generator=gen) < 0.15 else torch.float32
    q, k, v = (torch.randn(B, H, n, D, generator=gen, dtype=torch.float64) for n in (n_q, n_k, n_k))
    mask_shape = (B, H, n_q, n_k) if torch.rand(1, generator=gen) < 0.3 else (B, n_q, n_k)
    density = float(torch.rand(1, generator=gen)) ** 2  # many sparse masks, some empty rows
    logits = density - torch.rand(mask_shape, generator=gen, dtype=torch.float64)
    empty = torch.rand(mask_shape[:-1], generator=gen) < 0.15
    logits[empty] = -1.0
    kind = _randint(gen, 0, 3)  # 0: finite, 1: bad values, 2: bad keys, 3: both
    if kind in (1, 3):
        _sprinkle(v, gen, 0.05)
    if kind in (2, 3):
        _sprinkle(k, gen, 0.02)
    kps = None if n_k <= 32 or torch.rand(1, generator=gen) < 0.5 else 32 * _randint(gen, 1, (n_k - 1) // 32)
    as_bool = torch.rand(1, generator=gen) < 0.3
    return (q, k, v), logits, as_bool, kps, dtype


def test_fuzz_masked_attention():
    failures = []
    for _ in range(MASKATTN_CASES):
        seed = fresh_seed()
        (q64, k64, v64), logits, as_bool, kps, dtype = _maskattn_case(_case_generator(seed))
        q, k, v = (t.to(dtype).to(DEVICE) for t in (q64, k64, v64))
        mask = (logits >= 0 if as_bool else logits.to(dtype)).to(DEVICE)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            got, _ = tk.masked_attention_fwd(q, k, v, mask, not as_bool, keys_per_split=kps)
        torch_backend = masked_attention_from_logits(q, k, v, logits.to(dtype).to(DEVICE), backend="torch")
        want = masked_attention_torch(*(t.double().cpu() for t in (q, k, v)), logits.to(dtype).double() >= 0)
        tol = F64_TOL if dtype == torch.float64 else F32_TOL
        where = (f"case seed {seed}: q {tuple(q.shape)} k {tuple(k.shape)} {dtype}, mask {tuple(logits.shape)} "
                 f"{'bool' if as_bool else 'logits'}, keys_per_split {kps}")
        failures += _three_way_mismatches(where, got, torch_backend, want, tol)
    assert not failures, f"{len(failures)} of {MASKATTN_CASES} cases failed:\n" + "\n".join(failures[:10])


def _maskattn_grad_scales(qkv, logits, grad_out) -> list[float]:
    """Norms of the terms that sum to dQ, dK, dV (float64). dQ and dK cancel to ~0 where a row's softmax is flat
    (one allowed key: P = 1, dS = P (dP - rowsum(dO O)) = 0), where rounding alone is then the whole result."""
    q, k, v = (t.detach().double() for t in qkv)
    allow = normalize_allow(logits.double() >= 0, q.shape[1])
    scale = q.shape[-1] ** -0.5
    p = torch.softmax((q @ k.transpose(-1, -2) * scale).masked_fill(~allow, float("-inf")), dim=-1)
    d_out = grad_out.double()
    delta = (d_out * (p @ v)).sum(-1, keepdim=True).abs()  # (B, H, Nq, 1)
    ds_terms = p * (d_out.abs() @ v.abs().transpose(-1, -2) + delta)  # |dS| bound, (B, H, Nq, Nk)
    return [float((ds_terms @ k.abs()).norm() * scale), float((ds_terms.transpose(-1, -2) @ q.abs()).norm() * scale),
            float((p.transpose(-1, -2) @ d_out.abs()).norm())]


@pytest.mark.parametrize("op", ["ms_deform_attn", "masked_attention"])
def test_fuzz_backward_finite(op):
    """Gradients over random shapes (finite inputs; far-out locations included): Triton against float64."""
    failures = []
    for _ in range(12):
        seed = fresh_seed()
        gen = _case_generator(seed)
        if op == "ms_deform_attn":
            shapes, _, value, loc, attn = _msda_case(gen)
            # non-finite locations far out (not onto a kink), other non-finite inputs finite
            inputs = [torch.nan_to_num(value, nan=0.5, posinf=0.7, neginf=-0.3), torch.where(loc.isfinite(), loc, -5.0),
                      torch.nan_to_num(attn, nan=0.5, posinf=0.7, neginf=-0.3)]
            fn = lambda a, b, c, be: ms_deform_attn(a, shapes, None, b, c, backend=be)  # noqa: E731
        else:
            (q64, k64, v64), logits, _, _, dtype = _maskattn_case(gen)
            inputs = [torch.nan_to_num(t, nan=0.5, posinf=0.7, neginf=-0.3).to(dtype) for t in (q64, k64, v64)]
            fn = lambda a, b, c, be: masked_attention_from_logits(  # noqa: E731
                a, b, c, logits.to(a.dtype).to(a.device), backend=be)
        leaves = [t.to(DEVICE).requires_grad_() for t in inputs]
        out = fn(*leaves, "triton")
        grad_out = torch.randn(out.shape, generator=gen, dtype=torch.float64)
        out.backward(grad_out.to(out.dtype).to(DEVICE))
        refs = [t.detach().double().cpu().requires_grad_() for t in inputs]
        fn(*refs, "torch").backward(grad_out)
        tol = F64_TOL if inputs[0].dtype == torch.float64 else 1e-4
        scales = [0.0] * 3 if op == "ms_deform_attn" else _maskattn_grad_scales(refs, logits, grad_out)
        for i, (leaf, ref) in enumerate(zip(leaves, refs)):
            problem = mismatch(leaf.grad, ref.grad, tol, scales[i])
            if problem:
                failures.append(f"case seed {seed}: {op} grad of input {i} {tuple(leaf.shape)}: {problem}")
    assert not failures, "\n".join(failures[:10])
