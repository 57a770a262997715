"""Lazy access to TensorRT and a CUDA binding, with one clear error where they are missing, and the version facts
the build follows (export/README.md's support table, with NVIDIA's sources)."""
from __future__ import annotations

from typing import Any

from m2f.errors import BackendUnavailableError

MIN_TENSORRT = (10, 3)  # JetPack 6.x (Jetson Orin) ships TensorRT 10.3
PYTHON_PLUGINS_MIN = (10, 9)  # m2f's plugins use tensorrt.plugin.aot_impl: AOT Python plugins, TensorRT 10.9
MSDA_PLUGIN_V2_MIN = (10, 11)  # MultiscaleDeformableAttnPlugin_TRT version "2" (IPluginV3), TensorRT 10.11
STRONGLY_TYPED_ONLY_MIN = (11, 0)  # 11.x removed weak typing (BuilderFlag.FP16 / BF16 / INT8, calibrators)
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


def tensorrt_version(trt: Any) -> tuple[int, ...]:
    return _version_tuple(trt.__version__)


def weak_typing_available(trt: Any) -> bool:
    """TensorRT 10.x: precision builder flags and INT8 calibrators exist; 11.x: strongly typed networks only."""
    return tensorrt_version(trt) < STRONGLY_TYPED_ONLY_MIN


def msda_plugin_version(trt: Any) -> str:
    """The MultiscaleDeformableAttnPlugin_TRT version to ask for: "2" (IPluginV3) where TensorRT has it, else "1"."""
    return "2" if tensorrt_version(trt) >= MSDA_PLUGIN_V2_MIN else "1"


def import_tensorrt() -> Any:
    """``import tensorrt`` (>= 10.3), or raise BackendUnavailableError naming the fix."""
    try:
        import tensorrt as trt
    except Exception:  # ImportError, or a broken install raising OSError on a missing libnvinfer
        raise BackendUnavailableError(f"TensorRT >= 10.3 is not installed: {INSTALL_HINT}") from None
    if not isinstance(getattr(trt, "__version__", None), str):  # e.g. only tensorrt-stubs' .pyi files
        raise BackendUnavailableError(f"the tensorrt package found has no runtime (type stubs only?): {INSTALL_HINT}")
    if tensorrt_version(trt) < MIN_TENSORRT:
        raise BackendUnavailableError(
            f"TensorRT {trt.__version__} is too old: m2f needs >= 10.3 (JetPack 6's); {INSTALL_HINT}"
        )
    return trt


def import_tensorrt_plugin() -> Any:
    """``tensorrt.plugin`` for m2f's AOT Python plugins (TensorRT >= 10.9), or one line naming what works instead."""
    trt = import_tensorrt()
    if tensorrt_version(trt) < PYTHON_PLUGINS_MIN:
        raise BackendUnavailableError(
            f"m2f's TensorRT plugins need TensorRT >= 10.9 (ahead-of-time tensorrt.plugin), this is {trt.__version__}: "
            "build with --plugins tensorrt from a graph exported with --masked-attn standard, or upgrade TensorRT"
        )
    try:
        import tensorrt.plugin as trtp
    except Exception:
        raise BackendUnavailableError(
            f"tensorrt.plugin (TensorRT >= 10.9 Python plugins) cannot be imported: {INSTALL_HINT}"
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
    err: Any
    values: list[Any]
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
