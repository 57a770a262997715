"""ONNX -> serialized TensorRT engine with the TensorRT Python API (>= 10.3), version aware.

Parse, one optimisation profile (min / opt / max shape of ``pixel_values``), a timing cache that persists across
builds, and the engine written atomically with a manifest beside it. Precision (export/README.md's support table):

* TensorRT >= 11: a strongly typed network, from the graph's own types (``m2f export onnx --precision``); INT8
  only from Q/DQ nodes. The removed weak-typing APIs are only ever touched by the ``_trt10_*`` functions.
* TensorRT 10.x: the same strongly typed route by default, or weak typing (``--fp16 / --bf16 / --int8``, int8
  with an entropy calibrator over a folder of images) on a float32 graph.

Deformable-attention plugin nodes (``MultiscaleDeformableAttnPlugin_TRT``, from ``m2f export onnx --msda plugin``)
run either TensorRT's own open-source plugin (``plugins="tensorrt"``, from libnvinfer_plugin) or m2f's Triton
kernel compiled ahead of time into the engine (``plugins="m2f"``, see :mod:`m2f.export.plugins`): the nodes are
retargeted to the m2f plugin before parsing; the file on disk is not changed. Masked-attention plugin nodes
(``m2f::masked_attention``, from ``m2f export onnx --masked-attn plugin``) always run m2f's plugin: m2f's
plugins are registered whenever the graph holds a node of the "m2f" domain.

Written against the documented TensorRT 10.x API; not run here (no TensorRT on the development machines):
see export/README.md for what was verified where.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from m2f.errors import InputError
from m2f.io import atomic_path, check_can_write, write_bytes_atomic

from ._trt import import_tensorrt, msda_plugin_version, weak_typing_available
from .manifest import load_onnx, new_manifest, read_manifest, sha256_file, write_manifest

if TYPE_CHECKING:  # the calls on TensorRT's objects are type-checked against tensorrt-stubs (pyproject's mypy)
    import tensorrt

    from m2f.export.manifest import Manifest

log = logging.getLogger("m2f.export")

Shape = tuple[int, int, int, int]
PRECISIONS = ("fp32", "fp16", "bf16", "int8")
PLUGIN_CHOICES = ("m2f", "tensorrt")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def parse_shape(text: str) -> Shape:
    """"1x3x512x512" (also with "×" or ",") -> (1, 3, 512, 512), validated: 4 positive sides, 3 channels (what H and
    W must be multiples of is the graph's: :func:`default_profile` checks it against the manifest)."""
    parts = [p for p in re.split(r"[x×X,*]", text.strip()) if p]
    try:
        dims = tuple(int(p) for p in parts)
    except ValueError:
        raise InputError(f"shape {text!r} is not BxCxHxW integers, e.g. 1x3x512x512") from None
    if len(dims) != 4 or min(dims) < 1:
        raise InputError(f"shape {text!r} must be four positive integers BxCxHxW, e.g. 1x3x512x512")
    if dims[1] != 3:
        raise InputError(f"shape {text!r} has {dims[1]} channels; pixel_values has 3 (RGB)")
    return dims  # type: ignore[return-value]


@dataclass(frozen=True)
class Profile:
    min: Shape
    opt: Shape
    max: Shape

    def validate(self) -> "Profile":
        for i, axis in enumerate("BCHW"):
            if not self.min[i] <= self.opt[i] <= self.max[i]:
                raise InputError(
                    f"optimisation profile axis {axis}: need min <= opt <= max, got "
                    f"{self.min[i]} / {self.opt[i]} / {self.max[i]}"
                )
        return self


def input_divisibility(manifest: "Manifest | dict[str, Any]") -> int:
    """What the ONNX input's H and W are multiples of: the export records the model's (its backbone's coarsest
    stride, at least its config's ``size_divisibility``); for a manifest written before that, the config's."""
    recorded = manifest.get("divisibility")
    if recorded is not None:
        return int(recorded)
    return max(int((manifest.get("config") or {}).get("size_divisibility") or 1), 1)


def default_profile(manifest: "Manifest | dict[str, Any]", min_shape: Shape | None, opt_shape: Shape | None,
                    max_shape: Shape | None) -> Profile:
    """Fill the profile from the manifest: the export shape; a dynamic batch up to max(8, export batch)."""
    batch, height, width = manifest["batch"], manifest["height"], manifest["width"]
    export_shape: Shape = (batch, 3, height, width)
    dynamic = manifest.get("dynamic", False)
    divisibility = input_divisibility(manifest)
    for given, name in ((min_shape, "min"), (opt_shape, "opt"), (max_shape, "max")):
        if given is not None and (given[2] % divisibility or given[3] % divisibility):
            raise InputError(
                f"--{name}-shape {'x'.join(map(str, given))}: height and width must be multiples of {divisibility} "
                "(the exported model's input divisibility); pad the image"
            )
    if not dynamic:
        for given, name in ((min_shape, "min"), (opt_shape, "opt"), (max_shape, "max")):
            if given is not None and given != export_shape:
                raise InputError(
                    f"--{name}-shape {'x'.join(map(str, given))} differs from the static export shape "
                    f"{'x'.join(map(str, export_shape))}; re-export with --dynamic to vary shapes"
                )
        return Profile(export_shape, export_shape, export_shape)
    opt = opt_shape or export_shape
    return Profile(min_shape or (1, 3, opt[2], opt[3]), opt, max_shape or (max(8, opt[0]), 3, opt[2], opt[3])).validate()


def retarget_msda_nodes(model: Any) -> int:
    """Point every TensorRT-interface MSDA node at m2f's Triton plugin (in place); returns how many."""
    from .plugins import M2F_MSDA, TRT_MSDA

    count = 0
    for node in model.graph.node:
        if node.op_type == TRT_MSDA.op_type:
            M2F_MSDA.retarget(node)
            count += 1
    if count and not any(o.domain == M2F_MSDA.domain for o in model.opset_import):
        model.opset_import.add(domain=M2F_MSDA.domain, version=1)
    return count


def _image_batches(folder: Path, shape: Shape, mean: Sequence[float], std: Sequence[float], limit: int):
    """Calibration batches: images resized to the profile's (H, W) with PIL, normalised like the model input."""
    import numpy as np
    from PIL import Image

    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)[:limit]
    if not files:
        raise InputError(f"--calib {folder} holds no images ({', '.join(IMAGE_SUFFIXES)}); give a folder of images")
    batch, _, height, width = shape
    m = np.asarray(mean, dtype=np.float32).reshape(3, 1, 1)
    s = np.asarray(std, dtype=np.float32).reshape(3, 1, 1)
    for start in range(0, len(files) - batch + 1, batch):
        images = []
        for f in files[start : start + batch]:
            with Image.open(f) as img:
                rgb = img.convert("RGB").resize((width, height), Image.Resampling.BILINEAR)
            images.append((np.asarray(rgb, dtype=np.float32).transpose(2, 0, 1) - m) / s)
        yield np.ascontiguousarray(np.stack(images))


