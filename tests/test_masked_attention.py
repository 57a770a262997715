"""Masked cross-attention: the PyTorch reference against a loop, the Triton kernels (interpreter on the CPU)
against a float64 reference, forward and backward, every mask corner case, the split-KV path, and the ops."""
from __future__ import annotations

import importlib
import math

import pytest
import torch

from m2f.errors import InputError
from m2f.kernels import masked_attention, masked_attention_from_logits
from m2f.kernels.masked_attention import masked_attention_torch, normalize_allow
from tests.utils import mismatch, poisoned_like, rel_err

tk = pytest.importorskip("m2f.kernels.masked_attention.triton_kernels")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}




@pytest.fixture
def poison_scratch(monkeypatch):
    """Every intermediate buffer the launchers allocate starts as NaN (int8 flags as -1, which reads as 'empty')."""

    def scratch(shape, dtype, device):
        fill = float("nan") if dtype.is_floating_point else -1
        return torch.full(shape, fill, dtype=dtype, device=device)

    def scratch_like(t):
        return torch.full_like(t, float("nan") if t.dtype.is_floating_point else -1)

    monkeypatch.setattr(tk, "scratch", scratch)
    monkeypatch.setattr(tk, "scratch_like", scratch_like)


def make_qkv(rng, B, H, n_q, n_k, D, dtype=torch.float64, layout="bhnd"):
    """q (B, H, Nq, D), k, v (B, H, Nk, D) in float64 and ``dtype``; "bnhd" gives (B, N, H, D) memory like the model."""
    def one(n):
        if layout == "bnhd":
            return torch.randn(B, n, H, D, generator=rng, dtype=torch.float64).transpose(1, 2)
        return torch.randn(B, H, n, D, generator=rng, dtype=torch.float64)

    q64, k64, v64 = one(n_q), one(n_k), one(n_k)
    return (q64, k64, v64), tuple(t.to(dtype).to(DEVICE) for t in (q64, k64, v64))


def make_logits(rng, shape, density, empty_rows=0):
    """Mask logits (allowed ⇔ >= 0) with about ``density`` allowed keys; the first ``empty_rows`` rows forbid all."""
    u = torch.rand(shape, generator=rng, dtype=torch.float64)
    logits = (density - u) * 4.0  # >= 0 with probability density; never exactly 0 in practice
    if empty_rows:
        logits[..., :empty_rows, :] = -0.5 - u[..., :empty_rows, :]
    return logits.float()


def reference(q64, k64, v64, allow):
    return masked_attention_torch(q64, k64, v64, allow.cpu())


def loop_reference(q, k, v, allow):
    """Independent float64 loop: per (b, h, query) gather the allowed keys (all when none), softmax, weighted sum."""
    B, H, n_q, D = q.shape
    out = torch.zeros_like(q)
    for b in range(B):
        for h in range(H):
            for i in range(n_q):
                row = allow[b, i] if allow.dim() == 3 else allow[b, h, i]
                keys = [j for j in range(k.shape[2]) if bool(row[j])] or list(range(k.shape[2]))
                scores = [float(q[b, h, i] @ k[b, h, j]) / math.sqrt(D) for j in keys]
                top = max(scores)
                weights = [math.exp(s - top) for s in scores]
                total = sum(weights)
                for w, j in zip(weights, keys):
                    out[b, h, i] += (w / total) * v[b, h, j]
    return out


# ----------------------------------------------------------------------------------------------------------------
# The reference itself
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("per_head", [False, True])
def test_reference_matches_loop(rng, per_head):
    (q, k, v), _ = make_qkv(rng, 2, 2, 5, 7, 3)
    shape = (2, 2, 5, 7) if per_head else (2, 5, 7)
    logits = make_logits(rng, shape, 0.4, empty_rows=1)
    allow = logits >= 0
    allow[..., 3, :] = True  # an all-allowed row next to the empty one
    ref = loop_reference(q, k, v, allow)
    err = rel_err(masked_attention_torch(q, k, v, allow), ref)
    assert err <= 1e-12, f"seed {rng.seed_value}: {err}"
    err = rel_err(masked_attention(q, k, v, allow, backend="torch"), ref)
    assert err <= 1e-12, f"seed {rng.seed_value}: {err}"
    if not per_head:
        err = rel_err(masked_attention_from_logits(q, k, v, logits.double(), backend="torch"),
                      loop_reference(q, k, v, logits >= 0))
        assert err <= 1e-12, f"seed {rng.seed_value}: {err}"


