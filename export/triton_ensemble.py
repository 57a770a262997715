"""A complete Triton Inference Server repository: image bytes in, segments (JSON) out.

Layout (``NAME``: the model's name, default the file's stem)::

    DIR/NAME_pre/       Python backend: decode, resize to the config's test_size, normalise, pad (CPU)
    DIR/NAME/           the exported model: ONNX Runtime (cpu or gpu instances) or a TensorRT plan (gpu)
    DIR/NAME_post/      Python backend: m2f's NumPy post-processing -> JSON segments with COCO RLE masks (CPU)
    DIR/NAME_ensemble/  platform "ensemble": IMAGE (bytes) -> pixel_values, image_info -> pred_logits,
                        pred_masks -> SEGMENTS (bytes, one JSON document per image)

Each Python model's ``1/`` holds a thin ``model.py``, ``m2f_settings.json`` (the config's sizes, normalisation,
thresholds, labels) and ``m2f_triton/``, a copy of export/triton_backend.py and export/postprocess_numpy.py: the
server's Python needs numpy and Pillow only (no torch, no m2f), and runs the very functions the tests check.
With a dynamic batch axis every model and the ensemble get the same ``max_batch_size`` (the model's dynamic
batcher gathers requests of one padded size); a fixed-batch-1 export gets ``max_batch_size: 0`` throughout.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Sequence

from m2f.errors import InputError
from m2f.io import atomic_dir, check_can_write

from . import postprocess_numpy, triton_backend
from .triton_repo import TRITON_DTYPES, TensorSpec, _is_dynamic, model_io, write_triton_repo

_DTYPES = {**TRITON_DTYPES, "bytes": "TYPE_STRING"}

MODEL_PY = '''"""Triton Python backend: m2f {stage}-processing, written by `m2f export triton-repo --ensemble`.
The logic is m2f_triton/triton_backend.py ({function}); this file only moves tensors in and out."""
import json
import os
import sys

import numpy as np
import triton_python_backend_utils as pb_utils

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from m2f_triton import triton_backend  # noqa: E402

INPUTS = {inputs!r}


class TritonPythonModel:
    def initialize(self, args):
        with open(os.path.join(HERE, "m2f_settings.json"), encoding="utf-8") as f:
            self.settings = json.load(f)

    def execute(self, requests):
        responses = []
        for request in requests:
            inputs = {{name: pb_utils.get_input_tensor_by_name(request, name).as_numpy() for name in INPUTS}}
            try:
                outputs = triton_backend.{function}(inputs, self.settings)
            except triton_backend.RequestError as exc:  # a bad request: a one-line error, the model keeps serving
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(str(exc))))
                continue
            responses.append(pb_utils.InferenceResponse(
                [pb_utils.Tensor(name, np.ascontiguousarray(value)) for name, value in outputs.items()]))
        return responses
'''


def _dims(spec: TensorSpec, max_batch_size: int) -> str:
    shape = spec.shape[1:] if max_batch_size > 0 else spec.shape
    return ", ".join("-1" if _is_dynamic(d) else str(int(d)) for d in shape)


def _block(kind: str, specs: Sequence[TensorSpec], max_batch_size: int) -> str:
    items = [f'  {{\n    name: "{s.name}"\n    data_type: {_DTYPES[s.dtype]}\n    dims: [ {_dims(s, max_batch_size)} ]\n  }}'
             for s in specs]
    return f"{kind} [\n" + ",\n".join(items) + "\n]"


def render_python_config(name: str, inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec],
                         max_batch_size: int, instance_count: int) -> str:
    """config.pbtxt of a Python-backend model on CPU instances (numpy work; the GPU is the model's)."""
    return "\n".join([f'name: "{name}"', 'backend: "python"', f"max_batch_size: {max_batch_size}",
                      _block("input", inputs, max_batch_size), _block("output", outputs, max_batch_size),
                      f"instance_group [\n  {{\n    count: {instance_count}\n    kind: KIND_CPU\n  }}\n]"]) + "\n"


def render_ensemble_config(name: str, steps: Sequence[tuple[str, Sequence[str], Sequence[str]]],
                           inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec], max_batch_size: int) -> str:
    """config.pbtxt of the ensemble; ``steps``: (model, its inputs, its outputs), tensors named alike throughout."""
    def step(model: str, step_inputs: Sequence[str], step_outputs: Sequence[str]) -> str:
        maps = [f'      input_map {{ key: "{t}" value: "{t}" }}' for t in step_inputs]
        maps += [f'      output_map {{ key: "{t}" value: "{t}" }}' for t in step_outputs]
        return f'    {{\n      model_name: "{model}"\n      model_version: -1\n' + "\n".join(maps) + "\n    }"

    return "\n".join([f'name: "{name}"', 'platform: "ensemble"', f"max_batch_size: {max_batch_size}",
                      _block("input", inputs, max_batch_size), _block("output", outputs, max_batch_size),
                      "ensemble_scheduling {\n  step [\n" + ",\n".join(step(*s) for s in steps) + "\n  ]\n}"]) + "\n"


