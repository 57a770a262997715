"""``m2f convert``: read any supported checkpoint and write it in m2f's own format (atomically)."""
from __future__ import annotations

import argparse
from pathlib import Path

from m2f.errors import M2FError
from m2f.io import check_can_write


def register(sub: argparse._SubParsersAction) -> None:
    from m2f.cli.options import add_out_option, checkpoint_help

    p = sub.add_parser(
        "convert",
        help="convert a Hugging Face / official detectron2 checkpoint to m2f's format",
        description="Read a Hugging Face Mask2Former directory, an official .pkl / .pth checkpoint (needs --preset) "
        "or an m2f directory, check every tensor, and write an m2f directory (m2f_config.json + model.safetensors).",
    )
    p.add_argument("src", metavar="SRC", help=checkpoint_help("checkpoint to convert"))
    add_out_option(p, "output directory", required=True, dest="output", old=("--output", "-o"))
    p.add_argument("--preset", metavar="NAME", help="architecture of an official checkpoint (see `m2f presets`)")
    p.add_argument("--force", action="store_true", help="overwrite DIR if it exists")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from m2f.checkpoints import from_pretrained, save_pretrained

    output = Path(args.output)
    if Path(args.src).resolve() == output.resolve():
        raise M2FError("SRC and --output are the same path; write the converted checkpoint somewhere else")
    check_can_write(output, force=args.force, directory=True)
    model = from_pretrained(args.src, preset=args.preset)
    save_pretrained(model, output, force=True)
    cfg = model.config
    params = sum(p.numel() for p in model.parameters())
    print(
        f"wrote {output}: {params / 1e6:.1f}M parameters, {cfg.num_classes} classes, "
        f"{cfg.transformer_decoder.num_queries} queries, {cfg.backbone.type} backbone"
    )
    return 0
