"""Multi-scale deformable attention: the Triton kernels (forward and backward) against the float64 reference.

Runs the kernels in Triton's interpreter on the CPU (tests/conftest.py sets TRITON_INTERPRET=1 when there is no
GPU), so shapes are small but awkward: odd map sizes, head dims that are not powers of two, query tails,
locations on and outside the borders. Outputs are poisoned with NaN before the kernels write them.
"""
from __future__ import annotations

import math

import pytest
import torch

from m2f.errors import BackendUnavailableError, InputError
from m2f.kernels import ms_deform_attn
from m2f.kernels.ms_deform_attn import ms_deform_attn_torch, triton_kernels
from tests.utils import mismatch, off_kink_locations, poisoned_like, rel_err



# Kernels run on the GPU where there is one, else in the interpreter on the CPU (tests/conftest.py).
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
HALF_TOL = 1e-2
F32_TOL = 1e-5
GRAD_F32_TOL = 1e-4


def make_inputs(rng, shapes, n=1, q=5, m=2, d=8, p=2, dtype=torch.float32, loc_dtype=None, lo=-0.15, hi=1.15,
                device=DEVICE):
    """Random value / locations / weights on ``device``; locations uniform in [lo, hi] (partly outside the image)."""
    L = len(shapes)
    S = sum(h * w for h, w in shapes)
    value = torch.randn(n, S, m, d, generator=rng).to(dtype)
    loc = (lo + (hi - lo) * torch.rand(n, q, m, L, p, 2, generator=rng)).to(loc_dtype or dtype)
    attn = (0.1 + torch.rand(n, q, m, L, p, generator=rng)).to(loc_dtype or dtype)
    return value.to(device), loc.to(device), attn.to(device)


def reference64(value, shapes, loc, attn, grad_out=None):
    """Output (and with ``grad_out``, gradients) of the grid_sample reference in float64."""
    v, l, a = (t.detach().double().requires_grad_(grad_out is not None) for t in (value, loc, attn))
    out = ms_deform_attn_torch(v, shapes, l, a)
    if grad_out is None:
        return out.detach()
    out.backward(grad_out.double())
    return out.detach(), v.grad, l.grad, a.grad


def shape_tensors(shapes):
    shapes_t = torch.tensor(shapes, dtype=torch.int64)
    sizes = [h * w for h, w in shapes]
    starts = torch.tensor([sum(sizes[:i]) for i in range(len(sizes))], dtype=torch.int64)
    return shapes_t.to(DEVICE), starts.to(DEVICE)


# ------------------------------------------------------------------------------------------------------------
# The reference itself against a straightforward loop (so that the float64 reference can be trusted)
# ------------------------------------------------------------------------------------------------------------
def loop_reference(value, shapes, loc, attn):
    """Official semantics written out corner by corner, in float64 Python loops."""
    N, _, M, D = value.shape
    _, Q, _, L, P, _ = loc.shape
    out = torch.zeros(N, Q, M, D, dtype=torch.float64)
    start = 0
    for lvl, (H, W) in enumerate(shapes):
        vmap = value[:, start : start + H * W].reshape(N, H, W, M, D).double()
        for n in range(N):
            for q in range(Q):
                for m in range(M):
                    for p in range(P):
                        x = float(loc[n, q, m, lvl, p, 0]) * W - 0.5  # pixel centres at i + 0.5
                        y = float(loc[n, q, m, lvl, p, 1]) * H - 0.5
                        x0, y0 = math.floor(x), math.floor(y)
                        fx, fy = x - x0, y - y0
                        a = float(attn[n, q, m, lvl, p])
                        for yy, xx, w in ((y0, x0, (1 - fy) * (1 - fx)), (y0, x0 + 1, (1 - fy) * fx),
                                          (y0 + 1, x0, fy * (1 - fx)), (y0 + 1, x0 + 1, fy * fx)):
                            if 0 <= yy < H and 0 <= xx < W:  # each corner outside the map adds zero
                                out[n, q, m] += a * w * vmap[n, yy, xx, m]
        start += H * W
    return out.reshape(N, Q, M * D)