def set_msda_plugin_version(model: Any, version: str) -> str | None:
    """Ask TensorRT's parser for ``version`` of its MSDA plugin on every MultiscaleDeformableAttnPlugin_TRT node (in
    place; the parser reads the ``plugin_version`` attribute, "1" when absent). None when the graph has none."""
    from onnx import helper

    from .plugins import TRT_MSDA

    nodes = [n for n in model.graph.node if n.op_type == TRT_MSDA.op_type]
    for node in nodes:
        kept = [a for a in node.attribute if a.name != "plugin_version"]
        del node.attribute[:]
        node.attribute.extend(kept + [helper.make_attribute("plugin_version", version)])
    return version if nodes else None


def _trt10_weak_typing(trt: Any, config: tensorrt.IBuilderConfig, precision: str,
                       trt_profile: tensorrt.IOptimizationProfile, calib_dir: Any, calib_images: int,
                       profile: Profile, manifest: "Manifest | dict[str, Any]", output: Path) -> None:
    """TensorRT 10.x's weak typing: a precision flag (and for int8 an entropy calibrator). Removed in 11.x."""
    if precision == "fp16":
        config.set_flag(trt.BuilderFlag.FP16)
    elif precision == "bf16":
        config.set_flag(trt.BuilderFlag.BF16)
    elif precision == "int8":
        config.set_flag(trt.BuilderFlag.INT8)
        config.set_flag(trt.BuilderFlag.FP16)  # layers INT8 cannot take fall back to fp16, not fp32
        batches = _image_batches(Path(calib_dir), profile.opt, manifest["pixel_mean"], manifest["pixel_std"],
                                 calib_images)
        config.int8_calibrator = _trt10_make_calibrator(trt, batches, profile.opt[0],
                                                        output.with_name(output.name + ".calib"))
        config.set_calibration_profile(trt_profile)


