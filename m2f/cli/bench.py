"""``m2f bench``: kernel and end-to-end benchmarks (JSON + markdown + PNG with device, versions, git sha)."""
from __future__ import annotations

import argparse
import importlib

from m2f.errors import InputError

# op name -> module under m2f.bench providing ``run(...) -> list[BenchRow]`` and ``plot(rows, path)``.
KERNEL_SUITES = {"ms_deform_attn": "m2f.bench.ms_deform_attn", "masked_attention": "m2f.bench.masked_attention"}
DEFAULT_SIZES = "512x512,800x1344,1024x1024"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="benchmark the kernels or the whole model")
    bsub = p.add_subparsers(dest="suite", metavar="SUITE")
    bsub.required = True
    k = bsub.add_parser("kernels", help="one attention op against its baselines at Mask2Former's real shapes")
    k.add_argument("--op", choices=[*KERNEL_SUITES, "all"], default="all")
    k.add_argument("--sizes", default=DEFAULT_SIZES, help=f"input image sizes HxW, comma-separated ({DEFAULT_SIZES})")
    k.add_argument("--batch", default="1,8", help="batch sizes, comma-separated (1,8)")
    k.add_argument("--dtype", default="float32,bfloat16,float16", help="dtypes, comma-separated")
    k.add_argument("--no-backward", action="store_true", help="time the forward pass only")
    k.add_argument("--device", default="cuda", help="cuda (default) or cpu (torch baselines only)")
    k.add_argument("--out", default="bench/results", help="results directory (bench/results)")
    k.set_defaults(func=run_kernels)


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

    if name.startswith("cuda") and not torch.cuda.is_available():
        raise InputError("no CUDA GPU found: GPU benchmarks need one (pass --device cpu for the torch baselines)")
    return torch.device(name)


def run_kernels(args: argparse.Namespace) -> int:
    from m2f.bench.common import environment, write_results

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
