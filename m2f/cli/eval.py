"""``m2f eval``: score a model on a dataset (PQ / mIoU / mask AP), or two backends against each other.

Without --checkpoint / an exported model (--onnx, --openvino, --engine) it scores the shipped default model. With a
--reference-* model, the reference's predictions are the ground truth (e.g. an ONNX export against PyTorch).
"""
from __future__ import annotations

import argparse
from pathlib import Path

from m2f.cli.exported import add_exported_model_options, exported_config, exported_model


def register(sub: argparse._SubParsersAction) -> None:
    from m2f.cli.options import add_checkpoint_option, add_device_option, add_quiet_option, add_threads_option

    p = sub.add_parser("eval", help="score a model on a dataset: PQ (panoptic), mIoU (semantic), mask AP (instance)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="dataset folder (see `m2f data --help` for the layouts)")
    p.add_argument("--format", choices=("panoptic", "instance", "semantic"), help="dataset format (default: detect)")
    src = p.add_mutually_exclusive_group()
    add_checkpoint_option(src, "model to score", default="the shipped default model")
    add_exported_model_options(src)
    ref = p.add_mutually_exclusive_group()
    add_checkpoint_option(ref, "treat this model's predictions as the ground truth", name="--reference-checkpoint")
    add_exported_model_options(ref, prefix="reference-", what="treat its predictions as the ground truth")
    p.add_argument("--config", help="config JSON for an exported model (default: from its `m2f export` manifest, "
                   "else m2f_config.json beside it)")
    p.add_argument("--preset", help="architecture preset for checkpoints that carry no config")
    p.add_argument("--task", choices=("panoptic", "semantic", "instance"), help="default: the model's own task")
    p.add_argument("--json", metavar="FILE", help="write the metrics to this JSON file")
    p.add_argument("--force", action="store_true", help="overwrite an existing --json file")
    p.add_argument("--limit", type=int, metavar="N", help="only the first N images")
    p.add_argument("--resize-shortest", type=int, help="test-time resize of the short edge (default: none)")
    p.add_argument("--max-size", type=int, help="with --resize-shortest: cap of the long edge")
    add_device_option(p, " (PyTorch models)")
    p.add_argument("--backend", default="torch", choices=("torch", "triton", "auto"), help="attention ops")
    add_threads_option(p)
    add_quiet_option(p, "progress bar")
    p.set_defaults(func=run)


def _predictor(checkpoint: str | None, exported: str | None, args, *, default: bool):
    from m2f.evaluation.evaluate import RunnerPredictor, TorchPredictor

    if exported:
        from m2f.export.runner import open_runner
        from m2f.runtime import threads

        return RunnerPredictor(open_runner(exported, threads=threads()), exported_config(exported, args.config))
    if checkpoint is None and default:
        from m2f.assets import default_checkpoint_path

        checkpoint = str(default_checkpoint_path())
    from m2f.checkpoints import resolve_checkpoint

    checkpoint = str(resolve_checkpoint(checkpoint))  # a hub id: its downloaded snapshot
    from m2f.train.loop import is_run_checkpoint, model_from_run

    if is_run_checkpoint(checkpoint):  # a training run in progress: RUN_DIR or one of its state files
        model = model_from_run(checkpoint, backend=args.backend, device=args.device)
        return TorchPredictor(model, model.config, name=checkpoint, device=args.device)
    from m2f.checkpoints import from_pretrained

    model = from_pretrained(checkpoint, preset=args.preset, backend=args.backend, device=args.device)
    return TorchPredictor(model, model.config, name=checkpoint, device=args.device)


def run(args: argparse.Namespace) -> int:
    from m2f import runtime
    from m2f.data.datasets import open_dataset
    from m2f.errors import InputError
    from m2f.evaluation.evaluate import evaluate, format_table
    from m2f.io import check_can_write, write_json_atomic

    if args.limit is not None and args.limit < 1:
        raise InputError("--limit must be >= 1")
    runtime.use_threads(args.threads)
    args.device = runtime.resolve_device(args.device)
    if args.json:
        json_path = Path(args.json)
        if json_path.is_dir():
            raise InputError(f"--json {json_path} is a folder; pass a file name")
        check_can_write(json_path, force=args.force)  # before the work: an earlier run's metrics are not lost
    dataset = open_dataset(args.data, format=args.format)
    predictor = _predictor(args.checkpoint, exported_model(args), args, default=True)
    reference = None
    reference_exported = exported_model(args, prefix="reference_")
    if args.reference_checkpoint or reference_exported:
        reference = _predictor(args.reference_checkpoint, reference_exported, args, default=False)
    task = args.task or predictor.config.default_task
    result = evaluate(dataset, predictor, task, reference=reference, limit=args.limit,
                      resize_shortest=args.resize_shortest, max_size=args.max_size, progress=not args.quiet)
    result["model"] = predictor.name
    result["data"] = str(args.data)
    if reference is not None:
        result["reference"] = reference.name
    print(format_table(result))
    if args.json:
        write_json_atomic(args.json, _finite_or_null(result))
    return 0


def _finite_or_null(obj):
    """NaN (a metric over nothing, e.g. no stuff classes) becomes null: strict JSON has no NaN."""
    import math

    if isinstance(obj, dict):
        return {k: _finite_or_null(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite_or_null(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj
