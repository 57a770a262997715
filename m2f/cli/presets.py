"""``m2f presets``: list the named official configurations."""
from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("presets", help="list the named official configurations")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from m2f.config import preset, preset_names

    for name in preset_names():
        cfg = preset(name)
        print(f"{name:28s} classes={cfg.num_classes:<4d} queries={cfg.transformer_decoder.num_queries:<4d} "
              f"task={cfg.default_task}")
    return 0
