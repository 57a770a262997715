"""Options every command spells the same way, and the help format of every command.

One name per concept: ``--out`` is where a command writes (file or folder), ``--threads`` / ``--device`` /
``--quiet`` mean the same everywhere. Older spellings (``--output``, ``--workdir``, ``--no-progress``) still
work but are hidden from ``--help``.
"""
from __future__ import annotations

import argparse
import re

from m2f.runtime import DEVICES, MAX_DEFAULT_THREADS, THREADS_ENV

# ``code`` -> `code`; :class:`x` / :func:`x` / :data:`x` -> x (docstrings reused as descriptions are RST)
_RST_LITERAL = re.compile(r"``([^`]+)``")
_RST_ROLE = re.compile(r":[a-z]+:`~?([^`]+)`")


def plain(text: str) -> str:
    """``text`` without RST markup."""
    return _RST_ROLE.sub(r"\1", _RST_LITERAL.sub(r"`\1`", text))


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions as written (minus RST markup); every option's default shown unless it is unset (None) or a
    flag's False, or the help already says it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if ("%(default)" in text or "default:" in text or default in (None, False, argparse.SUPPRESS)
                or not action.option_strings):
            return text
        return f"{text} (default: %(default)s)"

    def _format_text(self, text: str) -> str:
        return super()._format_text(plain(text))

    def _expand_help(self, action: argparse.Action) -> str:
        return plain(super()._expand_help(action))


class ArgumentParser(argparse.ArgumentParser):
    """The parser of ``m2f`` and (argparse passes its class on) of every subcommand: :class:`HelpFormatter`, and
    a bad command line reported like every other user error, one ``m2f: error: ...`` line, exit status 2."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs["formatter_class"] = HelpFormatter  # raw descriptions too, so a command's own layout is kept
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        # an option required with hidden aliases is a required group of one visible name: say it plainly
        message = re.sub(r"^one of the arguments (\S+) is required$", r"the option \1 is required", message)
        self.exit(2, f"m2f: error: {message}; see `{self.prog} --help`\n")


def subcommand_parsers(parser: argparse.ArgumentParser, prefix: str = "m2f"):
    """(``m2f predict``, parser) for every leaf command under ``parser``."""
    children = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not children:
        yield prefix, parser
    for action in children:
        for name, child in action.choices.items():
            yield from subcommand_parsers(child, f"{prefix} {name}")


def add_out_option(parser: argparse.ArgumentParser, help: str, *, required: bool = False, default: str | None = None,
                   dest: str = "out", old: tuple[str, ...] = ()) -> None:
    """``--out`` (the one name for where a command writes), with ``old`` spellings as hidden aliases."""
    if required:
        group = parser.add_mutually_exclusive_group(required=True)  # required across --out and its aliases
    else:
        group = parser
    group.add_argument("--out", dest=dest, default=default, metavar="PATH", help=help)
    for name in old:
        group.add_argument(name, dest=dest, default=default, help=argparse.SUPPRESS)


# what every checkpoint argument reads (all go through m2f.checkpoints.resolve_checkpoint), in the same words everywhere
CHECKPOINT_KINDS = ("an m2f / Hugging Face folder, an official detectron2 .pkl / .pth file, or a Hugging Face hub id "
                    "(facebook/mask2former-swin-tiny-coco-panoptic, hf://OWNER/NAME@REVISION)")


def checkpoint_help(what: str, default: str | None = None) -> str:
    """``WHAT: CHECKPOINT_KINDS (default: DEFAULT)``, the help of every checkpoint argument."""
    text = f"{what}: {CHECKPOINT_KINDS}"
    return f"{text} (default: {default})" if default else text


def add_checkpoint_option(parser: argparse.ArgumentParser, what: str, *, name: str = "--checkpoint",
                          default: str | None = None, required: bool = False) -> None:
    """``--checkpoint`` (or ``name``, e.g. ``--reference-checkpoint``) with :func:`checkpoint_help`; ``default``
    says in words what an absent option means (the value itself stays None)."""
    parser.add_argument(name, required=required, default=None, metavar="CKPT", help=checkpoint_help(what, default))


def add_threads_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threads", type=int, default=None, metavar="N",
                        help="CPU threads for PyTorch and ONNX Runtime (default: the idle physical cores this "
                             f"process may use, at most {MAX_DEFAULT_THREADS}, or ${THREADS_ENV})")


def add_quiet_option(parser: argparse.ArgumentParser, what: str = "progress bars and stage lines",
                     old: tuple[str, ...] = ()) -> None:
    parser.add_argument("--quiet", action="store_true", help=f"no {what} on stderr")
    for name in old:
        parser.add_argument(name, dest="quiet", action="store_true", help=argparse.SUPPRESS)


def add_device_option(parser: argparse.ArgumentParser, note: str = "") -> None:
    parser.add_argument("--device", choices=DEVICES, default="auto",
                        help=f"where PyTorch runs: auto = cuda when a CUDA GPU is available, else cpu{note}")


def probability(text: str) -> float:
    """argparse type: a number in [0, 1]."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number from 0 to 1, got {text!r}") from None
    if not 0.0 <= value <= 1.0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"expected a number from 0 to 1, got {text}")
    return value
