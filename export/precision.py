"""Precision lives in the ONNX graph: float32 -> fp16 / bf16 (strongly typed mixed precision) or int8 (explicit Q/DQ).

TensorRT 11 builds only strongly typed networks: a layer runs in the type its tensors have in the graph, and INT8
only where Q/DQ nodes say so. So the precision is decided here, once, in a graph that ONNX Runtime can check on any
machine, and TensorRT (any version) just follows it.

* fp16 / bf16: onnxconverter-common's float16 converter with a block list (see export/README.md for why this tool).
  Kept float32 (:func:`keep_float_nodes`): softmax, LayerNorm / GroupNorm / InstanceNorm statistics, GridSample
  (the deformable-attention sampling and its bilinear weights) and the chain of ops that computes its sampling
  locations, the mask-logit thresholds (comparisons and the chain computing the logits they compare), the plugin
  nodes (their interfaces take one float dtype for all inputs; sampling locations must stay float32), and every
  post-processing op. Inputs and outputs stay float32 unless ``keep_io_types=False``. bf16 is the fp16 plan with
  the types rewritten to bfloat16 (weights rounded from the float32 originals).
* int8: ONNX Runtime's static quantization in QDQ format: symmetric per-channel int8 weights, symmetric per-tensor
  int8 activations (zero point 0, as TensorRT requires), only the weight-carrying Conv / MatMul / Gemm nodes (the
  layers TensorRT fuses with Q/DQ) and never a node of the kept-float set above; calibrated on a folder of
  images preprocessed exactly as ``m2f predict`` does, with a progress bar and a cache of the ranges. The
  calibration runs the graph in ONNX Runtime; a graph with plugin nodes runs there as a copy holding each plugin's
  reference body (a model-local function, :mod:`m2f.export.plugin_functions`), so its tensor names and ranges are
  the plugin graph's own. The plugin nodes stay float32 and unquantized (their inputs arrive dequantized), and the
  written graph holds no function (TensorRT's parser would import it instead of the plugin).
"""
from __future__ import annotations

import hashlib
import json
import logging
import tempfile
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np

from m2f.errors import BackendUnavailableError, InputError
from m2f.io import write_json_atomic

from .plugin_functions import with_reference_functions
from .plugins import M2F_MASKED_ATTENTION, TRT_MSDA

log = logging.getLogger("m2f.export")

PRECISIONS = ("fp32", "fp16", "bf16", "int8")
ONNX_TYPE_NAMES = {"fp16": "tensor(float16)", "bf16": "tensor(bfloat16)"}
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
MODEL_OUTPUTS = ("pred_logits", "pred_masks")  # everything not feeding these is post-processing

# Ops computed in float32 in every low-precision graph (statistics, sampling, comparisons, selection).
KEEP_FLOAT_OPS = frozenset({
    "Softmax", "LogSoftmax", "LayerNormalization", "GroupNormalization", "InstanceNormalization",
    "BatchNormalization", "GridSample", "Less", "LessOrEqual", "Greater", "GreaterOrEqual", "Equal",
    "TopK", "ArgMax", "ArgMin",
})
THRESHOLD_OPS = frozenset({"Less", "LessOrEqual", "Greater", "GreaterOrEqual"})
# Where a kept-float chain stops walking back: the layer that produced the value is kept too, not its inputs.
CHAIN_STOP_OPS = frozenset({"MatMul", "Gemm", "Conv", "Einsum", "ConvTranspose"})
QUANTIZABLE_OPS = ("Conv", "MatMul", "Gemm")
CALIB_CACHE_FORMAT = "m2f-calibration-cache/1"


@dataclass(frozen=True)
class CalibrationSettings:
    folder: Path
    limit: int = 64
    method: str = "percentile"  # "minmax" | "percentile" | "entropy" (onnxruntime.quantization's methods)


