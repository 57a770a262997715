"""End-to-end model benchmark: Hugging Face eager vs m2f (PyTorch, Triton, Triton + torch.compile) vs ONNX Runtime.

Every backend runs THE SAME random weights: a Hugging Face ``Mask2FormerForUniversalSegmentation`` is built from a
HF config equivalent to the m2f config (:func:`hf_config_for`), and m2f models load its state dict through
``m2f.checkpoints.hf.convert_hf_state_dict``. Per (model, dtype, backend) the model is built once and reused over
sizes and batches; every backend of a case sees the same fresh ``torch.randn`` input. Each row records latency
(median / p90, ``time_fn``), images/s, peak CUDA memory, the relative error of ``pred_logits`` / ``pred_masks``
against the float32 m2f-torch reference on that input, and agreement of the official panoptic and semantic
post-processing (image 0 of the batch, at the masks' stride-4 resolution).

Precision: ``hf-eager`` bfloat16 runs under ``torch.autocast`` (HF's own modules in float32); m2f bfloat16 casts the
model and the input (``model.to(torch.bfloat16)``; logits within ~1e-2 of float32, checked in the tests).
ONNX Runtime runs only where ``CUDAExecutionProvider`` exists, float32 static-shape exports (``m2f.export.to_onnx``).

Failures never stop the run: a failing build / compile / forward (out of memory included) becomes a row with
``median_ms`` None and ``extra["error"]``; backends that cannot run here are listed in ``skipped``.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from m2f.bench.common import BenchRow, bar_plot, environment, markdown_table, peak_memory_mb, time_fn, write_results
from m2f.backbones import backbone_spec
from m2f.config import Mask2FormerConfig
from m2f.errors import InputError
from m2f.io import write_text_atomic

BACKENDS = ("hf-eager", "m2f-torch", "m2f-triton", "m2f-triton-compile", "onnxruntime")
DEFAULT_MODELS = ("r50-coco-panoptic", "swin-t-coco-panoptic")
M2F_BACKEND = {"m2f-torch": "torch", "m2f-triton": "triton", "m2f-triton-compile": "triton"}
CUDA_ONLY = ("m2f-triton", "m2f-triton-compile")
SLOW_TO_PREPARE = ("m2f-triton-compile", "onnxruntime")  # compile / export per shape: run after the others
HF_STAGES = ["stage1", "stage2", "stage3", "stage4"]
EXTRA_KEYS = ("images_per_s", "rel_err_masks", "panoptic_pixel_agreement", "semantic_pixel_agreement")


@dataclass
class ModelBenchResult:
    rows: list[BenchRow]
    skipped: list[str] = field(default_factory=list)  # "<case> <backend> <dtype>: why", one per skipped group
    complete: bool = True  # False when the time budget ran out before every case ran


# ---------------------------------------------------------------------------------------------------------------
# Hugging Face twin of an m2f config, shared weights
# ---------------------------------------------------------------------------------------------------------------


def hf_config_for(cfg: Mask2FormerConfig):
    """A ``transformers.Mask2FormerConfig`` describing the same network as ``cfg``.

    Raises InputError when ``cfg`` has options HF cannot express (checked by translating back with
    ``config_from_hf`` and comparing the architecture).
    """
    import transformers

    from m2f.checkpoints.hf import config_from_hf

    bb, pd, td = cfg.backbone, cfg.pixel_decoder, cfg.transformer_decoder
    backbone = backbone_spec(bb).config_to_hf(bb, HF_STAGES)
    hf = transformers.Mask2FormerConfig(
        backbone_config=backbone, feature_size=pd.conv_dim, mask_feature_size=pd.mask_dim, hidden_dim=td.hidden_dim,
        encoder_layers=pd.num_encoder_layers, encoder_feedforward_dim=pd.ffn_dim, num_attention_heads=td.num_heads,
        decoder_layers=td.num_layers + 1, num_queries=td.num_queries, dim_feedforward=td.ffn_dim,
        pre_norm=td.pre_norm, enforce_input_projection=td.enforce_input_proj, common_stride=pd.common_stride,
        id2label={i: cfg.class_name(i) for i in range(cfg.num_classes)},
    )
    back = config_from_hf(hf.to_dict())

    def arch(c: Mask2FormerConfig) -> tuple:  # drop path only acts in training
        b = dataclasses.replace(c.backbone, drop_path_rate=0.0) if hasattr(c.backbone, "drop_path_rate") else c.backbone
        return b, c.pixel_decoder, c.transformer_decoder, c.num_classes

    if arch(back) != arch(cfg):
        diff = [name for name, a, b in zip(("backbone", "pixel_decoder", "transformer_decoder", "num_classes"),
                                           arch(cfg), arch(back)) if a != b]
        raise InputError(
            f"config {cfg.name or 'custom'} cannot be expressed as a Hugging Face Mask2Former (its {', '.join(diff)} "
            "differ after translation: HF fixes 32 norm groups, 4 points, 3 levels, one head count); "
            "benchmark a config HF can build"
        )
    return hf


def build_hf_model(cfg: Mask2FormerConfig, seed: int):
    """The HF model (CPU, float32, eval) with HF's random initialisation, seeded."""
    import transformers

    hf_cfg = hf_config_for(cfg)
    torch.manual_seed(seed)
    return transformers.Mask2FormerForUniversalSegmentation(hf_cfg).eval()