def test_normalize_allow_opens_empty_rows():
    allow = torch.tensor([[[False, False, False], [True, False, False]]])
    got = normalize_allow(allow, 4)
    assert got.shape == (1, 1, 2, 3)
    assert got[0, 0, 0].all() and got[0, 0, 1].tolist() == [True, False, False]


# ----------------------------------------------------------------------------------------------------------------
# Forward kernel
# ----------------------------------------------------------------------------------------------------------------

# (B, H, Nq, Nk, D, density, empty rows, per-head mask, mask kind, forced keys per split)
FORWARD_CASES = {
    "logits-one-split-d24": (2, 3, 19, 77, 24, 0.3, 3, False, "logits", None),
    "bool-split-perhead": (2, 2, 21, 83, 32, 0.05, 2, True, "bool", 32),
    "dense90-split32": (1, 2, 17, 61, 16, 0.9, 1, False, "logits", 32),
    "sparse1pct-split": (1, 2, 18, 97, 24, 0.01, 0, False, "bool", 64),
    "all-allowed": (1, 2, 9, 40, 32, 2.0, 0, False, "logits", None),
    "all-forbidden-split": (1, 2, 9, 40, 32, -1.0, 0, True, "bool", 32),
    "nq1": (2, 2, 1, 50, 32, 0.2, 0, False, "logits", 32),
    "nk1": (2, 2, 7, 1, 32, 0.5, 0, False, "bool", None),
    "odd-nk-d20-split": (1, 1, 5, 33, 20, 0.5, 2, False, "logits", 32),
}


def _mask_for(rng, case, B, H, n_q, n_k, density, empty_rows, per_head, kind):
    shape = (B, H, n_q, n_k) if per_head else (B, n_q, n_k)
    logits = make_logits(rng, shape, density, empty_rows)
    mask = logits if kind == "logits" else logits >= 0
    return logits >= 0, mask.to(DEVICE)


@pytest.mark.parametrize("name", list(FORWARD_CASES))
def test_forward_float32(rng, poison_scratch, name):
    B, H, n_q, n_k, D, density, empty_rows, per_head, kind, kps = FORWARD_CASES[name]
    (q64, k64, v64), (q, k, v) = make_qkv(rng, B, H, n_q, n_k, D, torch.float32, layout="bnhd")
    allow, mask = _mask_for(rng, name, B, H, n_q, n_k, density, empty_rows, per_head, kind)
    out = poisoned_like(q)
    got, lse = tk.masked_attention_fwd(q, k, v, mask, kind == "logits", keys_per_split=kps, out=out)
    assert got.data_ptr() == out.data_ptr()
    ref = reference(q64, k64, v64, allow)
    err = rel_err(got, ref)
    assert err <= TOL[torch.float32], f"{name} seed {rng.seed_value}: rel_err {err}"
    # lse (base 2) against the float64 log-sum-exp of the allowed scores
    scores = (q64 @ k64.transpose(-1, -2)) / math.sqrt(D)
    scores = scores.masked_fill(~normalize_allow(allow, H), float("-inf"))
    lse_ref = torch.logsumexp(scores, dim=-1) / math.log(2)
    assert rel_err(lse, lse_ref) <= 1e-5, f"{name} seed {rng.seed_value}"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kps", [None, 32])
def test_forward_half(rng, poison_scratch, dtype, kps):
    B, H, n_q, n_k, D = 2, 2, 19, 71, 24
    (q64, k64, v64), (q, k, v) = make_qkv(rng, B, H, n_q, n_k, D, dtype)
    logits = make_logits(rng, (B, n_q, n_k), 0.2, empty_rows=2)
    got, _ = tk.masked_attention_fwd(q, k, v, logits.to(dtype).to(DEVICE), True, keys_per_split=kps,
                                     out=poisoned_like(q))
    assert got.dtype == dtype
    # reference on the inputs as the kernel saw them (rounded to dtype), in float64
    ref = reference(q.double().cpu(), k.double().cpu(), v.double().cpu(), logits.to(dtype) >= 0)
    err = rel_err(got, ref)
    assert err <= TOL[dtype], f"{dtype} kps={kps} seed {rng.seed_value}: rel_err {err}"


