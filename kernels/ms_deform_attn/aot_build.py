"""Ahead-of-time builds of the deformable-attention kernels for GPUs that are not here (sm_90 H100, sm_87 Orin).

``compile_all()`` compiles the forward and backward kernel for each value dtype at Mask2Former's shape
(3 levels, 4 points, 32 channels per head) with ``m2f.kernels.aot.compile_for`` and returns the PTX / cubin
with registers, shared memory and spills. The TensorRT plugin embeds the same PTX.

Triton's interpreter (``TRITON_INTERPRET=1``) turns the standard library's own ``@triton.jit`` helpers
(``tl.sum``, ``tl.zeros``) into interpreted functions that the compiler cannot lower, so under the interpreter
the build runs in a child process with the interpreter off.

    python -m m2f.kernels.ms_deform_attn.aot_build [--targets sm_90,sm_87] [--json]
"""
from __future__ import annotations

import argparse
import base64
import dataclasses
import json
import os
import subprocess
import sys
from typing import Any, Sequence

DTYPES = ("float32", "float16", "bfloat16")
TARGETS = ("sm_90", "sm_87")
_TRITON_TYPE = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}
# Mask2Former's pixel decoder: 3 levels (res3..res5), 4 points, 8 heads x 32 channels.
MASK2FORMER_SHAPE = {"NUM_LEVELS": 3, "NUM_POINTS": 4, "HEAD_DIM": 32, "BLOCK_D": 32}


def kernel_spec(kind: str, dtype: str, loc_dtype: str | None = None) -> tuple[Any, dict[str, str], dict[str, Any], int]:
    """(kernel, signature, constexprs, num_warps) of the ``kind`` ("fwd" / "bwd") kernel for value ``dtype``;
    locations and weights in ``loc_dtype`` (default: value's dtype). Spatial shapes / starts as int64."""
    from .triton_kernels import AOT_CONFIGS, ms_deform_attn_bwd_kernel, ms_deform_attn_fwd_kernel

    v = "*" + _TRITON_TYPE[dtype]
    loc = "*" + _TRITON_TYPE[loc_dtype or dtype]
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
    return kernel, {**ptrs, **ints, **consts}, constexprs, config["num_warps"]


def compile_all(targets: Sequence[str] = TARGETS, dtypes: Sequence[str] = DTYPES) -> list[tuple[str, str, Any]]:
    """Every (kernel, dtype, target) compiled ahead of time: (kind "fwd" / "bwd", value dtype,
    ``m2f.kernels.aot.CompiledKernel``) for each."""
    from .._backend import triton_interpreter_enabled

    if triton_interpreter_enabled():
        return _compile_in_child(targets, dtypes)
    from ..aot import compile_for

    built = []
    for target in targets:
        for dtype in dtypes:
            for kind in ("fwd", "bwd"):
                kernel, signature, constexprs, num_warps = kernel_spec(kind, dtype)
                built.append((kind, dtype, compile_for(kernel, signature, constexprs, target=target,
                                                       num_warps=num_warps, num_stages=1)))
    return built


def _compile_in_child(targets: Sequence[str], dtypes: Sequence[str]) -> list:
    from ..aot import CompiledKernel

    env = {**os.environ, "TRITON_INTERPRET": "0"}
    cmd = [sys.executable, "-m", "m2f.kernels.ms_deform_attn.aot_build", "--json",
           "--targets", ",".join(targets), "--dtypes", ",".join(dtypes)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"ahead-of-time build failed:\n{proc.stderr[-4000:]}")
    records = json.loads(proc.stdout)
    return [(r.pop("kind"), r.pop("dtype"), CompiledKernel(**{**r, "cubin": base64.b64decode(r["cubin"])}))
            for r in records]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", default=",".join(TARGETS))
    parser.add_argument("--dtypes", default=",".join(DTYPES))
    parser.add_argument("--json", action="store_true", help="print every build (PTX, cubin in base64) as JSON")
    args = parser.parse_args(argv)
    built = compile_all(args.targets.split(","), args.dtypes.split(","))
    if args.json:
        records = [{**dataclasses.asdict(k), "cubin": base64.b64encode(k.cubin).decode(), "kind": kind,
                    "dtype": dtype} for kind, dtype, k in built]
        json.dump(records, sys.stdout)
    else:
        for kind, dtype, k in built:
            print(f"{dtype:>8} {k.summary()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
