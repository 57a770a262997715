"""Mask2Former -> ONNX, with a manifest, optional in-graph post-processing and optional simplification.

The exporter is ``torch.onnx.export(dynamo=True)`` (torch.export + the onnxscript translator): with
``dynamic=True`` batch, height and width are symbolic (height and width as 32 x a symbolic integer, so every
shape derived from them stays symbolic instead of being baked into constants). Opsets below 18 are produced by
the exporter's version conversion, which works for static graphs and fails for dynamic ones (onnx's converter
cannot move a computed ``axes`` input back into an attribute): the default opset is 18, the exporter's own.

Deformable attention:

* ``msda="decomposed"`` - the PyTorch reference (one GridSample per level; opset >= 16): runs in ONNX Runtime,
  OpenVINO, TensorRT (but see NVIDIA/TensorRT#4813 on GridSample miscompilation in some 10.x / 11.x releases).
* ``msda="plugin"`` - one ``MultiscaleDeformableAttnPlugin_TRT`` node per deformable-attention call, with the
  interface of TensorRT's open-source plugin (see :mod:`m2f.export.plugins`). Done by a model-level switch: the
  deformable-attention modules of a copy of the model use the "triton" backend, whose single custom op
  ``m2f::ms_deform_attn`` (never run during export: torch.export traces its fake kernel) is translated into the
  plugin node.

Masked attention:

* ``masked_attn="standard"`` - the PyTorch reference (MatMul / Softmax / Where; no data-dependent indexing).
* ``masked_attn="plugin"`` - one ``m2f::masked_attention_logits`` node per masked cross-attention call (one per decoder
  layer), which TensorRT's ONNX parser resolves to m2f's TensorRT Python plugin of the same name (see
  :mod:`m2f.export.plugins`): the cross-attention layers of the copy use the "triton" backend, whose custom op
  ``m2f::masked_attention_from_logits`` (traced through its fake kernel) is translated into the plugin node,
  with the plugin's (B, N, H, D) layout on both sides.
"""
from __future__ import annotations

import contextlib
import copy
import importlib
import io
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from m2f.errors import BackendUnavailableError, InputError
from m2f.io import atomic_path, check_can_write
from m2f.runtime import stage

from .manifest import Manifest, OpRecord, TensorInfo, manifest_path, sha256_source, write_manifest
from .plugins import PLUGINS, PluginSpec, op_modes
from .precision import apply_precision, validate_precision

log = logging.getLogger("m2f.export")

POSTPROCESS_MODES = ("none", "semantic", "instance")
MIN_OPSET = 18  # the dynamo exporter emits 18; onnx cannot convert the Mask2Former graph down (GridSample needs 16)
MAX_OPSET = 24  # the newest TensorRT 10.x parses (and ONNX Runtime 1.2x runs)
MAX_DYNAMIC_SIDE = 4096  # upper bound of the symbolic height / width (multiples of 32)
MAX_DYNAMIC_BATCH = 64


@dataclass
class ExportResult:
    path: Path
    manifest_path: Path
    manifest: Manifest
    seconds: float
    simplified: bool = False
    notes: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------------
# The exported module: model + optional post-processing, tensors only
# ---------------------------------------------------------------------------------------------------


