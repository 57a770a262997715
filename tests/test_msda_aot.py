"""The deformable-attention kernels build ahead of time for H100 (sm_90) and Jetson Orin (sm_87) with no GPU."""
from __future__ import annotations

import re

from m2f.kernels.ms_deform_attn.aot_build import DTYPES, TARGETS, compile_all


def test_every_kernel_builds_for_sm90_and_sm87_without_spills():
    built = compile_all()
    print()
    for kind, dtype, k in built:
        print(f"{kind} {dtype:>8} {k.summary()}")
    assert sorted((kind, dtype, k.target) for kind, dtype, k in built) == sorted(
        (kind, dtype, target) for kind in ("fwd", "bwd") for dtype in DTYPES for target in TARGETS
    )
    for kind, dtype, k in built:
        where = f"{kind} {dtype} {k.target}"
        assert k.cubin and k.ptx, where
        assert re.search(rf"^\.target {k.target}a?\b", k.ptx, flags=re.MULTILINE), where
        assert k.spill_stores == 0 and k.spill_loads == 0, f"{where}: {k.summary()}"
        assert 0 < k.registers <= 255, where
        # Each corner read is a row of 32 contiguous channels: vector loads (8 or 16 bytes per thread, by the
        # elements each thread holds), not one load per channel.
        assert re.search(r"ld\.global(\.\w+)*\.v[24]\.", k.ptx), f"{where}: no vectorised loads"
