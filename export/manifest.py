"""Manifests: the JSON written next to every exported model (``model.onnx`` -> ``model.onnx.json``).

A manifest says what the file is and where it came from, so that ``m2f export check``, ``m2f export tensorrt``
and ``m2f export triton-repo`` need nothing but the file: opset, input / output names with shapes (symbolic
dimensions as strings), dynamic axes, deformable-attention mode, dtype, the versions of the tools that wrote it,
the source checkpoint with its sha256, and the export date.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import platform
from pathlib import Path
from typing import Any

from m2f.errors import InputError
from m2f.io import write_json_atomic

MANIFEST_FORMAT = "m2f-export-manifest/1"


def manifest_path(model_path: str | Path) -> Path:
    """Where the manifest of ``model_path`` lives: the same name with ``.json`` appended."""
    model_path = Path(model_path)
    return model_path.with_name(model_path.name + ".json")


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def sha256_source(path: str | Path) -> str:
    """sha256 of a checkpoint: of the file, or of a directory's files (sorted by relative name, name + bytes)."""
    path = Path(path)
    if path.is_file():
        return sha256_file(path)
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(str(file.relative_to(path)).encode() + b"\0")
        digest.update(sha256_file(file).encode())
    return digest.hexdigest()


def tool_versions() -> dict[str, str | None]:
    """Versions of the packages that take part in an export (None where one is not installed)."""
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in ("m2f", "torch", "onnx", "onnxruntime", "onnxscript", "onnxslim", "triton", "tensorrt"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def now_utc() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


def new_manifest(kind: str, **fields: Any) -> dict[str, Any]:
    """A manifest dict: format, kind ("onnx" / "tensorrt"), the fields given, tool versions and the date."""
    return {"format": MANIFEST_FORMAT, "kind": kind, **fields, "versions": tool_versions(), "created": now_utc()}


def write_manifest(model_path: str | Path, manifest: dict[str, Any]) -> Path:
    return write_json_atomic(manifest_path(model_path), manifest)


def read_manifest(model_path: str | Path, required: bool = True) -> dict[str, Any] | None:
    """The manifest beside ``model_path``; None when absent and not ``required``."""
    path = manifest_path(model_path)
    if not path.exists():
        if required:
            raise InputError(
                f"{path} not found: {model_path} was not written by `m2f export` (or its manifest was moved); "
                "pass the source with --checkpoint, or re-export"
            )
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot read manifest {path}: {exc}; re-export the model") from None
    if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT:
        raise InputError(f"{path} is not an m2f export manifest (format {MANIFEST_FORMAT!r}); re-export the model")
    return data
