"""Lazy access to TensorRT and a CUDA binding, with one clear error where they are missing."""
from __future__ import annotations

from typing import Any

from m2f.errors import BackendUnavailableError

MIN_TENSORRT = (10, 7)
INSTALL_HINT = (
    "pip install tensorrt (NVIDIA's index, https://pypi.nvidia.com; needs a CUDA GPU and driver) "
    "- or use the ONNX file with ONNX Runtime"
)


def _version_tuple(version: str) -> tuple[int, ...]:
    parts = []
    for p in version.split(".")[:3]:
        digits = "".join(ch for ch in p if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


def import_tensorrt() -> Any:
    """``import tensorrt`` (>= 10.7), or raise BackendUnavailableError naming the fix."""
    try:
        import tensorrt as trt
    except Exception:  # ImportError, or a broken install raising OSError on a missing libnvinfer
        raise BackendUnavailableError(f"TensorRT >= 10.7 is not installed: {INSTALL_HINT}") from None
    if _version_tuple(trt.__version__) < MIN_TENSORRT:
        raise BackendUnavailableError(
            f"TensorRT {trt.__version__} is too old: m2f needs >= 10.7 (Python plugins, IPluginV3); {INSTALL_HINT}"
        )
    return trt


def import_tensorrt_plugin() -> Any:
    import_tensorrt()
    try:
        import tensorrt.plugin as trtp
    except Exception:
        raise BackendUnavailableError(
            f"tensorrt.plugin (TensorRT >= 10.7 Python plugins) cannot be imported: {INSTALL_HINT}"
        ) from None
    return trtp


def import_cudart() -> Any:
    """The CUDA runtime binding of cuda-python (``cuda.bindings.runtime``; older releases ``cuda.cudart``)."""
    try:
        from cuda.bindings import runtime as cudart  # cuda-python >= 12.6
    except Exception:
        try:
            from cuda import cudart  # type: ignore[no-redef]  # cuda-python < 12.6
        except Exception:
            raise BackendUnavailableError(
                "cuda-python is not installed: pip install cuda-python (the TensorRT runner uses it for device buffers)"
            ) from None
    return cudart


def check_cuda(result: Any) -> Any:
    """Unpack a cuda-python call's (err, *values) tuple; raise RuntimeError on an error code."""
    if isinstance(result, tuple):
        err, *values = result
    else:
        err, values = result, []
    code = int(getattr(err, "value", err))
    if code != 0:
        raise RuntimeError(f"CUDA error {err!r}")
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)