class OnnxExportModule(nn.Module):
    """``pixel_values`` (B, 3, H, W) -> (pred_logits, pred_masks[, post-processed outputs]).

    semantic: + ``semantic_probs`` (B, K, H, W) = softmax(cls)[..., :-1]ᵀ · sigmoid(masks upsampled to H, W),
              ``semantic_map`` (B, H, W) int64 = argmax over K.
    instance: + ``instance_scores`` (B, k), ``instance_labels`` (B, k) int64, ``instance_masks`` (B, k, H, W)
              bool: top-k over Q x K class probabilities (sorted), score x mean mask probability inside the mask.
    """

    OUTPUTS = {
        "none": ("pred_logits", "pred_masks"),
        "semantic": ("pred_logits", "pred_masks", "semantic_probs", "semantic_map"),
        "instance": ("pred_logits", "pred_masks", "instance_scores", "instance_labels", "instance_masks"),
    }

    def __init__(self, model: nn.Module, postprocess: str = "none", topk: int = 100) -> None:
        super().__init__()
        if postprocess not in POSTPROCESS_MODES:
            raise InputError(f"postprocess must be one of {', '.join(POSTPROCESS_MODES)}, got {postprocess!r}")
        self.model = model
        self.postprocess = postprocess
        self.topk = topk

    @property
    def output_names(self) -> tuple[str, ...]:
        return self.OUTPUTS[self.postprocess]

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.model(pixel_values)
        logits, masks = out.pred_logits, out.pred_masks  # (B, Q, K+1), (B, Q, H/4, W/4)
        if self.postprocess == "none":
            return logits, masks
        height, width = pixel_values.shape[-2:]
        probs = logits.softmax(-1)[..., :-1]  # (B, Q, K)
        if self.postprocess == "semantic":
            up = F.interpolate(masks, size=(height, width), mode="bilinear", align_corners=False)  # (B, Q, H, W)
            sem = torch.matmul(probs.transpose(1, 2), up.sigmoid().flatten(2))  # (B, K, H*W)
            sem = sem.unflatten(2, (height, width))
            return logits, masks, sem, sem.argmax(1)
        num_queries, num_classes = probs.shape[1], probs.shape[2]
        k = min(self.topk, num_queries * num_classes)
        scores, index = probs.flatten(1).topk(k, dim=1)  # (B, k) sorted, query-major flat index
        labels = index % num_classes
        query = index // num_classes
        picked = torch.gather(masks, 1, query[:, :, None, None].expand(-1, -1, masks.shape[2], masks.shape[3]))
        picked = F.interpolate(picked, size=(height, width), mode="bilinear", align_corners=False)  # (B, k, H, W)
        binary = picked > 0
        fg = binary.to(picked.dtype).flatten(2)
        mask_scores = (picked.sigmoid().flatten(2) * fg).sum(-1) / (fg.sum(-1) + 1e-6)
        return logits, masks, scores * mask_scores, labels, binary


# ---------------------------------------------------------------------------------------------------
# Plugin mode: each fused op's torch custom op -> its plugin node (m2f.export.plugins.PLUGINS)
# ---------------------------------------------------------------------------------------------------


def _register_schema(spec: PluginSpec) -> None:
    """Declare the plugin node's signature to onnx (in this process) so the onnxscript translator can emit it."""
    import onnx

    if onnx.defs.has(spec.node.op_type, spec.node.domain):
        return
    onnx.defs.register_schema(spec.schema())


def _require_custom_op(spec: PluginSpec) -> None:
    """Fail in one line if m2f.kernels' custom op of ``spec``'s plugin mode is missing."""
    try:
        importlib.import_module(spec.kernel_module)
        getattr(torch.ops.m2f, spec.torch_op).default  # noqa: B018
    except (ImportError, AttributeError, RuntimeError):
        raise BackendUnavailableError(
            f"{spec.flag} {spec.plugin_mode} needs the m2f::{spec.torch_op} custom op of m2f.kernels "
            f"({spec.kernel_module}), which this build lacks; export with {spec.flag} {spec.modes[0]}"
        ) from None


def _switch_to_plugin(spec: PluginSpec, module: nn.Module) -> tuple[dict[Any, Any], int]:
    """Switch ``spec``'s modules of the (copied) model to the "triton" backend, so torch.export traces its custom
    op; returns the op's translation-table entry and how many plugin nodes the graph must hold."""
    _require_custom_op(spec)
    modules = spec.modules(module)
    for m in modules:
        m.backend = "triton"  # the leaf holds the backend: its custom op appears in the trace
    _register_schema(spec)
    return {getattr(torch.ops.m2f, spec.torch_op).default: spec.translation()}, len(modules)


