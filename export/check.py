"""``m2f export check``: is an exported ONNX file valid, portable and faithful to the PyTorch model?

One JSON report with:

* ``checker``: onnx.checker (full check, with shape inference);
* ``census``: op counts by (domain, op_type); dtypes: no DOUBLE tensors anywhere; no data-dependent-shape ops
  (NonZero, Compress, Unique, ...) that TensorRT handles badly or not at all;
* ``tensorrt``: every op against the list TensorRT 10.x's ONNX parser imports (custom plugin nodes allowed and
  listed), with the restrictions that apply;
* ``plugins``: for plugin-mode graphs, each ``MultiscaleDeformableAttnPlugin_TRT`` node's inputs (ranks, dtypes,
  order) against the plugin's interface; ``masked_attention_plugins`` likewise for ``m2f::masked_attention``
  nodes (``--masked-attn plugin``), with the attributes TensorRT's parser reads;
* ``parity``: ONNX Runtime against the PyTorch model (the checkpoint named by the manifest, or given) on fresh
  random inputs, at the export size and, for a dynamic graph, at another size and batch: relative error
  ``||ort - torch|| / ||torch||`` per float output, mismatch fraction per integer / bool output. Graphs with plugin
  nodes cannot run in ONNX Runtime (it has no such ops): they are checked structurally only, and the report says so;
* ``verdict``: "pass" / "fail" with the reasons.
"""
from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from m2f.errors import InputError
from m2f.io import write_json_atomic

from . import tensorrt_onnx_ops
from .manifest import load_onnx, read_manifest, sha256_file
from .plugins import M2F_MASKED_ATTENTION, MASKED_ATTENTION_INPUTS, MSDA_INPUTS, TRT_MSDA

log = logging.getLogger("m2f.export")

# The acceptance bounds on rel_err against the float32 PyTorch model, per graph precision (export/README.md has the
# measured values: these leave ~5-10x headroom over them).
FLOAT_RTOL = {"fp32": 1e-4, "fp16": 2e-2, "bf16": 6e-2, "int8": 0.25}
MIN_SEMANTIC_AGREEMENT = {"fp32": 0.999, "fp16": 0.99, "bf16": 0.97, "int8": 0.9}
MAX_MISMATCH = 2e-3  # integer / bool outputs: fraction of elements allowed to differ (near-ties of argmax / > 0)
DATA_DEPENDENT_OPS = {"NonZero", "Compress", "Unique", "SequenceConstruct", "SplitToSequence"}
CONTROL_FLOW_OPS = {"If", "Loop", "Scan"}  # reported (TensorRT imports them), not failed
ONNX_DOUBLE = 11


@dataclass(frozen=True)
class CheckSize:
    batch: int
    height: int
    width: int

    def as_dict(self) -> dict[str, int]:
        return {"batch": self.batch, "height": self.height, "width": self.width}


# ---------------------------------------------------------------------------------------------------
# Structure
# ---------------------------------------------------------------------------------------------------


def run_checker(model: Any) -> dict[str, Any]:
    import onnx

    try:
        onnx.checker.check_model(model, full_check=True)
        return {"ok": True}
    except Exception as exc:  # onnx raises ValidationError / InferenceError
        return {"ok": False, "error": " ".join(str(exc).split())[:2000]}


def op_census(model: Any) -> dict[str, int]:
    """Counts of every op in the graph (and its subgraphs), keyed "op_type" or "domain::op_type"."""
    counts: Counter[str] = Counter()

    def visit(graph: Any) -> None:
        for node in graph.node:
            key = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}::{node.op_type}"
            counts[key] += 1
            for attr in node.attribute:
                if attr.g is not None and attr.g.node:
                    visit(attr.g)
                for g in attr.graphs:
                    visit(g)

    visit(model.graph)
    return dict(sorted(counts.items()))


def double_tensors(model: Any) -> list[str]:
    """Names of float64 tensors: initializers, value infos, graph I/O, Cast-to-DOUBLE and Constant outputs."""
    found = [i.name for i in model.graph.initializer if i.data_type == ONNX_DOUBLE]
    for vi in (*model.graph.input, *model.graph.output, *model.graph.value_info):
        if vi.type.tensor_type.elem_type == ONNX_DOUBLE:
            found.append(vi.name)
    for node in model.graph.node:
        for attr in node.attribute:
            if node.op_type == "Cast" and attr.name == "to" and attr.i == ONNX_DOUBLE:
                found.append(node.output[0])
            if node.op_type == "Constant" and attr.name == "value" and attr.t.data_type == ONNX_DOUBLE:
                found.append(node.output[0])
    return sorted(set(found))