def test_reference_matches_loop_implementation(rng):
    shapes = [(3, 4), (2, 3)]
    value, loc, attn = make_inputs(rng, shapes, n=2, q=4, m=2, d=3, p=3, dtype=torch.float64, lo=-0.4, hi=1.4,
                                   device="cpu")
    # Exactly on the image borders, on pixel centres, and just outside.
    loc[0, 0, 0, :, 0] = torch.tensor([0.0, 1.0], dtype=torch.float64)
    loc[0, 0, 1, :, 1] = torch.tensor([1.0, 0.0], dtype=torch.float64)
    loc[0, 1, 0, 0, 2] = torch.tensor([0.5 / 4, 1.5 / 3], dtype=torch.float64)
    loc[1, 2, 1, 1, 0] = torch.tensor([-0.5 / 3, 1.0 + 0.5 / 2], dtype=torch.float64)
    loc[1, 3, 0, 1, 1] = torch.tensor([-3.0, 2.5], dtype=torch.float64)
    got = ms_deform_attn_torch(value, shapes, loc, attn)
    want = loop_reference(value, shapes, loc, attn)
    assert rel_err(got, want) <= 1e-12, f"seed {rng.seed_value}: reference vs loop {rel_err(got, want):.3g}"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_reference_in_half_precision_on_cpu(rng, dtype):
    """Regression: torch's CPU grid_sample read garbage from the channel-minor (N*M, D, H, W) view in half types."""
    shapes = [(16, 16), (8, 8)]
    value, loc, attn = make_inputs(rng, shapes, n=1, q=40, m=8, d=32, p=4, dtype=dtype, device="cpu")
    out = ms_deform_attn_torch(value, shapes, loc, attn)
    err = rel_err(out, reference64(value, shapes, loc, attn))
    # grid_sample un-normalises the coordinates in the half type itself (~1 % off in bfloat16, unlike the
    # Triton kernel's float32 arithmetic); the bug gave NaN or 1e30.
    assert err <= 3 * HALF_TOL, f"seed {rng.seed_value}: torch reference in {dtype} rel_err {err:.3g}"


# ------------------------------------------------------------------------------------------------------------
# Forward and backward against float64
# ------------------------------------------------------------------------------------------------------------
FWD_CASES = [  # (value dtype, locations / weights dtype, tolerance)
    (torch.float32, torch.float32, F32_TOL),
    (torch.float16, torch.float16, HALF_TOL),
    (torch.bfloat16, torch.bfloat16, HALF_TOL),
    (torch.float16, torch.float32, HALF_TOL),
]


@pytest.mark.parametrize("dtype,loc_dtype,tol", FWD_CASES, ids=lambda x: str(x).replace("torch.", ""))
def test_forward_matches_float64_reference(rng, dtype, loc_dtype, tol):
    shapes = [(7, 9), (3, 5), (2, 2)]  # odd sizes; Q = 70 spans two query blocks, D = 24 masks a channel tail
    value, loc, attn = make_inputs(rng, shapes, n=2, q=70, m=2, d=24, p=2, dtype=dtype, loc_dtype=loc_dtype)
    want = reference64(value, shapes, loc, attn)

    out = ms_deform_attn(value, shapes, None, loc, attn, backend="triton")
    assert out.dtype == dtype and out.shape == (2, 70, 2 * 24)
    err = rel_err(out, want)
    print(f"forward {dtype} (locations {loc_dtype}): rel_err {err:.3g}")
    assert err <= tol, f"seed {rng.seed_value}: forward {dtype} rel_err {err:.3g} > {tol}"

    if dtype != torch.float32 or loc_dtype != torch.float32:
        return  # the store mask does not depend on the dtype: poison once (the interpreter is slow)
    # Every output element written: launch into a buffer full of NaN.
    shapes_t, starts = shape_tensors(shapes)
    poisoned = poisoned_like(out)
    triton_kernels.ms_deform_attn_fwd(value, shapes_t, starts, loc, attn, out=poisoned)
    assert rel_err(poisoned, want) <= tol, f"seed {rng.seed_value}: poisoned output not fully overwritten"


BWD_CASES = [(torch.float32, GRAD_F32_TOL), (torch.float16, HALF_TOL), (torch.bfloat16, 2 * HALF_TOL)]


