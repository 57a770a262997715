"""OpenVINO (Intel CPUs, iGPUs, NPUs): an IR directory (``model.xml`` + ``model.bin`` + ``manifest.json``) converted
from the decomposed ONNX graph by ``openvino.convert_model``.

``--precision fp32`` keeps float32 weights; ``fp16`` stores float16 weights (``compress_to_fp16``: half the file,
decompressed at load). Both run in float32 on the CPU (``INFERENCE_PRECISION_HINT`` f32: the CPU plugin would
otherwise pick bf16 on CPUs with AMX / AVX512-BF16, 10x the error of the parity bound); ``int8`` quantizes with NNCF's
post-training quantization over a folder of calibration images (``--calib DIR``), keeping float the ops NNCF's
transformer preset keeps: the quantized layers run in int8, the rest in float32.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np

from m2f.errors import BackendUnavailableError, InputError
from m2f.runtime import quiet_library_prints

from ..runner import ClosingRunner
from . import Target, check_precision, register

PRECISIONS = ("fp32", "fp16", "int8")
XML, BIN = "model.xml", "model.bin"


def import_openvino() -> Any:
    try:
        import openvino as ov
    except Exception:  # ImportError, or a broken install failing to load its libraries
        raise BackendUnavailableError("OpenVINO is not installed: pip install 'm2f[openvino]' (or pip install openvino)"
                                      ) from None
    return ov


def import_nncf() -> Any:
    try:
        import nncf
    except Exception:  # ImportError, or a broken install
        raise BackendUnavailableError("--precision int8 quantizes with NNCF, which is not installed: pip install nncf "
                                      "(or export with --precision fp32 / fp16)") from None
    return nncf


def _available() -> str | None:
    try:
        import_openvino()
    except BackendUnavailableError as exc:
        return str(exc)
    return None


def build_openvino(onnx_path: str | Path, output: str | Path, precision: str = "fp32", calib_dir: str | Path | None = None,
                   calib_images: int = 64, force: bool = False) -> Path:
    """Convert an exported ONNX file (standard ops only) into the OpenVINO IR directory ``output`` (+ manifest)."""
    from dataclasses import replace

    from m2f.io import atomic_dir, check_can_write

    from ..manifest import now_utc, read_manifest, sha256_file, tool_versions, write_manifest
    from ..plugins import PLUGINS

    onnx_path, output = Path(onnx_path), Path(output)
    check_precision(precision, PRECISIONS, calib_dir, "NNCF's calibration")
    if not onnx_path.is_file():
        raise InputError(f"ONNX file {onnx_path} not found; export one with `m2f export onnx`")
    check_can_write(output, force=force, directory=True)
    manifest = read_manifest(onnx_path, kind="onnx")
    plugin_ops = [spec.name for spec in PLUGINS if manifest.op_mode(spec.name) == spec.plugin_mode]
    if plugin_ops:
        raise InputError(f"{onnx_path} holds TensorRT plugin nodes ({', '.join(plugin_ops)}), which OpenVINO cannot "
                         "run; export it with `m2f export onnx --target openvino`")
    ov = import_openvino()
    if precision == "int8":
        import_nncf()  # before the conversion
    model = ov.convert_model(str(onnx_path))
    details: dict[str, Any] = {"source_onnx": str(onnx_path.resolve()), "source_onnx_sha256": sha256_file(onnx_path)}
    if precision == "int8":
        model, details["precision_note"] = _quantize(model, manifest, Path(calib_dir), calib_images)
    with atomic_dir(output) as tmp:
        ov.save_model(model, str(tmp / XML), compress_to_fp16=precision == "fp16")
        write_manifest(tmp, replace(
            manifest, kind="openvino", target="openvino", precision=precision, notes=(), artifact=None,
            details=details, versions=tool_versions(), created=now_utc(),
        ))
    return output


def _quantize(model: Any, manifest: Any, calib_dir: Path, limit: int) -> tuple[Any, str]:
    """NNCF post-training int8 quantization over calibration images at the export size."""
    nncf = import_nncf()
    from ..tensorrt_build import _image_batches

    shape = (1, 3, manifest.height, manifest.width)
    batches = list(_image_batches(calib_dir, shape, manifest.pixel_mean, manifest.pixel_std, limit))
    # NNCF draws its progress bars (rich) and logs on stdout: none of it under --quiet
    with quiet_library_prints():
        quantized = nncf.quantize(model, nncf.Dataset(batches), model_type=nncf.ModelType.TRANSFORMER,
                                  subset_size=len(batches))
    nodes = quantized_nodes(quantized)
    if not nodes:
        raise BackendUnavailableError(f"NNCF {nncf.__version__} quantized no layer of the model; export it "
                                      "with --precision fp32 / fp16")
    return quantized, (f"NNCF {nncf.__version__} post-training quantization, {len(batches)} calibration images, "
                       f"{nodes} FakeQuantize nodes")


def quantized_nodes(model: Any) -> int:
    """How many FakeQuantize nodes (int8 inputs of the layers NNCF quantized) an OpenVINO model holds."""
    return sum(op.get_type_name() == "FakeQuantize" for op in model.get_ops())


class OpenVINORunner(ClosingRunner):
    """An OpenVINO IR directory compiled for ``device`` ("CPU" by default): NumPy in, outputs by name out."""

    def __init__(self, path: str | Path, threads: int | None = None, device: str = "CPU") -> None:
        from ..manifest import read_manifest

        path = Path(path)
        if not (path / XML).is_file():
            raise InputError(f"{path} is not an OpenVINO model directory ({XML} missing); write one with "
                             "`m2f export openvino`")
        self.manifest = read_manifest(path, kind="openvino")
        ov = import_openvino()
        config: dict[str, Any] = {}
        if device == "CPU":  # float32 arithmetic whatever the weights: the CPU plugin would pick bf16 where it can
            config["INFERENCE_PRECISION_HINT"] = "f32"
        if threads:
            config["INFERENCE_NUM_THREADS"] = int(threads)
        core = ov.Core()
        self.compiled = core.compile_model(core.read_model(str(path / XML)), device, config)
        self.request = self.compiled.create_infer_request()
        self.name = str(path)
        arithmetic = "int8 quantized layers, float32 elsewhere" if self.manifest.precision == "int8" else "float32 arithmetic"
        self.runs_as = f"openvino ({device}{', ' + arithmetic if 'INFERENCE_PRECISION_HINT' in config else ''})"
        self.output_names = tuple(o.get_any_name() for o in self.compiled.outputs)
        self.fixed_size = None if self.manifest.dynamic else (self.manifest.height, self.manifest.width)
        self.fixed_batch = None if self.manifest.dynamic else self.manifest.batch

    def run(self, pixel_values: np.ndarray) -> dict[str, np.ndarray]:
        x = np.ascontiguousarray(pixel_values, dtype=np.float32)
        result = self.request.infer({0: x})
        return {name: np.asarray(result[out]) for name, out in zip(self.output_names, self.compiled.outputs)}

    def close(self) -> None:
        self.request = self.compiled = None


def _add_cli(p: argparse.ArgumentParser) -> None:
    from m2f.cli.export import add_export_size_options
    from m2f.cli.options import add_checkpoint_option, add_out_option

    src = p.add_mutually_exclusive_group(required=True)
    add_checkpoint_option(src, "model to export (through a decomposed ONNX graph)")
    src.add_argument("--onnx", help="ONNX file written by `m2f export onnx` (standard ops)")
    add_out_option(p, "OpenVINO model directory to write", required=True, dest="output", old=("--output",))
    add_export_size_options(p)
    p.add_argument("--precision", default="fp32", help="fp32 (default), fp16 (float16 weights) or int8 (NNCF)")
    p.add_argument("--calib", default=None, help="folder of calibration images for --precision int8")
    p.add_argument("--force", action="store_true", help="overwrite an existing output directory")


def _run_cli(args: argparse.Namespace) -> Path:
    import tempfile

    from m2f.io import check_can_write

    check_precision(args.precision, PRECISIONS, args.calib, "NNCF's calibration")
    check_can_write(args.output, force=args.force, directory=True)
    import_openvino()  # fail before a long export
    if args.precision == "int8":
        import_nncf()
    if args.onnx:
        return build_openvino(args.onnx, args.output, precision=args.precision, calib_dir=args.calib, force=args.force)
    from ..onnx_export import export_checkpoint

    with tempfile.TemporaryDirectory(prefix="m2f-openvino-") as work:
        onnx_path = Path(work) / "model.onnx"
        export_checkpoint(args.checkpoint, onnx_path, preset=args.preset, height=args.height, width=args.width,
                          batch=args.batch, dynamic=args.dynamic, target="openvino")
        return build_openvino(onnx_path, args.output, precision=args.precision, calib_dir=args.calib,
                              force=args.force)


TARGET = register(Target(
    name="openvino",
    description="OpenVINO IR (Intel CPU / iGPU / NPU), from the decomposed ONNX graph",
    artifact="openvino",
    op_modes={"msda": "decomposed", "masked_attn": "standard"},
    ops=None,  # OpenVINO's ONNX frontend imports every standard op the exporter emits (checked by parity)
    runner=OpenVINORunner,
    build=build_openvino,
    available=_available,
    suffixes=("",),
    flag="openvino",
    flag_metavar="DIR",
    add_cli=_add_cli,
    run_cli=_run_cli,
))