def validate_precision(precision: str, calib_dir: str | Path | None) -> None:
    """Refuse a bad precision / calibration combination in one line, before any work."""
    if precision not in PRECISIONS:
        raise InputError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "int8" and calib_dir is None:
        raise InputError("--precision int8 needs --calib DIR: a folder of representative images to calibrate on")
    if calib_dir is not None and precision != "int8":
        raise InputError(f"--calib is only used by --precision int8 (got --precision {precision}); drop --calib")
    if calib_dir is not None:
        calibration_images(Path(calib_dir))


def calibration_images(folder: Path, limit: int | None = None) -> list[Path]:
    """The image files of a calibration folder, sorted; each decoded once here so a bad one fails before the export."""
    from m2f.preprocess import load_image

    if not folder.exists():
        raise InputError(f"--calib {folder} does not exist; pass a folder of representative images")
    if not folder.is_dir():
        raise InputError(f"--calib {folder} is not a folder; pass a folder of representative images")
    try:
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    except OSError as exc:
        raise InputError(f"--calib {folder} cannot be read ({exc.strerror or exc}); check its permissions") from None
    if not files:
        raise InputError(f"--calib {folder} holds no images ({', '.join(IMAGE_SUFFIXES)}); add representative images")
    files = files[:limit] if limit else files
    for f in files:
        load_image(f)  # raises InputError naming the file if it cannot be decoded
    return files


# ---------------------------------------------------------------------------------------------------
# Which nodes stay float32
# ---------------------------------------------------------------------------------------------------


def name_nodes(model: Any) -> None:
    """Give every node a unique name (block lists and the manifest refer to nodes by name)."""
    seen: set[str] = set()
    for i, node in enumerate(model.graph.node):
        if not node.name or node.name in seen:
            node.name = f"{node.op_type}_{i}"
        seen.add(node.name)


def _producers(model: Any) -> dict[str, Any]:
    return {out: node for node in model.graph.node for out in node.output}


def _chain(producers: dict[str, Any], tensors: Iterable[str], keep: set[str]) -> None:
    """Add to ``keep`` the nodes computing ``tensors``, walking back to (and including) the nearest layer."""
    keep.update(_ancestors(producers, tensors, stop_ops=CHAIN_STOP_OPS))


def _ancestors(producers: dict[str, Any], outputs: Iterable[str], stop_ops: Iterable[str] = ()) -> set[str]:
    """The names of the nodes computing ``outputs``, walking back through inputs; a node of ``stop_ops`` is included
    but not walked past."""
    stop = set(stop_ops)
    names: set[str] = set()
    stack, seen = list(outputs), set()
    while stack:
        tensor = stack.pop()
        if tensor in seen or tensor not in producers:
            continue
        seen.add(tensor)
        node = producers[tensor]
        names.add(node.name)
        if node.op_type not in stop:
            stack.extend(i for i in node.input if i)
    return names


def _is_plugin(node: Any) -> bool:
    return (node.op_type, node.domain) in ((TRT_MSDA.op_type, TRT_MSDA.domain),
                                           (M2F_MASKED_ATTENTION.op_type, M2F_MASKED_ATTENTION.domain))


def keep_float_nodes(model: Any) -> dict[str, str]:
    """name -> why, for every node that stays float32 (the module docstring's list). Nodes must be named."""
    producers = _producers(model)
    keep: dict[str, str] = {}

    def add(names: Iterable[str], why: str) -> None:
        for n in names:
            keep.setdefault(n, why)

    model_part = _ancestors(producers, [o.name for o in model.graph.output if o.name in MODEL_OUTPUTS])
    add((n.name for n in model.graph.node if n.name not in model_part), "post-processing")
    for node in model.graph.node:
        chain: set[str] = set()
        if node.op_type == "GridSample":
            _chain(producers, node.input[1:2], chain)
            add(chain, "deformable-attention sampling locations")
        elif node.op_type == TRT_MSDA.op_type:
            _chain(producers, node.input[3:5], chain)
            add(chain, "deformable-attention sampling locations / weights")
        elif node.op_type in THRESHOLD_OPS:
            _chain(producers, node.input, chain)
            add(chain, "mask-logit threshold")
        if node.op_type in KEEP_FLOAT_OPS:
            add([node.name], node.op_type)
        if _is_plugin(node):
            add([node.name], "plugin node (one float dtype for all inputs)")
    return keep


