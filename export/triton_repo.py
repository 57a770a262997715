"""A model repository for NVIDIA Triton Inference Server from an exported model whose target Triton serves
(:attr:`m2f.export.targets.Target.triton_platform`: ONNX Runtime, TensorRT).

Layout (Triton's model repository convention)::

    DIR/NAME/config.pbtxt
    DIR/NAME/1/model.onnx        (platform onnxruntime_onnx)   or   DIR/NAME/1/model.plan   (tensorrt_plan)

Input / output names, dtypes and shapes come from the export manifest (for an ONNX file without one, from the
graph). A dynamic batch axis becomes ``max_batch_size`` + ``dynamic_batching`` and is left out of ``dims``;
other dynamic axes are ``-1``. A model exported at a fixed batch gets ``max_batch_size: 0`` (Triton's "no
batching" form) with the batch in ``dims``.
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from m2f.errors import InputError
from m2f.io import atomic_dir, check_can_write

from . import targets
from .manifest import load_onnx, read_manifest

TRITON_DTYPES = {
    "float32": "TYPE_FP32",
    "float16": "TYPE_FP16",
    "bfloat16": "TYPE_BF16",
    "int64": "TYPE_INT64",
    "int32": "TYPE_INT32",
    "int8": "TYPE_INT8",
    "uint8": "TYPE_UINT8",
    "bool": "TYPE_BOOL",
}


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy-style name: "float32", "int64", ...
    shape: tuple[int | str, ...]  # a str (or -1) is a dynamic axis


def _is_dynamic(dim: int | str) -> bool:
    return isinstance(dim, str) or dim is None or int(dim) < 0


def _onnx_io(path: Path) -> tuple[list[TensorSpec], list[TensorSpec]]:
    from onnx import helper

    model = load_onnx(path, load_external_data=False)

    def spec(value_info: Any) -> TensorSpec:
        t = value_info.type.tensor_type
        dims = tuple(d.dim_param if d.HasField("dim_param") else (d.dim_value if d.HasField("dim_value") else "?")
                     for d in t.shape.dim)
        return TensorSpec(value_info.name, str(helper.tensor_dtype_to_np_dtype(t.elem_type)), dims)

    initializers = {i.name for i in model.graph.initializer}
    inputs = [spec(v) for v in model.graph.input if v.name not in initializers]
    return inputs, [spec(v) for v in model.graph.output]


def render_config(
    name: str,
    platform: str,
    inputs: Sequence[TensorSpec],
    outputs: Sequence[TensorSpec],
    max_batch_size: int,
    instance_count: int = 1,
    kind: str = "KIND_GPU",
    model_filename: str | None = None,
) -> str:
    """config.pbtxt text. ``max_batch_size > 0`` drops the leading (batch) axis from every ``dims``."""
    def dims(spec: TensorSpec) -> str:
        shape = spec.shape[1:] if max_batch_size > 0 else spec.shape
        return ", ".join("-1" if _is_dynamic(d) else str(int(d)) for d in shape)

    def block(specs: Sequence[TensorSpec]) -> str:
        items = []
        for s in specs:
            if s.dtype not in TRITON_DTYPES:
                raise InputError(f"tensor {s.name!r} has dtype {s.dtype}, which Triton's config cannot describe")
            items.append(f'  {{\n    name: "{s.name}"\n    data_type: {TRITON_DTYPES[s.dtype]}\n    dims: [ {dims(s)} ]\n  }}')
        return ",\n".join(items)

    lines = [f'name: "{name}"', f'platform: "{platform}"', f"max_batch_size: {max_batch_size}"]
    if model_filename:
        lines.append(f'default_model_filename: "{model_filename}"')
    lines += [f"input [\n{block(inputs)}\n]", f"output [\n{block(outputs)}\n]"]
    if max_batch_size > 0:
        lines.append("dynamic_batching { }")
    lines.append(f"instance_group [\n  {{\n    count: {instance_count}\n    kind: {kind}\n  }}\n]")
    return "\n".join(lines) + "\n"


def write_triton_repo(
    model_path: str | Path,
    output: str | Path,
    name: str | None = None,
    max_batch: int = 8,
    instance_count: int = 1,
    force: bool = False,
    instance_kind: str = "gpu",
) -> Path:
    """Write ``output/name/{config.pbtxt, 1/model.*}``; returns the model's directory. ``instance_kind``: where
    Triton runs the model's instances, ``gpu`` or ``cpu`` (ONNX Runtime only; a TensorRT plan needs a GPU)."""
    model_path = Path(model_path)
    if not model_path.is_file():
        raise InputError(f"model file {model_path} not found; pass a model file written by `m2f export`")
    target = targets.for_artifact(model_path)
    if target.triton_platform is None:
        servable = ", ".join(s for t in targets.all_targets() if t.triton_platform for s in t.suffixes)
        raise InputError(f"Triton Inference Server cannot serve a {target.name} model ({model_path}); pass {servable}")
    if max_batch < 1:
        raise InputError(f"--max-batch must be >= 1, got {max_batch}")
    name = name or model_path.stem
    if not name.replace("_", "").replace("-", "").isalnum():
        raise InputError(f"model name {name!r} must be letters, digits, '-' or '_'")
    platform, filename = target.triton_platform
    check_instance_kind(instance_kind, platform)

    inputs, outputs, max_batch_size = model_io(model_path, max_batch)
    config = render_config(name, platform, inputs, outputs, max_batch_size, instance_count,
                           kind=f"KIND_{instance_kind.upper()}", model_filename=filename)

    target = check_can_write(Path(output) / name, force=force, directory=True)
    with atomic_dir(target) as tmp:
        (tmp / "1").mkdir()
        shutil.copyfile(model_path, tmp / "1" / filename)
        (tmp / "config.pbtxt").write_text(config, encoding="utf-8")
    return target


INSTANCE_KINDS = ("cpu", "gpu")


def check_instance_kind(instance_kind: str, platform: str) -> None:
    if instance_kind not in INSTANCE_KINDS:
        raise InputError(f"--instance-kind {instance_kind!r} is not cpu or gpu; pass one of them")
    if instance_kind == "cpu" and platform == "tensorrt_plan":
        raise InputError("--instance-kind cpu cannot run a TensorRT plan (GPU only); pass --instance-kind gpu, "
                         "or an .onnx model for ONNX Runtime on the CPU")


def model_io(model_path: Path, max_batch: int) -> tuple[list[TensorSpec], list[TensorSpec], int]:
    """(inputs, outputs, max_batch_size) of an exported model: from its manifest (an ONNX file may come without one:
    then from the graph; a built artifact may not); max_batch_size is 0 for a fixed batch (Triton must not batch
    requests), else ``max_batch`` capped at an engine's optimisation profile."""
    target = targets.for_artifact(model_path)
    manifest = read_manifest(model_path, required=target.artifact != "onnx", kind=target.artifact)
    if manifest is not None:
        inputs = [TensorSpec(t.name, t.dtype, t.shape) for t in manifest.inputs]
        outputs = [TensorSpec(t.name, t.dtype, t.shape) for t in manifest.outputs]
        batch_limit = manifest.details.get("max_batch")  # engines: the optimisation profile's max batch
    else:
        inputs, outputs = _onnx_io(model_path)
        batch_limit = None
    if not all(s.shape and _is_dynamic(s.shape[0]) for s in (*inputs, *outputs)):
        return inputs, outputs, 0
    return inputs, outputs, min(max_batch, int(batch_limit)) if batch_limit else max_batch
