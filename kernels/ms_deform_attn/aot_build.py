"""Ahead-of-time builds of the deformable-attention kernels for GPUs that are not here (sm_90 H100, sm_87 Orin).

``compile_all()`` compiles the forward and backward kernel for each value dtype at Mask2Former's shape
(3 levels, 4 points, 32 channels per head) with ``m2f.kernels.aot.compile_for`` and returns the PTX / cubin
with registers, shared memory and spills. The TensorRT plugin embeds the same PTX.

    python -m m2f.kernels.ms_deform_attn.aot_build [--targets sm_90,sm_87] [--dtypes float32,float16]
"""
from __future__ import annotations

import argparse
from typing import Any, Sequence

from ..common import TRITON_TYPES

DTYPES = ("float32", "float16", "bfloat16")
TARGETS = ("sm_90", "sm_87")
# Mask2Former's pixel decoder: 3 levels (res3..res5), 4 points, 8 heads x 32 channels.
MASK2FORMER_SHAPE = {"NUM_LEVELS": 3, "NUM_POINTS": 4, "HEAD_DIM": 32, "BLOCK_D": 32}


def kernel_spec(kind: str, dtype: str, loc_dtype: str | None = None) -> Any:
    """The ``m2f.kernels.aot.KernelSpec`` (for sm_90; ``.for_target`` for others) of the ``kind`` ("fwd" / "bwd")
    kernel for value ``dtype``; locations and weights in ``loc_dtype`` (default: value's dtype). Spatial shapes /
    starts as int64."""
    from ..aot import KernelSpec
    from .triton_kernels import AOT_CONFIGS, ms_deform_attn_bwd_kernel, ms_deform_attn_fwd_kernel

    v = "*" + TRITON_TYPES[dtype]
    loc = "*" + TRITON_TYPES[loc_dtype or dtype]
    ints = {"num_keys": "i32", "num_queries": "i32", "num_heads": "i32"}
    consts = {name: "constexpr"
              for name in ("NUM_LEVELS", "NUM_POINTS", "HEAD_DIM", "BLOCK_D", "ROW_ALIGNED", "BLOCK_Q")}
    if kind == "fwd":
        kernel = ms_deform_attn_fwd_kernel
        ptrs = {"value_ptr": v, "shapes_ptr": "*i64", "starts_ptr": "*i64", "loc_ptr": loc, "attn_ptr": loc,
                "out_ptr": v}
    elif kind == "bwd":
        kernel = ms_deform_attn_bwd_kernel
        ptrs = {"grad_out_ptr": v, "value_ptr": v, "shapes_ptr": "*i64", "starts_ptr": "*i64", "loc_ptr": loc,
                "attn_ptr": loc, "grad_value_ptr": "*fp32", "grad_loc_ptr": loc, "grad_attn_ptr": loc}
    else:
        raise ValueError(f"unknown kernel kind {kind!r}; choose fwd or bwd")
    config = AOT_CONFIGS[kind]
    constexprs = {**MASK2FORMER_SHAPE, "ROW_ALIGNED": True, "BLOCK_Q": config["BLOCK_Q"]}
    return KernelSpec(kernel, {**ptrs, **ints, **consts}, constexprs, num_warps=config["num_warps"], num_stages=1)


def compile_all(targets: Sequence[str] = TARGETS, dtypes: Sequence[str] = DTYPES) -> list[tuple[str, str, Any]]:
    """Every (kernel, dtype, target) compiled ahead of time: (kind "fwd" / "bwd", value dtype,
    ``m2f.kernels.aot.CompiledKernel``) for each."""
    from ..aot import compile_many

    keys, specs = [], []
    for target in targets:
        for dtype in dtypes:
            for kind in ("fwd", "bwd"):
                keys.append((kind, dtype))
                specs.append(kernel_spec(kind, dtype).for_target(target))
    return [(kind, dtype, built) for (kind, dtype), built in zip(keys, compile_many(specs))]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", default=",".join(TARGETS))
    parser.add_argument("--dtypes", default=",".join(DTYPES))
    args = parser.parse_args(argv)
    for kind, dtype, k in compile_all(args.targets.split(","), args.dtypes.split(",")):
        print(f"{kind} {dtype:>8} {k.summary()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