@pytest.mark.parametrize("skip", [True, False])
def test_forward_block_skipping_configs(rng, poison_scratch, skip):
    """Forced configs: with and without skipping of key blocks no row may attend to (block-sparse mask)."""
    B, H, n_q, n_k, D = 1, 2, 20, 80, 16
    (q64, k64, v64), (q, k, v) = make_qkv(rng, B, H, n_q, n_k, D, torch.float32)
    allow = torch.zeros(B, n_q, n_k, dtype=torch.bool)
    allow[:, :10, 32:48] = torch.rand(B, 10, 16, generator=rng) < 0.5  # key block 1 only ...
    allow[:, :10, 40] = True
    allow[:, 10:, 64:] = True  # ... and block 2: tile 0 skips block 0, tile 1 (rows 16..19) blocks 0 and 1
    config = {"BLOCK_Q": 16, "BLOCK_K": 32, "SKIP_EMPTY": skip, "num_warps": 1, "num_stages": 1}
    for kps in (None, 32):
        got, _ = tk.masked_attention_fwd(q, k, v, allow.to(DEVICE), False, keys_per_split=kps, config=config,
                                         out=poisoned_like(q))
        err = rel_err(got, reference(q64, k64, v64, allow))
        assert err <= 1e-5, f"skip={skip} kps={kps} seed {rng.seed_value}: {err}"


def test_empty_rows_compose_with_splits(rng, poison_scratch):
    """Rows whose only allowed key sits in the last split, rows allowed in one middle split, and empty rows."""
    B, H, n_q, n_k, D = 1, 2, 6, 96, 16
    (q64, k64, v64), (q, k, v) = make_qkv(rng, B, H, n_q, n_k, D, torch.float32)
    allow = torch.zeros(B, n_q, n_k, dtype=torch.bool)
    allow[0, 0, 95] = True
    allow[0, 1, 20:28] = True
    allow[0, 2, 0] = True
    allow[0, 3, ::7] = True  # rows 4, 5 stay empty
    ref = reference(q64, k64, v64, allow)
    for kps in (32, 64, None):
        got, _ = tk.masked_attention_fwd(q, k, v, allow.to(DEVICE), False, keys_per_split=kps, out=poisoned_like(q))
        err = rel_err(got, ref)
        assert err <= 1e-5, f"kps={kps} seed {rng.seed_value}: {err}"


def unpack(bits, n_k):
    """(B, Hm, Nq, W) int32 words -> (B, Hm, Nq, Nk) bool."""
    shifts = torch.arange(32, dtype=torch.int64)
    unpacked = (bits.cpu().long()[..., None] >> shifts) & 1  # (B, Hm, Nq, W, 32)
    return unpacked.flatten(-2)[..., :n_k].bool()


