"""``m2f bench``: kernel and end-to-end benchmarks (JSON + markdown + PNG with device, versions, git sha)."""
from __future__ import annotations

import argparse
import importlib

from m2f.cli.exported import add_exported_model_options, exported_targets
from m2f.errors import InputError

# op name -> module under m2f.bench providing ``run(...) -> list[BenchRow]`` and ``plot(rows, path)``.
KERNEL_SUITES = {"ms_deform_attn": "m2f.bench.ms_deform_attn", "masked_attention": "m2f.bench.masked_attention"}
DEFAULT_SIZES = "512x512,800x1344,1024x1024"
MODEL_BACKENDS = ("hf-eager", "m2f-torch", "m2f-triton", "m2f-triton-compile", "onnxruntime")  # = bench.model.BACKENDS


def register(sub: argparse._SubParsersAction) -> None:
    from m2f.cli.options import (add_checkpoint_option, add_device_option, add_out_option, add_quiet_option,
                                 add_threads_option)

    p = sub.add_parser("bench", help="benchmark the kernels or the whole model")
    bsub = p.add_subparsers(dest="suite", metavar="SUITE")
    bsub.required = True
    k = bsub.add_parser("kernels", help="one attention op against its baselines at Mask2Former's real shapes")
    k.add_argument("--op", choices=[*KERNEL_SUITES, "all"], default="all", help="the attention op to benchmark")
    k.add_argument("--sizes", default=DEFAULT_SIZES, help="input image sizes HxW, comma-separated")
    k.add_argument("--batch", default="1,8", help="batch sizes, comma-separated")
    k.add_argument("--dtype", default="float32,bfloat16,float16", help="dtypes, comma-separated")
    k.add_argument("--no-backward", action="store_true", help="time the forward pass only")
    add_device_option(k, "; on cpu only the torch baselines run")
    add_out_option(k, "results directory", default="bench/results", old=("--output",))
    add_threads_option(k)
    k.set_defaults(func=run_kernels)

    m = bsub.add_parser("model", help="end-to-end latency, throughput and memory: HF eager vs m2f backends vs ORT")
    m.add_argument("--models", default="r50-coco-panoptic,swin-t-coco-panoptic",
                   help="presets, comma-separated (see `m2f presets`)")
    m.add_argument("--config", default=None,
                   help="a custom m2f config (JSON file, or inline JSON) benchmarked instead of the presets")
    m.add_argument("--sizes", default=DEFAULT_SIZES, help="input sizes HxW, multiples of 32")
    m.add_argument("--batch", default="1,8", help="batch sizes, comma-separated")
    m.add_argument("--dtype", default="float32,bfloat16", help="float32 and/or bfloat16, comma-separated")
    m.add_argument("--backends", default=",".join(MODEL_BACKENDS),
                   help=f"comma-separated, from {', '.join(MODEL_BACKENDS)}")
    m.add_argument("--compile-batches", default="1", help="batches timed with m2f-triton-compile")
    m.add_argument("--onnx-batches", default="1", help="batches exported and timed with onnxruntime")
    add_device_option(m, "; on cpu only hf-eager and m2f-torch run")
    add_out_option(m, "results directory", default="bench/results", old=("--output",))
    m.add_argument("--warmup-ms", type=float, default=50.0, help="warm-up per timing, in ms")
    m.add_argument("--rep-ms", type=float, default=200.0, help="measurement window per timing, in ms")
    m.add_argument("--budget-s", type=float, default=None,
                   help="start no new backend after this many seconds (the rest is listed as skipped)")
    m.add_argument("--seed", type=int, default=None, help="seed of the weights and inputs (default: fresh)")
    add_threads_option(m)
    add_quiet_option(m, "progress bar", old=("--no-progress",))
    add_exported_model_options(m, what="benchmark it against its PyTorch model (CPU, its export size)")
    add_checkpoint_option(m, "with exported models, the PyTorch model they came from",
                          default="their manifest's source")
    m.set_defaults(func=run_model)

    s = bsub.add_parser("serve", help="`m2f serve` under load on loopback: throughput, p50 / p99 latency, batch "
                        "sizes, with and without batching, on one and two replicas")
    add_checkpoint_option(s, "model to serve", default="the shipped default model")
    s.add_argument("--clients", type=int, default=8, help="concurrent clients (8)")
    s.add_argument("--requests", type=int, default=96, help="requests per setting (96)")
    s.add_argument("--replicas", default="1,2", help="replica counts, comma-separated (1,2)")
    s.add_argument("--max-batch", type=int, default=8, help="largest batch of the batching settings (8)")
    s.add_argument("--batch-wait-ms", type=float, default=20.0, help="longest wait to fill a batch (20)")
    s.add_argument("--threads", type=int, default=1, help="CPU threads per replica (1)")
    s.add_argument("--out", default="bench/results", help="results directory (bench/results)")
    s.set_defaults(func=run_serve)

    r = bsub.add_parser("report", help="regenerate README.md's performance table from bench/results/*.json")
    r.add_argument("--results", default="bench/results", help="directory of result JSON files")
    r.add_argument("--readme", default="README.md", help="file with the perf-table markers")
    r.set_defaults(func=run_report)


