"""`m2f bench kernels --op ms_deform_attn` on the CPU (the torch reference only) at a small shape."""
from __future__ import annotations

import torch

from m2f.bench import ms_deform_attn as suite


def test_min_bytes_matches_the_hand_count_at_1024():
    # 1024 x 1024: Q = S = 128² + 64² + 32² = 21504; value / output 21504·8·32, locations 21504·8·3·4·2,
    # weights 21504·8·3·4.
    shapes = suite.level_shapes_for(1024, 1024)
    assert shapes == [(128, 128), (64, 64), (32, 32)]
    q = 21504
    elements = 2 * q * 8 * 32 + q * 8 * 3 * 4 * 2 + q * 8 * 3 * 4
    assert suite.min_bytes(shapes, 1, torch.float32, torch.float32) == 4 * elements == 68_812_800
    assert suite.min_bytes(shapes, 8, torch.bfloat16, torch.bfloat16) == 8 * 2 * elements
    assert suite.level_shapes_for(800, 1344) == [(100, 168), (50, 84), (25, 42)]


def test_cpu_run_times_the_reference_and_writes_a_plot(tmp_path):
    rows = suite.run(sizes=[(64, 96)], batches=[1], dtypes=[torch.float32], device=torch.device("cpu"),
                     backward=True)
    assert [(r.case, r.backend) for r in rows] == [("ms_deform_attn/fwd", "torch-grid_sample"),
                                                   ("ms_deform_attn/fwd+bwd", "torch-grid_sample")]
    for r in rows:
        assert r.median_ms > 0 and r.p90_ms >= r.median_ms
        assert r.rel_err is not None and r.rel_err <= 1e-5, r
        assert r.extra["gbps"] > 0 and "reference only" in r.extra["measured"]
        assert r.extra["queries"] == 8 * 12 + 4 * 6 + 2 * 3
    suite.plot(rows, tmp_path / "bench.png")
    assert (tmp_path / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
