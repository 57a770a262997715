"""Original (detectron2) Mask2Former checkpoints: ``model_final_*.pkl`` and ``.pth`` files.

A ``.pkl`` is a pickled dict with numpy arrays under ``"model"``. It is read with a restricted unpickler that
only rebuilds numpy arrays, numpy dtypes / scalars and plain containers, so a malicious file cannot run code. A
``.pth`` is ``torch.save``'d and read with ``torch.load(weights_only=True)``.

Our parameter names mirror the official ones, so the head converts by a prefix rename:
``sem_seg_head.pixel_decoder.`` -> ``pixel_decoder.``, ``sem_seg_head.predictor.`` -> ``transformer_decoder.``.
The files do not record the architecture: a preset (or config) must say which one it is.
"""
from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch

from m2f.checkpoints import torch_load_weights
from m2f.config import Mask2FormerConfig
from m2f.errors import CheckpointError

HEAD_PREFIXES = {"sem_seg_head.pixel_decoder.": "pixel_decoder.", "sem_seg_head.predictor.": "transformer_decoder."}
BACKBONE_PREFIX = "backbone."
# Tensors of the training loss / input normalisation only: read and dropped.
IGNORED_KEYS = ("criterion.empty_weight", "pixel_mean", "pixel_std")

_ALLOWED_GLOBALS = {
    ("collections", "OrderedDict"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "scalar"),
    ("_codecs", "encode"),  # numpy arrays pickled with protocol 2 carry their bytes through it
}


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED_GLOBALS or (module in ("numpy", "numpy.dtypes") and name.endswith("DType")):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def _load_restricted_pickle(data: bytes) -> Any:
    return _RestrictedUnpickler(io.BytesIO(data), encoding="latin1").load()


def read_detectron2_file(path: Path) -> dict[str, torch.Tensor]:
    """The flat state dict (official key names) of a detectron2 ``.pkl`` or ``.pth`` checkpoint."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise CheckpointError(f"cannot read {path}: {exc.strerror or exc}") from None
    obj: Any = None
    if raw[:2] == b"PK":  # torch.save's zip container
        obj = torch_load_weights(path)
    elif raw[:1] == b"\x80":  # a pickle (detectron2 .pkl, or torch.save's legacy format)
        try:
            obj = _load_restricted_pickle(raw)
        except pickle.UnpicklingError as exc:
            if "refusing to load torch" in str(exc):
                obj = torch_load_weights(path)
            else:
                raise CheckpointError(
                    f"{path} is not a checkpoint m2f can read safely ({exc}); expected numpy arrays under \"model\""
                ) from None
        except Exception as exc:  # truncated / corrupt pickle
            raise CheckpointError(f"{path} is not a readable checkpoint ({type(exc).__name__}); is the file complete?") from None
    else:
        raise CheckpointError(
            f"{path} is not a checkpoint: expected a Hugging Face model directory, a directory written by "
            "`m2f convert`, or an official .pkl / .pth file"
        )
    return _state_from_object(obj, path)


def _state_from_object(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        obj = obj["model"]
    elif isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not obj:
        raise CheckpointError(f"{path} holds no state dict (expected a dict of tensors under \"model\")")
    state: dict[str, torch.Tensor] = {}
    for key, value in obj.items():
        if isinstance(value, np.ndarray):
            value = torch.from_numpy(np.array(value, copy=True))
        elif isinstance(value, np.generic):
            value = torch.as_tensor(np.asarray(value))
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{path} entry {key!r} is a {type(value).__name__}, not an array; not a model state dict")
        if value.is_floating_point() and value.dtype != torch.float32:
            value = value.float()
        state[key] = value
    return state


def check_is_mask2former_state(d2_state: dict[str, torch.Tensor], source: str = "checkpoint") -> None:
    """Raise a CheckpointError naming what the file is when it is not an official Mask2Former state dict."""
    if any(k.startswith("sem_seg_head.") for k in d2_state):
        return
    if any(k.startswith("model.pixel_level_module.") for k in d2_state):
        raise CheckpointError(
            f"{source} is a Hugging Face Mask2Former state dict; pass the directory holding it and its config.json"
        )
    if any(k.startswith(("pixel_decoder.", "transformer_decoder.")) for k in d2_state):
        raise CheckpointError(f"{source} is an m2f state dict; pass the directory written by `m2f convert`")
    raise CheckpointError(
        f"{source} holds no sem_seg_head.* tensors: it is not a Mask2Former checkpoint "
        f"(first keys: {', '.join(list(d2_state)[:3])})"
    )


def convert_detectron2_state_dict(d2_state: dict[str, torch.Tensor], cfg: Mask2FormerConfig, source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Our state dict from an official one. Unknown keys are kept under their names (reported as unexpected)."""
    from m2f.backbones.convert import pop_detectron2_backbone_state

    check_is_mask2former_state(d2_state, source)
    d2_state = dict(d2_state)
    for key in IGNORED_KEYS:
        d2_state.pop(key, None)
    ours: dict[str, torch.Tensor] = {}
    for k, v in pop_detectron2_backbone_state(d2_state, cfg.backbone, prefix=BACKBONE_PREFIX).items():
        ours[k if k.startswith("backbone.") else "backbone." + k] = v
    for key in list(d2_state):
        for prefix, replacement in HEAD_PREFIXES.items():
            if key.startswith(prefix):
                # checkpoints from before the official v2 decoder call the query features "static_query"
                new = replacement + key[len(prefix) :].replace("static_query", "query_feat")
                ours[new] = d2_state.pop(key)
                break
    ours.update(d2_state)  # leftovers: unexpected
    return ours