def tensorrt_support(census: dict[str, int], opset: int) -> dict[str, Any]:
    """Ops of the graph against TensorRT's ONNX parser list; custom-domain nodes are plugins (allowed)."""
    standard = {k: v for k, v in census.items() if "::" not in k}
    plugins = {k: v for k, v in census.items() if "::" in k}
    unsupported = sorted(k for k in standard if k not in tensorrt_onnx_ops.SUPPORTED)
    restrictions = {k: tensorrt_onnx_ops.RESTRICTIONS[k] for k in standard if k in tensorrt_onnx_ops.RESTRICTIONS}
    opset_ok = tensorrt_onnx_ops.OPSET_MIN <= opset <= tensorrt_onnx_ops.OPSET_MAX
    return {
        "tensorrt_version": tensorrt_onnx_ops.TENSORRT_VERSION,
        "opset_supported": opset_ok,
        "unsupported_ops": unsupported,
        "plugin_ops": plugins,
        "restrictions_to_mind": restrictions,
        "ok": opset_ok and not unsupported,
    }


def _value_types(model: Any) -> dict[str, tuple[int, int | None]]:
    """name -> (elem_type, rank) for every typed tensor after ONNX shape inference (custom ops stay untyped)."""
    import onnx

    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    except Exception:
        inferred = model
    types: dict[str, tuple[int, int | None]] = {}
    for vi in (*inferred.graph.input, *inferred.graph.output, *inferred.graph.value_info):
        t = vi.type.tensor_type
        types[vi.name] = (t.elem_type, len(t.shape.dim) if t.HasField("shape") else None)
    for init in inferred.graph.initializer:
        types[init.name] = (init.data_type, len(init.dims))
    return types


def msda_plugin_nodes(model: Any) -> dict[str, Any]:
    """Each TensorRT MSDA plugin node against the plugin's interface: 5 inputs in order, their ranks and dtypes,
    one output, no attributes."""
    import onnx

    float_types = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16}
    expected = [(4, float_types), (2, {onnx.TensorProto.INT32}), (1, {onnx.TensorProto.INT32}), (6, float_types),
                (5, float_types)]
    types = _value_types(model)
    nodes, problems = [], []
    for node in model.graph.node:
        if node.op_type != TRT_MSDA.op_type:
            continue
        entry = {"name": node.name, "domain": node.domain, "inputs": list(node.input),
                 "attributes": [a.name for a in node.attribute]}
        if len(node.input) != len(MSDA_INPUTS) or len(node.output) != 1:
            problems.append(f"{node.name}: {len(node.input)} inputs / {len(node.output)} outputs, expected 5 / 1")
        if node.attribute:
            problems.append(f"{node.name}: has attributes {entry['attributes']}; the plugin takes none")
        for i, (name, (rank, dtypes)) in enumerate(zip(node.input, expected)):
            elem, got_rank = types.get(name, (0, None))
            if got_rank is not None and got_rank != rank:
                problems.append(f"{node.name}: input {i} ({MSDA_INPUTS[i]}) has rank {got_rank}, expected {rank}")
            if elem and elem not in dtypes:
                problems.append(f"{node.name}: input {i} ({MSDA_INPUTS[i]}) has dtype "
                                f"{onnx.TensorProto.DataType.Name(elem)}")
        nodes.append(entry)
    functions = [f.name for f in model.functions if f.name == TRT_MSDA.op_type]
    if functions:  # the parser would import the function body instead of the plugin
        problems.append(f"the model defines a local function named {TRT_MSDA.op_type}; TensorRT would inline it")
    domains = {o.domain for o in model.opset_import}
    if nodes and TRT_MSDA.domain not in domains:
        problems.append(f"domain {TRT_MSDA.domain!r} of the plugin nodes is not in opset_import")
    return {"op_type": TRT_MSDA.op_type, "count": len(nodes), "nodes": nodes, "problems": problems}