@pytest.mark.parametrize("dtype,tol", BWD_CASES, ids=lambda x: str(x).replace("torch.", ""))
def test_backward_matches_float64_autograd(rng, dtype, tol):
    shapes = [(7, 9), (3, 5), (2, 2)]
    value, loc, attn = make_inputs(rng, shapes, n=2, q=70, m=2, d=24, p=2, dtype=dtype)
    grad_out = torch.randn(2, 70, 2 * 24, generator=rng).to(DEVICE, dtype)
    _, *want = reference64(value, shapes, loc, attn, grad_out)

    leaves = [t.clone().requires_grad_() for t in (value, loc, attn)]
    ms_deform_attn(leaves[0], shapes, None, leaves[1], leaves[2], backend="triton").backward(grad_out)
    for name, leaf, ref in zip(("value", "sampling_locations", "attention_weights"), leaves, want):
        err = rel_err(leaf.grad, ref)
        print(f"grad {name} {dtype}: rel_err {err:.3g}")
        assert leaf.grad.dtype == dtype
        assert err <= tol, f"seed {rng.seed_value}: grad {name} {dtype} rel_err {err:.3g} > {tol}"

    if dtype != torch.float32:
        return
    # grad_locations / grad_weights are written once per element, never accumulated: poison them.
    shapes_t, starts = shape_tensors(shapes)
    grad_loc, grad_attn = poisoned_like(loc), poisoned_like(attn)
    triton_kernels.ms_deform_attn_bwd(grad_out, value, shapes_t, starts, loc, attn, grad_loc=grad_loc,
                                      grad_attn=grad_attn)
    assert rel_err(grad_loc, want[1]) <= tol and rel_err(grad_attn, want[2]) <= tol, f"seed {rng.seed_value}"


