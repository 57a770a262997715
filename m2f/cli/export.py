"""``m2f export``: ONNX with verified parity, then one stage per export target that builds its own artifact
(TensorRT engines, OpenVINO IR, ...: :mod:`m2f.export.targets`), Triton Inference Server repositories.

    m2f export onnx --checkpoint CKPT --output m2f.onnx [--height 512 --width 512] [--dynamic] [--target tensorrt]
    m2f export check m2f.onnx [--report report.json]
    m2f export tensorrt --onnx m2f.onnx --output m2f.engine [--fp16] [--min-shape 1x3x512x512 ...]
    m2f export openvino --checkpoint CKPT --output m2f_openvino [--precision fp16] [--dynamic]
    m2f export triton-repo --model m2f.onnx --output model_repository [--max-batch 8] [--ensemble]

Each stage writes its file atomically with a manifest beside it (``FILE.json``; ``DIR/manifest.json`` for a
directory); nothing is overwritten without ``--force`` and a failed stage leaves no file behind.
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

from m2f.errors import InputError
from m2f.export import targets
from m2f.export.plugins import PLUGINS


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def register(sub: argparse._SubParsersAction) -> None:
    from m2f.cli.options import add_checkpoint_option, add_out_option, add_quiet_option, add_threads_option

    p = sub.add_parser("export", help=f"export to ONNX, {', '.join(t.name for t in targets.all_targets() if t.build)}, "
                                      "Triton Inference Server, with verification")
    esub = p.add_subparsers(dest="export_command", metavar="STAGE")
    esub.required = True

    o = esub.add_parser("onnx", help="export a checkpoint to ONNX (+ manifest)")
    add_checkpoint_option(o, "model to export", required=True)
    add_out_option(o, "ONNX file to write", required=True, dest="output", old=("--output",))
    add_export_size_options(o)
    o.add_argument("--precision", default="fp32", choices=("fp32", "fp16", "bf16", "int8"),
                   help="precision in the graph: fp16 / bf16 mixed precision (statistics, sampling and thresholds "
                        "float32); int8 explicit Q/DQ, calibrated on --calib")
    o.add_argument("--calib", default=None, metavar="DIR",
                   help="folder of representative images for --precision int8 (ranges cached in OUTPUT.calib.json)")
    o.add_argument("--calib-images", type=_int, default=64, help="calibrate on at most N images")
    _add_target_and_op_options(o)
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

    c = esub.add_parser("check", help="structure, target op support and parity against PyTorch of an exported model")
    c.add_argument("file", help="a model written by `m2f export` (.onnx file, engine, OpenVINO directory)")
    add_checkpoint_option(c, "model to compare against", default="the manifest's source")
    c.add_argument("--report", default=None, help="write the JSON report here")
    c.add_argument("--force", action="store_true", help="overwrite an existing report")
    c.add_argument("--seed", type=int, default=None,
                   help="seed of the random check inputs (default: drawn from torch's generator; printed and in the report)")
    add_threads_option(c)
    add_quiet_option(c)
    c.set_defaults(func=run_check)

    for target in targets.all_targets():
        if target.add_cli is not None:
            t = esub.add_parser(target.name, help=f"build: {target.description}")
            target.add_cli(t)
            add_threads_option(t)
            add_quiet_option(t)
            t.set_defaults(func=run_target, target=target.name)

    w = esub.add_parser("pipeline", help="export -> check [-> build -> run -> compare] in one work dir")
    add_checkpoint_option(w, "model to export", required=True)
    add_out_option(w, "folder for every stage's artifact + pipeline.json", required=True, dest="workdir",
                   old=("--workdir",))
    add_export_size_options(w)
    _add_target_and_op_options(w)
    w.add_argument("--tensorrt", dest="target", action="store_const", const="tensorrt",
                   help="same as --target tensorrt: also build an fp16 engine, run it and compare")
    w.add_argument("--force", action="store_true", help="replace an existing work dir")
    add_threads_option(w)
    add_quiet_option(w)
    w.set_defaults(func=run_pipeline_cmd)

    r = esub.add_parser("triton-repo", help="a Triton Inference Server model repository from an .onnx / .engine")
    r.add_argument("--model", required=True, help="an exported model Triton serves (.onnx, .engine, .plan)")
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


def add_export_size_options(p: argparse.ArgumentParser) -> None:
    """What every export from a checkpoint takes: its preset, the input size and batch, dynamic axes."""
    p.add_argument("--preset", default=None, help="architecture preset when the checkpoint has no config")
    p.add_argument("--height", type=_int, default=512, help="input height, a multiple of 32")
    p.add_argument("--width", type=_int, default=512, help="input width, a multiple of 32")
    p.add_argument("--batch", type=_int, default=1, help="batch size of the export")
    p.add_argument("--dynamic", action="store_true", help="symbolic batch, height and width")


def _add_target_and_op_options(p: argparse.ArgumentParser) -> None:
    names = targets.names()
    p.add_argument("--target", default="onnxruntime",
                   help=f"the runtime the graph is for: {', '.join(names)} (onnxruntime); sets the op defaults")
    for spec in PLUGINS:
        defaults = ", ".join(f"{spec.plugin_mode if t.op_modes.get(spec.name) == spec.plugin_mode else spec.modes[0]} "
                             f"for {t.name}" for t in targets.all_targets())
        p.add_argument(spec.flag, dest=spec.name, default=None,
                       help=f"{spec.what.split(' (')[0]}s as {spec.modes[0]!r} ops or one {spec.node.key} "
                            f"{spec.plugin_mode!r} node each (default: {defaults})")


def _op_modes(args: argparse.Namespace) -> dict[str, str | None]:
    return {spec.name: getattr(args, spec.name) for spec in PLUGINS}


def run_onnx(args: argparse.Namespace) -> int:
    _setup_logging(args)
    from m2f.export.onnx_export import export_checkpoint
    from m2f.export.precision import CalibrationSettings

    if args.calib_images < 1:
        raise InputError(f"--calib-images must be >= 1, got {args.calib_images}")
    calib = CalibrationSettings(Path(args.calib), limit=args.calib_images) if args.calib else None
    targets.get(args.target)  # an unknown target fails before the checkpoint loads
    result = export_checkpoint(
        args.checkpoint, args.output, preset=args.preset, height=args.height, width=args.width, batch=args.batch,
        dynamic=args.dynamic, precision=args.precision, calib=calib, postprocess=args.postprocess, opset=args.opset,
        simplify=not args.no_simplify, optimize=not args.no_optimize, force=args.force, target=args.target,
        **_op_modes(args),
    )
    m = result.manifest
    ops = ", ".join(f"{name}={r.mode}" + (f" ({r.nodes} plugin nodes)" if r.mode == "plugin" else "")
                    for name, r in m.ops.items())
    print(f"wrote {result.path} (opset {m.opset}, {m.precision}, {m.dtype} I/O, {ops}, "
          f"{'dynamic' if m.dynamic else 'static'} {m.batch}x3x{m.height}x{m.width}, "
          f"{result.seconds:.1f} s) and {result.manifest_path}")
    if args.check:
        from m2f.export.check import check_onnx

        return _print_check(check_onnx(result.path, checkpoint=args.checkpoint))
    return 0


def _print_check(report) -> int:
    summary = []
    if report.structure:
        summary.append(f"{report.structure['num_nodes']} nodes, opset {report.opset}, checker "
                       f"{'ok' if report.structure['checker']['ok'] else 'FAILED'}")
    for name, support in report.targets.items():
        summary.append(f"{name} ops " + ("ok" if support["ok"] else "UNSUPPORTED " + ",".join(support["unsupported_ops"])))
    print(f"{report.file}: {report.verdict}  ({report.target}{'; ' if summary else ''}{', '.join(summary)})")
    precision = (report.manifest or {}).get("precision")
    if precision:
        runs = report.parity.get("runs")
        print(f"  precision {precision}: compared with the float32 PyTorch model"
              + (f" ({runs[0]['runtime']}, inputs of --seed {runs[0]['seed']})" if runs else ""))
    if "skipped" in report.parity:
        print(f"  parity: skipped - {report.parity['skipped']}")
    for run in report.parity.get("runs", []):
        errs = ", ".join(f"{k}={v['rel_err']:.2e}" if "rel_err" in v else f"{k} mismatch={v.get('mismatch', 0):.2%}"
                         for k, v in run["outputs"].items())
        if run.get("semantic_agreement") is not None:
            errs += f", semantic agreement {run['semantic_agreement']:.2%}"
        print(f"  {run['batch']}x3x{run['height']}x{run['width']}: {errs}")
    for info in report.plugins.values():
        print(f"  {info['count']} {info['op_type']} nodes")
    for reason in report.reasons:
        print(f"  FAIL: {reason}")
    return 0 if report.verdict == "pass" else 1


def run_check(args: argparse.Namespace) -> int:
    _setup_logging(args)
    from m2f.export.check import check_model

    report = check_model(args.file, checkpoint=args.checkpoint, report=args.report, seed=args.seed, force=args.force)
    code = _print_check(report)
    if args.report:
        print(f"report: {args.report}")
    return code


def run_target(args: argparse.Namespace) -> int:
    _setup_logging(args)
    from m2f.export.manifest import read_manifest

    path = targets.get(args.target).run_cli(args)
    manifest = read_manifest(path)
    typing = manifest.details.get("typing")  # TensorRT: "strong" (the graph's own types) or "weak" (10.x flags)
    how = {"strong": ", strongly typed", "weak": ", weak typing"}.get(typing, "")
    print(f"wrote {path} ({args.target}, {manifest.precision}{how}) and its manifest")
    return 0


def run_pipeline_cmd(args: argparse.Namespace) -> int:
    _setup_logging(args)
    from m2f.export.pipeline import run_pipeline

    target = targets.get(args.target)
    record = run_pipeline(args.checkpoint, args.workdir, target=target.name, build_options=dict(target.pipeline_build),
                          force=args.force, preset=args.preset, height=args.height, width=args.width,
                          batch=args.batch, dynamic=args.dynamic, **_op_modes(args))
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