def torch_backend_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose attention modules use the PyTorch reference ops, whatever backend it was built with:
    export traces (and ``check_onnx`` compares against) the standard ONNX forms, which need no GPU or Triton."""
    copied = copy.deepcopy(model)
    for spec in PLUGINS:
        for m in spec.modules(copied):
            m.backend = "torch"
    return copied


# Messages the exporter prints on every export of every m2f model, none of which is about the model: the registry
# skipping torchvision's ops (m2f never uses torchvision), torch.export's own deprecated LeafSpec check, and the
# optimizer declining to fold LayerNormalization (a normal op that is kept, not an error).
_HARMLESS_EXPORT_LOGGERS = ("torch.onnx._internal.exporter._registration", "onnxscript.optimizer._constant_folding")
_HARMLESS_EXPORT_WARNINGS = (r".*isinstance\(treespec, LeafSpec\)` is deprecated",)


@contextlib.contextmanager
def _without_known_exporter_noise() -> Iterator[None]:
    """Silence exactly the messages above for the duration of one export; everything else still shows."""
    import warnings

    loggers = [logging.getLogger(name) for name in _HARMLESS_EXPORT_LOGGERS]
    levels = [logger.level for logger in loggers]
    with warnings.catch_warnings():
        for message in _HARMLESS_EXPORT_WARNINGS:
            warnings.filterwarnings("ignore", message=message, category=FutureWarning)
        for logger in loggers:
            logger.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for logger, level in zip(loggers, levels):
                logger.setLevel(level)


@contextlib.contextmanager
def _tracing_triton_op_on_cpu() -> Iterator[None]:
    """The "triton" backend refuses CPU tensors unless TRITON_INTERPRET=1; torch.export only traces the op's fake
    kernel (nothing runs), so allow it for the duration of the export."""
    saved = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = saved


# ---------------------------------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------------------------------


def validate_export_args(height: int, width: int, batch: int, opset: int, postprocess: str = "none",
                         target: str = "onnxruntime", divisibility: int = 32, **modes: str | None) -> dict[str, str]:
    """Check the export options; returns every op's mode (those given in ``modes`` by op name, the target's
    defaults for the rest). ``divisibility``: the coarsest backbone stride (:func:`input_divisibility`)."""
    from . import targets

    d = divisibility
    if height < d or width < d or height % d or width % d:
        raise InputError(f"height and width must be positive multiples of {d}, got {height}x{width}; "
                         f"e.g. {max(d, -(-height // d) * d)}x{max(d, -(-width // d) * d)}")
    if batch < 1:
        raise InputError(f"--batch must be >= 1, got {batch}")
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise InputError(f"opset {opset} is not supported: choose {MIN_OPSET}..{MAX_OPSET} (the exporter emits opset 18 and cannot convert this graph lower; TensorRT 10.x parses up to 24)")
    if postprocess not in POSTPROCESS_MODES:
        raise InputError(f"--postprocess must be one of {', '.join(POSTPROCESS_MODES)}, got {postprocess!r}")
    unknown = sorted(set(modes) - {spec.name for spec in PLUGINS})
    if unknown:
        raise TypeError(f"unknown op(s) {', '.join(unknown)}")
    defaults = targets.get(target).op_modes
    chosen = op_modes(**{spec.name: modes.get(spec.name) or defaults.get(spec.name) for spec in PLUGINS})
    for spec in PLUGINS:
        if chosen[spec.name] not in spec.modes:
            raise InputError(f"{spec.flag} must be one of {', '.join(spec.modes)}, got {chosen[spec.name]!r}")
    return chosen


def input_divisibility(model: nn.Module) -> int:
    """What input sides must be a multiple of: the coarsest stride of the model's backbone (32 for ResNet /
    Swin), and at least the config's ``size_divisibility``."""
    strides = getattr(getattr(model, "backbone", None), "out_strides", None) or {"res5": 32}
    config = getattr(model, "config", None)
    return max(max(strides.values()), getattr(config, "size_divisibility", 0) or 1)