# ---------------------------------------------------------------------------------------------------
# fp16 / bf16
# ---------------------------------------------------------------------------------------------------


def _float16_converter() -> Any:
    try:
        from onnxconverter_common import float16
    except ImportError:
        raise BackendUnavailableError(
            "--precision fp16 / bf16 needs onnxconverter-common: pip install 'onnxconverter-common>=1.14' "
            "(or pip install -e '.[onnx]')"
        ) from None
    return float16


def to_low_precision(model: Any, precision: str, keep_io_types: bool = True) -> tuple[Any, dict[str, Any]]:
    """The fp16 / bf16 graph of a float32 ``model`` (a ModelProto) and the details for the manifest."""
    import onnx

    float16 = _float16_converter()
    model = onnx.ModelProto.FromString(model.SerializeToString())  # never change the caller's graph
    del model.graph.value_info[:]  # the converter infers its own: stale float32 entries confuse its casts
    # ONNX shape inference cannot type a plugin node's output, which would leave everything after it untyped (its
    # weights converted, its activations not); the plugins return the float32 dtype of their inputs
    model.graph.value_info.extend(onnx.helper.make_tensor_value_info(out, onnx.TensorProto.FLOAT, None)
                                  for node in model.graph.node if _is_plugin(node) for out in node.output)
    name_nodes(model)
    keep = keep_float_nodes(model)
    untyped = ops_without_type(model, ONNX_TYPE_NAMES[precision])
    op_block_list = set(float16.DEFAULT_OP_BLOCK_LIST) | untyped
    split_shared_weights(model, lambda node: node.name in keep or node.op_type in op_block_list)
    float_values = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer
                    if i.data_type == onnx.TensorProto.FLOAT}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        converted = float16.convert_float_to_float16(
            model, keep_io_types=keep_io_types, max_finite_val=65504.0, min_positive_val=2 ** -24,
            op_block_list=sorted(op_block_list), node_block_list=sorted(keep),
        )
    # the converter warns once per constant it clamps into float16's range (the -inf of an attention mask becomes
    # -65504, which softmax still turns into 0): expected, so counted in the manifest, not printed; others pass on
    clamped = [w for w in caught if "will be truncated to" in str(w.message)]
    for w in caught:
        if w not in clamped:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    retarget_float_casts(converted)
    if precision == "bf16":
        _fp16_to_bf16(converted, float_values)
    low = {n.name for n in converted.graph.node if n.name in _names(model)} - set(keep)
    details = {
        "tool": f"onnxconverter-common {_version('onnxconverter-common')} float16 (block list)",
        "io_types": "float32" if keep_io_types else precision,
        "low_precision_nodes": len(low),
        "kept_float": sorted(keep),
        "kept_float_reasons": dict(Counter(keep.values())),
        "kept_float_ops_without_type": sorted(untyped & {n.op_type for n in model.graph.node}),
        # bf16 weights are then rounded from their float32 originals (bf16 holds inf): the count is fp16's
        "fp16_clamped_constants": len(clamped),
    }
    return converted, details


def split_shared_weights(model: Any, kept_float: Callable[[Any], bool]) -> None:
    """Give the kept-float readers of a float32 initializer that converted nodes read too their own copy, in place.
    The converter leaves an initializer float32 when any reader is blocked, so its converted readers would mix
    float32 and float16 inputs (an invalid graph; e.g. one shared scalar 0 for the mask thresholds and a Where)."""
    from onnx import TensorProto

    weights = {i.name: i for i in model.graph.initializer if i.data_type == TensorProto.FLOAT}
    readers: dict[str, list[Any]] = {}
    for node in model.graph.node:
        for name in set(node.input) & weights.keys():
            readers.setdefault(name, []).append(node)
    for name, nodes in readers.items():
        kept = [n for n in nodes if kept_float(n)]
        if not kept or len(kept) == len(nodes):
            continue
        copy = model.graph.initializer.add()
        copy.CopyFrom(weights[name])
        copy.name = f"{name}__float32"
        for node in kept:
            for k, tensor in enumerate(node.input):
                if tensor == name:
                    node.input[k] = copy.name


