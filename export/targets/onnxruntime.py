"""ONNX Runtime: runs the exported ONNX file itself (CPU here; CUDA where onnxruntime-gpu is installed).

Every ONNX Runtime session of m2f is made by :func:`ort_session`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from m2f.errors import BackendUnavailableError, InputError

from ..manifest import load_onnx
from ..runner import ClosingRunner
from . import Target, register

CPU = ("CPUExecutionProvider",)


REFERENCE_PLUGINS = "plugin nodes run by their reference ONNX functions: the plugins' semantics, not their kernels"


def ort_session(path: str | Path, providers: Sequence[str] = CPU, threads: int | None = None,
                reference_plugins: bool = False) -> tuple[Any, str]:
    """An ``onnxruntime.InferenceSession`` on ``path`` with quiet logging, and how it runs the graph: "onnxruntime",
    or for a low-precision graph whose types this build has no kernels for (bf16 on the CPU) "onnxruntime
    (emulated ...)". ``reference_plugins``: run m2f's plugin nodes, which ONNX Runtime has no kernel for, by
    their reference functions (:func:`m2f.export.plugin_functions.with_reference_functions`). One line naming the
    problem when onnxruntime is missing or cannot load the file."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise BackendUnavailableError("ONNX Runtime is not installed: pip install onnxruntime") from None
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    model = None  # the graph as ONNX Runtime gets it, where that is not the file itself
    how = ["onnxruntime"]
    if reference_plugins:
        from ..plugin_functions import with_reference_functions

        model = with_reference_functions(load_onnx(path))
        how.append(REFERENCE_PLUGINS)
    try:
        source = str(path) if model is None else model.SerializeToString()
        return ort.InferenceSession(source, options, providers=list(providers)), _runs_as(how)
    except Exception as exc:  # onnxruntime raises its own exception types for bad files
        if "NOT_IMPLEMENTED" not in str(exc):
            raise InputError(f"onnxruntime cannot load {path} ({type(exc).__name__}: "
                             f"{' '.join(str(exc).split())[:200]}); re-export it with `m2f export onnx`") from None
    # a bf16 graph: this CPU build has no bf16 kernels; run it emulated (float32 arithmetic, bf16 rounding)
    from ..precision import emulate_on_cpu

    emulated = emulate_on_cpu(model if model is not None else load_onnx(path))
    session = ort.InferenceSession(emulated.SerializeToString(), options, providers=list(providers))
    how.append("emulated: the CPU build has no kernel for some of the graph's types; float32 arithmetic, rounded "
               "to the graph's type at every stored tensor")
    return session, _runs_as(how)


def _runs_as(how: list[str]) -> str:
    return how[0] + (f" ({'; '.join(how[1:])})" if how[1:] else "")


class OnnxRuntimeRunner(ClosingRunner):
    """An ONNX file in ONNX Runtime: NumPy in, the graph's outputs by name out."""

    def __init__(self, path: str | Path, threads: int | None = None, providers: Sequence[str] = CPU,
                 reference_plugins: bool = False) -> None:
        path = Path(path)
        if not path.is_file():
            raise InputError(f"ONNX file {path} does not exist; export one with `m2f export onnx`")
        self.name = str(path)
        self.session, self.runs_as = ort_session(path, providers, threads, reference_plugins)
        inputs = self.session.get_inputs()
        if inputs[0].type == "tensor(bfloat16)":
            raise InputError(f"{path} takes a bfloat16 input, which NumPy cannot make; export it with float32 inputs "
                             "and outputs (the default)")
        self.input_name = inputs[0].name
        self.input_dtype = np.float16 if inputs[0].type == "tensor(float16)" else np.float32
        self.output_names = tuple(o.name for o in self.session.get_outputs())
        shape = inputs[0].shape
        self.fixed_shape = tuple(shape) if all(isinstance(s, int) for s in shape) else None
        self.fixed_size = (shape[2], shape[3]) if all(isinstance(s, int) for s in shape[2:]) else None
        self.fixed_batch = shape[0] if isinstance(shape[0], int) else None

    def run(self, pixel_values: np.ndarray) -> dict[str, np.ndarray]:
        x = np.ascontiguousarray(pixel_values, dtype=self.input_dtype)
        return dict(zip(self.output_names, self.session.run(list(self.output_names), {self.input_name: x})))

    def close(self) -> None:
        self.session = None


TARGET = register(Target(
    name="onnxruntime",
    description="ONNX Runtime (CPU / CUDA): runs the .onnx file",
    artifact="onnx",
    op_modes={"msda": "decomposed", "masked_attn": "standard"},
    ops=None,  # ONNX Runtime runs every standard op the exporter emits
    runner=OnnxRuntimeRunner,
    triton_platform=("onnxruntime_onnx", "model.onnx"),
    suffixes=(".onnx",),
    flag="onnx",
))
