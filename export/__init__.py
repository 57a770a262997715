"""m2f.export: ONNX export with verified parity, TensorRT engines with m2f's kernels as plugins.

    from m2f.export import to_onnx, check_onnx
    result = to_onnx(model, "m2f.onnx", height=512, width=512, dynamic=True)   # + m2f.onnx.json manifest
    report = check_onnx("m2f.onnx", model=model)                              # report["verdict"] == "pass"

TensorRT (>= 10.3, a CUDA GPU; imported lazily, BackendUnavailableError where absent): ``build_engine``,
``TensorRTRunner`` (NumPy in / out, no PyTorch), ``register_tensorrt_plugins``. Triton Inference Server:
``write_triton_repo``. The whole chain in one work directory: ``run_pipeline``. See export/README.md for what was verified where.
"""
from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "to_onnx": "onnx_export",
    "export_checkpoint": "onnx_export",
    "ExportResult": "onnx_export",
    "OnnxExportModule": "onnx_export",
    "check_onnx": "check",
    "build_engine": "tensorrt_build",
    "TensorRTRunner": "runner",
    "register_tensorrt_plugins": "plugins",
    "write_triton_repo": "triton_repo",
    "run_pipeline": "pipeline",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = list(_LAZY)
