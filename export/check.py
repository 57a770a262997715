"""``m2f export check``: is an exported model valid, portable and faithful to the PyTorch model?

One :class:`CheckReport` (JSON, versioned) per file. For an ONNX file:

* ``checker``: onnx.checker (full check, with shape inference);
* ``census``: op counts by (domain, op_type); dtypes: no DOUBLE tensors anywhere; no data-dependent-shape ops
  (NonZero, Compress, Unique, ...) that TensorRT handles badly or not at all;
* ``targets``: for every export target with an op list (:mod:`m2f.export.targets`), the graph's ops against it
  (m2f's plugin nodes allowed and listed), with the restrictions that apply; only the target the graph was
  exported for (its manifest's) can fail the verdict;
* ``plugins``: per fused op in plugin mode (:data:`m2f.export.plugins.PLUGINS`), each plugin node's inputs (ranks,
  dtypes, order) and attributes against the plugin's interface;
* ``parity``: ONNX Runtime against the PyTorch model (the checkpoint named by the manifest, or given) on fresh
  random inputs, at the export size and, for a dynamic graph, at another size and batch: relative error
  ``||ort - torch|| / ||torch||`` per float output, mismatch fraction per integer / bool output. ONNX Runtime has
  no kernel for m2f's plugin nodes: it runs each through the plugin's reference function
  (:mod:`m2f.export.plugin_functions`), which checks the plugin nodes' wiring (inputs, order, layouts) and the rest
  of the graph numerically, and the plugins' own kernels not at all (the runs' ``runtime`` says so);
* ``verdict``: "pass" / "fail" with the reasons.

For an artifact a target built (an OpenVINO directory, ...): its manifest, and parity of the target's runner
against PyTorch as above.
"""
from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from m2f.errors import InputError
from m2f.io import write_json_atomic

from . import targets
from .manifest import Manifest, artifact_stamp, load_onnx, read_manifest
from .plugins import PLUGINS, PluginSpec

log = logging.getLogger("m2f.export")

# The acceptance bounds on rel_err against the float32 PyTorch model, per graph precision (export/README.md has the
# measured values: these leave ~5-10x headroom over them).
FLOAT_RTOL = {"fp32": 1e-4, "fp16": 2e-2, "bf16": 6e-2, "int8": 0.25}
MIN_SEMANTIC_AGREEMENT = {"fp32": 0.999, "fp16": 0.99, "bf16": 0.97, "int8": 0.9}
REPORT_FORMAT = "m2f-check-report/1"
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


