"""``m2f train``: train or fine-tune Mask2Former on a COCO panoptic / COCO instance / semantic-PNG dataset.

Several GPUs: ``torchrun --nproc_per_node G -m m2f train ...`` (one process per GPU; --batch-size is the total).
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path

_DEFAULTS = {"lr": 1e-4, "weight_decay": 0.05, "backbone_multiplier": 0.1, "clip": 0.01, "warmup_factor": 1.0}


def register(sub: argparse._SubParsersAction) -> None:
    from m2f.cli.options import (add_checkpoint_option, add_device_option, add_out_option, add_quiet_option,
                                 add_threads_option)

    p = sub.add_parser("train", help="train or fine-tune on a dataset (COCO panoptic / instance, semantic PNGs)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="preset name (see `m2f presets`) or a JSON config file (Mask2FormerConfig "
                   "fields, e.g. an m2f_config.json); the label set is taken from the dataset. Not needed with "
                   "--resume (if given, it must be the run's)")
    p.add_argument("--data", required=True, help="dataset folder (see `m2f data --help` for the layouts)")
    p.add_argument("--format", choices=("panoptic", "instance", "semantic"), help="dataset format (default: detect)")
    add_out_option(p, "run folder: checkpoint.json + checkpoint-*.safetensors (training state), log.jsonl, "
                   "log.csv, loss.png, model/", required=True, old=("--output", "--workdir"))
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its training state")
    p.add_argument("--force", action="store_true", help="start a new run even if --out already holds one")
    add_checkpoint_option(p, "start from these weights (tensors whose shape differs, e.g. the class head, stay freshly "
                          "initialised)", name="--init")
    p.add_argument("--iters", type=int, help="total iterations (default: 1000; on --resume: the saved total)")
    p.add_argument("--batch-size", type=int, default=16, help="total batch over all processes")
    p.add_argument("--lr", type=float, default=_DEFAULTS["lr"], help="base learning rate")
    p.add_argument("--weight-decay", type=float, default=_DEFAULTS["weight_decay"], help="AdamW weight decay")
    p.add_argument("--backbone-multiplier", type=float, default=_DEFAULTS["backbone_multiplier"],
                   help="backbone lr multiplier")
    p.add_argument("--clip", type=float, default=_DEFAULTS["clip"],
                   help="full-model gradient-norm clip, 0 = off")
    p.add_argument("--warmup-iters", type=int, default=0, help="linear lr warm-up iterations")
    p.add_argument("--warmup-factor", type=float, default=_DEFAULTS["warmup_factor"],
                   help="lr multiplier at iteration 0 of the warm-up (official: 1.0, i.e. no warm-up)")
    p.add_argument("--input-size", help="training crop HxW (default: the first image's size rounded up to 32)")
    p.add_argument("--scale-range", default="0.1,2.0", help="large-scale-jitter range MIN,MAX")
    p.add_argument("--no-flip", action="store_true", help="no random horizontal flips")
    p.add_argument("--num-points", type=int, default=12544, help="points per mask for matching and losses")
    p.add_argument("--amp", action="store_true", help="mixed precision: bf16 on CPU, fp16 + GradScaler on CUDA")
    add_device_option(p)
    p.add_argument("--backend", default="torch", choices=("torch", "triton", "auto"), help="attention ops")
    p.add_argument("--seed", type=int, default=0, help="seed of weights, data order and augmentation")
    p.add_argument("--checkpoint-every", type=int, default=500, help="save the training state every N iterations")
    p.add_argument("--log-every", type=int, default=10, help="log every N iterations")
    p.add_argument("--workers", type=int, default=0,
                   help="data-loading worker processes (each runs one thread, beside --threads)")
    add_threads_option(p)
    add_quiet_option(p, "progress bar")
    p.set_defaults(func=run)


def _parse_pair(text: str, what: str, cast=float) -> tuple:
    from m2f.errors import InputError

    sep = "x" if what == "--input-size" else ","
    try:
        a, b = (cast(x) for x in text.lower().split(sep))
    except ValueError:
        example = "128x128" if sep == "x" else "0.1,2.0"
        raise InputError(f"bad {what} {text!r}: write it like {example}") from None
    if not (math.isfinite(a) and math.isfinite(b)) or a <= 0 or b <= 0 or (sep == "," and a > b):
        raise InputError(f"bad {what} {text!r}: values must be positive and finite"
                         + (" and MIN <= MAX" if sep == "," else ""))
    return a, b


def load_config(spec: str):
    """A preset name or a JSON file of Mask2FormerConfig fields (an m2f_config.json also works)."""
    from m2f.config import Mask2FormerConfig, preset, preset_names
    from m2f.errors import InputError, M2FError
    from m2f.io import read_json

    path = Path(spec)
    if path.suffix == ".json" or path.exists():
        if not path.is_file():
            raise InputError(f"config file {path} does not exist; pass a preset name or a JSON config file")
        data = read_json(path, fix="fix it or pass a preset name")
        if not isinstance(data, dict):
            raise InputError(f"config file {path} must hold a JSON object of Mask2FormerConfig fields")
        data = data.get("config", data) if isinstance(data.get("config"), dict) else data
        data = {k: v for k, v in data.items() if k not in ("format", "format_version")}  # m2f_config.json markers
        try:
            return Mask2FormerConfig.from_dict(data)
        except M2FError as exc:
            raise InputError(f"config file {path}: {exc}") from None
        except (TypeError, ValueError) as exc:
            raise InputError(f"config file {path} has a bad value ({exc})") from None
    if spec in preset_names():
        return preset(spec)
    raise InputError(f"--config {spec!r} is neither a JSON file nor a preset; presets: `m2f presets`")


def _init_state(spec: str, model_config):
    """State dict for --init: the checkpoint's tensors that fit the new model (shape mismatches dropped)."""
    from m2f.checkpoints import from_pretrained
    from m2f.model import build_model

    source = from_pretrained(spec).state_dict()
    target = build_model(model_config, backend="torch").state_dict()
    state, dropped = {}, []
    for name, tensor in target.items():
        if name in source and source[name].shape == tensor.shape:
            state[name] = source[name]
        else:
            state[name] = tensor
            dropped.append(name)
    if dropped:
        print(f"--init: {len(dropped)} tensors newly initialised (shape differs or missing): "
              + ", ".join(dropped[:6]) + (" ..." if len(dropped) > 6 else ""))
    return state


