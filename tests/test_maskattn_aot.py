"""Every masked-attention kernel (forward and backward) compiles ahead of time for sm_90 (H100) and sm_87 (Jetson
Orin) with no GPU, without register spills; prints registers / shared memory / spills (pytest -s shows them)."""
from __future__ import annotations

import pytest
import torch

from m2f.kernels.aot import compile_many
from m2f.kernels.masked_attention import triton_kernels as tk

pytest.importorskip("triton")

KERNELS = {"pack_mask", "fwd", "fwd_split", "merge", "bwd_delta", "bwd_dkdv", "bwd_dq_split"}
# (target, q/k/v dtype, mask dtype): both targets, every dtype, bool and logits masks
CASES = [("sm_90", torch.bfloat16, torch.float32), ("sm_90", torch.float32, torch.float32),
         ("sm_87", torch.float16, torch.bool), ("sm_87", torch.float32, torch.float16)]


def test_every_kernel_compiles_for_sm90_and_sm87():
    keys, specs = [], []
    for target, dtype, mask_dtype in CASES:
        for name, spec in tk.aot_specs(dtype, mask_dtype, head_dim=32).items():
            keys.append((name, target, str(dtype).replace("torch.", ""), str(mask_dtype).replace("torch.", "")))
            specs.append(spec.for_target(target))
    built = compile_many(specs)
    print()
    for (name, target, dtype, mask), k in zip(keys, built):
        print(f"{target} {dtype:8s} mask={mask:7s} {name:12s} {k.summary()}")
    for target in ("sm_90", "sm_87"):
        assert {name for name, t, _, _ in keys if t == target} == KERNELS
    for key, k in zip(keys, built):
        assert k.target == key[1] and k.cubin and k.ptx.count("\n") > 0, key
        assert k.registers <= 255, (key, k.summary())
        assert k.spill_stores == 0 and k.spill_loads == 0, f"register spills: {key} {k.summary()}"