def plugin_nodes(spec: PluginSpec, model: Any) -> dict[str, Any]:
    """Each plugin node of ``spec`` against its interface: the inputs in order with their ranks and dtypes (one
    dtype for all when the plugin takes one), one output, the attributes TensorRT's parser reads."""
    import onnx
    from onnx import helper

    node_spec = spec.node
    names = node_spec.inputs
    allowed = [{getattr(onnx.TensorProto, d) for d in rule.dtypes} for rule in spec.input_rules]
    types = _value_types(model)
    nodes, problems = [], []
    for node in model.graph.node:
        if not node_spec.matches(node):
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        attrs = {k: v.decode() if isinstance(v, bytes) else v for k, v in attrs.items()}
        entry: dict[str, Any] = {"name": node.name, "domain": node.domain, "inputs": list(node.input),
                                 "attributes": attrs}
        if len(node.input) != len(names) or len(node.output) != len(node_spec.outputs):
            problems.append(f"{node.name}: {len(node.input)} inputs / {len(node.output)} outputs, expected "
                            f"{len(names)} / {len(node_spec.outputs)}")
        if attrs != node_spec.attributes:
            problems.append(f"{node.name}: attributes {attrs}, expected {node_spec.attributes or 'none'}")
        floats = set()
        for i, (name, rule, dtypes) in enumerate(zip(node.input, spec.input_rules, allowed)):
            elem, got_rank = types.get(name, (0, None))
            if got_rank is not None and got_rank != rule.rank:
                problems.append(f"{node.name}: input {i} ({names[i]}) has rank {got_rank}, expected {rule.rank}")
            if elem and elem not in dtypes:
                problems.append(f"{node.name}: input {i} ({names[i]}) has dtype {onnx.TensorProto.DataType.Name(elem)}")
            elif elem and "FLOAT" in rule.dtypes:
                floats.add(elem)
        if spec.one_dtype and len(floats) > 1:
            problems.append(f"{node.name}: inputs of dtypes {sorted(onnx.TensorProto.DataType.Name(e) for e in floats)};"
                            " the plugin takes one dtype for all")
        entry["dtype"] = onnx.TensorProto.DataType.Name(next(iter(floats))) if len(floats) == 1 else None
        nodes.append(entry)
    if any(f.name == node_spec.op_type for f in model.functions):  # the parser would import the function instead
        problems.append(f"the model defines a local function named {node_spec.op_type}; TensorRT would inline it")
    if nodes and node_spec.domain not in {o.domain for o in model.opset_import}:
        problems.append(f"domain {node_spec.domain!r} of the {spec.name} plugin nodes is not in opset_import")
    return {"op_type": node_spec.op_type, "count": len(nodes), "nodes": nodes, "problems": problems}


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
    runner: Any,  # an m2f.export.runner.Runner
    module: Any,  # the torch export module (OnnxExportModule) in eval mode
    sizes: Sequence[CheckSize],
    output_names: Sequence[str],
    seed: int | None = None,
    precision: str = "fp32",
) -> list[dict[str, Any]]:
    """Run ``runner`` and the float32 PyTorch module on the same random inputs at each size (inputs stable at
    ``precision``: a draw its rounding alone would flip across a mask threshold is drawn again). Without ``seed``,
    the seed is drawn from torch's global generator, so a caller that seeds torch (the test suite) replays a check,
    and every result records its seed."""
    import torch

    generator = torch.Generator()
    seed = int(seed if seed is not None else torch.randint(0, 2**31 - 1, ()).item())
    generator.manual_seed(seed)
    results = []
    for size in sizes:
        x, ref, skipped = _stable_input(module, size, generator, torch.float32, *STABILITY[precision])
        ref_np = {n: t.detach().float().numpy() if t.is_floating_point() else t.numpy() for n, t in zip(output_names, ref)}
        start = time.perf_counter()
        got = runner.run(x.numpy())
        run_s = time.perf_counter() - start
        got_np = {n: (g.astype(np.float32) if np.issubdtype(g.dtype, np.floating) else g) for n, g in got.items()}
        results.append({**size.as_dict(), "seed": seed, "runtime": getattr(runner, "runs_as", runner.name), "run_seconds": round(run_s, 3),
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


@dataclass(frozen=True)
class CheckReport:
    """What ``m2f export check`` found; written as JSON by :func:`write_report` only. ``structure`` holds the
    ONNX-graph sections (checker, census, dtypes, ...; empty for other artifacts), ``targets`` the op support per
    target, ``plugins`` the plugin-node checks per op in plugin mode."""

    file: str
    kind: str
    target: str
    sha256: str
    manifest: Mapping[str, Any] | None
    parity: Mapping[str, Any]
    verdict: str
    reasons: tuple[str, ...]
    opset: int | None = None
    structure: Mapping[str, Any] = field(default_factory=dict)
    targets: Mapping[str, Any] = field(default_factory=dict)
    plugins: Mapping[str, Any] = field(default_factory=dict)
    format: str = REPORT_FORMAT

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def write_report(path: str | Path, report: CheckReport) -> None:
    write_json_atomic(path, report.to_json())


def _manifest_summary(manifest: Manifest | None) -> dict[str, Any] | None:
    if manifest is None:
        return None
    keys = ("kind", "target", "opset", "ops", "dtype", "precision", "dynamic", "batch", "height", "width",
            "postprocess", "source")
    data = manifest.to_json()
    return {k: data[k] for k in keys}


def check_model(
    path: str | Path,
    checkpoint: str | Path | None = None,
    report: str | Path | None = None,
    extra_sizes: Sequence[CheckSize] = (),
    model: Any = None,
    seed: int | None = None,
    force: bool = False,
) -> CheckReport:
    """Check any exported model: an ONNX file (:func:`check_onnx`), or an artifact a target built (its runner
    against PyTorch)."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path} not found; export a model with `m2f export`")
    target = targets.for_artifact(path)
    if target.artifact == "onnx":
        return check_onnx(path, checkpoint, report, extra_sizes, model, seed, force)
    if report is not None:
        from m2f.io import check_can_write

        check_can_write(report, force=force)
    manifest = read_manifest(path, kind=target.artifact)
    why = target.available()
    reasons: list[str] = []
    if why is not None:
        parity: dict[str, Any] = {"skipped": f"{target.name} cannot run here: {why}"}
    else:
        with target.runner(path) as runner:
            parity = _parity_section(path, manifest, checkpoint, model, extra_sizes, seed, reasons, runner)
    out = CheckReport(file=str(path), kind=target.artifact, target=target.name,
                      sha256=artifact_stamp(path)["sha256"], manifest=_manifest_summary(manifest), parity=parity,
                      verdict="pass" if not reasons else "fail", reasons=tuple(reasons))
    if report is not None:
        write_report(report, out)
    return out


def check_onnx(
    onnx_path: str | Path,
    checkpoint: str | Path | None = None,
    report: str | Path | None = None,
    extra_sizes: Sequence[CheckSize] = (),
    model: Any = None,  # an already loaded torch model (skips loading the checkpoint)
    seed: int | None = None,
    force: bool = False,
) -> CheckReport:
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
    manifest = read_manifest(onnx_path, required=checkpoint is None and model is None, kind="onnx")
    exported_for = manifest.target if manifest is not None else "onnxruntime"
    proto = load_onnx(onnx_path)
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)
    census = op_census(proto)
    doubles = double_tensors(proto)
    data_dependent = sorted(k for k in census if k in DATA_DEPENDENT_OPS)
    structure = {
        "checker": run_checker(proto),
        "census": census,
        "num_nodes": int(sum(census.values())),
        "double_tensors": doubles,
        "data_dependent_ops": data_dependent,
        "control_flow_ops": sorted(k for k in census if k in CONTROL_FLOW_OPS),
    }
    plugin_keys = frozenset(spec.node.key for spec in PLUGINS)
    support = {t.name: t.support(census, opset, plugin_keys) for t in targets.all_targets() if t.ops is not None}
    reasons = []
    if not structure["checker"]["ok"]:
        reasons.append(f"onnx.checker: {structure['checker']['error'][:300]}")
    if doubles:
        reasons.append(f"float64 tensors in the graph: {doubles[:5]}")
    if data_dependent:
        reasons.append(f"data-dependent ops in the graph: {data_dependent}")
    if exported_for in support and support[exported_for]["unsupported_ops"]:
        reasons.append(f"ops {exported_for} does not import: {support[exported_for]['unsupported_ops']}")

    plugins: dict[str, Any] = {}
    for spec in PLUGINS:
        info = plugin_nodes(spec, proto)
        record = manifest.ops.get(spec.name) if manifest is not None else None
        if info["count"] == 0 and (record is None or record.mode != spec.plugin_mode):
            continue
        plugins[spec.name] = info
        reasons.extend(info["problems"])
        if record is not None and record.expected_nodes is not None and info["count"] != record.expected_nodes:
            reasons.append(f"{info['count']} {spec.name} plugin nodes, expected {record.expected_nodes} "
                           f"(one per {spec.what})")
    from .targets.onnxruntime import OnnxRuntimeRunner

    if manifest is None:
        raise InputError(f"{onnx_path} has no manifest: the export size is unknown; re-export with `m2f export onnx`")
    with OnnxRuntimeRunner(onnx_path, reference_plugins=bool(plugins)) as runner:
        parity = _parity_section(onnx_path, manifest, checkpoint, model, extra_sizes, seed, reasons, runner)
    out = CheckReport(file=str(onnx_path), kind="onnx", target=exported_for,
                      sha256=artifact_stamp(onnx_path)["sha256"], manifest=_manifest_summary(manifest),
                      parity=parity, verdict="pass" if not reasons else "fail", reasons=tuple(reasons), opset=opset,
                      structure=structure, targets=support, plugins=plugins)
    if report is not None:
        write_report(report, out)
    return out


def _parity_section(path: Path, manifest: Manifest, checkpoint: Any, model: Any, extra_sizes: Sequence[CheckSize],
                    seed: int | None, reasons: list[str], runner: Any) -> dict[str, Any]:
    from .onnx_export import OnnxExportModule, load_checkpoint_model, torch_backend_copy

    if model is None:
        source = checkpoint or (manifest.source or {}).get("path")
        if not source:
            raise InputError(f"no checkpoint to compare {path} against: pass --checkpoint")
        model = load_checkpoint_model(source, preset=(manifest.source or {}).get("preset"))
    else:  # the graph holds the standard ops: compare with them, whatever backend the model was built with
        model = torch_backend_copy(model)
    precision = manifest.precision
    if precision not in FLOAT_RTOL:
        raise InputError(f"{path}'s manifest names precision {precision!r}, not one of {', '.join(FLOAT_RTOL)}; "
                         "re-export with `m2f export onnx --precision ...`")
    module = OnnxExportModule(model, postprocess=manifest.postprocess,
                              topk=manifest.topk or 100).eval().float()  # the reference is always float32
    sizes = [CheckSize(manifest.batch, manifest.height, manifest.width)]
    if manifest.dynamic:
        sizes.append(other_size(manifest.batch, manifest.height, manifest.width))
    sizes.extend(extra_sizes)
    names = [o.name for o in manifest.outputs]
    runs = run_parity(runner, module, sizes, names, seed=seed, precision=precision)
    rtol, min_agreement = FLOAT_RTOL[precision], MIN_SEMANTIC_AGREEMENT[precision]
    for run in runs:
        where = f"at {run['batch']}x3x{run['height']}x{run['width']}"
        reasons.extend(f"{where}: {r}" for r in parity_ok(run["outputs"], rtol))
        agreement = run["semantic_agreement"]
        if agreement is not None and agreement < min_agreement:
            reasons.append(f"{where}: semantic classes agree on {agreement:.2%} of pixels < {min_agreement:.0%}")
    return {"precision": precision, "reference": "float32 PyTorch model", "rtol": rtol,
            "min_semantic_agreement": min_agreement, "runs": runs}
