"""``m2f export``: ONNX with verified parity, TensorRT engines, Triton Inference Server repositories.

    m2f export onnx --checkpoint CKPT --output m2f.onnx [--height 512 --width 512] [--dynamic] [--target tensorrt]
    m2f export check m2f.onnx [--report report.json]
    m2f export tensorrt --onnx m2f.onnx --output m2f.engine [--fp16] [--min-shape 1x3x512x512 ...]
    m2f export triton-repo --model m2f.onnx --output model_repository [--max-batch 8] [--ensemble]

Each stage writes its file atomically with a manifest beside it (``FILE.json``); nothing is overwritten without
``--force`` and a failed stage leaves no file behind.
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

from m2f.errors import InputError

MSDA_DEFAULT_FOR_TARGET = {"onnxruntime": "decomposed", "tensorrt": "plugin"}
MASKED_ATTN_DEFAULT_FOR_TARGET = {"onnxruntime": "standard", "tensorrt": "plugin"}


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def register(sub: argparse._SubParsersAction) -> None:
    from m2f.cli.options import add_out_option, add_quiet_option, add_threads_option

    p = sub.add_parser("export", help="export to ONNX / TensorRT / Triton Inference Server, with verification")
    esub = p.add_subparsers(dest="export_command", metavar="STAGE")
    esub.required = True

    o = esub.add_parser("onnx", help="export a checkpoint to ONNX (+ manifest)")
    o.add_argument("--checkpoint", required=True, help="m2f / HF / official checkpoint (file or directory)")
    add_out_option(o, "ONNX file to write", required=True, dest="output", old=("--output",))
    o.add_argument("--preset", default=None, help="architecture preset when the checkpoint has no config")
    o.add_argument("--height", type=_int, default=512, help="input height, a multiple of 32")
    o.add_argument("--width", type=_int, default=512, help="input width, a multiple of 32")
    o.add_argument("--batch", type=_int, default=1, help="batch size of the export")
    o.add_argument("--dynamic", action="store_true", help="symbolic batch, height and width")
    o.add_argument("--precision", default="fp32", choices=("fp32", "fp16", "bf16", "int8"),
                   help="precision in the graph: fp16 / bf16 mixed precision (statistics, sampling and thresholds "
                        "float32); int8 explicit Q/DQ, calibrated on --calib")
    o.add_argument("--calib", default=None, metavar="DIR",
                   help="folder of representative images for --precision int8 (ranges cached in OUTPUT.calib.json)")
    o.add_argument("--calib-images", type=_int, default=64, help="calibrate on at most N images")
    o.add_argument("--target", default="onnxruntime", choices=tuple(MSDA_DEFAULT_FOR_TARGET),
                   help="the runtime the graph is for: sets the --msda and --masked-attn defaults")
    o.add_argument("--msda", default=None, choices=("decomposed", "plugin"),
                   help="deformable attention as 'decomposed' GridSample ops (default for onnxruntime) or one TensorRT "
                        "'plugin' node per call (default for tensorrt)")
    o.add_argument("--masked-attn", default=None, choices=("standard", "plugin"),
                   help="masked attention as 'standard' ops (default for onnxruntime) or one m2f::masked_attention "
                        "TensorRT 'plugin' node per decoder layer (default for tensorrt)")
    o.add_argument("--postprocess", default="none", choices=("none", "semantic", "instance"),
                   help="post-processed outputs in the graph")
    o.add_argument("--opset", type=_int, default=18, help="ONNX opset, 18..24")
    o.add_argument("--no-simplify", action="store_true", help="skip onnxslim")
    o.add_argument("--no-optimize", action="store_true",
                   help="skip the exporter's graph optimizer (faster export, larger graph)")
    o.add_argument("--check", action="store_true", help="run `m2f export check` on the result")
    o.add_argument("--force", action="store_true", help="overwrite an existing output")
    add_threads_option(o)
    add_quiet_option(o)
    o.set_defaults(func=run_onnx)

    c = esub.add_parser("check", help="checker + op census + TensorRT op support + ONNX Runtime vs PyTorch parity")
    c.add_argument("file", help="ONNX file written by `m2f export onnx`")
    c.add_argument("--checkpoint", default=None, help="checkpoint to compare against (default: the manifest's)")
    c.add_argument("--report", default=None, help="write the JSON report here")
    c.add_argument("--force", action="store_true", help="overwrite an existing report")
    add_threads_option(c)
    add_quiet_option(c)
    c.set_defaults(func=run_check)

    t = esub.add_parser("tensorrt", help="build a TensorRT engine (TensorRT >= 10.3, a CUDA GPU); by default strongly "
                                         "typed, in the precision of the ONNX graph")
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
    t.set_defaults(func=run_tensorrt)

    w = esub.add_parser("pipeline", help="export -> check [-> TensorRT build -> run -> compare] in one work dir")
    w.add_argument("--checkpoint", required=True, help="checkpoint (file or directory)")
    add_out_option(w, "folder for every stage's artifact + pipeline.json", required=True, dest="workdir",
                   old=("--workdir",))
    w.add_argument("--preset", default=None, help="architecture preset when the checkpoint has no config")
    w.add_argument("--height", type=_int, default=512, help="input height, a multiple of 32")
    w.add_argument("--width", type=_int, default=512, help="input width, a multiple of 32")
    w.add_argument("--batch", type=_int, default=1, help="batch size of the export")
    w.add_argument("--dynamic", action="store_true", help="symbolic batch, height and width")
    w.add_argument("--msda", default=None, choices=("decomposed", "plugin"),
                   help="deformable attention: plugin with --tensorrt, decomposed otherwise (default)")
    w.add_argument("--masked-attn", default=None, choices=("standard", "plugin"),
                   help="masked attention: plugin with --tensorrt, standard ops otherwise (default)")
    w.add_argument("--tensorrt", action="store_true", help="also build an fp16 engine, run it and compare")
    w.add_argument("--force", action="store_true", help="replace an existing work dir")
    add_threads_option(w)
    add_quiet_option(w)
    w.set_defaults(func=run_pipeline_cmd)

    r = esub.add_parser("triton-repo", help="a Triton Inference Server model repository from an .onnx / .engine")
    r.add_argument("--model", required=True, help="exported .onnx, .engine or .plan")
    add_out_option(r, "model repository directory", required=True, dest="output", old=("--output",))
    r.add_argument("--name", default=None, help="model name (default: the file's stem)")
    r.add_argument("--max-batch", type=_int, default=8, help="max_batch_size for dynamic-batch models")
    r.add_argument("--instances", type=_int, default=1, help="instance_group count")
    r.add_argument("--instance-kind", choices=("cpu", "gpu"), default="gpu",
                   help="where the model's instances run (cpu: ONNX Runtime on the CPU, not for a plan)")
    r.add_argument("--ensemble", action="store_true",
                   help="the whole repository: Python pre-processing (image bytes in), the model, Python "
                        "post-processing (JSON segments out) and their ensemble NAME_ensemble")
    r.add_argument("--task", choices=("panoptic", "instance", "semantic"), default=None,
                   help="--ensemble: the segments' task (default: the model's)")
    r.add_argument("--config", default=None, help="--ensemble: config JSON of a model without one in its manifest")
    r.add_argument("--force", action="store_true", help="overwrite an existing model directory")
    r.set_defaults(func=run_triton_repo)


def _setup_logging(args: argparse.Namespace | None = None) -> None:
    """Log lines as ``m2f: ...``; with ``args`` (a computing stage) also its --quiet and --threads."""
    if args is not None:
        from m2f import runtime

        runtime.set_quiet(args.quiet)
        runtime.use_threads(args.threads)
    root = logging.getLogger("m2f")
    if not root.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("m2f: %(message)s"))
        root.addHandler(handler)
        root.setLevel(logging.INFO)


def run_onnx(args: argparse.Namespace) -> int:
    _setup_logging(args)
    if args.target not in MSDA_DEFAULT_FOR_TARGET:
        raise InputError(f"--target must be onnxruntime or tensorrt, got {args.target!r}")
    msda = args.msda or MSDA_DEFAULT_FOR_TARGET[args.target]
    masked_attn = args.masked_attn or MASKED_ATTN_DEFAULT_FOR_TARGET[args.target]
    from m2f.export.onnx_export import export_checkpoint
    from m2f.export.precision import CalibrationSettings

    if args.calib_images < 1:
        raise InputError(f"--calib-images must be >= 1, got {args.calib_images}")
    calib = CalibrationSettings(Path(args.calib), limit=args.calib_images) if args.calib else None
    result = export_checkpoint(
        args.checkpoint, args.output, preset=args.preset, height=args.height, width=args.width, batch=args.batch,
        dynamic=args.dynamic, precision=args.precision, calib=calib, msda=msda, masked_attn=masked_attn, postprocess=args.postprocess,
        opset=args.opset, simplify=not args.no_simplify, optimize=not args.no_optimize, force=args.force,
    )
    m = result.manifest
    extra = f", {m['plugin_nodes']} {m['msda']} nodes" if m["msda"] == "plugin" else ""
    extra += f", masked_attn={m['masked_attn']}"
    extra += f", {m['masked_attention_nodes']} plugin nodes" if m["masked_attn"] == "plugin" else ""
    print(f"wrote {result.path} (opset {m['opset']}, {m['precision']}, {m['dtype']} I/O, msda={m['msda']}{extra}, "
          f"{'dynamic' if m['dynamic'] else 'static'} {m['batch']}x3x{m['height']}x{m['width']}, "
          f"{result.seconds:.1f} s) and {result.manifest_path}")
    if args.check:
        from m2f.export.check import check_onnx

        return _print_check(check_onnx(result.path, checkpoint=args.checkpoint))
    return 0


def _print_check(report: dict) -> int:
    print(f"{report['file']}: {report['verdict']}  ({report['num_nodes']} nodes, opset {report['opset']}, "
          f"checker {'ok' if report['checker']['ok'] else 'FAILED'}, TensorRT ops "
          f"{'ok' if report['tensorrt']['ok'] else 'UNSUPPORTED ' + ','.join(report['tensorrt']['unsupported_ops'])})")
    parity = report.get("parity", {})
    if report.get("precision"):
        print(f"  precision {report['precision']}: compared with the float32 PyTorch model"
              + (f" ({parity['runs'][0]['runtime']})" if parity.get("runs") else ""))
    if "skipped" in parity:
        print(f"  parity: skipped - {parity['skipped']}")
    for run in parity.get("runs", []):
        errs = ", ".join(f"{k}={v['rel_err']:.2e}" if "rel_err" in v else f"{k} mismatch={v.get('mismatch', 0):.2%}"
                         for k, v in run["outputs"].items())
        if run.get("semantic_agreement") is not None:
            errs += f", semantic agreement {run['semantic_agreement']:.2%}"
        print(f"  {run['batch']}x3x{run['height']}x{run['width']}: {errs}")
    for key in ("plugins", "masked_attention_plugins"):
        if key in report:
            print(f"  {report[key]['count']} {report[key]['op_type']} nodes")
    for reason in report["reasons"]:
        print(f"  FAIL: {reason}")
    return 0 if report["verdict"] == "pass" else 1


def run_check(args: argparse.Namespace) -> int:
    _setup_logging(args)
    from m2f.export.check import check_onnx

    report = check_onnx(args.file, checkpoint=args.checkpoint, report=args.report, force=args.force)
    code = _print_check(report)
    if args.report:
        print(f"report: {args.report}")
    return code


def run_tensorrt(args: argparse.Namespace) -> int:
    _setup_logging()
    from m2f.export.tensorrt_build import build_engine, parse_shape

    precision = "fp16" if args.fp16 else "bf16" if args.bf16 else "int8" if args.int8 else "fp32"
    shapes = {k: parse_shape(v) if v else None for k, v in
              (("min_shape", args.min_shape), ("opt_shape", args.opt_shape), ("max_shape", args.max_shape))}
    path = build_engine(args.onnx, args.output, precision=precision, calib_dir=args.calib,
                        timing_cache=args.timing_cache, workspace_gb=args.workspace, plugins=args.plugins,
                        force=args.force, **shapes)
    print(f"wrote {path} ({'weak typing, ' + precision if precision != 'fp32' else 'strongly typed'}) and {path}.json")
    return 0


def run_pipeline_cmd(args: argparse.Namespace) -> int:
    _setup_logging(args)
    from m2f.export.pipeline import run_pipeline

    target = "tensorrt" if args.tensorrt else "onnxruntime"
    record = run_pipeline(args.checkpoint, args.workdir, tensorrt=args.tensorrt, force=args.force, preset=args.preset,
                          height=args.height, width=args.width, batch=args.batch, dynamic=args.dynamic,
                          msda=args.msda or MSDA_DEFAULT_FOR_TARGET[target],
                          masked_attn=args.masked_attn or MASKED_ATTN_DEFAULT_FOR_TARGET[target])
    for st in record["stages"]:
        print(f"{st['stage']:>12}: {st['status']} ({st['seconds']} s){'  -> ' + st['artifact'] if 'artifact' in st else ''}")
    print(f"{args.workdir}/pipeline.json: verdict {record['verdict']}")
    return 0 if record["verdict"] == "pass" else 1


def run_triton_repo(args: argparse.Namespace) -> int:
    from m2f.errors import InputError
    from m2f.export.triton_repo import write_triton_repo

    if args.ensemble:
        from m2f.export.triton_ensemble import write_triton_ensemble

        target = write_triton_ensemble(args.model, args.output, name=args.name, max_batch=args.max_batch,
                                       instance_count=args.instances, instance_kind=args.instance_kind,
                                       task=args.task, config=args.config, force=args.force)
        print(f"wrote the Triton repository {target}: {', '.join(sorted(p.name for p in target.iterdir()))}")
        return 0
    if args.task is not None or args.config is not None:
        raise InputError("--task and --config describe the ensemble's post-processing; add --ensemble")
    target = write_triton_repo(args.model, args.output, name=args.name, max_batch=args.max_batch,
                               instance_count=args.instances, force=args.force, instance_kind=args.instance_kind)
    print(f"wrote {target}/config.pbtxt and {target}/1/")
    return 0

