"""``m2f export pipeline``: load -> export -> check [-> build -> run -> compare] in one work directory.

Like Polygraphy / mmdeploy: every stage writes its artifact into ``WORKDIR`` (``model.onnx`` + manifest,
``check.json``, and for a target that builds its own artifact (:mod:`m2f.export.targets`) ``model.<target>`` +
manifest and ``compare.json``) and ``WORKDIR/pipeline.json`` records each stage's
status, seconds and artifact, so a failed run shows where it stopped. The work directory is written atomically:
on failure the partial one is kept as ``WORKDIR.failed`` for inspection, never as ``WORKDIR``.
"""
from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from m2f.errors import BackendUnavailableError, InputError
from m2f.io import check_can_write, write_json_atomic

from . import targets
from .manifest import now_utc, tool_versions
from .plugins import PLUGINS

PIPELINE_FORMAT = "m2f-pipeline/1"


def run_pipeline(
    checkpoint: str | Path,
    workdir: str | Path,
    target: str = "onnxruntime",
    build_options: dict[str, Any] | None = None,
    force: bool = False,
    **export_kwargs: Any,
) -> dict[str, Any]:
    """Run the stages for ``target``; returns the pipeline record (also written to ``WORKDIR/pipeline.json``).
    ``build_options`` go to the target's build (e.g. ``{"precision": "fp16"}``)."""
    from .check import check_onnx, write_report
    from .onnx_export import export_checkpoint, validate_export_args

    workdir = Path(workdir)
    chosen = targets.get(target)
    validate_export_args(export_kwargs.get("height", 512), export_kwargs.get("width", 512),
                         export_kwargs.get("batch", 1), export_kwargs.get("opset", 18),
                         export_kwargs.get("postprocess", "none"), target,
                         **{spec.name: export_kwargs.get(spec.name) for spec in PLUGINS})
    check_can_write(workdir, force=force, directory=True)
    if chosen.build is not None:
        why = chosen.available()
        if why is not None:  # fail before a long export when the later stages cannot run
            raise BackendUnavailableError(why)
    from m2f.checkpoints import resolve_checkpoint

    checkpoint = resolve_checkpoint(checkpoint)  # a hub id: its downloaded snapshot, which every stage then reads
    partial = workdir.with_name(workdir.name + ".partial")
    failed = workdir.with_name(workdir.name + ".failed")
    for stale in (partial, failed):
        shutil.rmtree(stale, ignore_errors=True)
    partial.mkdir(parents=True)
    record: dict[str, Any] = {"format": PIPELINE_FORMAT, "target": target, "checkpoint": str(Path(checkpoint).resolve()),
                              "stages": [], "versions": tool_versions(), "created": now_utc()}

    def stage(name: str, fn: Any) -> Any:
        start = time.perf_counter()
        entry: dict[str, Any] = {"stage": name, "status": "running"}
        record["stages"].append(entry)
        try:
            result = fn()
        except BaseException as exc:
            entry.update(status="failed", error=f"{type(exc).__name__}: {exc}",
                         seconds=round(time.perf_counter() - start, 2))
            write_json_atomic(partial / "pipeline.json", record)
            shutil.rmtree(failed, ignore_errors=True)
            partial.rename(failed)
            raise
        entry.update(status="ok", seconds=round(time.perf_counter() - start, 2))
        return result

    onnx_path = partial / "model.onnx"
    stage("export", lambda: export_checkpoint(checkpoint, onnx_path, target=target, **export_kwargs))
    record["stages"][-1]["artifact"] = "model.onnx"
    report = stage("check", lambda: check_onnx(onnx_path, checkpoint=checkpoint))
    write_report(partial / "check.json", report)
    record["stages"][-1].update(artifact="check.json", verdict=report.verdict)
    if chosen.build is not None:
        artifact = f"model.{chosen.name}"
        built = stage("build", lambda: chosen.build(onnx_path, partial / artifact, **(build_options or {})))
        record["stages"][-1]["artifact"] = artifact
        compare = stage("run+compare", lambda: _compare(built, onnx_path, checkpoint, chosen))
        write_json_atomic(partial / "compare.json", compare)
        record["stages"][-1]["artifact"] = "compare.json"
    record["verdict"] = report.verdict
    write_json_atomic(partial / "pipeline.json", record)
    if workdir.exists():
        shutil.rmtree(workdir)
    partial.rename(workdir)
    return record


def _compare(built: Path, onnx_path: Path, checkpoint: Any, target: Any) -> dict[str, Any]:
    """The built artifact in its target's runner against PyTorch at the export size on a fresh random input
    (rel_err per output)."""
    import torch

    from .check import compare_outputs
    from .manifest import read_manifest
    from .onnx_export import OnnxExportModule, load_checkpoint_model

    manifest = read_manifest(onnx_path, kind="onnx")
    module = OnnxExportModule(load_checkpoint_model(checkpoint), manifest.postprocess, manifest.topk or 100)
    x = np.random.default_rng().standard_normal((manifest.batch, 3, manifest.height, manifest.width))
    x = x.astype(np.float32)
    with torch.no_grad():
        ref = module.eval()(torch.from_numpy(x))
    ref_np = {n: t.float().numpy() if t.is_floating_point() else t.numpy() for n, t in zip(module.output_names, ref)}
    with target.runner(built) as runner:
        got = runner.run(x)
    if set(got) != set(ref_np):
        raise InputError(f"{target.name} outputs {sorted(got)} differ from the model's {sorted(ref_np)}")
    return {"shape": list(x.shape), "outputs": compare_outputs(got, ref_np)}
