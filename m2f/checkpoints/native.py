"""m2f's own checkpoint format: a directory with ``m2f_config.json`` and ``model.safetensors``.

``m2f_config.json`` is :meth:`Mask2FormerConfig.to_dict` plus ``"format": "m2f"`` and ``"format_version"``; the
weights use our parameter names, so loading is a plain (strict) ``load_state_dict``.
"""
from __future__ import annotations

from pathlib import Path

import torch

from m2f.config import Mask2FormerConfig, is_int
from m2f.errors import CheckpointError, ConfigError, M2FError
from m2f.io import atomic_dir, write_json_atomic

CONFIG_NAME = "m2f_config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT_MARKER = "m2f"
FORMAT_VERSION = 1


def is_native_dir(path: Path) -> bool:
    return path.is_dir() and (path / CONFIG_NAME).is_file()


def read_native_config(path: Path) -> Mask2FormerConfig:
    from m2f.checkpoints.hf import read_json

    data = read_json(path / CONFIG_NAME)
    if data.pop("format", None) != FORMAT_MARKER:
        raise CheckpointError(f"{path / CONFIG_NAME} lacks the \"format\": \"m2f\" marker; re-create it with `m2f convert`")
    version = data.pop("format_version", None)
    if not is_int(version) or version < 1:
        raise CheckpointError(
            f"{path / CONFIG_NAME} has format_version {version!r}, not a version number; re-create it with `m2f convert`"
        )
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"{path / CONFIG_NAME} has format_version {version!r}; this m2f reads up to {FORMAT_VERSION}: upgrade m2f"
        )
    try:
        return Mask2FormerConfig.from_dict(data)
    except ConfigError as exc:
        raise ConfigError(f"{path / CONFIG_NAME}: {exc}") from None


def read_native_weights(path: Path) -> dict[str, torch.Tensor]:
    from m2f.checkpoints import read_safetensors

    weights = path / WEIGHTS_NAME
    if not weights.is_file():
        raise CheckpointError(f"{path} has {CONFIG_NAME} but no {WEIGHTS_NAME}; copy the whole directory or re-run `m2f convert`")
    return read_safetensors(weights)


def save_pretrained(model: torch.nn.Module, path: str | Path, force: bool = False) -> Path:
    """Write ``model`` (a :class:`m2f.Mask2Former`) as an m2f checkpoint directory, atomically.

    Refuses to replace an existing ``path`` unless ``force``; a failure leaves nothing behind.
    """
    from safetensors.torch import save

    path = Path(path)
    if path.exists() and not force:
        raise M2FError(f"{path} already exists; pass force=True (CLI: --force) to overwrite it")
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    config = {**model.config.to_dict(), "format": FORMAT_MARKER, "format_version": FORMAT_VERSION}
    with atomic_dir(path) as tmp:
        # Serialised here and written by Python: safetensors' own file writer reports a full disk as a
        # SafetensorError, which m2f.io could not name (an OSError becomes "no space left on the device").
        weights = save(state, metadata={"format": "pt", "m2f_format_version": str(FORMAT_VERSION)})
        (tmp / WEIGHTS_NAME).write_bytes(weights)
        write_json_atomic(tmp / CONFIG_NAME, config)
    return path
