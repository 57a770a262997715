"""File output: atomic (a reader never sees a half-written file, a failed run leaves nothing behind), with the
permissions a plain ``open(..., "w")`` / ``mkdir`` would give (0o666 / 0o777 minus the umask), and every
``OSError`` met while writing turned into one :class:`OutputError` line naming the path and the fix.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import secrets
import shutil
from pathlib import Path
from typing import Any, Iterator

from .errors import InputError, M2FError, OutputError

# errno -> (what is wrong, how to fix it); ENOTDIR / EEXIST name the file in the way instead (see _file_in_the_way)
_OS_PROBLEMS: dict[int, tuple[str, str]] = {
    errno.ENOSPC: ("no space left on the device", "free some space or use another disk"),
    errno.EDQUOT: ("disk quota exceeded", "free some space or use another disk"),
    errno.EFBIG: ("file too large for the file system (or `ulimit -f`)", "use another file system or raise the limit"),
    errno.EROFS: ("read-only file system", "use a path on a writable file system"),
    errno.EACCES: ("permission denied", "fix its permissions or use another path"),
    errno.EPERM: ("operation not permitted", "fix its permissions or use another path"),
    errno.EISDIR: ("it is a directory", "give a file name, or remove the directory"),
    errno.ENAMETOOLONG: ("file name too long", "choose a shorter name"),
    errno.ENOENT: ("no such file or directory", "check the path"),
    errno.ELOOP: ("too many levels of symbolic links", "fix the link loop"),
}
_TEMP_SUFFIX = ".partial"
_TEMP_NAME = re.compile(r"\.(.+)\.[0-9a-f]{16}" + re.escape(_TEMP_SUFFIX))  # what _temp_beside makes


def describe_os_error(exc: OSError, target: str | os.PathLike | None = None) -> str | None:
    """One line for ``exc``: the path, what is wrong and the fix; None when it names no path and is no disk-full.

    ``target`` is the output being written, named when the error names no file. Our temporary names are shown
    as the names they were to become (``.out.<hex>.partial/a.png`` as ``out/a.png``).
    """
    name = exc.filename if exc.filename is not None else target
    if name is None:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            return None  # no path, not the disk: possibly a bug, not the user's set-up
        problem, fix = _OS_PROBLEMS[exc.errno]
        return f"{problem}; {fix}"
    raw = Path(os.fsdecode(name))
    path = _final_name(raw)
    writes_target = target is not None and path.is_relative_to(_final_name(Path(target)))
    where = f"cannot write {path}" if writes_target else str(path)
    if exc.errno in (errno.ENOTDIR, errno.EEXIST):
        in_the_way = _file_in_the_way(raw)
        if in_the_way is not None:
            return _through_a_file(where, _final_name(in_the_way))
        if exc.errno == errno.EEXIST:
            return f"{where}: it already exists; remove it or choose another path"
    problem, fix = _OS_PROBLEMS.get(exc.errno, ((exc.strerror or str(exc)).lower(), "check the path and the device"))
    return f"{where}: {problem}; {fix}"


def _final_name(path: Path) -> Path:
    """``path`` with each temporary name of ours replaced by the name it is renamed to on success."""
    return Path(*(m.group(1) if (m := _TEMP_NAME.fullmatch(part)) else part for part in path.parts))


def _through_a_file(where: str, in_the_way: Path) -> str:
    return f"{where}: {in_the_way} is a file, not a directory; remove it or choose another path"


def _file_in_the_way(path: Path) -> Path | None:
    """The first component of ``path`` that exists but is not a directory (``a`` in ``a/b/c`` when ``a`` is a file)."""
    for part in (*reversed(path.parents), path):
        if os.path.lexists(part) and not part.is_dir():
            return part
    return None


@contextlib.contextmanager
def writing(target: str | os.PathLike) -> Iterator[None]:
    """Turn an ``OSError`` raised inside into an :class:`OutputError` naming ``target`` (or the file it names)."""
    try:
        yield
    except OSError as exc:
        raise OutputError(describe_os_error(exc, target)) from exc


def check_can_write(path: str | os.PathLike, force: bool = False, directory: bool = False) -> Path:
    """Refuse an output that exists unless ``force``, a directory where a file is wanted, or a path through a file.

    Called before the work, so a long run does not fail at its last step; creates nothing. Returns the path.
    """
    path = Path(path)
    in_the_way = _file_in_the_way(path.parent)
    if in_the_way is not None:
        raise OutputError(_through_a_file(f"cannot write {path}", in_the_way))
    if not directory and path.is_dir():
        raise OutputError(f"{path} is a directory; give a file name, or remove the directory")
    if os.path.lexists(path) and not force:
        raise OutputError(f"{path} already exists; pass --force to overwrite it")
    return path


def _temp_beside(path: Path) -> Path:
    """A hidden, unused name in ``path``'s directory (64 random bits; created with O_EXCL / mkdir, never reused)."""
    return path.with_name(f".{path.name}.{secrets.token_hex(8)}{_TEMP_SUFFIX}")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is renamed onto ``path``, on error removed.

    Use for writers that want a file name (``torch.onnx.export``, ``PIL.save``). The file is created with mode
    0o666 and the umask applies, as for ``open(path, "w")``.
    """
    path = Path(path)
    with writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = _temp_beside(path)
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        try:
            yield tmp
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):  # report what failed, not the clean-up
                tmp.unlink()
            raise


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory beside ``path``; on success it replaces ``path``, on error it is removed.

    An existing ``path`` is moved aside first and put back if the new one cannot be moved in, so a failure
    never loses it. The directory gets mode 0o777 minus the umask, as for ``mkdir``.
    """
    path = Path(path)
    with writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = _temp_beside(path)
        os.mkdir(tmp, 0o777)
        try:
            yield tmp
            old = None
            if os.path.lexists(path):
                old = _temp_beside(path)
                os.replace(path, old)
            try:
                os.replace(tmp, path)
            except BaseException:
                if old is not None:
                    os.replace(old, path)
                raise
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    if old is not None:  # committed: the old output is garbage now, and failing to delete it is no failure
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                old.unlink()


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    return write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | os.PathLike, obj: Any) -> Path:
    return write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