def _trt10_make_calibrator(trt: Any, batches: Any, batch_size: int, cache_path: Path | None) -> Any:
    from ._trt import check_cuda, import_cudart

    cudart = import_cudart()

    class ImageFolderCalibrator(trt.IInt8EntropyCalibrator2):
        def __init__(self) -> None:
            super().__init__()
            self._batches = iter(batches)
            self._device: Any = None
            self._nbytes = 0
            self._batch_size = batch_size

        def get_batch_size(self) -> int:
            return self._batch_size

        def get_batch(self, names: list[str]) -> list[int] | None:
            try:
                batch = next(self._batches)
            except StopIteration:
                return None
            if self._device is None or batch.nbytes > self._nbytes:
                if self._device is not None:
                    check_cuda(cudart.cudaFree(self._device))
                self._device, self._nbytes = check_cuda(cudart.cudaMalloc(batch.nbytes)), batch.nbytes
            check_cuda(cudart.cudaMemcpy(self._device, batch.ctypes.data, batch.nbytes,
                                         cudart.cudaMemcpyKind.cudaMemcpyHostToDevice))
            return [int(self._device)]

        def read_calibration_cache(self) -> bytes | None:
            return cache_path.read_bytes() if cache_path is not None and cache_path.exists() else None

        def write_calibration_cache(self, cache: Any) -> None:
            if cache_path is not None:
                write_bytes_atomic(cache_path, bytes(cache))

    return ImageFolderCalibrator()


