"""Run a serialized TensorRT engine with NumPy in, NumPy out: no PyTorch at run time.

Device buffers and copies go through cuda-python's runtime binding (``cuda.bindings.runtime``). The engine's
outputs (``pred_logits``, ``pred_masks``, or the in-graph post-processed ones) come back as arrays; ``predict``
applies the NumPy post-processing of :mod:`m2f.export.postprocess_numpy` (same algorithm as ``m2f.postprocess``).

    runner = TensorRTRunner("m2f.engine")
    outputs = runner.infer(pixel_values)                    # dict name -> np.ndarray
    results = runner.predict(pixel_values, task="panoptic", image_sizes=[(h, w)], original_sizes=[(H, W)])

Written against the TensorRT 10.x Python API; it needs a CUDA GPU with TensorRT and was not run on the
development machines (see export/README.md).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from m2f.errors import InputError

from . import postprocess_numpy as pp
from ._trt import check_cuda, import_cudart, import_tensorrt
from .manifest import read_manifest


class _DeviceBuffer:
    def __init__(self, cudart: Any, nbytes: int) -> None:
        self.cudart, self.nbytes = cudart, max(int(nbytes), 1)
        self.ptr = int(check_cuda(cudart.cudaMalloc(self.nbytes)))

    def free(self) -> None:
        if self.ptr:
            check_cuda(self.cudart.cudaFree(self.ptr))
            self.ptr = 0


class TensorRTRunner:
    """One engine, one execution context, one CUDA stream; buffers grow to the largest shape seen."""

    def __init__(self, engine_path: str | Path, register_m2f_plugins: bool | None = None) -> None:
        engine_path = Path(engine_path)
        if not engine_path.is_file():
            raise InputError(f"engine {engine_path} not found; build one with `m2f export tensorrt`")
        self.manifest = read_manifest(engine_path, required=False, kind="tensorrt") or {}
        trt = self.trt = import_tensorrt()
        self.cudart = import_cudart()
        self.logger = trt.Logger(trt.Logger.WARNING)
        trt.init_libnvinfer_plugins(self.logger, "")  # engines with TensorRT's MultiscaleDeformableAttnPlugin_TRT
        if register_m2f_plugins is None:
            register_m2f_plugins = self.manifest.get("plugins") == "m2f"
        if register_m2f_plugins:  # AOT plugins carry their PTX; the creator must still be known to deserialize
            from .plugins import register_tensorrt_plugins

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
        self.output_names = [n for n in names if n not in self.input_names]
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
                             f"{self.manifest.get('profile', '(see the engine manifest)')}")
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

    __call__ = infer

    # -- post-processed results ----------------------------------------------------------------------
    def predict(
        self,
        pixel_values: np.ndarray,
        task: str = "panoptic",
        image_sizes: Sequence[tuple[int, int]] | None = None,
        original_sizes: Sequence[tuple[int, int]] | None = None,
    ) -> list[Any]:
        """Per image: semantic (K, H, W) probabilities, an InstanceResult or a PanopticResult."""
        outputs = self.infer(pixel_values)
        if "pred_logits" not in outputs or "pred_masks" not in outputs:
            raise InputError("predict() needs an engine with raw outputs (exported with --postprocess none); "
                             "use infer() for engines with in-graph post-processing")
        return postprocess_outputs(outputs["pred_logits"], outputs["pred_masks"], pixel_values.shape[-2:], task,
                                   self.manifest.get("config") or {}, image_sizes, original_sizes)

    def close(self) -> None:
        for buf in self._buffers.values():
            buf.free()
        self._buffers.clear()
        if getattr(self, "stream", None) is not None:
            check_cuda(self.cudart.cudaStreamDestroy(self.stream))
            self.stream = None

    def __enter__(self) -> "TensorRTRunner":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def postprocess_outputs(
    pred_logits: np.ndarray,  # (B, Q, K+1)
    pred_masks: np.ndarray,  # (B, Q, H/4, W/4)
    padded_size: Sequence[int],
    task: str,
    config: dict[str, Any],
    image_sizes: Sequence[tuple[int, int]] | None = None,
    original_sizes: Sequence[tuple[int, int]] | None = None,
) -> list[Any]:
    """The NumPy post-processing of every image of a batch (``config``: the model config dict of the manifest)."""
    batch = pred_logits.shape[0]
    padded = (int(padded_size[0]), int(padded_size[1]))
    image_sizes = list(image_sizes or [padded] * batch)
    original_sizes = list(original_sizes or image_sizes)
    post = config.get("postprocess", {})
    results = []
    for i in range(batch):
        masks = pp.postprocess_masks(pred_masks[i], padded, image_sizes[i], original_sizes[i])
        if task == "semantic":
            results.append(pp.semantic_inference(pred_logits[i], masks))
        elif task == "instance":
            things = config.get("thing_classes") or None
            if config.get("default_task") != "panoptic":
                things = None  # instance models: every class is a thing
            results.append(pp.instance_inference(pred_logits[i], masks, post.get("instance_topk", 100), things))
        elif task == "panoptic":
            results.append(pp.panoptic_inference(pred_logits[i], masks, config.get("thing_classes", ()),
                                                 post.get("object_mask_threshold", 0.8),
                                                 post.get("overlap_threshold", 0.8)))
        else:
            raise InputError(f"task must be semantic, instance or panoptic, got {task!r}")
    return results