def _dynamic_shapes(divisibility: int) -> dict[str, Any]:
    from torch.export import Dim

    b = Dim("batch", min=1, max=MAX_DYNAMIC_BATCH)
    h = Dim(f"height_{divisibility}", min=2, max=MAX_DYNAMIC_SIDE // divisibility)
    w = Dim(f"width_{divisibility}", min=2, max=MAX_DYNAMIC_SIDE // divisibility)
    return {"pixel_values": {0: b, 2: divisibility * h, 3: divisibility * w}}


def _io_specs(path: Path) -> tuple[tuple[TensorInfo, ...], tuple[TensorInfo, ...]]:
    import onnx
    from onnx import helper

    proto = onnx.load(str(path), load_external_data=False)

    def spec(vi: Any) -> TensorInfo:
        t = vi.type.tensor_type
        shape = tuple(d.dim_param if d.HasField("dim_param") else int(d.dim_value) for d in t.shape.dim)
        return TensorInfo(vi.name, str(helper.tensor_dtype_to_np_dtype(t.elem_type)), shape)

    initializers = {i.name for i in proto.graph.initializer}
    return (tuple(spec(v) for v in proto.graph.input if v.name not in initializers),
            tuple(spec(v) for v in proto.graph.output))


def _slim(src: Path, dst: Path) -> bool:
    """onnxslim ``src`` into ``dst``; False (with a logged note) when onnxslim is not installed or fails."""
    try:
        import onnxslim
    except ImportError:
        log.warning("onnxslim is not installed: the graph is not simplified (pip install onnxslim)")
        return False
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # onnxslim prints a summary table
            onnxslim.slim(str(src), output_model=str(dst))
    except Exception as exc:  # a simplifier failure must never fail the export
        log.warning("onnxslim failed (%s: %s): keeping the unsimplified graph", type(exc).__name__, exc)
        return False
    return dst.exists()


def _same_outputs(a: Path, b: Path, shape: tuple[int, int, int, int], rtol: float = 1e-5) -> bool:
    """Do two ONNX files agree in ONNX Runtime on one random input (used to accept a simplified graph)?"""
    import numpy as np

    from .targets.onnxruntime import OnnxRuntimeRunner

    x = np.random.default_rng().standard_normal(shape).astype(np.float32)
    outs = [list(OnnxRuntimeRunner(p).run(x).values()) for p in (a, b)]
    for ref, got in zip(*outs):
        if ref.shape != got.shape:
            return False
        if np.issubdtype(ref.dtype, np.floating):
            ref64, got64 = ref.astype(np.float64), got.astype(np.float64)
            if not np.linalg.norm(got64 - ref64) <= rtol * max(np.linalg.norm(ref64), 1e-30):
                return False
        elif np.mean(ref != got) > 1e-3:
            return False
    return True


def to_onnx(
    model: nn.Module,
    path: str | Path,
    height: int = 512,
    width: int = 512,
    batch: int = 1,
    dynamic: bool = False,
    precision: str = "fp32",
    calib: Any = None,  # precision.CalibrationSettings for int8
    msda: str | None = None,
    postprocess: str = "none",
    opset: int = 18,
    masked_attn: str | None = None,
    topk: int | None = None,
    simplify: bool = True,
    optimize: bool = True,
    force: bool = False,
    source: dict[str, Any] | None = None,
    target: str = "onnxruntime",
) -> ExportResult:
    """Export ``model`` (an m2f Mask2Former) to ``path`` with a manifest beside it.

    ``pixel_values`` is (batch, 3, height, width), normalised as for ``model(...)``. ``dynamic`` makes batch,
    height and width symbolic (height / width multiples of :func:`input_divisibility`, recorded in the
    manifest). ``msda`` / ``masked_attn`` choose standard ops or
    one TensorRT plugin node per call for each attention op (module docstring; None: the default of ``target``,
    the runtime the graph is exported for, see :mod:`m2f.export.targets`). ``source`` ({"path", "sha256",
    "preset"}) is recorded in the manifest. ``optimize`` runs the exporter's onnxscript optimizer (constant
    folding, dead-code removal; most of the export time of a dynamic graph); ``simplify`` runs onnxslim after it.
    ``precision`` (fp32 / fp16 / bf16 / int8, :mod:`m2f.export.precision`) is applied to the float32 graph last;
    int8 calibrates on ``calib`` and caches the ranges in ``PATH.calib.json``.
    """
    start = time.perf_counter()
    divisibility = input_divisibility(model)
    modes = validate_export_args(height, width, batch, opset, postprocess, target, divisibility, msda=msda,
                                 masked_attn=masked_attn)
    validate_precision(precision, calib.folder if calib is not None else None)
    path = Path(path)
    check_can_write(path, force=force)  # a manifest without its model is stale: the new one replaces it
    config = getattr(model, "config", None)
    if topk is None:
        topk = config.postprocess.instance_topk if config is not None else 100

    module = OnnxExportModule(torch_backend_copy(model), postprocess=postprocess, topk=topk).eval()
    translation: dict[Any, Any] = {}
    expected: dict[str, int] = {}  # plugin nodes each plugin-mode op must leave in the graph
    for spec in PLUGINS:
        if modes[spec.name] == spec.plugin_mode:
            entry, expected[spec.name] = _switch_to_plugin(spec, module)
            translation.update(entry)
    # torch.export specialises a dimension traced at size 1: trace a dynamic batch at >= 2.
    example = torch.randn(max(batch, 2) if dynamic else batch, 3, height, width)
    notes: list[str] = []

    with atomic_path(path) as tmp, contextlib.ExitStack() as stack:
        if expected:
            stack.enter_context(_tracing_triton_op_on_cpu())
        stack.enter_context(_without_known_exporter_noise())
        raw = tmp.with_name(tmp.name + ".raw.onnx")
        try:
            with stage(f"tracing and converting to ONNX (opset {opset}{', optimizing' if optimize else ''})"):
                torch.onnx.export(
                    module, (example,), str(raw), dynamo=True, opset_version=opset,
                    input_names=["pixel_values"], output_names=list(module.output_names),
                    dynamic_shapes=_dynamic_shapes(divisibility) if dynamic else None,
                    custom_translation_table=translation or None, external_data=False, verbose=False,
                    optimize=optimize,
                )
            simplified = False
            if simplify:
                slim = tmp.with_name(tmp.name + ".slim.onnx")
                with stage("simplifying the graph (onnxslim)"):
                    slimmed = _slim(raw, slim)
                if slimmed:
                    if expected:
                        ok = _plugin_counts(slim) == {name: expected.get(name, 0) for name in modes}
                    else:
                        ok = _same_outputs(raw, slim, (batch, 3, height, width))
                    if ok:
                        os.replace(slim, raw)
                        simplified = True
                    else:
                        notes.append("onnxslim changed the outputs or the plugin nodes: kept the unsimplified graph")
                        log.warning(notes[-1])
                    if slim.exists():
                        slim.unlink()
                else:
                    notes.append("graph not simplified (onnxslim unavailable or failed)")
            precision_details = None
            if precision != "fp32":  # on the float32 graph, simplified and checked: the plan sees its final nodes
                precision_details = apply_precision(raw, raw, precision, config=config, calib=calib,
                                                    cache_path=path.with_name(path.name + ".calib.json"))
            os.replace(raw, tmp)
        finally:
            for leftover in tmp.parent.glob(tmp.name + ".*"):
                leftover.unlink()
        inputs, outputs = _io_specs(tmp)
        written_opset = _opset_of(tmp)
        if written_opset != opset:  # the exporter's down-conversion failed and it kept its own opset
            raise InputError(
                f"the exporter could not convert this graph to opset {opset} (it emits opset {written_opset}; "
                f"onnx's version converter cannot rewrite its dynamic-axes ops); use --opset {written_opset}"
            )
        counts = _plugin_counts(tmp)
        for spec in PLUGINS:
            if spec.name in expected and counts[spec.name] != expected[spec.name]:
                raise RuntimeError(f"plugin export produced {counts[spec.name]} {spec.node.op_type} nodes for "
                                   f"{expected[spec.name]} {spec.what}s")
        manifest = Manifest(
            kind="onnx",
            target=target,
            opset=opset,
            inputs=inputs,
            outputs=outputs,
            dynamic=dynamic,
            batch=batch, height=height, width=width,
            dtype=inputs[0].dtype,
            precision=precision,
            precision_details=precision_details,
            ops={name: OpRecord(mode, counts[name], expected.get(name)) for name, mode in modes.items()},
            postprocess=postprocess,
            topk=topk if postprocess == "instance" else None,
            pixel_mean=tuple(config.pixel_mean) if config is not None else None,
            pixel_std=tuple(config.pixel_std) if config is not None else None,
            config=config.to_dict() if config is not None else None,
            source=source,
            notes=tuple(notes),
            details={"exporter": "torch.onnx.export(dynamo=True)", "optimized": optimize, "simplified": simplified,
                     "divisibility": divisibility,
                     "dynamic_axes": {"pixel_values": {"0": "batch", "2": f"height ({divisibility} x n)",
                                                       "3": f"width ({divisibility} x n)"}} if dynamic else {}},
        )
    manifest = write_manifest(path, manifest)  # after the model is committed: it records the model's sha256
    return ExportResult(path, manifest_path(path), manifest, time.perf_counter() - start, simplified, notes)


def _opset_of(path: Path) -> int:
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    return next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)


def _plugin_counts(path: Path) -> dict[str, int]:
    """Plugin nodes of each op spec in the file."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    return {spec.name: spec.count(proto) for spec in PLUGINS}


# ---------------------------------------------------------------------------------------------------
# From a checkpoint (the CLI's path)
# ---------------------------------------------------------------------------------------------------


def load_checkpoint_model(checkpoint: str | Path, preset: str | None = None) -> nn.Module:
    """``m2f.from_pretrained`` on the CPU with the PyTorch reference kernels, in eval mode."""
    from m2f.checkpoints import from_pretrained, resolve_checkpoint

    checkpoint = resolve_checkpoint(checkpoint)  # a hub id: its downloaded snapshot

    model = from_pretrained(str(checkpoint), preset=preset, backend="torch", device="cpu")
    return model.eval()


def export_checkpoint(checkpoint: str | Path, output: str | Path, preset: str | None = None, **kwargs: Any) -> ExportResult:
    """Load ``checkpoint`` and export it; the manifest records its path, sha256 and preset."""
    validate_export_args(kwargs.get("height", 512), kwargs.get("width", 512), kwargs.get("batch", 1),
                         kwargs.get("opset", 18), kwargs.get("postprocess", "none"), kwargs.get("target", "onnxruntime"),
                         **{spec.name: kwargs.get(spec.name) for spec in PLUGINS})
    calib = kwargs.get("calib")
    validate_precision(kwargs.get("precision", "fp32"), calib.folder if calib is not None else None)
    check_can_write(output, force=kwargs.get("force", False))
    from m2f.checkpoints import resolve_checkpoint

    checkpoint = resolve_checkpoint(checkpoint)  # the manifest records the local copy, which check_onnx reloads
    model = load_checkpoint_model(checkpoint, preset)
    source = {"path": str(Path(checkpoint).resolve()), "sha256": sha256_source(checkpoint), "preset": preset}
    return to_onnx(model, output, source=source, **kwargs)