def retarget_float_casts(model: Any) -> None:
    """Make the graph's own Casts to float32 (e.g. bool masks -> float) cast to float16 where the converter typed
    their output float16, in place: it retypes every unblocked tensor but leaves a Cast's ``to`` as it was, and
    ONNX Runtime refuses the mismatch. Its own Casts to float32 (before blocked nodes) keep float32 outputs."""
    from onnx import TensorProto

    fp16_values = {vi.name for vi in (*model.graph.value_info, *model.graph.output)
                   if vi.type.tensor_type.elem_type == TensorProto.FLOAT16}
    for node in model.graph.node:
        if node.op_type == "Cast" and node.output[0] in fp16_values:
            for attr in node.attribute:
                if attr.name == "to" and attr.i == TensorProto.FLOAT:
                    attr.i = TensorProto.FLOAT16


def ops_without_type(model: Any, type_name: str) -> set[str]:
    """Standard ops of ``model`` whose schema, at the graph's opset, takes float32 but not ``type_name``
    (e.g. Conv has no bfloat16 before opset 22): they stay float32 rather than make an invalid graph."""
    import onnx

    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    out = set()
    for op_type in {n.op_type for n in model.graph.node if n.domain in ("", "ai.onnx")}:
        try:
            schema = onnx.defs.get_schema(op_type, opset)
        except onnx.defs.SchemaError:
            continue
        for constraint in schema.type_constraints:
            types = set(constraint.allowed_type_strs)
            if "tensor(float)" in types and type_name not in types:
                out.add(op_type)
    return out


def _names(model: Any) -> set[str]:
    return {n.name for n in model.graph.node}


def _bf16_bits(values: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), rounded to nearest even."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32).astype(np.uint64)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)


def _fp16_to_bf16(model: Any, float_values: dict[str, np.ndarray]) -> None:
    """Rewrite an fp16 graph as bf16 in place: every FLOAT16 type, Cast target and constant becomes BFLOAT16;
    weights are rounded from their float32 originals (no double rounding through fp16)."""
    from onnx import TensorProto, numpy_helper

    fp16, bf16 = TensorProto.FLOAT16, TensorProto.BFLOAT16

    def retensor(t: Any, original: np.ndarray | None = None) -> None:
        if t.data_type != fp16:
            return
        values = original if original is not None else numpy_helper.to_array(t).astype(np.float32)
        t.ClearField("int32_data")
        t.ClearField("raw_data")
        t.data_type = bf16
        t.raw_data = _bf16_bits(values).tobytes()

    for init in model.graph.initializer:
        retensor(init, float_values.get(init.name))
    for vi in (*model.graph.input, *model.graph.output, *model.graph.value_info):
        if vi.type.tensor_type.elem_type == fp16:
            vi.type.tensor_type.elem_type = bf16
    for node in model.graph.node:
        for attr in node.attribute:
            if node.op_type == "Cast" and attr.name == "to" and attr.i == fp16:
                attr.i = bf16
            if attr.HasField("t"):
                retensor(attr.t)


# ---------------------------------------------------------------------------------------------------
# int8
# ---------------------------------------------------------------------------------------------------