# ---------------------------------------------------------------------------------------------------
# Strict JSON in: what m2f reads is refused, in one line, where Python's json would silently accept it
# ---------------------------------------------------------------------------------------------------


class _NotStrictJSON(ValueError):
    pass


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):  # json keeps the last of two equal keys: which one the writer meant is unknown
        seen: set[str] = set()
        twice = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise _NotStrictJSON(f"key {twice!r} appears twice in one object")
    return obj


def _no_constant(name: str) -> Any:
    raise _NotStrictJSON(f"{name} is not a JSON number")


def parse_json(text: str, where: str, *, error: type[M2FError] = InputError, fix: str = "fix it or write it again"
               ) -> Any:
    """``text`` as strict JSON (duplicate keys and NaN / Infinity refused); ``error`` naming ``where`` and ``fix``."""
    try:
        return json.loads(text, object_pairs_hook=_unique_keys, parse_constant=_no_constant)
    except json.JSONDecodeError as exc:
        raise error(f"{where} is not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno}); {fix}") from None
    except _NotStrictJSON as exc:
        raise error(f"{where} is not valid JSON ({exc}); {fix}") from None


def read_json(path: str | os.PathLike, *, error: type[M2FError] = InputError,
              fix: str = "fix it or write it again") -> Any:
    """The strict JSON in ``path``; every problem (unreadable, not UTF-8, not JSON) is one ``error`` line."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise error(f"{path} is not a UTF-8 JSON text file; {fix}") from None
    except OSError as exc:
        raise error(f"cannot read {path}: {exc.strerror or exc}; {fix}") from None
    return parse_json(text, str(path), error=error, fix=fix)
