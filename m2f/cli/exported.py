"""Options shared by ``m2f predict``, ``m2f eval`` and ``m2f bench model`` to run an exported model instead of a
checkpoint: one flag per export target (``--onnx FILE``, ``--openvino DIR``, ``--engine FILE``), from the target
registry (:mod:`m2f.export.targets`), and the model config such a model runs with."""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def exported_targets() -> Any:
    """The export targets (each gives one option)."""
    from m2f.export.targets import all_targets

    return all_targets()


def add_exported_model_options(group: Any, prefix: str = "", what: str = "run it instead of a checkpoint") -> None:
    for target in exported_targets():
        group.add_argument(f"--{prefix}{target.flag}", metavar=target.flag_metavar, default=None,
                           help=f"a model exported for {target.name} (`m2f export`): {what}")


def exported_model(args: argparse.Namespace, prefix: str = "") -> str | None:
    """The exported model the arguments name (the flags are mutually exclusive), or None."""
    for target in exported_targets():
        value = getattr(args, f"{prefix}{target.flag}".replace("-", "_"), None)
        if value:
            return value
    return None


def exported_config(path: str | Path, explicit: str | None = None) -> Any:
    """The model config of an exported model: ``explicit`` (a config JSON), else its manifest's, else
    ``m2f_config.json`` beside it, else the ONNX file's ``m2f_config`` metadata."""
    from m2f.cli.train import load_config
    from m2f.config import Mask2FormerConfig
    from m2f.errors import InputError
    from m2f.export.manifest import read_manifest

    path = Path(path)
    if explicit:
        return load_config(explicit)
    # `m2f export` writes a manifest with the config; one beside another model (or damaged) is refused
    manifest = read_manifest(path, required=False) if path.exists() else None
    if manifest is not None and manifest.config is not None:
        return Mask2FormerConfig.from_dict(dict(manifest.config))
    beside = path.with_name("m2f_config.json")
    if beside.is_file():
        return load_config(str(beside))
    if path.is_file() and path.suffix == ".onnx":
        try:
            import onnx

            meta = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
        except Exception:  # not readable as ONNX: the runner reports it
            meta = {}
        if "m2f_config" in meta:
            return Mask2FormerConfig.from_dict(json.loads(meta["m2f_config"]))
    raise InputError(f"no config for {path}: pass --config m2f_config.json (the model's config) or put it beside "
                     "the exported model")