class ImageFolderReader:
    """onnxruntime CalibrationDataReader over a folder of images: ``m2f predict``'s pre-processing (resize to the
    model's test size, normalise, pad to a multiple of 32), then for a static graph a resize to fit and a pad to its
    input size; a progress bar over the images."""

    def __init__(self, files: Sequence[Path], config: Any, input_name: str, batch: int,
                 fixed_size: tuple[int, int] | None, progress: bool = True) -> None:
        self.files, self.config, self.input_name = list(files), config, input_name
        self.batch, self.fixed_size, self.progress = batch, fixed_size, progress
        self._iter: Iterator[dict[str, np.ndarray]] | None = None

    def _batches(self) -> Iterator[dict[str, np.ndarray]]:
        import torch

        from m2f.preprocess import load_image, preprocess
        from m2f.runtime import progress_bar

        if self.fixed_size is not None:  # fit the graph's fixed input, the way predict's resize would
            shortest, longest = min(self.fixed_size), max(self.fixed_size)
        else:
            shortest, longest = self.config.test_size
        quiet = None if self.progress else True  # None: the command's --quiet decides
        with progress_bar(len(self.files), "calibrating", "img", quiet=quiet) as bar:
            for start in range(0, len(self.files) - self.batch + 1, self.batch):
                images = [load_image(f) for f in self.files[start:start + self.batch]]
                pixels = preprocess(images, self.config, resize_shortest=shortest, max_size=longest).pixel_values
                if self.fixed_size is not None:
                    h, w = pixels.shape[-2:]
                    pixels = torch.nn.functional.pad(pixels, (0, self.fixed_size[1] - w, 0, self.fixed_size[0] - h))
                yield {self.input_name: np.ascontiguousarray(pixels.float().numpy())}
                bar.update(self.batch)

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._iter is None:
            self._iter = self._batches()
        return next(self._iter, None)

    def rewind(self) -> None:
        self._iter = None


def _quantization() -> Any:
    try:
        from onnxruntime import quantization
    except ImportError:
        raise BackendUnavailableError("--precision int8 needs onnxruntime: pip install onnxruntime") from None
    return quantization


def _cache_key(model_bytes: bytes, files: Sequence[Path], settings: CalibrationSettings) -> str:
    from .manifest import sha256_file

    digest = hashlib.sha256(hashlib.sha256(model_bytes).digest())
    digest.update(settings.method.encode())
    for f in files:
        digest.update(f.name.encode() + b"\0" + sha256_file(f).encode())
    return digest.hexdigest()


def _read_cache(path: Path | None, key: str) -> dict[str, tuple[float, float]] | None:
    """Ranges from a calibration cache made for this very graph, images and method; None otherwise."""
    if path is None or not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        log.warning("calibration cache %s is unreadable: calibrating again", path)
        return None
    if not isinstance(data, dict) or data.get("format") != CALIB_CACHE_FORMAT or data.get("key") != key:
        return None
    ranges = data.get("ranges")
    if not isinstance(ranges, dict) or not all(isinstance(v, list) and len(v) == 2 for v in ranges.values()):
        return None
    return {k: (float(v[0]), float(v[1])) for k, v in ranges.items()}


def _tensor_ranges(quantization: Any, ranges: dict[str, tuple[float, float]]) -> Any:
    from onnxruntime.quantization.calibrate import TensorData, TensorsData

    method = quantization.CalibrationMethod.MinMax  # the ranges are final: no further statistics needed
    return TensorsData(method, {k: TensorData(lowest=np.float32(lo), highest=np.float32(hi))
                                for k, (lo, hi) in ranges.items()})


