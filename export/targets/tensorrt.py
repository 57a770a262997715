"""TensorRT (>= 10.7, a CUDA GPU): an engine built from the ONNX file, m2f's fused ops as AOT Triton plugins.

The build is :func:`m2f.export.tensorrt_build.build_engine`, the runner :class:`m2f.export.runner.TensorRTRunner`.
"""
from __future__ import annotations

from typing import Any

from ..tensorrt_onnx_ops import SUPPORT
from . import Target, register


def _build(onnx_path: Any, output: Any, **options: Any) -> Any:
    from ..tensorrt_build import build_engine

    return build_engine(onnx_path, output, **options)


def _runner(path: Any, **options: Any) -> Any:
    from ..runner import TensorRTRunner

    return TensorRTRunner(path, **options)


def _available() -> str | None:
    from m2f.errors import BackendUnavailableError

    from .._trt import import_cudart, import_tensorrt

    try:
        import_tensorrt()
        import_cudart()
    except BackendUnavailableError as exc:
        return str(exc)
    return None


def _add_cli(t: Any) -> None:
    from m2f.cli.options import add_out_option

    t.add_argument("--onnx", required=True, help="ONNX file written by `m2f export onnx`")
    add_out_option(t, "engine file to write", required=True, dest="output", old=("--output",))
    prec = t.add_mutually_exclusive_group()
    prec.add_argument("--fp16", action="store_true",
                      help="TensorRT 10.x weak typing: allow float16 kernels (11.x: export with --precision fp16)")
    prec.add_argument("--bf16", action="store_true",
                      help="TensorRT 10.x weak typing: allow bfloat16 kernels (11.x: export with --precision bf16)")
    prec.add_argument("--int8", action="store_true",
                      help="TensorRT 10.x: INT8 with entropy calibration, needs --calib (11.x: --precision int8)")
    t.add_argument("--calib", default=None, help="folder of calibration images for --int8")
    t.add_argument("--min-shape", default=None, help="optimisation profile minimum, BxCxHxW")
    t.add_argument("--opt-shape", default=None, help="optimisation profile optimum, BxCxHxW")
    t.add_argument("--max-shape", default=None, help="optimisation profile maximum, BxCxHxW")
    t.add_argument("--timing-cache", default=None, help="timing cache file (read if present, then updated)")
    t.add_argument("--workspace", type=float, default=4.0, help="builder workspace in GB")
    t.add_argument("--plugins", default="m2f", choices=("m2f", "tensorrt"),
                   help="deformable-attention plugin nodes run 'm2f' (our Triton kernel, AOT) or 'tensorrt' (its own); "
                        "masked-attention plugin nodes always run m2f's")
    t.add_argument("--force", action="store_true", help="overwrite an existing engine")


def _run_cli(args: Any) -> Any:
    from ..tensorrt_build import build_engine, parse_shape

    precision = "fp16" if args.fp16 else "bf16" if args.bf16 else "int8" if args.int8 else "fp32"
    shapes = {k: parse_shape(v) if v else None for k, v in
              (("min_shape", args.min_shape), ("opt_shape", args.opt_shape), ("max_shape", args.max_shape))}
    return build_engine(args.onnx, args.output, precision=precision, calib_dir=args.calib,
                        timing_cache=args.timing_cache, workspace_gb=args.workspace, plugins=args.plugins,
                        force=args.force, **shapes)


TARGET = register(Target(
    name="tensorrt",
    description="a TensorRT engine (TensorRT >= 10.3, a CUDA GPU; by default strongly typed, in the precision of "
                "the ONNX graph), m2f's Triton kernels as plugins",
    artifact="tensorrt",
    op_modes={"msda": "plugin", "masked_attn": "plugin"},
    ops=SUPPORT,
    runner=_runner,
    build=_build,
    available=_available,
    triton_platform=("tensorrt_plan", "model.plan"),
    suffixes=(".engine", ".plan"),
    flag="engine",
    add_cli=_add_cli,
    run_cli=_run_cli,
    pipeline_build={"precision": "fp16"},
))