def masked_attention_plugin_nodes(model: Any) -> dict[str, Any]:
    """Each ``m2f::masked_attention`` node against the plugin's interface: inputs q, k, v (rank 4), mask logits
    (rank 3), all one float dtype (the plugin's type combinations); one output; attributes plugin_namespace "m2f"
    (how the parser finds the plugin) and aot 1 (TensorRT's ahead-of-time implementation)."""
    import onnx
    from onnx import helper

    float_types = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16}
    ranks = (4, 4, 4, 3)
    types = _value_types(model)
    plugin = M2F_MASKED_ATTENTION
    nodes, problems = [], []
    for node in model.graph.node:
        if node.op_type != plugin.op_type:
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        attrs = {k: v.decode() if isinstance(v, bytes) else v for k, v in attrs.items()}
        entry = {"name": node.name, "domain": node.domain, "inputs": list(node.input), "attributes": attrs}
        if node.domain != plugin.domain:
            problems.append(f"{node.name}: domain {node.domain!r}, expected {plugin.domain!r}")
        if len(node.input) != len(MASKED_ATTENTION_INPUTS) or len(node.output) != 1:
            problems.append(f"{node.name}: {len(node.input)} inputs / {len(node.output)} outputs, expected 4 / 1")
        if attrs != plugin.attributes:
            problems.append(f"{node.name}: attributes {attrs}, expected {plugin.attributes}")
        elems = set()
        for i, (name, rank) in enumerate(zip(node.input, ranks)):
            elem, got_rank = types.get(name, (0, None))
            if got_rank is not None and got_rank != rank:
                problems.append(f"{node.name}: input {i} ({MASKED_ATTENTION_INPUTS[i]}) has rank {got_rank}, "
                                f"expected {rank}")
            if elem:
                elems.add(elem)
                if elem not in float_types:
                    problems.append(f"{node.name}: input {i} ({MASKED_ATTENTION_INPUTS[i]}) has dtype "
                                    f"{onnx.TensorProto.DataType.Name(elem)}")
        if len(elems) > 1:
            problems.append(f"{node.name}: inputs of dtypes {sorted(onnx.TensorProto.DataType.Name(e) for e in elems)};"
                            " the plugin takes one dtype for all")
        entry["dtype"] = onnx.TensorProto.DataType.Name(elems.pop()) if len(elems) == 1 else None
        nodes.append(entry)
    if any(f.name == plugin.op_type for f in model.functions):  # the parser would import the function body instead
        problems.append(f"the model defines a local function named {plugin.op_type}; TensorRT would inline it")
    if nodes and plugin.domain not in {o.domain for o in model.opset_import}:
        problems.append(f"domain {plugin.domain!r} of the masked-attention plugin nodes is not in opset_import")
    return {"op_type": plugin.op_type, "count": len(nodes), "nodes": nodes, "problems": problems}


# ---------------------------------------------------------------------------------------------------
# Parity against PyTorch
# ---------------------------------------------------------------------------------------------------


def compare_outputs(ort_out: dict[str, np.ndarray], ref_out: dict[str, np.ndarray]) -> dict[str, Any]:
    """rel_err (float outputs) or mismatch fraction (integer / bool outputs) per output name."""
    result = {}
    for name, ref in ref_out.items():
        got = ort_out[name]
        entry: dict[str, Any] = {"shape": list(got.shape), "ref_shape": list(ref.shape)}
        if got.shape != ref.shape:
            entry["error"] = "shape mismatch"
        elif np.issubdtype(ref.dtype, np.floating):
            ref64, got64 = ref.astype(np.float64), got.astype(np.float64)
            entry["rel_err"] = float(np.linalg.norm(got64 - ref64) / max(np.linalg.norm(ref64), 1e-300))
            entry["max_abs_err"] = float(np.max(np.abs(got64 - ref64))) if ref.size else 0.0
            entry["finite"] = bool(np.isfinite(got).all())
        else:
            entry["mismatch"] = float(np.mean(got != ref)) if ref.size else 0.0
        result[name] = entry
    return result


def parity_ok(outputs: dict[str, Any], rtol: float) -> list[str]:
    reasons = []
    for name, e in outputs.items():
        if "error" in e:
            reasons.append(f"{name}: {e['error']} {e['shape']} vs {e['ref_shape']}")
        elif "rel_err" in e and not (e["finite"] and e["rel_err"] <= rtol):
            reasons.append(f"{name}: rel_err {e['rel_err']:.3g} > {rtol:g}")
        elif "mismatch" in e and e["mismatch"] > MAX_MISMATCH:
            reasons.append(f"{name}: {e['mismatch']:.3%} of elements differ")
    return reasons


