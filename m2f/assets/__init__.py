"""Files shipped inside the package: the default model and a few sample images.

* ``default/``: a small Mask2Former trained by ``m2f train`` on ``m2f data synth`` scenes (see its
  ``TRAINING.md`` for the exact commands and measured PQ): ``m2f_config.json`` + ``model.safetensors``.
* ``samples/``: a few synthetic demo images from a seed never used for training or evaluation.
"""
from __future__ import annotations

from pathlib import Path

from m2f.errors import CheckpointError

ASSETS_DIR = Path(__file__).resolve().parent


def default_checkpoint_path() -> Path:
    """The shipped default model's folder (m2f format), what the CLI uses when no --checkpoint is given."""
    path = ASSETS_DIR / "default"
    if not (path / "model.safetensors").is_file() or not (path / "m2f_config.json").is_file():
        raise CheckpointError(f"the shipped default model is missing from {path}; reinstall m2f or pass --checkpoint")
    return path


def sample_images() -> list[Path]:
    """The bundled demo images, sorted by name."""
    folder = ASSETS_DIR / "samples"
    return sorted(p for p in folder.glob("*.png")) if folder.is_dir() else []