def _edge_locations(loc, shapes, rng, with_kinks):
    """Overwrite many locations with values on / outside the borders. ``with_kinks`` adds pixel centres and
    w_im = -1 / W exactly, where the bilinear weights are continuous but their derivative jumps (gradients
    there depend on float rounding, so they are checked in the forward pass only)."""
    specials = [0.0, 1.0, -2.0, 3.0, 1e4, -1e4]
    for lvl, (h, w) in enumerate(shapes):
        vals_x = specials + ([(i + 0.5) / w for i in range(w)] + [-0.5 / w, 1.0 + 0.5 / w] if with_kinks else [])
        vals_y = specials + ([(i + 0.5) / h for i in range(h)] + [-0.5 / h, 1.0 + 0.5 / h] if with_kinks else [])
        flat = loc[:, :, :, lvl].reshape(-1, 2)  # a copy: (N * Q * M * P, 2), written back below
        pick = torch.randperm(flat.shape[0], generator=rng)[: flat.shape[0] // 2]
        xs = torch.tensor(vals_x, dtype=loc.dtype)[torch.randint(len(vals_x), (len(pick),), generator=rng)]
        ys = torch.tensor(vals_y, dtype=loc.dtype)[torch.randint(len(vals_y), (len(pick),), generator=rng)]
        pick, xs, ys = pick.to(loc.device), xs.to(loc.device), ys.to(loc.device)
        flat[pick, 0] = xs
        flat[pick, 1] = ys
        loc[:, :, :, lvl] = flat.view(loc[:, :, :, lvl].shape)


EDGE_CASES = {  # name: (shapes, dict of sizes, pass spatial_shapes as an int32 tensor with level_start_index)
    "borders-and-outside": ([(7, 9), (4, 5)], dict(n=1, q=20, m=2, d=8, p=2), False),
    "one-query-one-level-d5": ([(5, 6)], dict(n=1, q=1, m=1, d=5, p=1), True),
    "four-levels-five-points": ([(9, 7), (5, 4), (3, 2), (1, 1)], dict(n=1, q=9, m=2, d=16, p=5), True),
}


@pytest.mark.parametrize("case", list(EDGE_CASES))
def test_edge_cases_forward_and_backward(rng, case):
    shapes, sizes, as_tensor = EDGE_CASES[case]
    value, loc, attn = make_inputs(rng, shapes, **sizes, lo=-0.3, hi=1.3)
    if as_tensor:
        shapes_arg, starts = (t.to(torch.int32) for t in shape_tensors(shapes))
    else:
        shapes_arg, starts = shapes, None

    # Forward with kinks (pixel centres, w_im = -1 exactly, far outside).
    loc_kinks = loc.clone()
    _edge_locations(loc_kinks, shapes, rng, with_kinks=True)
    out = ms_deform_attn(value, shapes_arg, starts, loc_kinks, attn, backend="triton")
    err = rel_err(out, reference64(value, shapes, loc_kinks, attn))
    assert err <= F32_TOL, f"seed {rng.seed_value}: {case} forward rel_err {err:.3g}"

    # Forward and backward on borders / outside without kinks.
    _edge_locations(loc, shapes, rng, with_kinks=False)
    grad_out = torch.randn(out.shape, generator=rng).to(DEVICE)
    want_out, *want = reference64(value, shapes, loc, attn, grad_out)
    leaves = [t.clone().requires_grad_() for t in (value, loc, attn)]
    out = ms_deform_attn(leaves[0], shapes_arg, starts, leaves[1], leaves[2], backend="triton")
    assert rel_err(out, want_out) <= F32_TOL, f"seed {rng.seed_value}: {case} forward"
    out.backward(grad_out)
    for name, leaf, ref in zip(("value", "sampling_locations", "attention_weights"), leaves, want):
        err = rel_err(leaf.grad, ref)
        assert err <= GRAD_F32_TOL, f"seed {rng.seed_value}: {case} grad {name} rel_err {err:.3g}"


# ------------------------------------------------------------------------------------------------------------
# One op for torch.export / torch.compile; opcheck
# ------------------------------------------------------------------------------------------------------------
class _DeformSample(torch.nn.Module):
    """Builds value from two feature maps and spatial shapes from their sizes, as the pixel decoder does."""

    def forward(self, f1, f2, loc, attn):
        n = f1.shape[0]
        shapes = [(f1.shape[2], f1.shape[3]), (f2.shape[2], f2.shape[3])]
        value = torch.cat([f1.flatten(2), f2.flatten(2)], 2).transpose(1, 2).reshape(n, -1, 2, 4)
        return ms_deform_attn(value, shapes, None, loc, attn, backend="triton")


def test_export_has_exactly_one_op_node(rng):
    f1, f2 = torch.randn(1, 8, 5, 3, generator=rng), torch.randn(1, 8, 2, 3, generator=rng)
    loc = torch.rand(1, 6, 2, 2, 3, 2, generator=rng)
    attn = torch.rand(1, 6, 2, 2, 3, generator=rng)
    f1, f2, loc, attn = (t.to(DEVICE) for t in (f1, f2, loc, attn))
    module = _DeformSample()
    ep = torch.export.export(module, (f1, f2, loc, attn))
    targets = [n.target for n in ep.graph.nodes if n.op == "call_function"]
    hits = [t for t in targets if "ms_deform_attn" in str(t)]
    assert hits == [torch.ops.m2f.ms_deform_attn.default], targets
    assert not any("grid_sampler" in str(t) for t in targets), targets
    out = ep.module()(f1, f2, loc, attn)
    assert rel_err(out, module(f1, f2, loc, attn)) <= 1e-6


def test_opcheck(rng):
    shapes = [(3, 4)]
    value, loc, attn = make_inputs(rng, shapes, n=1, q=2, m=1, d=4, p=2)
    shapes_t, starts = shape_tensors(shapes)
    args = (value.requires_grad_(), shapes_t, starts, loc.requires_grad_(), attn.requires_grad_())
    import m2f.kernels.ms_deform_attn.op  # noqa: F401 - registers the op (ms_deform_attn imports it lazily)

    torch.library.opcheck(torch.ops.m2f.ms_deform_attn.default, args)


# ------------------------------------------------------------------------------------------------------------
# Bad input: every argument that sizes a memory access, on both backends
# ------------------------------------------------------------------------------------------------------------
BAD_SHAPES = [(3, 4), (2, 3)]  # S = 18


def _bad_input_cases(value, loc, attn):
    """(name, args, message pattern): each a one-line InputError naming the argument."""
    shapes = BAD_SHAPES
    shapes_t, starts = shape_tensors(shapes)
    return [
        ("sum-list", (value, [(3, 4), (2, 2)], None, loc, attn), r"value has 18 keys .* hold 16"),
        ("sum-tensor", (value, shapes_t * 2, None, loc, attn), r"value has 18 keys .* hold 72"),
        ("sum-tensor-int32", (value, torch.tensor([[8, 10], [2, 3]], dtype=torch.int32, device=DEVICE), None, loc,
                              attn), r"value has 18 keys .* hold 86"),
        ("zero-level", (value, [(0, 5), (3, 6)], None, loc, attn), r"level 0 is \(H, W\) = \(0, 5\)"),
        ("negative-level-tensor", (value, torch.tensor([[-3, -4], [5, 6]], device=DEVICE), None, loc, attn),
         r"level 0 is \(H, W\) = \(-3, -4\)"),
        ("starts-values", (value, shapes_t, torch.tensor([0, 5], device=DEVICE), loc, attn),
         r"level_start_index is \[0, 5\] .* at \[0, 12\]"),
        ("starts-with-list", (value, shapes, torch.tensor([0, 13], device=DEVICE), loc, attn),
         r"level_start_index is \[0, 13\]"),
        ("starts-length", (value, shapes_t, starts[:1], loc, attn), r"level_start_index must be .*\(2,\)"),
        ("starts-float", (value, shapes_t, starts.float(), loc, attn), r"level_start_index must be .*float32"),
        ("levels", (value, shapes[:1], None, loc, attn), r"sampling_locations has 2 levels .* has 1"),
        ("shapes-float", (value, torch.tensor([[3.0, 4.0], [2.0, 3.0]]), None, loc, attn),
         r"spatial_shapes must be an \(L, 2\) int32/int64 tensor .*float32"),
        ("shapes-1d", (value, shapes_t.flatten(), None, loc, attn), r"spatial_shapes must be an \(L, 2\)"),
        ("shapes-not-pairs", (value, [3, 4], None, loc, attn), r"list of \(H, W\) pairs, got \[3, 4\]"),
        ("value-3d", (value[0], shapes, None, loc, attn), r"value must be \(N, S, M, D\)"),
        ("value-no-channels", (value[..., :0], shapes, None, loc, attn), r"value must be .*D >= 1"),
        ("heads", (value[:, :, :1], shapes, None, loc, attn), r"does not match value .* heads"),
        ("batch", (value.expand(2, -1, -1, -1), shapes, None, loc, attn), r"does not match value .* batch"),
        ("loc-last-dim", (value, shapes, None, loc[..., :1], attn), r"sampling_locations must be"),
        ("points", (value, shapes, None, loc, attn[..., :1]), r"attention_weights must be \(N, Lq, M, L, P\)"),
        ("value-int", (value.long(), shapes, None, loc, attn), r"value dtype torch.int64 is not supported"),
        ("loc-dtype", (value.bfloat16(), shapes, None, loc.half(), attn.bfloat16()),
         r"sampling_locations is torch.float16 but value is torch.bfloat16"),
        ("attn-dtype", (value.half(), shapes, None, loc.half(), attn.double()),
         r"attention_weights is torch.float64 but value is torch.float16"),
        ("attn-device", (value, shapes, None, loc, attn.to("meta")), r"attention_weights is on meta"),
    ]


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_bad_inputs_raise_one_line_input_errors(rng, backend):
    value, loc, attn = make_inputs(rng, BAD_SHAPES, q=3)
    for name, args, pattern in _bad_input_cases(value, loc, attn):
        with pytest.raises(InputError, match=pattern) as info:
            ms_deform_attn(*args, backend=backend)
        message = str(info.value)
        assert message.startswith("ms_deform_attn") and "\n" not in message, f"{name}: {message!r}"


def test_kernel_launchers_refuse_non_contiguous_buffers(rng):
    value, loc, attn = make_inputs(rng, BAD_SHAPES, q=3)
    shapes_t, starts = shape_tensors(BAD_SHAPES)
    out = torch.empty(1, 12, 3, dtype=value.dtype, device=DEVICE).transpose(1, 2)  # (1, 3, 12), not contiguous
    with pytest.raises(InputError, match=r"out \(1, 3, 12\) has strides .* must be contiguous"):
        triton_kernels.ms_deform_attn_fwd(value, shapes_t, starts, loc, attn, out=out)
    with pytest.raises(InputError, match=r"value .* must be contiguous"):
        triton_kernels.ms_deform_attn_fwd(value.transpose(2, 3).contiguous().transpose(2, 3), shapes_t, starts, loc,
                                          attn)


def test_op_refuses_cpu_tensors_without_the_interpreter(rng, monkeypatch):
    value, loc, attn = make_inputs(rng, BAD_SHAPES)
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # a CPU tensor and no interpreter: the op cannot run
    with pytest.raises(BackendUnavailableError, match="CUDA"):
        torch.ops.m2f.ms_deform_attn(value.cpu(), *(t.cpu() for t in shape_tensors(BAD_SHAPES)), loc.cpu(),
                                     attn.cpu())


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_shape_tensors_are_read_once_and_rechecked_when_changed(rng, backend, monkeypatch):
    """Index tensors are read back (a device sync) once, then trusted until an in-place write bumps their version."""
    value, loc, attn = make_inputs(rng, BAD_SHAPES, q=3)
    shapes_t, starts = shape_tensors(BAD_SHAPES)
    reads = []
    real_tolist = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda t: reads.append(tuple(t.shape)) or real_tolist(t))
    want = ms_deform_attn_torch(value, BAD_SHAPES, loc, attn)
    for _ in range(3):
        out = ms_deform_attn(value, shapes_t, starts, loc, attn, backend=backend)
        assert rel_err(out, want) <= F32_TOL, f"seed {rng.seed_value}"
    assert reads == [(4,), (2,)], reads  # spatial_shapes and level_start_index, each read once

    shapes_t[0, 1] = 40  # in place: 12 keys become 120, more than value holds
    with pytest.raises(InputError, match="value has 18 keys .* hold 126"):
        ms_deform_attn(value, shapes_t, starts, loc, attn, backend=backend)
    shapes_t[0, 1] = 4
    starts[1:].add_(1)  # through a view: the view shares the version counter
    with pytest.raises(InputError, match=r"level_start_index is \[0, 13\]"):
        ms_deform_attn(value, shapes_t, starts, loc, attn, backend=backend)
    starts[1] = 12
    assert rel_err(ms_deform_attn(value, shapes_t, starts, loc, attn, backend=backend), want) <= F32_TOL

    with torch.inference_mode():  # inference tensors have no version counter: read on every call
        frozen = torch.tensor([[8, 10], [2, 3]], device=DEVICE)
        with pytest.raises(InputError, match="hold 86"):
            ms_deform_attn(value, frozen, None, loc, attn, backend=backend)