def _model_config(model_path: Path, config_path: str | None):
    """The m2f config of an export: --config, else its manifest's (ONNX: also m2f_config.json beside it)."""
    from m2f.cli.exported import exported_config

    return exported_config(model_path, config_path)


def _python_model(folder: Path, name: str, stage: str, function: str, inputs: Sequence[TensorSpec],
                  outputs: Sequence[TensorSpec], max_batch_size: int, instance_count: int, settings: dict) -> None:
    version = folder / "1"
    package = version / "m2f_triton"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text('"""A copy of m2f\'s Triton backend functions (see model.py)."""\n')
    for module in (triton_backend, postprocess_numpy):
        shutil.copyfile(module.__file__, package / Path(module.__file__).name)
    (version / "model.py").write_text(MODEL_PY.format(stage=stage, function=function,
                                                      inputs=[s.name for s in inputs]), encoding="utf-8")
    (version / "m2f_settings.json").write_text(json.dumps(settings, indent=1) + "\n", encoding="utf-8")
    (folder / "config.pbtxt").write_text(render_python_config(name, inputs, outputs, max_batch_size, instance_count),
                                         encoding="utf-8")


def write_triton_ensemble(
    model_path: str | Path,
    output: str | Path,
    name: str | None = None,
    max_batch: int = 8,
    instance_count: int = 1,
    instance_kind: str = "gpu",
    task: str | None = None,
    config: str | None = None,
    force: bool = False,
) -> Path:
    """Write the whole repository ``output`` (atomically: all four models or nothing); returns it."""
    model_path = Path(model_path)
    if task not in (None, "panoptic", "instance", "semantic"):
        raise InputError(f"--task {task!r} is not panoptic, instance or semantic; pass one of them")
    target = check_can_write(Path(output), force=force, directory=True)
    with atomic_dir(target) as tmp:  # any refusal below leaves nothing behind
        # the model first: its checks (file, suffix, name, batch, instance kind) are write_triton_repo's
        name = write_triton_repo(model_path, tmp, name=name, max_batch=max_batch, instance_count=instance_count,
                                 instance_kind=instance_kind).name
        inputs, outputs, max_batch_size = model_io(model_path, max_batch)
        by_name = {s.name: s for s in (*inputs, *outputs)}
        if [s.name for s in inputs] != ["pixel_values"] or not {"pred_logits", "pred_masks"} <= by_name.keys():
            raise InputError(f"{model_path} has inputs {', '.join(s.name for s in inputs)} and outputs "
                             f"{', '.join(s.name for s in outputs)}; the ensemble needs pixel_values -> pred_logits, "
                             "pred_masks: export with --postprocess none")
        pixels = by_name["pixel_values"]
        if max_batch_size == 0 and pixels.shape[0] != 1:
            raise InputError(f"{model_path} takes a fixed batch of {pixels.shape[0]}; one request is one image: "
                             "export with --dynamic or --batch 1")
        settings = triton_backend.settings_from_config(_model_config(model_path, config), task)
        if not any(_is_dynamic(d) for d in pixels.shape[2:]):
            settings["input_size"] = [int(d) for d in pixels.shape[2:]]  # a fixed-size graph: pad images to it
        batch = "batch" if max_batch_size > 0 else 1
        image = TensorSpec("IMAGE", "bytes", (batch, 1))
        info = TensorSpec("image_info", "int32", (batch, 6))
        segments = TensorSpec("SEGMENTS", "bytes", (batch, 1))
        network = [by_name["pred_logits"], by_name["pred_masks"]]
        _python_model(tmp / f"{name}_pre", f"{name}_pre", "pre", "run_pre", [image], [pixels, info], max_batch_size,
                      instance_count, settings)
        _python_model(tmp / f"{name}_post", f"{name}_post", "post", "run_post", [*network, info], [segments],
                      max_batch_size, instance_count, settings)
        ensemble = tmp / f"{name}_ensemble"
        (ensemble / "1").mkdir(parents=True)  # Triton wants a version folder, empty for an ensemble
        steps = [(f"{name}_pre", ["IMAGE"], ["pixel_values", "image_info"]),
                 (name, ["pixel_values"], ["pred_logits", "pred_masks"]),
                 (f"{name}_post", ["pred_logits", "pred_masks", "image_info"], ["SEGMENTS"])]
        (ensemble / "config.pbtxt").write_text(
            render_ensemble_config(f"{name}_ensemble", steps, [image], [segments], max_batch_size), encoding="utf-8")
    return target
