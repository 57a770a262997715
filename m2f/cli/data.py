"""``m2f data``: dataset utilities. ``m2f data synth`` writes synthetic COCO-panoptic scenes."""
from __future__ import annotations

import argparse

LAYOUTS = """dataset layouts read by `m2f train` / `m2f eval` (--data DIR):
  COCO panoptic  DIR/panoptic.json + DIR/panoptic/*.png + DIR/images/*  (what `m2f data synth` writes), or
                 DIR/annotations/panoptic_val2017.json + DIR/annotations/panoptic_val2017/ + DIR/val2017/
  COCO instance  DIR/*.json or DIR/annotations/instances_*.json with 'segmentation' + DIR/images/ (or the split)
  semantic PNG   DIR/images/* + DIR/labels/<same stem>.png (class id per pixel, 255 = ignore)
                 [+ DIR/categories.json: ["name", ...]]"""


# what `m2f data synth` writes: --force replaces a folder holding nothing else
SYNTH_OWNED = ("images/[0-9]*.png", "panoptic/[0-9]*.png", "panoptic.json")


def register(sub: argparse._SubParsersAction) -> None:
    from m2f.cli.options import add_out_option, add_quiet_option

    p = sub.add_parser("data", help="dataset utilities (synthetic data)", description=LAYOUTS)
    dsub = p.add_subparsers(dest="data_command", metavar="ACTION")
    dsub.required = True
    s = dsub.add_parser("synth", help="write synthetic shapes-on-background scenes in COCO panoptic format")
    add_out_option(s, "output folder (images/, panoptic/, panoptic.json)", required=True, old=("--output",))
    s.add_argument("--num", type=int, default=100, metavar="N", help="number of images")
    s.add_argument("--seed", type=int, default=0, help="random seed; same seed, same bytes")
    s.add_argument("--size", default="128x128", metavar="HxW", help="image size")
    s.add_argument("--force", action="store_true",
                   help="replace --out if it holds an earlier synth's files only (never other files)")
    add_quiet_option(s, "progress bar")
    s.set_defaults(func=run_synth)


def run_synth(args: argparse.Namespace) -> int:
    from pathlib import Path

    from m2f.data.synth import parse_size, write_dataset
    from m2f.outputs import check_only_owned

    size = parse_size(args.size)
    if args.force:  # the folder is replaced as a whole: it must hold nothing synth did not write
        check_only_owned(Path(args.out), SYNTH_OWNED, "`m2f data synth`")
    out = write_dataset(args.out, num=args.num, seed=args.seed, size=size, force=args.force,
                        progress=not args.quiet)
    print(f"wrote {args.num} synthetic images ({size[0]}x{size[1]}, seed {args.seed}) to {out}")
    return 0