def parse_sizes(text: str) -> list[tuple[int, int]]:
    sizes = []
    for item in text.split(","):
        try:
            h, w = (int(x) for x in item.lower().split("x"))
        except ValueError:
            raise InputError(f"bad size {item!r}: write sizes as HxW, e.g. 800x1344") from None
        if h <= 0 or w <= 0:
            raise InputError(f"bad size {item!r}: height and width must be positive")
        sizes.append((h, w))
    return sizes


def parse_ints(text: str, what: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",")]
    except ValueError:
        raise InputError(f"bad {what} list {text!r}: write integers separated by commas, e.g. 1,8") from None
    if any(v <= 0 for v in values):
        raise InputError(f"bad {what} list {text!r}: values must be positive")
    return values


def parse_dtypes(text: str) -> list:
    import torch

    names = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
             "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    try:
        return [names[x.strip().lower()] for x in text.split(",")]
    except KeyError as exc:
        raise InputError(f"unknown dtype {exc.args[0]!r}; choose from float32, float16, bfloat16") from None


def check_device(name: str):
    import torch

    from m2f import runtime

    if name == "auto":
        name = runtime.resolve_device(name)
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise InputError("no CUDA GPU found: GPU benchmarks need one (pass --device cpu for the torch baselines)")
    return torch.device(name)


def run_kernels(args: argparse.Namespace) -> int:
    from m2f import runtime
    from m2f.bench.common import environment, write_results

    runtime.use_threads(args.threads)
    sizes, batches = parse_sizes(args.sizes), parse_ints(args.batch, "batch")
    dtypes, device = parse_dtypes(args.dtype), check_device(args.device)
    ops = list(KERNEL_SUITES) if args.op == "all" else [args.op]
    env = environment()
    for op in ops:
        suite = importlib.import_module(KERNEL_SUITES[op])
        rows = suite.run(sizes=sizes, batches=batches, dtypes=dtypes, device=device, backward=not args.no_backward)
        paths = write_results(rows, args.out, suite=f"kernels-{op}", title=f"{op} kernel benchmark", env=env,
                              plot=suite.plot)
        print(paths["md"].read_text())
        print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


def parse_backends(text: str) -> list[str]:
    names = [x.strip() for x in text.split(",") if x.strip()]
    unknown = [n for n in names if n not in MODEL_BACKENDS]
    if unknown or not names:
        raise InputError(f"unknown backend {', '.join(unknown) or repr(text)}; choose from {', '.join(MODEL_BACKENDS)}")
    return names