def calibrate(model: Any, reader: ImageFolderReader, settings: CalibrationSettings, work_dir: Path) -> \
        dict[str, tuple[float, float]]:
    """Per-tensor activation ranges of ``model`` (which ONNX Runtime must be able to run) over the reader's images
    (onnxruntime's calibrator)."""
    import onnx

    from m2f.runtime import quiet_library_prints

    quantization = _quantization()
    methods = {"minmax": quantization.CalibrationMethod.MinMax, "entropy": quantization.CalibrationMethod.Entropy,
               "percentile": quantization.CalibrationMethod.Percentile}
    if settings.method not in methods:
        raise InputError(f"calibration method must be one of {', '.join(methods)}, got {settings.method!r}")
    src = work_dir / "calib_source.onnx"
    onnx.save(model, str(src))
    extra = {"symmetric": True}
    if settings.method == "percentile":
        extra["percentile"] = 99.999
    calibrator = quantization.create_calibrator(
        src, op_types_to_calibrate=list(QUANTIZABLE_OPS), augmented_model_path=work_dir / "calib_augmented.onnx",
        calibrate_method=methods[settings.method], extra_options=extra,
    )
    # the calibrator prints its steps ("Collecting tensor data ...") on stdout: none of it under --quiet
    with quiet_library_prints():
        calibrator.collect_data(reader)
        data = calibrator.compute_data()
    out: dict[str, tuple[float, float]] = {}
    for name, td in data.data.items():
        lo, hi = (float(np.asarray(v).reshape(-1)[0]) for v in td.range_value)
        out[name] = (lo, hi)
    return out


def to_int8(model: Any, reader: ImageFolderReader, settings: CalibrationSettings, work_dir: Path,
            cache_path: Path | None) -> tuple[Any, dict[str, Any]]:
    """The explicitly quantized (Q/DQ) int8 graph of a float32 ``model`` and the details for the manifest. A graph
    with plugin nodes is calibrated as a copy holding their reference functions (same tensor names); the Q/DQ nodes
    go into the graph itself, which holds no function."""
    import onnx

    quantization = _quantization()
    from onnxruntime.quantization.qdq_quantizer import QDQQuantizer

    model = onnx.ModelProto.FromString(model.SerializeToString())
    name_nodes(model)
    runnable = with_reference_functions(model)  # what ONNX Runtime calibrates
    keep = keep_float_nodes(model)
    initializers = {i.name for i in model.graph.initializer}
    quantize = [n.name for n in model.graph.node if n.op_type in QUANTIZABLE_OPS and n.name not in keep
                and any(i in initializers for i in n.input[1:2])]  # weight-carrying layers only
    key = _cache_key(runnable.SerializeToString(), reader.files, settings)
    ranges = _read_cache(cache_path, key)
    cached = ranges is not None
    if ranges is None:
        ranges = calibrate(runnable, reader, settings, work_dir)
        if cache_path is not None:
            write_json_atomic(cache_path, {"format": CALIB_CACHE_FORMAT, "key": key, "method": settings.method,
                                           "images": [f.name for f in reader.files],
                                           "ranges": {k: list(v) for k, v in sorted(ranges.items())}})
    quantizer = QDQQuantizer(
        model, True, False, quantization.QuantType.QInt8, quantization.QuantType.QInt8,
        _tensor_ranges(quantization, ranges), quantize, [n for n in keep], list(QUANTIZABLE_OPS),
        {"ActivationSymmetric": True, "WeightSymmetric": True, "QDQKeepRemovableActivations": False,
         "DedicatedQDQPair": False},
    )
    quantizer.quantize_model()
    quantizer.model.topological_sort()  # the quantizer appends Q/DQ nodes at the end
    quantized = quantizer.model.model
    details = {
        "tool": f"onnxruntime {_version('onnxruntime')} quantization (QDQ, symmetric int8, per-channel weights, "
                "per-tensor activations)",
        "calibration": {"images": len(reader.files), "folder": str(settings.folder), "method": settings.method,
                        "cache": str(cache_path) if cache_path else None, "from_cache": cached},
        "quantized": sorted(quantize),
        "kept_float": sorted(keep),
        "kept_float_reasons": dict(Counter(keep.values())),
    }
    return quantized, details


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


# ---------------------------------------------------------------------------------------------------
# The precision step of an export
# ---------------------------------------------------------------------------------------------------