def build_engine(
    onnx_path: str | Path,
    output: str | Path,
    precision: str = "fp32",
    min_shape: Shape | None = None,
    opt_shape: Shape | None = None,
    max_shape: Shape | None = None,
    calib_dir: str | Path | None = None,
    calib_images: int = 256,
    timing_cache: str | Path | None = None,
    workspace_gb: float = 4.0,
    plugins: str = "m2f",
    force: bool = False,
) -> Path:
    """Build and write a serialized engine (+ manifest); returns the engine path.

    ``precision`` "fp32" (the default) builds a strongly typed network: every layer runs in the type the graph gives
    it (``m2f export onnx --precision fp16 | bf16 | int8``). "fp16" / "bf16" / "int8" are TensorRT 10.x's weak-typing
    flags on a float32 graph (int8 with an entropy calibrator over ``calib_dir``); TensorRT >= 11 removed them and
    refuses them here in one line naming the export that replaces them.
    """
    onnx_path, output = Path(onnx_path), Path(output)
    if not onnx_path.is_file():
        raise InputError(f"ONNX file {onnx_path} not found; export one with `m2f export onnx`")
    if precision not in PRECISIONS:
        raise InputError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "int8" and calib_dir is None:
        raise InputError("--int8 needs --calib DIR: a folder of representative images for calibration")
    if calib_dir is not None and not Path(calib_dir).is_dir():
        raise InputError(f"--calib {calib_dir} is not a directory of images")
    if plugins not in PLUGIN_CHOICES:
        raise InputError(f"plugins must be one of {', '.join(PLUGIN_CHOICES)}, got {plugins!r}")
    if workspace_gb <= 0:
        raise InputError(f"--workspace must be > 0 GB, got {workspace_gb}")
    check_can_write(output, force=force)
    manifest = read_manifest(onnx_path, kind="onnx")
    assert manifest is not None  # required=True: a missing manifest raised
    profile = default_profile(manifest, min_shape, opt_shape, max_shape)
    graph_precision = manifest.get("precision", "fp32")

    trt = import_tensorrt()
    weak_flag = precision != "fp32"
    if weak_flag and not weak_typing_available(trt):
        raise InputError(
            f"TensorRT {trt.__version__} builds strongly typed networks only (--{precision} was removed in 11.x): "
            f"export the graph in that precision with `m2f export onnx --precision {precision}"
            f"{' --calib DIR' if precision == 'int8' else ''}` and build it without --{precision}"
        )
    if weak_flag and graph_precision != "fp32":
        raise InputError(f"{onnx_path} is already a {graph_precision} graph (strongly typed): build it without "
                         f"--{precision}, or pass a float32 export")
    model = load_onnx(onnx_path)
    retargeted = retarget_msda_nodes(model) if plugins == "m2f" else 0
    msda_version = set_msda_plugin_version(model, msda_plugin_version(trt)) if plugins == "tensorrt" else None
    m2f_nodes = sum(1 for n in model.graph.node if n.domain == "m2f")
    if m2f_nodes:  # retargeted MSDA nodes and / or masked-attention plugin nodes
        from ._trt import import_tensorrt_plugin
        from .plugin_kernels import register_tensorrt_plugins

        import_tensorrt_plugin()  # one line naming the way out on TensorRT < 10.9, before any work
    logger = trt.Logger(trt.Logger.WARNING)
    trt.init_libnvinfer_plugins(logger, "")  # TensorRT's own plugins, MultiscaleDeformableAttnPlugin_TRT among them
    if m2f_nodes:
        register_tensorrt_plugins()

    builder: tensorrt.Builder = trt.Builder(logger)
    # Strongly typed: TensorRT 11 always (the only mode, no flag); 10.x unless a weak-typing flag was asked for.
    if weak_typing_available(trt) and not weak_flag:
        network: tensorrt.INetworkDefinition = builder.create_network(
            1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    else:
        network = builder.create_network(0)  # explicit batch is the only mode since TensorRT 10
    parser: tensorrt.OnnxParser = trt.OnnxParser(network, logger)
    if not parser.parse(model.SerializeToString(), str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise InputError(f"TensorRT could not parse {onnx_path}: {errors}")

    config: tensorrt.IBuilderConfig = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    input_name = manifest["inputs"][0]["name"]
    trt_profile: tensorrt.IOptimizationProfile = builder.create_optimization_profile()
    trt_profile.set_shape(input_name, profile.min, profile.opt, profile.max)
    config.add_optimization_profile(trt_profile)
    if weak_typing_available(trt) and weak_flag:  # TensorRT 10.x only: these APIs are gone in 11.x
        _trt10_weak_typing(trt, config, precision, trt_profile, calib_dir, calib_images, profile, manifest, output)

    cache_path = Path(timing_cache) if timing_cache else None
    cache = config.create_timing_cache(cache_path.read_bytes() if cache_path and cache_path.exists() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise InputError(f"TensorRT failed to build an engine from {onnx_path} (see the log above)")
    with atomic_path(output) as tmp:
        tmp.write_bytes(bytes(serialized))
    if cache_path is not None:
        write_bytes_atomic(cache_path, bytes(config.get_timing_cache().serialize()))

    write_manifest(output, new_manifest(
        "tensorrt",
        source_onnx=str(onnx_path.resolve()),
        source_onnx_sha256=sha256_file(onnx_path),
        source=manifest.get("source"),
        precision=graph_precision if not weak_flag else precision,
        typing="weak" if weak_flag else "strong",
        tensorrt_version=trt.__version__,
        msda_plugin_version=msda_version,
        plugins=plugins if retargeted or msda_version else "none",
        ops=manifest.ops,
        target="tensorrt",
        m2f_plugin_nodes=m2f_nodes,
        profile={"min": list(profile.min), "opt": list(profile.opt), "max": list(profile.max)},
        max_batch=profile.max[0],
        batch=manifest["batch"], height=manifest["height"], width=manifest["width"],
        dynamic=manifest.get("dynamic", False),
        inputs=manifest["inputs"], outputs=manifest["outputs"],
        postprocess=manifest.get("postprocess", "none"),
        pixel_mean=manifest.get("pixel_mean"), pixel_std=manifest.get("pixel_std"),
        config=manifest.get("config"),
    ))
    log.info("wrote %s (%s, profile %s)", output, precision, profile)
    return output