def parse_models(args: argparse.Namespace) -> list:
    """[(case name, Mask2FormerConfig)] from --config (a JSON file or inline JSON) or --models (preset names)."""
    from pathlib import Path

    from m2f.config import Mask2FormerConfig, preset, preset_names
    from m2f.errors import M2FError
    from m2f.io import parse_json

    if args.config:
        text = args.config
        if not text.lstrip().startswith("{"):
            path = Path(text)
            if not path.is_file():
                raise InputError(f"--config {text}: no such file; pass a JSON config file (or inline JSON)")
            text = path.read_text(encoding="utf-8")
        try:
            cfg = Mask2FormerConfig.from_dict(parse_json(text, "--config"))
        except (ValueError, M2FError) as exc:
            raise InputError(f"--config is not an m2f config: {' '.join(str(exc).split())}") from None
        return [(cfg.name or "custom", cfg)]
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    unknown = [n for n in names if n not in preset_names()]
    if unknown or not names:
        raise InputError(f"unknown model {', '.join(unknown) or repr(args.models)}; choose presets from `m2f presets`")
    return [(n, preset(n)) for n in names]


def run_exported(args: argparse.Namespace, paths: list[str]) -> int:
    """``m2f bench model --onnx / --openvino / --engine``: each exported model and its PyTorch model, one run."""
    from pathlib import Path

    from m2f.bench import model as bench_model
    from m2f.export.manifest import read_manifest
    from m2f.export.onnx_export import load_checkpoint_model
    from m2f.export.runner import open_runner
    from m2f.export.targets import for_artifact

    manifests = [read_manifest(p) for p in paths]
    shapes = {(m.batch, m.height, m.width) for m in manifests}
    if len(shapes) > 1:
        raise InputError(f"the exported models have different export sizes {sorted(shapes)}; benchmark models "
                         "exported at one size together")
    batch, height, width = shapes.pop()
    source = args.checkpoint or (manifests[0].source or {}).get("path")
    if not source:
        raise InputError(f"{paths[0]} names no source checkpoint; pass --checkpoint")
    model = load_checkpoint_model(source, preset=(manifests[0].source or {}).get("preset"))
    runners = [(for_artifact(p).name, open_runner(p)) for p in paths]
    result = bench_model.run_exported(model, runners, model.config.name or Path(source).name, batch, height, width,
                                      warmup_ms=args.warmup_ms, rep_ms=args.rep_ms, seed=args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    written = bench_model.write(result, out, settings={"exported": paths, "checkpoint": str(source)},
                                with_plot=False)
    print(written["md"].read_text())
    print("wrote " + ", ".join(str(p) for p in written.values()))
    return 0


def run_model(args: argparse.Namespace) -> int:
    import torch

    from m2f import runtime
    from m2f.bench import model as bench_model
    from m2f.bench.common import environment

    exported = [getattr(args, t.flag) for t in exported_targets() if getattr(args, t.flag, None)]
    if exported:
        return run_exported(args, exported)

    sizes, batches = parse_sizes(args.sizes), parse_ints(args.batch, "batch")
    dtypes = parse_dtypes(args.dtype)
    if torch.float16 in dtypes:
        raise InputError("the model benchmark runs float32 and bfloat16 only; drop float16 from --dtype")
    backends = parse_backends(args.backends)
    compile_batches = parse_ints(args.compile_batches, "--compile-batches")
    onnx_batches = parse_ints(args.onnx_batches, "--onnx-batches")
    models = parse_models(args)
    device = check_device(args.device)
    runtime.use_threads(args.threads)
    if args.rep_ms <= 0 or args.warmup_ms < 0:
        raise InputError("--rep-ms must be positive and --warmup-ms not negative")
    import os
    from pathlib import Path

    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"cannot create the results directory {out} ({exc.strerror}); pass a writable --out") from None
    seed = args.seed if args.seed is not None else int.from_bytes(os.urandom(4), "little") % 2**31
    env = environment()
    settings = {"models": [n for n, _ in models], "sizes": [f"{h}x{w}" for h, w in sizes], "batches": batches,
                "dtypes": [str(d).replace("torch.", "") for d in dtypes], "backends": backends,
                "compile_batches": compile_batches, "onnx_batches": onnx_batches, "warmup_ms": args.warmup_ms,
                "rep_ms": args.rep_ms, "seed": seed,
                # float32 convolutions use TF32 on Ampere+ unless disabled: it sets the float32 rows' error level
                "tf32": {"matmul": torch.backends.cuda.matmul.allow_tf32, "cudnn": torch.backends.cudnn.allow_tf32}}

    def partial(result) -> None:  # written after every backend group: a run killed by a time limit keeps its rows
        bench_model.write(result, out, env=env, settings=settings, with_plot=False)

    result = bench_model.run(models, sizes, batches, dtypes, backends, device, compile_batches=compile_batches,
                             onnx_batches=onnx_batches, warmup_ms=args.warmup_ms, rep_ms=args.rep_ms, seed=seed,
                             budget_s=args.budget_s, progress=not args.quiet, on_update=partial)
    paths = bench_model.write(result, out, env=env, settings=settings)
    print(paths["md"].read_text())
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