# ------------------------------------------------------------------------------------------------------------
# float64: gradcheck on both backends (the official op's own test)
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_gradcheck_float64(rng, backend):
    shapes = [(3, 2), (1, 3)]  # odd sizes, a one-row level
    value, _, attn = make_inputs(rng, shapes, n=1, q=3, m=2, d=3, p=2, dtype=torch.float64)
    # Away from the kinks (pixel centres, borders), where the bilinear weights are not differentiable.
    loc = off_kink_locations(shapes, (1, 3, 2, 2), rng).to(DEVICE)
    inputs = tuple(t.detach().clone().requires_grad_() for t in (value, loc, attn))
    fn = lambda v, l, a: ms_deform_attn(v, shapes, None, l, a, backend=backend)  # noqa: E731
    assert fn(*inputs).dtype == torch.float64
    # Triton: fast mode (a random projection of the Jacobian, a few launches) as each interpreted launch costs ~0.2 s
    # and the full Jacobian needs two per input element.
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-8, rtol=1e-6, fast_mode=backend == "triton"), \
        f"seed {rng.seed_value}"


# ------------------------------------------------------------------------------------------------------------
# Non-finite inputs: every backend follows the float64 reference (naive.py's semantics)
# ------------------------------------------------------------------------------------------------------------
NON_FINITE_SHAPES = [(4, 5), (3, 2)]
SKIPPED_LOCATIONS = [float("nan"), float("inf"), -float("inf"), 1e30, -1e4, 3.0]  # never inside any map