def build_m2f_model(cfg: Mask2FormerConfig, hf_state: dict[str, torch.Tensor], backend: str) -> torch.nn.Module:
    """An m2f model (CPU, float32, eval) holding the HF model's weights."""
    import m2f
    from m2f.checkpoints import load_state_dict_strict
    from m2f.checkpoints.hf import convert_hf_state_dict

    model = m2f.build_model(cfg, backend=backend)
    load_state_dict_strict(model, convert_hf_state_dict(hf_state, cfg), source="the benchmark's HF model")
    return model.eval()


# ---------------------------------------------------------------------------------------------------------------
# Comparisons
# ---------------------------------------------------------------------------------------------------------------


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.to(out.device).double()
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


def _category_map(logits: torch.Tensor, masks: torch.Tensor, thing_classes: Sequence[int]) -> tuple[torch.Tensor, int]:
    """(h, w) category per pixel (-1 = void) of the official panoptic inference with object_mask_threshold 0,
    at the masks' own resolution; and the number of segments."""
    from m2f import postprocess

    size = (int(masks.shape[-2]), int(masks.shape[-1]))
    result = postprocess.panoptic(logits[None].float(), masks[None].float(), [size], [size], size,
                                  thing_classes=thing_classes, object_mask_threshold=0.0, overlap_threshold=0.8)[0]
    lookup = torch.full((len(result.segments) + 1,), -1, dtype=torch.long, device=masks.device)
    for seg in result.segments:
        lookup[seg.id] = seg.label
    return lookup[result.segmentation.long()], len(result.segments)


def agreement(logits: torch.Tensor, masks: torch.Tensor, ref_logits: torch.Tensor, ref_masks: torch.Tensor,
              thing_classes: Sequence[int]) -> dict[str, Any]:
    """Panoptic and semantic agreement of image 0: (Q, K+1) logits, (Q, h, w) mask logits each."""
    from m2f import postprocess

    ref_logits, ref_masks = ref_logits.to(logits.device), ref_masks.to(logits.device)
    cat, n = _category_map(logits, masks, thing_classes)
    ref_cat, ref_n = _category_map(ref_logits, ref_masks, thing_classes)
    size = [tuple(masks.shape[-2:])]
    sem = postprocess.semantic(logits[None].float(), masks[None].float(), size, size, size[0])[0].labels
    ref_sem = postprocess.semantic(ref_logits[None].float(), ref_masks[None].float(), size, size, size[0])[0].labels
    same_pixels = float((cat == ref_cat).float().mean())
    return {
        "panoptic_pixel_agreement": same_pixels,
        "panoptic_same": bool(n == ref_n and same_pixels == 1.0),
        "panoptic_segments": n,
        "panoptic_segments_ref": ref_n,
        "semantic_pixel_agreement": float((sem == ref_sem).float().mean()),
    }


# ---------------------------------------------------------------------------------------------------------------
# Runners: one callable per (backend, dtype), built once, applied to many inputs
# ---------------------------------------------------------------------------------------------------------------


class Runner:
    """``prepare(x)`` -> a zero-argument callable returning (pred_logits, pred_masks) for that input."""

    precision = ""

    def prepare(self, x: torch.Tensor, batch: int) -> Callable[[], tuple[torch.Tensor, torch.Tensor]]:
        raise NotImplementedError

    def close(self) -> None:
        pass