def run_serve(args: argparse.Namespace) -> int:
    import math
    from pathlib import Path

    from m2f.errors import BackendUnavailableError

    replicas = parse_ints(args.replicas, "--replicas")
    for name in ("clients", "requests", "threads"):
        if getattr(args, name) < 1:
            raise InputError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.max_batch < 2:
        raise InputError("--max-batch must be >= 2: the batching settings are compared with max batch 1")
    if not math.isfinite(args.batch_wait_ms) or args.batch_wait_ms < 0:
        raise InputError(f"--batch-wait-ms {args.batch_wait_ms} must be a finite number >= 0")
    try:
        import ray.serve  # noqa: F401
    except ImportError:
        raise BackendUnavailableError("m2f bench serve needs Ray Serve; pip install 'm2f[serve]'") from None
    from rich.console import Console

    from m2f.assets import default_checkpoint_path, sample_images
    from m2f.bench import serve as bench_serve
    from m2f.bench.common import environment
    from m2f.serve.app import ModelSpec, load_predictor

    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"cannot create the results directory {out} ({exc.strerror}); pass a writable --out") from None
    spec = ModelSpec(checkpoint=args.checkpoint or str(default_checkpoint_path()), threads=args.threads)
    model = load_predictor(spec).config.name  # a bad checkpoint is one line here, before Ray starts
    bodies = [path.read_bytes() for path in sample_images()]
    settings = [bench_serve.Setting(n, b) for n in replicas for b in (1, args.max_batch)]
    rows = bench_serve.run(spec, settings, args.clients, args.requests, args.batch_wait_ms, bodies)
    env = environment()
    title = (f"m2f serve, {model} on {env['device']}: {args.clients} clients, {args.requests} requests, "
             f"{args.threads} thread(s) per replica")
    paths = bench_serve.write(rows, out, env, title=title, settings={
        "model": model, "checkpoint": spec.checkpoint, "clients": args.clients, "requests": args.requests,
        "replicas": replicas, "max_batch": args.max_batch, "batch_wait_ms": args.batch_wait_ms,
        "threads": args.threads, "images": [p.name for p in sample_images()]})
    Console(width=120).print(bench_serve.table(rows, title))
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


def run_report(args: argparse.Namespace) -> int:
    from m2f.bench.report import END, START, perf_tables, update_readme

    table = perf_tables(args.results)
    if update_readme(args.readme, table):
        print(f"updated the performance table in {args.readme}")
        return 0
    print(table)
    print(f"{args.readme} has no {START} ... {END} markers: put both (each on its own line) where the table belongs, "
          "then run `m2f bench report` again")
    return 0