def cpu_session(onnx_path: str | Path) -> tuple[Any, str]:
    """An ONNX Runtime CPU session of the graph and how it runs: "onnxruntime", or for a low-precision graph whose
    types the CPU build has no kernels for (bf16), "onnxruntime (emulated ...)": the same graph with float32
    arithmetic and the rounding to the low-precision type at every stored tensor (precision.emulate_on_cpu)."""
    import onnxruntime as ort

    from .precision import emulate_on_cpu

    options = ort.SessionOptions()
    options.log_severity_level = 3
    try:
        return ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"]), "onnxruntime"
    except Exception as exc:  # onnxruntime's NotImplemented for a type without CPU kernels
        if "NOT_IMPLEMENTED" not in str(exc):
            raise
        emulated = emulate_on_cpu(load_onnx(Path(onnx_path)))
        session = ort.InferenceSession(emulated.SerializeToString(), options, providers=["CPUExecutionProvider"])
        return session, ("onnxruntime (emulated: the CPU build has no kernel for some of the graph's types; float32 "
                         "arithmetic, rounded to the graph's type at every stored tensor)")


def semantic_agreement(got: dict[str, np.ndarray], ref: dict[str, np.ndarray]) -> float | None:
    """Fraction of pixels (at mask resolution) whose semantic class (argmax of softmax(logits) . sigmoid(masks))
    agrees between the two sets of outputs; None without pred_logits / pred_masks."""
    if not {"pred_logits", "pred_masks"} <= set(got) & set(ref):
        return None

    def classes(out: dict[str, np.ndarray]) -> np.ndarray:
        logits, masks = out["pred_logits"].astype(np.float64), out["pred_masks"].astype(np.float64)
        probs = np.exp(logits - logits.max(-1, keepdims=True))
        probs = (probs / probs.sum(-1, keepdims=True))[..., :-1]  # (B, Q, K)
        return np.einsum("bqk,bqhw->bkhw", probs, 1 / (1 + np.exp(-masks))).argmax(1)

    return float(np.mean(classes(got) == classes(ref)))


def run_parity(
    onnx_path: str | Path,
    module: Any,  # the float32 torch export module (OnnxExportModule) in eval mode
    sizes: Sequence[CheckSize],
    output_names: Sequence[str],
    seed: int | None = None,
    precision: str = "fp32",
) -> list[dict[str, Any]]:
    """Run ONNX Runtime and PyTorch on the same fresh random inputs at each size (inputs stable at ``precision``)."""
    import torch

    session, runtime = cpu_session(onnx_path)
    graph_input = session.get_inputs()[0]
    input_dtype = {"tensor(float16)": np.float16, "tensor(bfloat16)": None}.get(graph_input.type, np.float32)
    generator = torch.Generator()
    seed = int(seed if seed is not None else torch.seed() % (2**31))
    generator.manual_seed(seed)
    results = []
    for size in sizes:
        x, ref, skipped = _stable_input(module, size, generator, torch.float32, *STABILITY[precision])
        ref_np = {n: t.detach().float().numpy() if t.is_floating_point() else t.numpy() for n, t in zip(output_names, ref)}
        if input_dtype is None:
            raise InputError(f"{onnx_path} takes a bfloat16 input, which numpy cannot make; export it with float32 "
                             "inputs and outputs (the default)")
        start = time.perf_counter()
        got = session.run(list(output_names), {graph_input.name: x.numpy().astype(input_dtype)})
        ort_s = time.perf_counter() - start
        got_np = {n: (g.astype(np.float32) if np.issubdtype(g.dtype, np.floating) else g) for n, g in zip(output_names, got)}
        results.append({**size.as_dict(), "seed": seed, "runtime": runtime, "ort_seconds": round(ort_s, 3),
                        "unstable_draws_skipped": skipped, "outputs": compare_outputs(got_np, ref_np),
                        "semantic_agreement": semantic_agreement(got_np, ref_np)})
    return results


# precision -> (relative input perturbation of the stability probe, output change (rel) under it that marks an input
# as sitting on a mask threshold). The probe is the size of the graph's own rounding (float32: 1e-6; fp16 2^-11,
# bf16 2^-8, int8 activations ~1/127, each about doubled) and the change a quarter of its FLOAT_RTOL: a draw that
# rounding alone flips is redrawn instead of failing the check by chance.
STABILITY = {"fp32": (1e-6, 3e-5), "fp16": (1e-3, 5e-3), "bf16": (8e-3, 1.5e-2), "int8": (2e-2, 6e-2)}
MAX_DRAWS = 6