class HFRunner(Runner):
    def __init__(self, hf_model: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> None:
        self.model = copy.deepcopy(hf_model).to(device)
        self.device, self.dtype = device, dtype
        self.precision = ("float32" if dtype == torch.float32 else
                          f"torch.autocast({device.type!r}, dtype={dtype}) around a float32 model")

    def prepare(self, x, batch):
        def fn():
            autocast = (torch.autocast(self.device.type, dtype=self.dtype) if self.dtype != torch.float32
                        else contextlib.nullcontext())
            with torch.inference_mode(), autocast:
                out = self.model(pixel_values=x)
            return out.class_queries_logits, out.masks_queries_logits

        return fn

    def close(self):
        del self.model


class M2FRunner(Runner):
    def __init__(self, model: torch.nn.Module, device: torch.device, dtype: torch.dtype, compile: bool) -> None:
        self.model = model.to(device=device, dtype=dtype)
        self.dtype, self.compile = dtype, compile
        self.precision = "float32" if dtype == torch.float32 else f"model and input cast to {dtype} (model.to)"
        if compile:
            self.precision += "; torch.compile(dynamic=False)"

    def prepare(self, x, batch):
        model = self.model
        if self.compile:
            torch.compiler.reset()  # one fresh graph per shape: no recompilation limits across cases
            model = torch.compile(self.model, dynamic=False)
        x = x.to(self.dtype)

        def fn():
            with torch.inference_mode():
                out = model(x)
            return out.pred_logits, out.pred_masks

        return fn

    def close(self):
        del self.model
        if self.compile:
            torch.compiler.reset()


class OrtRunner(Runner):
    """ONNX Runtime on CUDA with I/O binding (input and outputs stay on the GPU); one static export per shape."""

    precision = "float32 ONNX graph (m2f.export.to_onnx, static shape), CUDAExecutionProvider"

    def __init__(self, model: torch.nn.Module, workdir: Path, device: torch.device) -> None:
        self.model, self.workdir, self.device = model, workdir, device

    def prepare(self, x, batch):
        import numpy as np
        import onnxruntime as ort

        from m2f.export import to_onnx

        h, w = int(x.shape[-2]), int(x.shape[-1])
        path = self.workdir / f"m2f_{batch}x{h}x{w}.onnx"
        to_onnx(self.model, path, height=h, width=w, batch=batch, dynamic=False, simplify=False, force=True)
        session = ort.InferenceSession(str(path), providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
        if session.get_providers()[0] != "CUDAExecutionProvider":
            raise RuntimeError(f"onnxruntime did not take the CUDA provider (got {session.get_providers()})")
        x = x.contiguous()
        binding = session.io_binding()
        binding.bind_input("pixel_values", "cuda", self.device.index or 0, np.float32, list(x.shape), x.data_ptr())
        names = [o.name for o in session.get_outputs()]
        for name in names:
            binding.bind_output(name, "cuda", self.device.index or 0)

        def fn():
            session.run_with_iobinding(binding)
            binding.synchronize_outputs()
            return binding

        def fetch():
            fn()
            values = dict(zip(names, binding.copy_outputs_to_cpu()))
            return torch.from_numpy(values["pred_logits"]), torch.from_numpy(values["pred_masks"])

        fn.fetch = fetch  # type: ignore[attr-defined]
        fn.keepalive = (session, x)  # type: ignore[attr-defined]
        return fn


def ort_cuda_available() -> bool:
    try:
        import onnxruntime as ort
    except ImportError:
        return False
    return "CUDAExecutionProvider" in ort.get_available_providers()


# ---------------------------------------------------------------------------------------------------------------
# The benchmark
# ---------------------------------------------------------------------------------------------------------------


def _finite(x: float | None) -> float | None:
    return x if x is None or math.isfinite(x) else None


def _free(device: torch.device) -> None:
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run(
    models: Sequence[tuple[str, Mask2FormerConfig]],
    sizes: Sequence[tuple[int, int]],
    batches: Sequence[int],
    dtypes: Sequence[torch.dtype],
    backends: Sequence[str],
    device: torch.device,
    compile_batches: Sequence[int] = (1,),
    onnx_batches: Sequence[int] = (1,),
    warmup_ms: float = 50.0,
    rep_ms: float = 200.0,
    seed: int | None = None,
    budget_s: float | None = None,
    progress: bool = True,
    on_update: Callable[[ModelBenchResult], None] | None = None,
) -> ModelBenchResult:
    """Benchmark every (model, dtype, backend, size, batch); returns the rows and the skipped groups.

    ``on_update`` is called after every (model, dtype, backend) group with the rows so far (partial results are
    written this way, so a run killed by a time limit still leaves its measurements).
    """
    from m2f.runtime import progress_bar

    unknown = [b for b in backends if b not in BACKENDS]
    if unknown:
        raise InputError(f"unknown backend(s) {', '.join(unknown)}; choose from {', '.join(BACKENDS)}")
    for h, w in sizes:
        if h % 32 or w % 32:
            raise InputError(f"size {h}x{w} is not a multiple of 32 (Mask2Former pads its inputs to 32): use e.g. 800x1344")
    seed = int.from_bytes(os.urandom(4), "little") % 2**31 if seed is None else seed
    result = ModelBenchResult(rows=[], complete=True)
    start = time.perf_counter()

    def batches_for(backend: str) -> list[int]:
        limit = {"m2f-triton-compile": compile_batches, "onnxruntime": onnx_batches}.get(backend)
        return [b for b in batches if limit is None or b in limit]

    def skip(case: str, backend: str, dtype: torch.dtype | None, why: str) -> None:
        note = f"{case} {backend}{'' if dtype is None else ' ' + str(dtype).replace('torch.', '')}: skipped: {why}"
        result.skipped.append(note)
        bar.write(note, file=sys.stderr)

    # Cheap backends of every model first, then the slow-to-prepare ones (compile, ONNX export): a time budget or
    # a killed run then loses the optional rows, not a whole model.
    passes = [[b for b in backends if b not in SLOW_TO_PREPARE], [b for b in backends if b in SLOW_TO_PREPARE]]
    plan = [(case, cfg, dtype, backend) for group_backends in passes for case, cfg in models for dtype in dtypes
            for backend in group_backends]
    last_use = {case: i for i, (case, *_rest) in enumerate(plan)}
    prepared: dict[str, _Prepared | None] = {}
    total = sum(len(sizes) * len(batches_for(backend)) for *_rest, backend in plan)
    bar = progress_bar(total, "bench model", unit="case", quiet=not progress)
    for index, (case, cfg, dtype, backend) in enumerate(plan):
        dname = str(dtype).replace("torch.", "")
        group = [(h, w, b) for h, w in sizes for b in batches_for(backend)]
        why = _unavailable(backend, dtype, device)
        if why is None and budget_s is not None and time.perf_counter() - start > budget_s:
            why = f"time budget of {budget_s:g} s spent"
            result.complete = False
        if why is None and case not in prepared:
            prepared[case] = _prepare(case, cfg, sizes, batches, seed, device, skip)
        data = prepared.get(case)
        if why is None and data is None:
            why = "building the HF model failed (see above)"
        if why is not None:
            skip(case, backend, dtype, why)
            bar.update(len(group))
        else:
            bar.set_postfix(case=f"{case} {backend} {dname}")
            deadline = None if budget_s is None else start + budget_s
            _run_group(result, case, cfg, dtype, backend, group, data, device, warmup_ms, rep_ms, bar, deadline)
            if on_update is not None:
                on_update(result)
        if last_use[case] == index:
            prepared[case] = None  # free its weights, inputs and references
            _free(device)
    bar.close()
    return result


@dataclass
class _Prepared:
    hf_model: torch.nn.Module  # CPU, float32
    hf_state: dict[str, torch.Tensor]
    inputs: dict[tuple[int, int, int], torch.Tensor]  # (h, w, batch) -> CPU input
    references: dict[tuple[int, int, int], tuple[torch.Tensor, torch.Tensor]]


def _prepare(case, cfg, sizes, batches, seed, device, skip) -> _Prepared | None:
    """The shared weights, the inputs and the float32 references of one model (None when HF cannot build it)."""
    try:
        hf_model = build_hf_model(cfg, seed)
    except InputError:
        raise
    except Exception as exc:  # noqa: BLE001 - recorded, the other models still run
        skip(case, "all backends", None, f"building the HF model failed: {type(exc).__name__}: {_one_line(exc)}")
        return None
    hf_state = {k: v.clone() for k, v in hf_model.state_dict().items()}
    gen = torch.Generator().manual_seed(seed)
    inputs = {(h, w, b): torch.randn(b, 3, h, w, generator=gen) for h, w in sizes for b in batches}
    return _Prepared(hf_model, hf_state, inputs, _references(cfg, hf_state, inputs, device))


def _run_group(result, case, cfg, dtype, backend, group, data: _Prepared, device, warmup_ms, rep_ms, bar,
               deadline: float | None = None) -> None:
    """One backend in one dtype: built once, then every (size, batch) of ``group``; failures become error rows."""
    dname = str(dtype).replace("torch.", "")
    runner: Runner | None = None
    build_error = None
    workdir = tempfile.TemporaryDirectory(prefix="m2f-bench-onnx-") if backend == "onnxruntime" else None
    try:
        runner = _make_runner(backend, cfg, data.hf_model, data.hf_state, device, dtype, workdir)
    except Exception as exc:  # noqa: BLE001
        build_error = f"build: {type(exc).__name__}: {_one_line(exc)}"
        _free(device)
    for i, (h, w, b) in enumerate(group):
        if deadline is not None and time.perf_counter() > deadline:
            left = ", ".join(f"b{b_} {h_}x{w_}" for h_, w_, b_ in group[i:])
            result.skipped.append(f"{case} {backend} {dname} {left}: skipped: time budget spent")
            result.complete = False
            bar.write(result.skipped[-1], file=sys.stderr)
            bar.update(len(group) - i)
            break
        row = BenchRow(suite="model", case=case, backend=backend, dtype=dname, batch=b, height=h, width=w,
                       median_ms=None, p90_ms=None,  # type: ignore[arg-type]
                       extra={"precision": runner.precision if runner else "",
                              "reference": "m2f-torch float32, same input"})
        if build_error:
            row.extra["error"] = build_error
        else:
            _measure(row, runner, data.inputs[(h, w, b)], data.references.get((h, w, b)), device, cfg,
                     warmup_ms, rep_ms, backend)
        if "error" in row.extra:
            bar.write(f"{case} {backend} {dname} b{b} {h}x{w}: error: {row.extra['error']}", file=sys.stderr)
        result.rows.append(row)
        bar.update(1)
    if runner is not None:
        runner.close()
    del runner
    if workdir is not None:
        workdir.cleanup()
    _free(device)


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text[:300] + ("..." if len(text) > 300 else "")


def _unavailable(backend: str, dtype: torch.dtype, device: torch.device) -> str | None:
    if backend in CUDA_ONLY and device.type != "cuda":
        return "Triton kernels need a CUDA GPU (on the CPU they only run in the slow interpreter)"
    if backend == "onnxruntime":
        if dtype != torch.float32:
            return "the ONNX benchmark exports float32 graphs only"
        if not ort_cuda_available() or device.type != "cuda":
            return "no CUDA provider in onnxruntime (install onnxruntime-gpu on a CUDA machine)"
    return None


def _make_runner(backend: str, cfg, hf_model, hf_state, device, dtype, workdir) -> Runner:
    if backend == "hf-eager":
        return HFRunner(hf_model, device, dtype)
    if backend == "onnxruntime":
        return OrtRunner(build_m2f_model(cfg, hf_state, "torch"), Path(workdir.name), device)
    model = build_m2f_model(cfg, hf_state, M2F_BACKEND[backend])
    return M2FRunner(model, device, dtype, compile=backend == "m2f-triton-compile")


def _references(cfg, hf_state, inputs, device) -> dict[tuple[int, int, int], tuple[torch.Tensor, torch.Tensor]]:
    """float32 m2f-torch outputs per input, kept on the CPU (so they do not count in the peak memory)."""
    refs = {}
    try:
        model = build_m2f_model(cfg, hf_state, "torch").to(device)
    except Exception as exc:  # noqa: BLE001 - every row then has rel_err None and a note
        print(f"reference model: {type(exc).__name__}: {_one_line(exc)}", file=sys.stderr)
        return refs
    for key, x in inputs.items():
        try:
            with torch.inference_mode():
                out = model(x.to(device))
            refs[key] = (out.pred_logits.float().cpu(), out.pred_masks.float().cpu())
            del out
        except Exception as exc:  # noqa: BLE001 - rows of this input get rel_err None
            print(f"reference for {key}: {type(exc).__name__}: {_one_line(exc)}", file=sys.stderr)
            _free(device)
    del model
    _free(device)
    return refs


def _measure(row: BenchRow, runner: Runner, x_cpu: torch.Tensor, ref, device, cfg, warmup_ms, rep_ms, backend) -> None:
    fn = None
    try:
        x = x_cpu.to(device)
        t0 = time.perf_counter()
        fn = runner.prepare(x, row.batch)
        logits, masks = fn.fetch() if hasattr(fn, "fetch") else fn()  # first call: compile / autotune / lazy init
        if device.type == "cuda":
            torch.cuda.synchronize()
        first_s = time.perf_counter() - t0
        if backend in ("m2f-triton-compile", "onnxruntime"):
            row.extra["prepare_s"] = round(first_s, 2)  # compile or export + session creation + first run
        if ref is not None:
            row.rel_err = _finite(rel_err(logits, ref[0]))
            row.extra["rel_err_masks"] = _finite(rel_err(masks, ref[1]))
            row.extra.update(agreement(logits[0], masks[0], ref[0][0], ref[1][0], cfg.thing_classes))
        else:
            row.extra["note"] = "no float32 reference for this input (its reference run failed)"
        del logits, masks  # not held while timing: they would count in the peak memory
        if device.type != "cuda":  # time_fn warms up once on the CPU; some eager models need a few calls
            deadline = time.perf_counter() + warmup_ms / 1e3
            for i in range(50):
                fn()
                if i >= 1 and time.perf_counter() > deadline:
                    break
        timing = time_fn(fn, warmup_ms=warmup_ms, rep_ms=rep_ms)
        row.median_ms, row.p90_ms = timing.median_ms, timing.p90_ms
        row.extra["images_per_s"] = row.batch / (timing.median_ms / 1e3)
        if timing.samples > 0:
            row.extra["samples"] = timing.samples
        if backend == "onnxruntime":
            row.extra["peak_mem_note"] = "onnxruntime allocates outside PyTorch's allocator: not measured"
        else:
            row.peak_mem_mb = peak_memory_mb(fn)
    except Exception as exc:  # noqa: BLE001 - out of memory, compile failures, ...: recorded, the run goes on
        row.median_ms = row.p90_ms = None  # type: ignore[assignment]
        kind = "out of memory" if isinstance(exc, torch.cuda.OutOfMemoryError) else type(exc).__name__
        row.extra["error"] = f"{kind}: {_one_line(exc)}"
    finally:
        del fn
        _free(device)


# ---------------------------------------------------------------------------------------------------------------
# Exported models (``--onnx`` / ``--openvino`` / ``--engine``) against the PyTorch model they were exported from
# ---------------------------------------------------------------------------------------------------------------


def run_exported(
    model: torch.nn.Module,
    runners: Sequence[tuple[str, Any]],  # (label, m2f.export.runner.Runner), raw outputs at one shared input size
    case: str,
    batch: int,
    height: int,
    width: int,
    warmup_ms: float = 50.0,
    rep_ms: float = 200.0,
    seed: int | None = None,
) -> ModelBenchResult:
    """One run, one fresh input: PyTorch (``m2f-torch``, float32, CPU) and every runner, timed on the same input,
    each with its rel_err and post-processing agreement against PyTorch."""
    from m2f.export.runner import TorchRunner

    seed = int.from_bytes(os.urandom(4), "little") % 2**31 if seed is None else seed
    x = torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(seed)).numpy()
    result = ModelBenchResult(rows=[])
    reference = None
    for label, runner in (("m2f-torch", TorchRunner(model)), *runners):
        row = BenchRow(suite="model", case=case, backend=label, dtype="float32", batch=batch, height=height,
                       width=width, median_ms=None, p90_ms=None,  # type: ignore[arg-type]
                       extra={"reference": "m2f-torch float32, same input", "seed": seed, "model": runner.name})
        try:
            out = runner.run(x)
            logits, masks = torch.from_numpy(out["pred_logits"]).float(), torch.from_numpy(out["pred_masks"]).float()
            if reference is None:
                reference = (logits, masks)
            row.rel_err = _finite(rel_err(logits, reference[0]))
            row.extra["rel_err_masks"] = _finite(rel_err(masks, reference[1]))
            row.extra.update(agreement(logits[0], masks[0], reference[0][0], reference[1][0],
                                       model.config.thing_classes))
            timing = time_fn(lambda: runner.run(x), warmup_ms=warmup_ms, rep_ms=rep_ms)
            row.median_ms, row.p90_ms = timing.median_ms, timing.p90_ms
            row.extra["images_per_s"] = batch / (timing.median_ms / 1e3)
        except Exception as exc:  # noqa: BLE001 - recorded, the other runners still run
            row.extra["error"] = f"{type(exc).__name__}: {_one_line(exc)}"
        result.rows.append(row)
    return result


# ---------------------------------------------------------------------------------------------------------------
# Outputs
# ---------------------------------------------------------------------------------------------------------------


def baseline_key(row: BenchRow) -> tuple:
    return row.case, row.batch, row.height, row.width


def speedups(rows: Sequence[BenchRow]) -> dict[int, float]:
    """id(row) -> speedup of its median over hf-eager float32 on the same case / batch / size (where both ran)."""
    base = {baseline_key(r): r.median_ms for r in rows
            if r.backend == "hf-eager" and r.dtype == "float32" and r.median_ms}
    return {id(r): base[baseline_key(r)] / r.median_ms for r in rows if r.median_ms and baseline_key(r) in base}


def speedup_table(rows: Sequence[BenchRow]) -> str:
    """Markdown: one line per (case, batch, size), one column per (backend, dtype): speedup vs hf-eager float32."""
    ups = speedups(rows)
    cols = list(dict.fromkeys((r.backend, r.dtype) for r in rows))
    keys = list(dict.fromkeys(baseline_key(r) for r in rows))
    head = ["case", "batch", "H×W", *(f"{b} {d}" for b, d in cols)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key in keys:
        cells = []
        for col in cols:
            match = [r for r in rows if baseline_key(r) == key and (r.backend, r.dtype) == col]
            cells.append(f"{ups[id(match[0])]:.2f}×" if match and id(match[0]) in ups else "–")
        lines.append(f"| {key[0]} | {key[1]} | {key[2]}×{key[3]} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(rows: Sequence[BenchRow], path: Path) -> None:
    timed = [r for r in rows if r.median_ms]
    bar_plot(timed, path, "Mask2Former end to end (median ms, lower is better)",
             group=lambda r: f"{r.case} {r.dtype} b{r.batch} {r.height}×{r.width}")


def _sanitize(rows: Sequence[BenchRow]) -> list[BenchRow]:
    """Non-finite floats -> None (strict JSON)."""
    def clean(v: Any) -> Any:
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        return v

    return [BenchRow(**{k: clean(v) for k, v in dataclasses.asdict(r).items()}) for r in rows]


def write(result: ModelBenchResult, out_dir: str | Path, env: dict[str, Any] | None = None,
          settings: dict[str, Any] | None = None, with_plot: bool = True) -> dict[str, Path]:
    """``<date>-<gpu>-model.{json,md[,png]}``: rows, skipped groups, settings; markdown with the speedup table."""
    env = dict(env or environment())
    env["skipped"] = list(result.skipped)
    env["complete"] = result.complete
    if settings:
        env["settings"] = settings
    rows = _sanitize(result.rows)
    paths = write_results(rows, out_dir, suite="model", title="Mask2Former end-to-end benchmark", env=env,
                          plot=plot if with_plot and any(r.median_ms for r in rows) else None)
    md = markdown_table(rows, "Mask2Former end-to-end benchmark", env, extra_keys=EXTRA_KEYS)
    md += "\n## Speedup over hf-eager float32 (same case, batch and size)\n\n" + speedup_table(rows)
    precisions = sorted({f"{r.backend} {r.dtype}: {r.extra['precision']}" for r in rows if r.extra.get("precision")})
    if precisions:
        md += "\n## Precision\n\n" + "".join(f"- {p}\n" for p in precisions)
    errors = [f"{r.case} {r.backend} {r.dtype} b{r.batch} {r.height}×{r.width}: {r.extra['error']}"
              for r in rows if "error" in r.extra]
    if errors:
        md += "\n## Errors\n\n" + "".join(f"- {e}\n" for e in errors)
    if result.skipped:
        md += "\n## Skipped\n\n" + "".join(f"- {s}\n" for s in result.skipped)
    if not result.complete:
        md += "\n**Incomplete run** (time budget spent or interrupted).\n"
    write_text_atomic(paths["md"], md)
    return paths