def _skip_points(loc, attn, rng, fraction=0.3):
    """Move a fraction of the points (both coordinates or one) out of their maps and give many of them an inf or NaN
    weight; returns the bool mask (N, Q, M, L, P) of the skipped points."""
    skipped = torch.rand(attn.shape, generator=rng) < fraction
    which = torch.randint(len(SKIPPED_LOCATIONS), loc.shape, generator=rng)
    far = torch.tensor(SKIPPED_LOCATIONS, dtype=loc.dtype)[which]
    axis = torch.randint(3, attn.shape, generator=rng)  # 0: x, 1: y, 2: both
    move = skipped[..., None] & torch.stack((axis != 1, axis != 0), dim=-1)
    loc[move.to(loc.device)] = far[move].to(loc.device)
    bad_weight = skipped & (torch.rand(attn.shape, generator=rng) < 0.6)
    attn[bad_weight.to(attn.device)] = torch.tensor([float("inf"), float("nan")], dtype=attn.dtype)[
        torch.randint(2, (int(bad_weight.sum()),), generator=rng)].to(attn.device)
    return skipped


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_skipped_points_contribute_nothing_and_get_zero_gradients(rng, backend):
    """NaN / inf / far-out locations, with inf / NaN weights: no effect on the output or on any gradient."""
    shapes = NON_FINITE_SHAPES
    value, _, attn = make_inputs(rng, shapes, n=2, q=9, m=2, d=5, p=3)
    loc = off_kink_locations(shapes, (2, 9, 2, 3), rng, dtype=torch.float32).to(DEVICE)
    bad_loc, bad_attn = loc.clone(), attn.clone()
    skipped = _skip_points(bad_loc, bad_attn, rng).to(DEVICE)
    grad_out = torch.randn(2, 9, 10, generator=rng).to(DEVICE)
    # The same inputs with the skipped points' weights zeroed and locations moved far out, all finite.
    clean_attn = attn.masked_fill(skipped, 0.0)
    clean_loc = loc.masked_fill(skipped[..., None], -5.0)
    want_out, want_value, _, want_attn = reference64(value, shapes, clean_loc, clean_attn, grad_out)

    leaves = [t.clone().requires_grad_() for t in (value, bad_loc, bad_attn)]
    out = ms_deform_attn(leaves[0], shapes, None, leaves[1], leaves[2], backend=backend)
    out.backward(grad_out)
    assert torch.isfinite(out).all(), f"seed {rng.seed_value}: a skipped point leaked into the output"
    assert rel_err(out, want_out) <= F32_TOL, f"seed {rng.seed_value}"
    assert rel_err(leaves[0].grad, want_value) <= GRAD_F32_TOL, f"seed {rng.seed_value}: grad value"
    assert (leaves[1].grad[skipped] == 0).all() and (leaves[2].grad[skipped] == 0).all(), f"seed {rng.seed_value}"
    err = rel_err(leaves[2].grad[~skipped], want_attn[~skipped])
    assert err <= GRAD_F32_TOL, f"seed {rng.seed_value}: grad attention_weights rel_err {err:.3g}"


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_non_finite_values_and_weights_propagate_as_the_reference(rng, backend):
    shapes = NON_FINITE_SHAPES
    value, _, attn = make_inputs(rng, shapes, n=1, q=12, m=2, d=6, p=2)
    loc = off_kink_locations(shapes, (1, 12, 2, 2), rng, dtype=torch.float32).to(DEVICE)
    _skip_points(loc, attn, rng)
    specials = torch.tensor([float("inf"), -float("inf"), float("nan")])
    hit = torch.rand(value.shape, generator=rng) < 0.04
    value[hit.to(DEVICE)] = specials[torch.randint(3, (int(hit.sum()),), generator=rng)].to(DEVICE)
    weird = torch.rand(attn.shape, generator=rng) < 0.05  # inf / NaN weights of points that are not skipped
    attn[weird.to(DEVICE)] = specials[torch.randint(3, (int(weird.sum()),), generator=rng)].to(DEVICE)
    out = ms_deform_attn(value, shapes, None, loc, attn, backend=backend)
    want = reference64(value, shapes, loc, attn)
    assert not torch.isfinite(want).all(), f"seed {rng.seed_value}: the case should reach non-finite outputs"
    problem = mismatch(out, want, F32_TOL)
    assert not problem, f"seed {rng.seed_value}: {backend}: {problem}"