def _stable_input(module: Any, size: CheckSize, generator: Any, dtype: Any, probe_size: float = 1e-6,
                  unstable_change: float = 3e-5) -> tuple[Any, Any, int]:
    """A random input away from Mask2Former's discontinuities, with the PyTorch outputs on it.

    The masked attention thresholds mask logits at 0 (sigmoid < 0.5): an input whose logits sit within rounding
    distance of 0 flips attention masks between any two float32 implementations (PyTorch against itself on
    another machine included), which moves the outputs by ~1e-4 with no bug anywhere (by far more in a low-precision
    graph, whose rounding is larger). Such inputs are detected by perturbing the input by ``probe_size`` (relative)
    and are redrawn; the report counts them.
    """
    import torch

    def rel(a: Any, b: Any) -> float:
        return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))

    skipped = 0
    for _ in range(MAX_DRAWS):
        x = torch.randn(size.batch, 3, size.height, size.width, generator=generator).to(dtype)  # normalised pixels
        with torch.no_grad():
            ref = module(x)
            noise = torch.randn(x.shape, generator=generator).to(dtype)
            probe = module(x + probe_size * x.abs().mean() * noise)
        change = max(rel(p, r) for p, r in zip(probe, ref) if r.is_floating_point())
        if dtype != torch.float32 or change <= unstable_change:
            return x, ref, skipped
        skipped += 1
    return x, ref, skipped  # every draw unstable: compare anyway (the report shows the count)


def other_size(batch: int, height: int, width: int) -> CheckSize:
    """A second check size for dynamic graphs: another batch and another H, W (multiples of 32)."""
    return CheckSize(batch + 1, height + 32 if height <= 256 else height - 64, width - 32 if width >= 96 else width + 64)


# ---------------------------------------------------------------------------------------------------
# The whole check
# ---------------------------------------------------------------------------------------------------


def check_onnx(
    onnx_path: str | Path,
    checkpoint: str | Path | None = None,
    report: str | Path | None = None,
    extra_sizes: Sequence[CheckSize] = (),
    model: Any = None,  # an already loaded torch model (skips loading the checkpoint)
    seed: int | None = None,
    force: bool = False,
) -> dict[str, Any]:
    """Check ``onnx_path``; write the JSON report to ``report`` when given; return the report.

    The PyTorch side is ``model`` (also accepted as the second positional argument) or the checkpoint at
    ``checkpoint`` (default: the one the manifest records)."""
    import torch

    if isinstance(checkpoint, torch.nn.Module):  # check_onnx(path, model)
        if model is not None:
            raise InputError("check_onnx got two models (positionally and as model=); pass one")
        model, checkpoint = checkpoint, None
    elif checkpoint is not None and not isinstance(checkpoint, (str, Path)):
        raise InputError(f"check_onnx's second argument must be a checkpoint path or an m2f model, got "
                         f"{type(checkpoint).__name__}; call check_onnx(path, model) or check_onnx(path, checkpoint)")

    onnx_path = Path(onnx_path)
    if not onnx_path.is_file():
        raise InputError(f"ONNX file {onnx_path} not found; export one with `m2f export onnx`")
    if report is not None:
        from m2f.io import check_can_write

        check_can_write(report, force=force)
    manifest = read_manifest(onnx_path, required=checkpoint is None and model is None, kind="onnx") or {}
    proto = load_onnx(onnx_path)
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)
    census = op_census(proto)
    doubles = double_tensors(proto)
    data_dependent = sorted(k for k in census if k in DATA_DEPENDENT_OPS)
    out: dict[str, Any] = {
        "file": str(onnx_path),
        "sha256": sha256_file(onnx_path),
        "precision": manifest.get("precision", "fp32") if manifest else None,
        "manifest": {k: manifest.get(k) for k in ("opset", "msda", "masked_attn", "dtype", "precision", "dynamic",
                                                  "batch", "height", "width", "postprocess", "source")}
        if manifest else None,
        "opset": opset,
        "checker": run_checker(proto),
        "census": census,
        "num_nodes": int(sum(census.values())),
        "double_tensors": doubles,
        "data_dependent_ops": data_dependent,
        "control_flow_ops": sorted(k for k in census if k in CONTROL_FLOW_OPS),
        "tensorrt": tensorrt_support(census, opset),
    }
    reasons = []
    if not out["checker"]["ok"]:
        reasons.append(f"onnx.checker: {out['checker']['error'][:300]}")
    if doubles:
        reasons.append(f"float64 tensors in the graph: {doubles[:5]}")
    if data_dependent:
        reasons.append(f"data-dependent ops in the graph: {data_dependent}")
    if out["tensorrt"]["unsupported_ops"]:
        reasons.append(f"ops TensorRT's parser does not import: {out['tensorrt']['unsupported_ops']}")

    plugin_info = msda_plugin_nodes(proto)
    masked_info = masked_attention_plugin_nodes(proto)
    skipped_ops = []
    if plugin_info["count"] > 0 or manifest.get("msda") == "plugin":
        out["plugins"] = plugin_info
        reasons.extend(plugin_info["problems"])
        expected = manifest.get("expected_plugin_nodes")
        if expected is not None and plugin_info["count"] != expected:
            reasons.append(f"{plugin_info['count']} MSDA plugin nodes, expected {expected} (one per encoder layer)")
        skipped_ops.append(TRT_MSDA.op_type)
    if masked_info["count"] > 0 or manifest.get("masked_attn") == "plugin":
        out["masked_attention_plugins"] = masked_info
        reasons.extend(masked_info["problems"])
        expected = manifest.get("expected_masked_attention_nodes")
        if expected is not None and masked_info["count"] != expected:
            reasons.append(f"{masked_info['count']} masked-attention plugin nodes, expected {expected} "
                           "(one per decoder layer)")
        skipped_ops.append(f"{M2F_MASKED_ATTENTION.domain}::{M2F_MASKED_ATTENTION.op_type}")
    if skipped_ops:
        out["parity"] = {"skipped": f"plugin-mode graph: ONNX Runtime has no {' / '.join(skipped_ops)} kernel, so "
                                    "the graph was checked structurally only (checker, op census, plugin node "
                                    "interface)"}
    else:
        out["parity"] = _parity_section(onnx_path, manifest, checkpoint, model, extra_sizes, seed, reasons)
    out["verdict"] = "pass" if not reasons else "fail"
    out["reasons"] = reasons
    if report is not None:
        write_json_atomic(report, out)
    return out


