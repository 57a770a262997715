"""Constants and dtype maps shared by m2f's Triton kernels, their launchers and their ahead-of-time builds."""
from __future__ import annotations

import torch

LOG2E = 1.4426950408889634  # scores in base 2: exp(x) = exp2(x * LOG2E)

DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
TRITON_TYPES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}  # dtype name -> Triton signature type
ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2}


def block_d(head_dim: int) -> int:
    """The head dim rounded up to a power of two, at least 16 (tl.dot's smallest tile)."""
    return max(16, 1 << max(0, (head_dim - 1).bit_length()))
