"""The ``m2f`` command line.

Each subcommand lives in its own module with ``register(subparsers)`` (adds its parser and sets ``func``);
the list below is the whole command set. User errors print as one line on stderr with exit status 2.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import Sequence

from m2f.errors import M2FError
from m2f.io import describe_os_error

# subcommand -> module under m2f.cli. Explicit on purpose: no registration by import side effects.
SUBCOMMANDS: dict[str, str] = {
    "demo": "demo",
    "predict": "predict",
    "eval": "eval",
    "train": "train",
    "data": "data",
    "convert": "convert",
    "export": "export",
    "bench": "bench",
    "presets": "presets",
    "serve": "serve",
}


def build_parser() -> argparse.ArgumentParser:
    from m2f.cli.options import ArgumentParser

    parser = ArgumentParser(
        prog="m2f", description="Mask2Former, fast: predict, convert, export, benchmark, train, evaluate."
    )
    parser.add_argument("--version", action="version", version=f"m2f {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for module_name in SUBCOMMANDS.values():
        importlib.import_module(f"m2f.cli.{module_name}").register(sub)
    return parser


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("m2f")
    except PackageNotFoundError:
        return "unknown"


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, or a bad command line (already reported in one line)
        return exc.code if isinstance(exc.code, int) else 2
    debug = os.environ.get("M2F_DEBUG", "") not in ("", "0")
    try:
        result = args.func(args)
    except M2FError as exc:
        if debug:
            raise
        print(f"m2f: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("m2f: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `m2f presets | head`: the reader left; not an error, and nothing more can be printed
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # keep Python's exit flush from failing again
        return 0
    except Exception as exc:  # a bug, not bad input: still one line, with how to get the traceback
        if debug:
            raise
        # Last resort for an OSError no writer translated: one naming a path (or a full disk) is the set-up's fault.
        problem = describe_os_error(exc) if isinstance(exc, OSError) else None
        if problem is not None:
            print(f"m2f: error: {problem}", file=sys.stderr)
            return 2
        print(f"m2f: internal error: {type(exc).__name__}: {exc} (set M2F_DEBUG=1 for the traceback)", file=sys.stderr)
        return 1
    return int(result or 0)


if __name__ == "__main__":  # python -m m2f.cli
    sys.exit(main())