@pytest.mark.parametrize("n_k", [1, 31, 32, 150])
def test_pack_mask_opens_empty_rows(rng, poison_scratch, n_k):
    logits = make_logits(rng, (2, 3, 9, n_k), 0.05, empty_rows=4)
    want = normalize_allow(logits >= 0, 3)
    bits = tk.pack_mask(logits.to(DEVICE), True, 3)
    assert bits.shape == (2, 3, 9, (n_k + 31) // 32)
    assert torch.equal(unpack(bits, n_k), want), f"seed {rng.seed_value}"
    bits = tk.pack_mask((logits >= 0).to(DEVICE), False, 3)
    assert torch.equal(unpack(bits, n_k), want), f"seed {rng.seed_value}"
    # bits past Nk stay clear, also in opened rows
    words = bits.cpu().long() & 0xFFFFFFFF
    if n_k % 32:
        assert int((words[..., -1] >> (n_k % 32)).max()) == 0, f"seed {rng.seed_value}"
    # a mask shared by the heads packs once
    assert tk.pack_mask(logits[:, 0].to(DEVICE), True, 3).shape == (2, 1, 9, (n_k + 31) // 32)


def test_broadcast_head_mask(rng):
    """A (B, H, Nq, Nk) mask expanded from (B, 1, ...) (head stride 0) is read once per batch, not per head."""
    (q64, k64, v64), (q, k, v) = make_qkv(rng, 1, 3, 7, 30, 16, torch.float32)
    allow = make_logits(rng, (1, 1, 7, 30), 0.3, empty_rows=1) >= 0
    expanded = allow.to(DEVICE).expand(1, 3, 7, 30)  # expand after the move: a copy would drop stride 0
    mask4, heads = tk.mask_view(expanded, 3)
    assert heads == 1
    got = masked_attention(q, k, v, expanded.to(DEVICE), backend="triton")
    assert rel_err(got, reference(q64, k64, v64, expanded)) <= 1e-5, f"seed {rng.seed_value}"


# ----------------------------------------------------------------------------------------------------------------
# Backward
# ----------------------------------------------------------------------------------------------------------------


def _grads(fn, tensors, grad_out):
    tensors = [t.detach().clone().requires_grad_(True) for t in tensors]
    out = fn(*tensors)
    out.backward(grad_out)
    return out, [t.grad for t in tensors]


@pytest.mark.parametrize("per_head, kind", [(False, "logits"), (True, "bool")])
def test_autograd_float32(rng, poison_scratch, per_head, kind):
    B, H, n_q, n_k, D = 2, 2, 19, 45, 24
    (q64, k64, v64), (q, k, v) = make_qkv(rng, B, H, n_q, n_k, D, torch.float32, layout="bnhd")
    shape = (B, H, n_q, n_k) if per_head else (B, n_q, n_k)
    logits = make_logits(rng, shape, 0.25, empty_rows=2)
    allow = logits >= 0
    grad_out = torch.randn(B, H, n_q, D, generator=rng, dtype=torch.float64)

    ref_out, ref_grads = _grads(lambda a, b, c: masked_attention_torch(a, b, c, allow), (q64, k64, v64), grad_out)
    if kind == "logits":
        fn = lambda a, b, c: masked_attention_from_logits(a, b, c, logits.to(DEVICE), backend="triton")  # noqa: E731
    else:
        fn = lambda a, b, c: masked_attention(a, b, c, allow.to(DEVICE), backend="triton")  # noqa: E731
    out, grads = _grads(fn, (q, k, v), grad_out.float().to(DEVICE))
    assert rel_err(out, ref_out) <= 1e-5, f"seed {rng.seed_value}"
    for name, g, r in zip("qkv", grads, ref_grads):
        err = rel_err(g, r)
        assert err <= 1e-4, f"d{name} seed {rng.seed_value}: rel_err {err}"


@pytest.mark.parametrize("dtype, kps", [(torch.float32, 32), (torch.bfloat16, None)])
def test_backward_split(rng, poison_scratch, dtype, kps):
    """dQ split over keys (float32 partials summed), dK/dV with empty rows and an odd key count."""
    B, H, n_q, n_k, D = 1, 2, 18, 53, 32
    (q64, k64, v64), (q, k, v) = make_qkv(rng, B, H, n_q, n_k, D, dtype)
    logits = make_logits(rng, (B, n_q, n_k), 0.3, empty_rows=3)
    grad_out = torch.randn(B, H, n_q, D, generator=rng, dtype=torch.float64)
    qr, kr, vr = (t.double().cpu() for t in (q, k, v))
    _, ref_grads = _grads(lambda a, b, c: masked_attention_torch(a, b, c, logits >= 0), (qr, kr, vr), grad_out)
    mask = logits.to(DEVICE)
    out, lse = tk.masked_attention_fwd(q, k, v, mask, True, keys_per_split=kps)
    grads = tk.masked_attention_bwd(grad_out.to(dtype).to(DEVICE), q, k, v, out, lse, mask, True, keys_per_split=kps)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    for name, g, r in zip("qkv", grads, ref_grads):
        assert g.dtype == dtype and g.shape == r.shape
        err = rel_err(g, r)
        assert err <= tol, f"d{name} {dtype} seed {rng.seed_value}: rel_err {err}"


# ----------------------------------------------------------------------------------------------------------------
# Ops, API, errors
# ----------------------------------------------------------------------------------------------------------------


def test_ops_registered_with_fake_kernels(rng):
    from torch._subclasses.fake_tensor import FakeTensorMode

    (_, _, _), (q, k, v) = make_qkv(rng, 2, 3, 5, 11, 16, torch.float16, layout="bnhd")
    logits = make_logits(rng, (2, 5, 11), 0.5).to(DEVICE)
    real_out, real_lse = torch.ops.m2f.masked_attention_from_logits(q, k, v, logits)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fq, fk, fv, fl = (mode.from_tensor(t) for t in (q, k, v, logits))
        out, lse = torch.ops.m2f.masked_attention_from_logits(fq, fk, fv, fl)
        out2, _ = torch.ops.m2f.masked_attention(fq, fk, fv, fl >= 0)
        grads = torch.ops.m2f.masked_attention_backward(out, fq, fk, fv, out, lse, fl, True)
    for fake, real in ((out, real_out), (lse, real_lse), (out2, real_out)):
        assert fake.shape == real.shape and fake.dtype == real.dtype and fake.stride() == real.stride()
    assert [g.shape for g in grads] == [q.shape, k.shape, v.shape]
    # the output's memory is (B, Nq, H, D): merging the heads is a view
    assert real_out.transpose(1, 2).is_contiguous()


def test_opcheck(rng):
    (_, _, _), (q, k, v) = make_qkv(rng, 1, 2, 3, 5, 16, torch.float32)
    logits = make_logits(rng, (1, 3, 5), 0.5, empty_rows=1).to(DEVICE)
    for t in (q, k, v):
        t.requires_grad_(True)
    import m2f.kernels.masked_attention.op  # noqa: F401 - registers the ops (the public functions import it lazily)

    torch.library.opcheck(torch.ops.m2f.masked_attention_from_logits.default, (q, k, v, logits),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


def test_input_errors(rng):
    (_, _, _), (q, k, v) = make_qkv(rng, 1, 2, 3, 5, 16, torch.float32)
    good = torch.ones(1, 3, 5, dtype=torch.bool, device=DEVICE)
    with pytest.raises(InputError, match="bool"):
        masked_attention(q, k, v, good.float(), backend="torch")
    with pytest.raises(InputError, match="floating"):
        masked_attention_from_logits(q, k, v, good, backend="torch")
    with pytest.raises(InputError, match=r"\(B, Nq, Nk\)"):
        masked_attention(q, k, v, good[:, :, :4], backend="torch")
    with pytest.raises(InputError, match="do not fit"):
        masked_attention(q, k[:, :, :, :8], v, good, backend="torch")
    with pytest.raises(InputError, match="share one dtype of float32, float16, bfloat16 or float64, got torch.int64"):
        masked_attention(q.long(), k.long(), v.long(), good, backend="triton")
    with pytest.raises(InputError, match="share one dtype"):
        masked_attention(q, k.half(), v, good, backend="torch")
    with pytest.raises(InputError, match="must be on one device"):
        masked_attention(q, k, v, good.to("meta"), backend="torch")
    with pytest.raises(InputError, match="head dim <= 256"):
        masked_attention(*(t.expand(-1, -1, -1, 257) for t in (q[..., :1], k[..., :1], v[..., :1])), good,
                         backend="triton")


def test_int32_offsets_checked(rng, monkeypatch):
    """Offsets inside one (batch, head) slice are int32 in the kernels: a slice spanning more is refused."""
    ma = importlib.import_module("m2f.kernels.masked_attention")  # the package's attribute is the function

    (_, _, _), (q, k, v) = make_qkv(rng, 1, 2, 3, 5, 16, torch.float32)
    allow = torch.ones(1, 3, 5, dtype=torch.bool, device=DEVICE)
    monkeypatch.setattr(ma, "INT32_SPAN", 64)  # k's (5, 16) slices span 80 elements
    with pytest.raises(InputError, match=r"^k \(1, 2, 5, 16\) with strides .* spans 80 elements .* int32"):
        masked_attention(q, k, v, allow, backend="triton")
    masked_attention(q, k, v, allow, backend="torch")  # the torch backend has no such limit


def test_torch_compile_fullgraph(rng):
    """The ops trace without graph breaks (fake kernels + registered autograd) and give the eager result."""
    (q64, k64, v64), (q, k, v) = make_qkv(rng, 1, 2, 9, 40, 16, torch.float32, layout="bnhd")
    logits = make_logits(rng, (1, 9, 40), 0.3, empty_rows=1).to(DEVICE)
    q.requires_grad_(True)

    def layer(q, k, v, logits):
        out = masked_attention_from_logits(q, k, v, logits, backend="triton")
        return out.transpose(1, 2).reshape(1, 9, 32)

    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    out = compiled(q, k, v, logits)
    out.sum().backward()
    ref = masked_attention_torch(q64, k64, v64, logits.cpu() >= 0).transpose(1, 2).reshape(1, 9, 32)
    assert rel_err(out, ref) <= 1e-5, f"seed {rng.seed_value}"
    assert q.grad is not None and torch.isfinite(q.grad).all()


# ----------------------------------------------------------------------------------------------------------------
# float64 (gradcheck) and non-finite inputs, both backends
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_gradcheck_float64(rng, backend):
    (_, _, _), (q, k, v) = make_qkv(rng, 1, 2, 3, 33, 3, torch.float64)  # 33 keys: two key blocks, a word tail
    logits = make_logits(rng, (1, 3, 33), 0.3, empty_rows=1).double().to(DEVICE)
    inputs = tuple(t.clone().requires_grad_() for t in (q, k, v))
    fn = lambda a, b, c: masked_attention_from_logits(a, b, c, logits, backend=backend)  # noqa: E731
    assert fn(*inputs).dtype == torch.float64
    # Triton: fast mode (a random projection of the Jacobian) since every interpreted launch is slow.
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-8, rtol=1e-6, fast_mode=backend == "triton"), \
        f"seed {rng.seed_value}"


def _poison_forbidden(rng, t, allow, fraction=0.5):
    """Put inf / -inf / NaN into channels of keys that some row may not attend to; returns the poisoned copy."""
    forbidden_somewhere = ~normalize_allow(allow, t.shape[1]).all(dim=-2)  # (B, 1 or H, Nk)
    hit = forbidden_somewhere[..., None].expand(t.shape) & (torch.rand(t.shape, generator=rng) < fraction)
    specials = torch.tensor([float("inf"), -float("inf"), float("nan")], dtype=t.dtype)
    out = t.clone()
    out[hit] = specials[torch.randint(3, (int(hit.sum()),), generator=rng)]
    return out


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("kps", [None, 32])
def test_non_finite_keys_and_values(rng, backend, kps):
    """Forbidden keys with inf / NaN K and V contribute nothing; the rows that allow them see IEEE results."""
    B, H, n_q, n_k, D = 1, 2, 7, 45, 8
    (q64, k64, v64), _ = make_qkv(rng, B, H, n_q, n_k, D)
    allow = make_logits(rng, (B, n_q, n_k), 0.4, empty_rows=1) >= 0
    allow[:, 1] = False
    allow[:, 1, :20] = True  # row 1 never sees keys >= 20: all its outputs stay finite
    keys_poisoned = torch.zeros(n_k, dtype=torch.bool)
    keys_poisoned[20:] = True
    k_bad, v_bad = (_poison_forbidden(rng, t, allow) for t in (k64, v64))
    for t, clean in ((k_bad, k64), (v_bad, v64)):
        t[:, :, :20] = clean[:, :, :20]
    want = masked_attention_torch(q64, k_bad, v_bad, allow)
    assert torch.isfinite(want[:, :, 1]).all() and not torch.isfinite(want).all(), f"seed {rng.seed_value}"

    q, k, v = (t.float().to(DEVICE) for t in (q64, k_bad, v_bad))
    if backend == "triton":
        got, _ = tk.masked_attention_fwd(q, k, v, allow.to(DEVICE), False, keys_per_split=kps)
    else:
        got = masked_attention(q, k, v, allow.to(DEVICE), backend="torch")
    problem = mismatch(got, want, TOL[torch.float32])
    assert not problem, f"seed {rng.seed_value}: {backend} kps={kps}: {problem}"


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_non_finite_forbidden_values_leave_gradients_unchanged(rng, backend):
    B, H, n_q, n_k, D = 1, 2, 6, 40, 8
    (q64, k64, v64), _ = make_qkv(rng, B, H, n_q, n_k, D)
    allow = make_logits(rng, (B, n_q, n_k), 0.4) >= 0
    allow[..., 0] = True  # no empty row (it would attend to every key, the poisoned ones too)
    allow[..., 33:] = False  # keys no row may attend to
    v_bad = v64.clone()
    v_bad[:, :, 33:, ::3] = float("nan")
    v_bad[:, :, 35:, 1::3] = float("inf")
    grad_out = torch.randn(B, H, n_q, D, generator=rng, dtype=torch.float64)
    _, want = _grads(lambda a, b, c: masked_attention_torch(a, b, c, allow), (q64, k64, v64), grad_out)
    fn = lambda a, b, c: masked_attention(a, b, c, allow.to(DEVICE), backend=backend)  # noqa: E731
    out, grads = _grads(fn, (t.float().to(DEVICE) for t in (q64, k64, v_bad)), grad_out.float().to(DEVICE))
    assert torch.isfinite(out).all(), f"seed {rng.seed_value}"
    for name, g, r in zip("qkv", grads, want):
        problem = mismatch(g, r, 1e-4)
        assert not problem, f"seed {rng.seed_value}: {backend} d{name}: {problem}"
