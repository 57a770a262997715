"""One :class:`Runner` shape for every way m2f runs a model: PyTorch, ONNX Runtime, OpenVINO, TensorRT.

A runner takes normalised pixels (B, 3, H, W) as a NumPy array and returns the model's outputs by name
(``pred_logits``, ``pred_masks``, or the in-graph post-processed ones) as NumPy arrays. :func:`open_runner` opens
an exported artifact with its target's runner (:mod:`m2f.export.targets`); :func:`postprocess_outputs` turns raw
outputs into per-image results with the one post-processing dispatcher (:func:`m2f.postprocess.postprocess_task`).

The TensorRT runner: NumPy in, NumPy out, no PyTorch for inference. Device buffers and copies go through cuda-python's runtime binding (``cuda.bindings.runtime``). The engine's
outputs (``pred_logits``, ``pred_masks``, or the in-graph post-processed ones) come back as arrays; ``predict``
applies the NumPy post-processing of :mod:`m2f.export.postprocess_numpy` (same algorithm as ``m2f.postprocess``).

    runner = TensorRTRunner("m2f.engine")
    outputs = runner.infer(pixel_values)                    # dict name -> np.ndarray
    results = runner.predict(pixel_values, task="panoptic", image_sizes=[(h, w)], original_sizes=[(H, W)])

Written against the TensorRT 10.x Python API; it needs a CUDA GPU with TensorRT and was not run on the
development machines (see export/README.md).
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Protocol, Sequence, runtime_checkable

import numpy as np

from m2f.errors import InputError

from ._trt import check_cuda, import_cudart, import_tensorrt
from .manifest import read_manifest

RAW_OUTPUTS = ("pred_logits", "pred_masks")


@runtime_checkable
class Runner(Protocol):
    """Arrays in, the model's outputs out. ``fixed_size`` is the (H, W) a static graph takes (None: any multiple
    of the model's size divisibility); ``fixed_batch`` likewise the one batch size it takes (None: any)."""

    name: str
    output_names: tuple[str, ...]
    fixed_size: tuple[int, int] | None
    fixed_batch: int | None

    def run(self, pixel_values: np.ndarray) -> dict[str, np.ndarray]: ...

    def close(self) -> None: ...


class ClosingRunner(contextlib.AbstractContextManager):
    """``with runner:`` closes it at the end (every runner here derives from this)."""

    def close(self) -> None:  # nothing to release unless a runner holds sessions or device memory
        pass

    def __exit__(self, *exc: Any) -> None:
        self.close()


class TorchRunner(ClosingRunner):
    """A PyTorch m2f model as a Runner (float32 outputs on the host)."""

    output_names = RAW_OUTPUTS
    fixed_size = None
    fixed_batch = None

    def __init__(self, model: Any, device: str = "cpu", name: str = "") -> None:
        import torch

        self.model, self.device, self.name = model.eval(), torch.device(device), name

    def run(self, pixel_values: np.ndarray) -> dict[str, np.ndarray]:
        import torch

        with torch.inference_mode():
            out = self.model(torch.as_tensor(pixel_values).to(self.device))
        return {"pred_logits": out.pred_logits.float().cpu().numpy(), "pred_masks": out.pred_masks.float().cpu().numpy()}


class RunnerModel:
    """A runner in the shape of an m2f model for ``m2f predict``: ``model(pixel_values)`` (a torch tensor) ->
    outputs with ``pred_logits`` / ``pred_masks`` tensors, ``config`` the model config it was exported from."""

    def __init__(self, runner: Runner, config: Any) -> None:
        missing = sorted(set(RAW_OUTPUTS) - set(runner.output_names))
        if missing:
            raise InputError(f"{runner.name} has no {', '.join(missing)} output(s); export it with --postprocess none")
        self.runner, self.config, self.fixed_size = runner, config, runner.fixed_size

    def __call__(self, pixel_values: Any) -> Any:
        from types import SimpleNamespace

        import torch

        out = self.runner.run(pixel_values.cpu().numpy())
        return SimpleNamespace(**{name: torch.from_numpy(np.asarray(out[name])).float() for name in RAW_OUTPUTS})


