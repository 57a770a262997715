"""Manifests: the JSON written next to every exported model (``model.onnx`` -> ``model.onnx.json``).

A manifest says what the file is and where it came from, so that ``m2f export check``, ``m2f export tensorrt``
and ``m2f export triton-repo`` need nothing but the file: opset, input / output names with shapes (symbolic
dimensions as strings), dynamic axes, deformable-attention mode, dtype, the versions of the tools that wrote it,
the source checkpoint with its sha256, the export date, and the model file's own size and sha256, so a reader
never acts on a manifest beside another model (a replaced file, an interrupted export).
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import platform
from pathlib import Path
from typing import Any

from m2f.errors import InputError
from m2f.io import read_json, write_json_atomic

MANIFEST_FORMAT = "m2f-export-manifest/2"  # 2: records its model's size and sha256


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


def write_manifest(model_path: str | Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """Write the manifest of ``model_path`` with the model's size and sha256, once the model is in place; returns
    what was written.

    The model is committed first and its manifest last (two renames are never atomic together): an interrupted
    export leaves a model without a manifest, or a new model beside the old manifest, whose checksum then refuses
    the pair (:func:`read_manifest`); never a manifest vouching for a model that is not there.
    """
    model_path = Path(model_path)
    written = {**manifest, "artifact": {"size": model_path.stat().st_size, "sha256": sha256_file(model_path)}}
    write_json_atomic(manifest_path(model_path), written)
    return written


# Fields the readers rely on (check, tensorrt build, triton-repo, runner, eval), with their JSON types.
_FIELDS: dict[str, dict[str, type]] = {
    "all": {"inputs": list, "outputs": list, "batch": int, "height": int, "width": int, "dynamic": bool,
            "artifact": dict},
    "onnx": {"opset": int, "dtype": str, "msda": str, "masked_attn": str, "postprocess": str},
    "tensorrt": {"max_batch": int, "precision": str, "plugins": str},
}
_NULLABLE: dict[str, type] = {"source": dict, "topk": int, "expected_plugin_nodes": int,
                              "expected_masked_attention_nodes": int, "config": dict, "pixel_mean": list,
                              "pixel_std": list, "precision_details": dict}
_JSON_TYPE_NAMES = {int: "an integer", str: "a string", bool: "true or false", list: "a list", dict: "an object"}


def _has_type(value: Any, kind: type) -> bool:
    if kind is int:  # JSON true / false load as bool, a subclass of int
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind)


def read_manifest(model_path: str | Path, required: bool = True, kind: str | None = None) -> dict[str, Any] | None:
    """The manifest beside ``model_path``, checked: its format, the fields readers use, and that it describes
    this very file (size and sha256). None when absent and not ``required``; InputError otherwise."""
    model_path = Path(model_path)
    path = manifest_path(model_path)
    if not path.exists():
        if required:
            raise InputError(
                f"{path} not found: {model_path} was not written by `m2f export` (or its manifest was moved); "
                "pass the source with --checkpoint, or re-export"
            )
        return None
    data = read_json(path, fix="re-export the model")
    fmt = data.get("format") if isinstance(data, dict) else None
    if not isinstance(fmt, str) or not fmt.startswith(MANIFEST_FORMAT.split("/")[0] + "/"):
        raise InputError(f"{path} is not an m2f export manifest (format {MANIFEST_FORMAT!r}); re-export the model")
    if fmt != MANIFEST_FORMAT:
        raise InputError(f"{path} has manifest format {fmt!r}, this m2f reads {MANIFEST_FORMAT!r} (format 1 records "
                         "no checksum of its model); re-export the model with this m2f")
    if kind is not None and data.get("kind") != kind:
        raise InputError(f"{path} describes a {data.get('kind')!r} file, not a {kind!r} one; re-export the model")
    _check_fields(path, data)
    _check_artifact(path, data["artifact"], model_path)
    return data


def _check_fields(path: Path, data: dict[str, Any]) -> None:
    def bad(why: str) -> InputError:
        return InputError(f"{path}: {why}; the manifest was edited or damaged: re-export the model")

    fields = {**_FIELDS["all"], **_FIELDS.get(data.get("kind"), {})}
    for name, kind in fields.items():
        if name not in data:
            raise bad(f"field {name!r} is missing")
        if not _has_type(data[name], kind):
            raise bad(f"field {name!r} must be {_JSON_TYPE_NAMES[kind]}, got {data[name]!r}")
    for name, kind in _NULLABLE.items():
        if data.get(name) is not None and not _has_type(data[name], kind):
            raise bad(f"field {name!r} must be {_JSON_TYPE_NAMES[kind]} or null, got {data[name]!r}")
    for name in ("batch", "height", "width"):
        if data[name] < 1:
            raise bad(f"field {name!r} must be >= 1, got {data[name]}")
    for group in ("inputs", "outputs"):
        for spec in data[group]:
            if not (isinstance(spec, dict) and isinstance(spec.get("name"), str) and isinstance(spec.get("dtype"), str)
                    and isinstance(spec.get("shape"), list)
                    and all(isinstance(d, str) or _has_type(d, int) for d in spec["shape"])):
                raise bad(f"an entry of {group!r} is not a tensor (name, dtype, shape of ints / strings): {spec!r}")
    if not data["inputs"] or not data["outputs"]:
        raise bad("it lists no inputs or no outputs")
    export_shape = [data["batch"], 3, data["height"], data["width"]]
    if not data["dynamic"] and data["inputs"][0]["shape"] != export_shape:
        raise bad(f"its batch / height / width {export_shape} disagree with its input shape {data['inputs'][0]['shape']}")


def _check_artifact(path: Path, artifact: dict[str, Any], model_path: Path) -> None:
    size, sha256 = artifact.get("size"), artifact.get("sha256")
    if not _has_type(size, int) or not isinstance(sha256, str):
        raise InputError(f"{path}: field 'artifact' must hold the model's size and sha256; re-export the model")
    if not model_path.is_file():
        raise InputError(f"{model_path} not found beside its manifest {path}; re-export the model")
    actual = model_path.stat().st_size
    mismatch = f"{actual} bytes, the manifest says {size}" if actual != size else None
    if mismatch is None and sha256_file(model_path) != sha256:
        mismatch = "its sha256 differs from the manifest's"
    if mismatch is not None:
        raise InputError(f"{model_path} does not match its manifest {path} ({mismatch}): the model was replaced or "
                         "its export was interrupted; re-export the model")


def load_onnx(path: str | Path, load_external_data: bool = True) -> Any:
    """The ONNX model in ``path``; InputError for a file that is not one (corrupt, truncated, another format)."""
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=load_external_data)
    except OSError:
        raise  # unreadable, not malformed: the CLI names the path and the OS's reason
    except Exception as exc:  # protobuf's DecodeError, a bad external-data reference, ...
        raise InputError(f"{path} is not a readable ONNX file ({type(exc).__name__}); re-export it") from None
    # protobuf reads an empty or foreign file as an empty model, a truncated one without its trailing opset_import
    if model.ir_version < 1 or not model.opset_import or not model.graph.output:
        raise InputError(f"{path} is not a complete ONNX model (no IR version, opset or graph outputs); re-export it")
    return model
