"""m2f: Mask2Former, fast. Same outputs as the official model; fused Triton kernels; verified ONNX / TensorRT.

Main entry points::

    import m2f
    model = m2f.from_pretrained("path/to/hf_dir_or_checkpoint")   # eval mode; or a hub id "OWNER/NAME"
    cfg = m2f.preset("swin-t-coco-panoptic")
    model = m2f.build_model(cfg, backend="torch")                    # random weights

Submodules: ``m2f.kernels`` (attention ops), ``m2f.export`` (ONNX / TensorRT), ``m2f.bench`` (benchmarks).
"""
from __future__ import annotations

from typing import Any

from .config import (
    Mask2FormerConfig,
    PixelDecoderConfig,
    PostProcessConfig,
    ResNetConfig,
    SwinConfig,
    TransformerDecoderConfig,
    preset,
    preset_names,
)
from .errors import M2FError

__version__ = "0.1.0"

# The model pulls in torch.nn modules and checkpoint readers; load them on first use so that light
# imports (``m2f.config``, the CLI's argument parsing) stay fast.
_LAZY = {
    "Mask2Former": "m2f.model",
    "Mask2FormerOutput": "m2f.model",
    "build_model": "m2f.model",
    "from_pretrained": "m2f.checkpoints",
    "save_pretrained": "m2f.checkpoints",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'm2f' has no attribute {name!r}")


def __dir__() -> list[str]:
    # the lazy names too, so that completion and dir(m2f) show them before their first use
    return sorted({*globals(), *_LAZY})


__all__ = [
    "Mask2FormerConfig",
    "PixelDecoderConfig",
    "PostProcessConfig",
    "ResNetConfig",
    "SwinConfig",
    "TransformerDecoderConfig",
    "M2FError",
    "preset",
    "preset_names",
    *_LAZY,
]
