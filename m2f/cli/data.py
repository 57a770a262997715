"""``m2f data``: dataset utilities. ``m2f data synth`` writes synthetic COCO-panoptic scenes."""
from __future__ import annotations

import argparse

LAYOUTS = """dataset layouts read by `m2f train` / `m2f eval` (--data DIR):
  COCO panoptic  DIR/panoptic.json + DIR/panoptic/*.png + DIR/images/*  (what `m2f data synth` writes), or
                 DIR/annotations/panoptic_val2017.json + DIR/annotations/panoptic_val2017/ + DIR/val2017/
  COCO instance  DIR/*.json or DIR/annotations/instances_*.json with 'segmentation' + DIR/images/ (or the split)
  semantic PNG   DIR/images/* + DIR/labels/<same stem>.png (class id per pixel, 255 = ignore)
                 [+ DIR/categories.json: ["name", ...]]"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="dataset utilities (synthetic data)", description=LAYOUTS,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    dsub = p.add_subparsers(dest="data_command", metavar="ACTION")
    dsub.required = True
    s = dsub.add_parser("synth", help="write synthetic shapes-on-background scenes in COCO panoptic format")
    s.add_argument("--out", required=True, help="output folder (images/, panoptic/, panoptic.json)")
    s.add_argument("--num", type=int, default=100, help="number of images (100)")
    s.add_argument("--seed", type=int, default=0, help="random seed; same seed, same bytes (0)")
    s.add_argument("--size", default="128x128", help="image size HxW (128x128)")
    s.add_argument("--force", action="store_true", help="replace --out if it exists")
    s.set_defaults(func=run_synth)


def run_synth(args: argparse.Namespace) -> int:
    from m2f.data.synth import parse_size, write_dataset

    size = parse_size(args.size)
    out = write_dataset(args.out, num=args.num, seed=args.seed, size=size, force=args.force, progress=True)
    print(f"wrote {args.num} synthetic images ({size[0]}x{size[1]}, seed {args.seed}) to {out}")
    return 0
