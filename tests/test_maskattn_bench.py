"""The masked-attention benchmark's plumbing on the CPU (tiny shapes, one timed call each): every case and
backend present, outputs checked against the reference, results written as JSON / markdown / PNG."""
from __future__ import annotations

import json

import pytest
import torch

from m2f.bench import common
from m2f.bench import masked_attention as suite
from m2f.kernels._backend import triton_interpreter_enabled


def test_bench_runs_on_cpu(tmp_path, monkeypatch):
    # small enough for Triton's interpreter: 17 queries, 2 heads of 128, keys 1x2 / 2x4 / 4x8; one call per timing
    monkeypatch.setattr(suite, "NUM_QUERIES", 17)
    monkeypatch.setattr(suite, "NUM_HEADS", 2)
    monkeypatch.setattr(suite, "HEAD_DIM", 128)
    monkeypatch.setattr(suite, "time_fn", lambda fn, **kw: (fn(), common.Timing(1.0, 1.0, 1))[1])
    rows = suite.run(sizes=[(32, 64)], batches=[1], dtypes=[torch.float32], device=torch.device("cpu"),
                     backward=True)
    keys = {(r.case, r.backend, r.extra["level"]) for r in rows}
    backends = {"sdpa-bool-mask", "m2f-torch"} | ({"m2f-triton"} if triton_interpreter_enabled() else set())
    for level in ("1x2", "2x4", "4x8"):
        for backend in backends:
            assert ("masked_attention/fwd", backend, level) in keys
        assert ("masked_attention/layer", "mha-official", level) in keys
        assert ("masked_attention/fwd+bwd", "sdpa-bool-mask", level) in keys
    for r in rows:
        if r.rel_err is not None:
            assert r.rel_err <= 1e-5, r
    if triton_interpreter_enabled():
        assert all("speedup" in r.extra for r in rows if r.backend == "m2f-triton")
    paths = common.write_results(rows, tmp_path, suite="kernels-masked_attention", title="t", plot=suite.plot)
    assert json.loads(paths["json"].read_text())["rows"]
    assert paths["png"].stat().st_size > 0 and "sdpa-bool-mask" in paths["md"].read_text()


def test_official_mask_matches_reference_rule():
    """The baseline's mask building (official code) agrees with m2f's rule: allowed ⇔ logit >= 0, empty rows open."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, suite.NUM_QUERIES, 16, 16, generator=g) - 1.5
    logits[0, :3] = -5.0  # empty rows
    forbidden = suite.official_mask(logits, (8, 8)).view(2, suite.NUM_HEADS, suite.NUM_QUERIES, 64)
    allow = suite.resized_logits(logits, (8, 8)) >= 0
    allow = allow | ~allow.any(-1, keepdim=True)
    assert torch.equal(~forbidden, allow[:, None].expand_as(forbidden))


@pytest.mark.parametrize("size, levels", [((512, 512), [(16, 16), (32, 32), (64, 64)]),
                                          ((800, 1344), [(25, 42), (50, 84), (100, 168)])])
def test_level_sizes(size, levels):
    assert suite.level_sizes(*size) == levels
