"""Loading and saving Mask2Former weights.

:func:`from_pretrained` reads, and tells apart by their content:

* a Hugging Face ``Mask2FormerForUniversalSegmentation`` directory (``config.json`` + ``model.safetensors`` or
  ``pytorch_model.bin``), Swin or ResNet backbone;
* an original detectron2 checkpoint (``.pkl`` with numpy arrays, or ``.pth``), which needs ``preset=`` (or
  ``config=``) because it does not record its architecture;
* m2f's own directory (``m2f_config.json`` + ``model.safetensors``), written by :func:`save_pretrained` or
  ``m2f convert``;
* a Hugging Face hub id (``facebook/mask2former-swin-tiny-coco-panoptic``, ``hf://OWNER/NAME``, a revision as
  ``OWNER/NAME@REVISION``), downloaded into the Hugging Face cache (``HF_HOME``; ``HF_HUB_OFFLINE=1`` reads only
  the cache) by :func:`resolve_checkpoint`. A local path that exists always wins over a hub id.

Every tensor of the checkpoint must be used and every parameter of the model filled; anything else is a
:class:`~m2f.errors.CheckpointError` listing what is missing, unexpected or of the wrong shape.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from m2f.config import Mask2FormerConfig
from m2f.errors import CheckpointError, M2FError

from .native import save_pretrained

__all__ = ["from_pretrained", "save_pretrained", "read_checkpoint", "resolve_checkpoint", "load_state_dict_strict",
           "LoadedCheckpoint"]

_SUPPORTED = (
    "pass a Hugging Face Mask2Former directory or hub id (OWNER/NAME), an official .pkl / .pth checkpoint "
    "(with --preset), or a directory written by `m2f convert`"
)
_HF_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


@dataclass
class LoadedCheckpoint:
    """A checkpoint read from disk: its format ("hf", "detectron2", "m2f"), architecture and our-named tensors."""

    kind: str
    config: Mask2FormerConfig
    state_dict: dict[str, torch.Tensor]


def from_pretrained(
    path: str | Path,
    preset: str | None = None,
    config: Mask2FormerConfig | None = None,
    backend: str = "torch",
    device: str | torch.device = "cpu",
) -> "Mask2Former":  # noqa: F821
    """A :class:`m2f.Mask2Former` with the weights at ``path``, in eval mode on ``device``.

    ``preset`` (a name from :func:`m2f.preset_names`) or ``config`` gives the architecture of an original
    detectron2 checkpoint; for the self-describing formats they replace the stored config (the tensors must
    still fit).
    """
    from m2f.kernels import resolve_backend
    from m2f.model import Mask2Former

    resolve_backend(backend, torch.device(device))  # fail before reading gigabytes if the backend cannot run there
    ckpt = read_checkpoint(path, preset=preset, config=config)
    model = Mask2Former(ckpt.config, backend=backend)
    load_state_dict_strict(model, ckpt.state_dict, source=str(path))
    return model.to(device).eval()


def resolve_checkpoint(spec: str | Path) -> Path:
    """The local file or directory ``spec`` names: itself when it exists, else the downloaded (or cached) snapshot of
    the Hugging Face hub id it spells; a CheckpointError saying which when it is neither."""
    path = Path(spec)
    if path.exists():
        return path
    if not isinstance(spec, Path):
        from . import hf

        hub_id = hf.parse_hub_id(str(spec))
        if hub_id is not None:
            return hf.download_hub_checkpoint(*hub_id)
    raise CheckpointError(f"{path} does not exist; {_SUPPORTED}")


def read_checkpoint(path: str | Path, preset: str | None = None, config: Mask2FormerConfig | None = None) -> LoadedCheckpoint:
    """Read any supported checkpoint into our config + state dict (no model is built)."""
    if preset is not None and config is not None:
        raise M2FError("give either a preset or a config, not both")
    override = config
    if preset is not None:
        from m2f.config import preset as get_preset

        override = get_preset(preset)
    spec, path = str(path).removeprefix("hf://"), resolve_checkpoint(path)
    if path.is_file() and (path.name in ("config.json", "m2f_config.json") or path.suffix == ".safetensors"):
        # a file of a checkpoint directory: read the whole directory
        if not ((path.parent / "config.json").is_file() or (path.parent / "m2f_config.json").is_file()):
            raise CheckpointError(
                f"{path} alone does not record the architecture; pass the directory holding it with its "
                "config.json or m2f_config.json"
            )
        path = path.parent
    if path.is_dir():
        return _read_directory(path, override, name=spec if spec != str(path) else path.name)
    return _read_detectron2(path, override)


def _read_directory(path: Path, override: Mask2FormerConfig | None, name: str) -> LoadedCheckpoint:
    from . import hf, native

    if native.is_native_dir(path):
        cfg = native.read_native_config(path)
        state = native.read_native_weights(path)
        return LoadedCheckpoint("m2f", override or cfg, state)
    if (path / "config.json").is_file():
        hf_config = hf.read_json(path / "config.json")
        if hf_config.get("model_type") != "mask2former":
            kind = hf_config.get("model_type")
            raise CheckpointError(
                f"{path} holds a {kind!r} model, not Mask2Former (config.json model_type must be 'mask2former'); "
                + _SUPPORTED
            )
        preprocessor = None
        if (path / "preprocessor_config.json").is_file():
            # optional (without it the ImageNet mean / std apply), but a damaged one is not silently replaced
            preprocessor = hf.read_json(path / "preprocessor_config.json")
        cfg = override or hf.config_from_hf(hf_config, name=f"hf:{name}", preprocessor=preprocessor)
        state = hf.convert_hf_state_dict(_read_hf_weights(path), cfg)
        return LoadedCheckpoint("hf", cfg, state)
    raise CheckpointError(f"{path} is a directory without config.json or m2f_config.json; {_SUPPORTED}")


def _read_detectron2(path: Path, override: Mask2FormerConfig | None) -> LoadedCheckpoint:
    from . import detectron2

    d2_state = detectron2.read_detectron2_file(path)
    # look at the keys before asking for a preset: a file of another network should say so first
    detectron2.check_is_mask2former_state(d2_state, source=str(path))
    if override is None:
        raise CheckpointError(
            f"{path} is an original detectron2 checkpoint, which does not record its architecture; pass "
            "--preset NAME (Python: preset=) naming it, e.g. --preset r50-coco-panoptic (list them: `m2f presets`)"
        )
    return LoadedCheckpoint("detectron2", override, detectron2.convert_detectron2_state_dict(d2_state, override, source=str(path)))


def _read_hf_weights(path: Path) -> dict[str, torch.Tensor]:
    for name in _HF_WEIGHTS:
        file = path / name
        if not file.is_file():
            continue
        if name.endswith(".index.json"):
            from .hf import read_json

            index = read_json(file).get("weight_map")
            if not isinstance(index, dict):
                raise CheckpointError(f"{file} has no weight_map; is the download complete?")
            state: dict[str, torch.Tensor] = {}
            for shard in sorted(set(index.values())):
                state.update(_read_weights_file(path / shard))
            return state
        return _read_weights_file(file)
    raise CheckpointError(
        f"{path} has a Mask2Former config.json but no weights ({' / '.join(_HF_WEIGHTS[::2])}); download them too"
    )


def _read_weights_file(file: Path) -> dict[str, torch.Tensor]:
    if not file.is_file():
        raise CheckpointError(f"{file} is missing; is the download complete?")
    if file.suffix == ".safetensors":
        return read_safetensors(file)
    state = torch_load_weights(file)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{file} does not hold a flat dict of tensors")
    return state


def torch_load_weights(file: Path) -> Any:
    """``torch.load(weights_only=True)``, the only way m2f reads torch files; its refusals become CheckpointErrors
    that keep torch's warning about ``weights_only=False`` but never advise it."""
    import pickle

    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        refused = re.search(r"GLOBAL ([\w.]+)", str(exc))
        if not refused:
            raise CheckpointError(f"{file} is not a readable torch file ({_first_line(exc)}); is it complete?") from None
        raise CheckpointError(
            f"{file} needs {refused.group(1)}, which torch.load(weights_only=True) refuses; m2f never loads with "
            "weights_only=False because that can run arbitrary code from the file: use a checkpoint that holds only "
            "tensors (an official .pkl / .pth, a Hugging Face folder or `m2f convert` output)") from None
    except Exception as exc:  # a truncated / foreign file: torch raises assorted types
        raise CheckpointError(f"{file} is not a readable torch file ({_first_line(exc)}); is it complete?") from None


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__


def read_safetensors(file: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(file), device="cpu")
    except Exception as exc:
        raise CheckpointError(f"{file} is not a readable safetensors file ({type(exc).__name__}); is it complete?") from None


def _preview(keys: list[str], limit: int = 10) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... (+{len(keys) - limit} more)" if len(keys) > limit else "")


def load_state_dict_strict(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str = "checkpoint",
                           fix: str = "check the checkpoint and --preset") -> None:
    """``model.load_state_dict(state)`` that fails with one readable line (ending in ``fix``) unless every tensor
    matches exactly."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [
        f"{k} checkpoint {tuple(state[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing key(s): {_preview(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s): {_preview(unexpected)}")
        if mismatched:
            parts.append(f"{len(mismatched)} shape mismatch(es): {_preview(mismatched, 5)}")
        name = getattr(getattr(model, "config", None), "name", "") or "the configured"
        raise CheckpointError(
            f"{source} does not fit the {name} architecture: {'; '.join(parts)}; {fix}"
        )
    model.load_state_dict(state, strict=True)