def pad_to(pixel_values: Any, size: tuple[int, int]) -> Any:
    """Zero-pad a (B, 3, h, w) torch batch to a static model's (H, W) (bottom / right, as the batch padding)."""
    import torch.nn.functional as F

    h, w = pixel_values.shape[-2:]
    if h > size[0] or w > size[1]:
        raise InputError(f"an image padded to {h}x{w} does not fit the exported model's fixed input "
                         f"{size[0]}x{size[1]}; export with --dynamic or a larger size")
    return F.pad(pixel_values, (0, size[1] - w, 0, size[0] - h))


def open_runner(path: str | Path, **options: Any) -> Runner:
    """The runner of an exported artifact (.onnx file, OpenVINO directory, TensorRT engine), by its target."""
    from .targets import for_artifact

    return for_artifact(path).runner(path, **options)


class _DeviceBuffer:
    def __init__(self, cudart: Any, nbytes: int) -> None:
        self.cudart, self.nbytes = cudart, max(int(nbytes), 1)
        self.ptr = int(check_cuda(cudart.cudaMalloc(self.nbytes)))

    def free(self) -> None:
        if self.ptr:
            check_cuda(self.cudart.cudaFree(self.ptr))
            self.ptr = 0


class TensorRTRunner(ClosingRunner):
    """One engine, one execution context, one CUDA stream; buffers grow to the largest shape seen."""

    def __init__(self, engine_path: str | Path, register_m2f_plugins: bool | None = None) -> None:
        engine_path = Path(engine_path)
        if not engine_path.is_file():
            raise InputError(f"engine {engine_path} not found; build one with `m2f export tensorrt`")
        self.manifest = read_manifest(engine_path, required=False, kind="tensorrt")
        details = self.manifest.details if self.manifest is not None else {}
        trt = self.trt = import_tensorrt()
        self.cudart = import_cudart()
        self.logger = trt.Logger(trt.Logger.WARNING)
        trt.init_libnvinfer_plugins(self.logger, "")  # engines with TensorRT's MultiscaleDeformableAttnPlugin_TRT
        if register_m2f_plugins is None:
            register_m2f_plugins = details.get("plugins") == "m2f"
        if register_m2f_plugins:  # AOT plugins carry their PTX; the creator must still be known to deserialize
            from .plugin_kernels import register_tensorrt_plugins

            register_tensorrt_plugins()
        self.runtime = trt.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine(engine_path.read_bytes())
        if self.engine is None:
            raise InputError(
                f"TensorRT could not deserialize {engine_path}: built by another TensorRT version or for another "
                "GPU; rebuild it here with `m2f export tensorrt`"
            )
        self.context = self.engine.create_execution_context()
        self.stream = check_cuda(self.cudart.cudaStreamCreate())
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.input_names = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.output_names = tuple(n for n in names if n not in self.input_names)
        self.name = str(engine_path)
        static = self.manifest is not None and not self.manifest.dynamic
        self.fixed_size = (self.manifest.height, self.manifest.width) if static else None
        self.fixed_batch = None  # an engine takes any batch up to its profile's maximum
        self._buffers: dict[str, _DeviceBuffer] = {}

    # -- raw inference -------------------------------------------------------------------------------
    def _buffer(self, name: str, nbytes: int) -> _DeviceBuffer:
        buf = self._buffers.get(name)
        if buf is None or buf.nbytes < nbytes:
            if buf is not None:
                buf.free()
            buf = self._buffers[name] = _DeviceBuffer(self.cudart, nbytes)
        return buf

    def infer(self, pixel_values: np.ndarray) -> dict[str, np.ndarray]:
        """(B, 3, H, W) normalised pixels -> the engine's outputs by name, as host arrays."""
        trt, cudart = self.trt, self.cudart
        name = self.input_names[0]
        dtype = trt.nptype(self.engine.get_tensor_dtype(name))
        x = np.ascontiguousarray(pixel_values, dtype=dtype)
        if x.ndim != 4 or x.shape[1] != 3:
            raise InputError(f"pixel_values must be (B, 3, H, W), got {x.shape}")
        if not self.context.set_input_shape(name, x.shape):
            raise InputError(f"input shape {x.shape} is outside the engine's optimisation profile "
                             f"{self.manifest.details.get('profile') if self.manifest else '(see the engine manifest)'}")
        h2d, d2h = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        buf = self._buffer(name, x.nbytes)
        check_cuda(cudart.cudaMemcpyAsync(buf.ptr, x.ctypes.data, x.nbytes, h2d, self.stream))
        self.context.set_tensor_address(name, buf.ptr)
        outputs: dict[str, np.ndarray] = {}
        for out_name in self.output_names:
            shape = tuple(self.context.get_tensor_shape(out_name))
            out = np.empty(shape, dtype=trt.nptype(self.engine.get_tensor_dtype(out_name)))
            self.context.set_tensor_address(out_name, self._buffer(out_name, out.nbytes).ptr)
            outputs[out_name] = out
        if not self.context.execute_async_v3(self.stream):
            raise RuntimeError("TensorRT execution failed (see the TensorRT log)")
        for out_name, out in outputs.items():
            check_cuda(cudart.cudaMemcpyAsync(out.ctypes.data, self._buffers[out_name].ptr, out.nbytes, d2h,
                                              self.stream))
        check_cuda(cudart.cudaStreamSynchronize(self.stream))
        return outputs

    run = __call__ = infer

    # -- post-processed results ----------------------------------------------------------------------
    def predict(
        self,
        pixel_values: np.ndarray,
        task: str = "panoptic",
        image_sizes: Sequence[tuple[int, int]] | None = None,
        original_sizes: Sequence[tuple[int, int]] | None = None,
    ) -> list[Any]:
        """Per image: an :mod:`m2f.postprocess` SemanticResult, InstanceResult or PanopticResult."""
        outputs = self.infer(pixel_values)
        if not set(RAW_OUTPUTS) <= set(outputs):
            raise InputError("predict() needs an engine with raw outputs (exported with --postprocess none); "
                             "use infer() for engines with in-graph post-processing")
        return postprocess_outputs(outputs["pred_logits"], outputs["pred_masks"], pixel_values.shape[-2:], task,
                                   dict(self.manifest.config or {}) if self.manifest else {}, image_sizes,
                                   original_sizes)

    def close(self) -> None:
        for buf in self._buffers.values():
            buf.free()
        self._buffers.clear()
        if getattr(self, "stream", None) is not None:
            check_cuda(self.cudart.cudaStreamDestroy(self.stream))
            self.stream = None



def postprocess_outputs(
    pred_logits: np.ndarray,  # (B, Q, K+1)
    pred_masks: np.ndarray,  # (B, Q, Hp/stride, Wp/stride)
    padded_size: Sequence[int],
    task: str,
    config: dict[str, Any],
    image_sizes: Sequence[tuple[int, int]] | None = None,
    original_sizes: Sequence[tuple[int, int]] | None = None,
) -> list[Any]:
    """Per-image results of a runner's raw outputs (``config``: the model config dict of the manifest), by the
    same dispatcher as ``m2f predict`` / ``m2f eval`` on a PyTorch model."""
    import torch

    from m2f.config import Mask2FormerConfig
    from m2f.postprocess import postprocess_task

    padded = (int(padded_size[0]), int(padded_size[1]))
    image_sizes = list(image_sizes or [padded] * pred_logits.shape[0])
    return postprocess_task(task, torch.from_numpy(np.asarray(pred_logits)), torch.from_numpy(np.asarray(pred_masks)),
                            image_sizes, list(original_sizes or image_sizes), padded, Mask2FormerConfig.from_dict(config))