def _parity_section(onnx_path: Path, manifest: dict[str, Any], checkpoint: Any, model: Any,
                    extra_sizes: Sequence[CheckSize], seed: int | None, reasons: list[str]) -> dict[str, Any]:
    from .onnx_export import OnnxExportModule, load_checkpoint_model, torch_backend_copy

    if model is None:
        source = checkpoint or (manifest.get("source") or {}).get("path")
        if not source:
            raise InputError(f"no checkpoint to compare {onnx_path} against: pass --checkpoint")
        model = load_checkpoint_model(source, preset=(manifest.get("source") or {}).get("preset"))
    else:  # the ONNX graph holds the standard ops: compare with them, whatever backend the model was built with
        model = torch_backend_copy(model)
    if not manifest:
        raise InputError(f"{onnx_path} has no manifest: the export size is unknown; re-export with `m2f export onnx`")
    precision = manifest.get("precision", "fp32")
    if precision not in FLOAT_RTOL:
        raise InputError(f"{onnx_path}'s manifest names precision {precision!r}, not one of {', '.join(FLOAT_RTOL)}; "
                         "re-export with `m2f export onnx --precision ...`")
    module = OnnxExportModule(model, postprocess=manifest.get("postprocess", "none"),
                              topk=manifest.get("topk", 100)).eval().float()  # the reference is always float32
    sizes = [CheckSize(manifest["batch"], manifest["height"], manifest["width"])]
    if manifest.get("dynamic"):
        sizes.append(other_size(manifest["batch"], manifest["height"], manifest["width"]))
    sizes.extend(extra_sizes)
    names = [o["name"] for o in manifest["outputs"]]
    runs = run_parity(onnx_path, module, sizes, names, seed=seed, precision=precision)
    rtol, min_agreement = FLOAT_RTOL[precision], MIN_SEMANTIC_AGREEMENT[precision]
    for run in runs:
        where = f"at {run['batch']}x3x{run['height']}x{run['width']}"
        reasons.extend(f"{where}: {r}" for r in parity_ok(run["outputs"], rtol))
        agreement = run["semantic_agreement"]
        if agreement is not None and agreement < min_agreement:
            reasons.append(f"{where}: semantic classes agree on {agreement:.2%} of pixels < {min_agreement:.0%}")
    return {"precision": precision, "reference": "float32 PyTorch model", "rtol": rtol,
            "min_semantic_agreement": min_agreement, "runs": runs}