def apply_precision(src: Path, dst: Path, precision: str, config: Any = None, calib: CalibrationSettings | None = None,
                    cache_path: Path | None = None, progress: bool = True) -> dict[str, Any]:
    """Write the ``precision`` graph of the float32 ONNX file ``src`` to ``dst``; returns ``precision_details``."""
    import onnx

    model = onnx.load(str(src))
    if precision in ("fp16", "bf16"):
        converted, details = to_low_precision(model, precision)
    elif precision == "int8":
        if calib is None or config is None:
            raise InputError("--precision int8 needs --calib DIR and the model's config")
        files = calibration_images(calib.folder, calib.limit)
        pixel = next(i for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer})
        dims = [d.dim_value if d.HasField("dim_value") else None for d in pixel.type.tensor_type.shape.dim]
        fixed = (dims[2], dims[3]) if dims[2] and dims[3] else None
        reader = ImageFolderReader(files, config, pixel.name, dims[0] or 1, fixed, progress)
        with tempfile.TemporaryDirectory(dir=dst.parent, prefix=".m2f-calib-") as work:
            converted, details = to_int8(model, reader, calib, Path(work), cache_path)
    else:
        raise InputError(f"precision must be one of {', '.join(PRECISIONS[1:])} here, got {precision!r}")
    onnx.save(converted, str(dst))
    return details


def emulate_on_cpu(model: Any) -> Any:
    """A float32 graph that rounds exactly where a bf16 / fp16 graph stores low-precision values, for ONNX Runtime
    builds without CPU kernels for that type: every low-precision tensor becomes float32 passed through a Cast pair
    (float -> low -> float, which ONNX Runtime's CPU has) and every low-precision weight its exact value in float32.
    The arithmetic inside each op is float32, as in TensorRT's low-precision kernels (float32 accumulation)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.shape_inference.infer_shapes(model)  # value types of every tensor, to know where to round
    low = {TensorProto.FLOAT16, TensorProto.BFLOAT16}
    low_tensors: dict[str, int] = {}
    for vi in (*model.graph.input, *model.graph.output, *model.graph.value_info):
        if vi.type.tensor_type.elem_type in low:
            low_tensors[vi.name] = vi.type.tensor_type.elem_type
            vi.type.tensor_type.elem_type = TensorProto.FLOAT

    def to_float(t: Any) -> Any:
        if t.data_type == TensorProto.BFLOAT16:
            bits = np.frombuffer(t.raw_data, dtype=np.uint16) if t.raw_data else np.asarray(t.int32_data, np.uint16)
            values = (bits.astype(np.uint32) << 16).view(np.float32).reshape(tuple(t.dims))
        else:
            values = numpy_helper.to_array(t).astype(np.float32)
        return numpy_helper.from_array(values, t.name)

    for i, init in enumerate(model.graph.initializer):
        if init.data_type in low:
            model.graph.initializer[i].CopyFrom(to_float(init))
    nodes = []
    for node in model.graph.node:
        for attr in node.attribute:
            if attr.HasField("t") and attr.t.data_type in low:
                attr.t.CopyFrom(to_float(attr.t))
        cast_to = next((a.i for a in node.attribute if node.op_type == "Cast" and a.name == "to"), None)
        if cast_to in low:  # Cast(x, low) -> Cast(Cast(x, low), float)
            rounded = node.output[0] + "__low"
            nodes.append(helper.make_node("Cast", list(node.input), [rounded], to=cast_to, name=node.name))
            nodes.append(helper.make_node("Cast", [rounded], list(node.output), to=TensorProto.FLOAT,
                                          name=node.name + "__to_float"))
            continue
        outputs = list(node.output)
        rounding = []
        for k, out in enumerate(outputs):
            if out in low_tensors and node.op_type not in ("Cast", "Constant"):
                raw = out + "__unrounded"
                outputs[k] = raw
                rounding += [helper.make_node("Cast", [raw], [out + "__low"], to=low_tensors[out]),
                             helper.make_node("Cast", [out + "__low"], [out], to=TensorProto.FLOAT)]
        del node.output[:]
        node.output.extend(outputs)
        nodes.append(node)
        nodes.extend(rounding)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return model
