"""``m2f serve``: an HTTP API for a model on Ray Serve (``pip install 'm2f[serve]'``).

POST /predict with image bytes (Content-Type image/* or application/octet-stream) or a multipart form's 'image'
file: segments as JSON (task, labels, names, scores, COCO RLE masks); ?overlay=1 adds the overlay PNG (base64).
GET /health, GET /metadata. Concurrent requests are batched (--max-batch, --batch-wait-ms). Ctrl-C / SIGTERM stops
the server cleanly. On a Ray cluster (RAY_ADDRESS set, or --ray-address), the replicas spread over its nodes.
"""
from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    from m2f.cli.options import add_checkpoint_option

    p = sub.add_parser("serve", help="serve a model over HTTP (Ray Serve, dynamic batching)", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    source = p.add_mutually_exclusive_group()
    add_checkpoint_option(source, "model to serve", default="the shipped default model")
    source.add_argument("--onnx", help="an `m2f export` ONNX graph (run by onnxruntime)")
    source.add_argument("--engine", help="a TensorRT engine (needs tensorrt and a CUDA GPU)")
    p.add_argument("--config", help="config JSON for an --onnx graph or --engine without its export manifest")
    p.add_argument("--task", choices=("panoptic", "instance", "semantic"), help="default: the model's")
    p.add_argument("--replicas", type=int, default=1, help="model replicas, one model each (1)")
    p.add_argument("--max-batch", type=int, default=8, help="largest batch of concurrent requests (8)")
    p.add_argument("--batch-wait-ms", type=float, default=10.0, help="longest wait to fill a batch (10)")
    p.add_argument("--gpus-per-replica", type=float, default=None,
                   help="GPUs each replica reserves in Ray (default: 1 for --engine, else 0; 0.5 puts two on one)")
    p.add_argument("--threads", type=int, help="CPU threads per replica (default: the runtime's choice)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (127.0.0.1; 0.0.0.0 for all)")
    p.add_argument("--port", type=int, default=8000, help="port (8000)")
    p.add_argument("--ray-address", help="an existing Ray cluster (default: RAY_ADDRESS, else a local one)")
    p.set_defaults(func=run)


def check_args(args: argparse.Namespace) -> None:
    import math

    from m2f.errors import InputError

    for name in ("replicas", "max_batch"):
        if getattr(args, name) < 1:
            raise InputError(f"--{name.replace('_', '-')} must be >= 1")
    if not math.isfinite(args.batch_wait_ms) or args.batch_wait_ms < 0:
        raise InputError(f"--batch-wait-ms {args.batch_wait_ms} must be a finite number >= 0")
    if not 0 < args.port < 65536:
        raise InputError(f"--port {args.port} is not a TCP port (1..65535)")
    if args.threads is not None and args.threads < 1:
        raise InputError("--threads must be >= 1")
    if args.gpus_per_replica is not None and not (math.isfinite(args.gpus_per_replica) and args.gpus_per_replica >= 0):
        raise InputError(f"--gpus-per-replica {args.gpus_per_replica} must be a finite number >= 0")


def run(args: argparse.Namespace) -> int:
    import signal
    import threading

    from m2f.errors import BackendUnavailableError

    check_args(args)
    try:
        import ray
        from ray import serve
    except ImportError:
        raise BackendUnavailableError("m2f serve needs Ray Serve; pip install 'm2f[serve]'") from None
    from m2f.serve.app import ModelSpec, build_app, load_predictor

    if args.checkpoint is None and args.onnx is None and args.engine is None:
        from m2f.assets import default_checkpoint_path

        args.checkpoint = str(default_checkpoint_path())
    spec = ModelSpec(checkpoint=args.checkpoint, onnx=args.onnx, engine=args.engine, config=args.config,
                     threads=args.threads)
    load_predictor(spec)  # a bad model is one line here, not a replica that keeps failing to start
    ray.init(address=args.ray_address, include_dashboard=False, log_to_driver=False)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": args.host, "port": args.port})
        serve.run(build_app(spec, args.replicas, args.max_batch, args.batch_wait_ms, args.task,
                            args.gpus_per_replica), route_prefix="/")
        print(f"serving on http://{args.host}:{args.port} (POST /predict, GET /health, GET /metadata); "
              "Ctrl-C stops", flush=True)
        stop.wait()
    finally:
        serve.shutdown()
        ray.shutdown()
    print("stopped")
    return 0