def run(args: argparse.Namespace) -> int:
    from m2f import runtime
    from m2f.data.datasets import open_dataset
    from m2f.errors import InputError
    from m2f.train.criterion import LossConfig
    from m2f.train.loop import Trainer, TrainOptions, dist_env_from
    from m2f.train.optim import OptimConfig
    from m2f.train.state import MANIFEST, clear_state, has_state

    # validate everything before touching --out
    runtime.use_threads(args.threads)  # the device is resolved by the trainer (auto: cuda when available)
    for name in ("batch_size", "checkpoint_every", "log_every", "num_points"):
        if getattr(args, name) < 1:
            raise InputError(f"--{name.replace('_', '-')} must be >= 1")
    if args.iters is not None and args.iters < 1:
        raise InputError("--iters must be >= 1")
    if args.workers < 0:
        raise InputError("--workers must be >= 0")
    for name, low, strict in (("lr", 0.0, True), ("weight_decay", 0.0, False), ("backbone_multiplier", 0.0, False),
                              ("clip", 0.0, False), ("warmup_factor", 0.0, True)):
        value = getattr(args, name)
        if not math.isfinite(value) or value < low or (strict and value == low):
            flag = "--" + name.replace("_", "-")
            raise InputError(f"{flag} {value} is not a {'positive' if strict else 'non-negative'} finite number; "
                             f"pass e.g. {flag} {_DEFAULTS[name]}")
    if args.warmup_iters < 0:
        raise InputError("--warmup-iters must be >= 0")
    out = Path(args.out)
    env = dist_env_from()
    if args.resume:
        if not has_state(out):
            raise InputError(f"--resume: {out} holds no training state ({MANIFEST}); start a new run without "
                             "--resume")
    elif out.exists() and any(out.iterdir()) and not args.force:
        raise InputError(f"{out} already exists and is not empty; pass --resume to continue it or --force to "
                         "start over")
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} is a file; pass a folder")

    options = TrainOptions(
        iters=args.iters or 1000,
        batch_size=args.batch_size,
        optim=OptimConfig(lr=args.lr, weight_decay=args.weight_decay, backbone_multiplier=args.backbone_multiplier,
                          clip_norm=args.clip, warmup_iters=args.warmup_iters, warmup_factor=args.warmup_factor),
        loss=LossConfig(num_points=args.num_points),
        input_size=_parse_pair(args.input_size, "--input-size", int) if args.input_size else None,
        scale_range=_parse_pair(args.scale_range, "--scale-range"),
        hflip=not args.no_flip,
        amp=args.amp,
        seed=args.seed,
        checkpoint_every=args.checkpoint_every,
        log_every=args.log_every,
        num_workers=args.workers,
        backend=args.backend,
    )
    dataset = open_dataset(args.data, format=args.format)
    if len(dataset) == 0:
        raise InputError(f"the dataset in {args.data} has no images")
    config = None  # on --resume: the run's own, which --config (if given) must equal
    if args.config:
        task = {"panoptic": "panoptic", "instance": "instance", "semantic": "semantic"}[dataset.format]
        config = load_config(args.config).replace(num_classes=dataset.num_classes, default_task=task,
                                                  **dataset.label_set())
    elif not args.resume:
        raise InputError("--config is required for a new run (a preset name or a JSON config file)")
    init_state = _init_state(args.init, config) if (args.init and not args.resume) else None
    if args.force and not args.resume and env.is_main:
        clear_state(out)  # the replaced run's state must not outlive a new run that fails before its first save
    trainer = Trainer(config, dataset, out, options, device=args.device, resume=args.resume, init_state=init_state,
                      progress=not args.quiet, env=env, resume_iters=args.iters)
    model_dir = trainer.train()
    if env.is_main:
        print(f"trained {trainer.options.iters} iterations; weights in {model_dir}; logs in {out}")
    return 0

