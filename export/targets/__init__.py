"""Export targets: one module per runtime, each registering one :class:`Target` (adding one: CONTRIBUTING.md).

A target says what it is called, which mode each fused op (:data:`m2f.export.plugins.PLUGINS`) defaults to when
an ONNX graph is exported for it, which ONNX ops it imports (None: any op ONNX Runtime runs), how to build its
artifact from an exported ONNX file, and how to make a :class:`m2f.export.runner.Runner` for that artifact. The
CLI, the pipeline, ``m2f export check`` and the Triton-server repository read this registry and name no target.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from m2f.errors import InputError

# The built-in targets, by module name: importing one registers it.
BUILTIN = ("onnxruntime", "tensorrt", "openvino")


@dataclass(frozen=True)
class OpSupport:
    """The ONNX ops a target's importer takes, as data (checked by ``m2f export check``)."""

    source: str  # where the list comes from, e.g. "onnx-tensorrt docs/operators.md for TensorRT 10.15"
    supported: frozenset[str]
    opset_min: int
    opset_max: int
    restrictions: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Target:
    """One export target.

    ``artifact`` is the kind its manifest records ("onnx" for runtimes that run the ONNX file itself);
    ``build(onnx_path, output, **options)`` writes the artifact (+ manifest) and returns its path, None for
    ``artifact == "onnx"``; ``runner(path, **options)`` opens the artifact as a Runner; ``available()`` says why
    it cannot run here (None when it can); ``flag`` names the predict / eval / bench option that runs the
    artifact; ``triton_platform`` is Triton Inference Server's name for it (None:
    Triton cannot serve it), with the file name it expects.
    """

    name: str
    description: str
    artifact: str
    op_modes: Mapping[str, str]  # op spec name -> mode of an ONNX export made for this target
    ops: OpSupport | None
    runner: Callable[..., Any]
    build: Callable[..., Any] | None = None
    available: Callable[[], str | None] = lambda: None
    triton_platform: tuple[str, str] | None = None
    suffixes: tuple[str, ...] = ()  # artifact file suffixes ("" for a directory artifact)
    flag: str = ""  # option of predict / eval / bench model that runs such an artifact: --onnx, --engine, ...
    flag_metavar: str = "FILE"
    add_cli: Callable[[Any], None] | None = None  # the options of `m2f export NAME` (targets that build)
    run_cli: Callable[[Any], Any] | None = None  # `m2f export NAME`: build from the options; returns the path
    pipeline_build: Mapping[str, Any] = field(default_factory=dict)  # build options of `m2f export pipeline`

    def support(self, census: Mapping[str, int], opset: int, plugin_keys: frozenset[str]) -> dict[str, Any]:
        """The graph's ops against this target's list; plugin nodes of m2f's specs are allowed and listed."""
        standard = {k: v for k, v in census.items() if "::" not in k}
        plugins = {k: v for k, v in census.items() if "::" in k}
        if self.ops is None:
            return {"source": "any ONNX op", "plugin_ops": plugins, "unsupported_ops": [], "ok": True,
                    "opset_supported": True, "restrictions_to_mind": {}}
        unsupported = sorted(k for k in standard if k not in self.ops.supported)
        unsupported += sorted(k for k in plugins if k not in plugin_keys)
        opset_ok = self.ops.opset_min <= opset <= self.ops.opset_max
        return {
            "source": self.ops.source,
            "opset_supported": opset_ok,
            "unsupported_ops": unsupported,
            "plugin_ops": plugins,
            "restrictions_to_mind": {k: self.ops.restrictions[k] for k in standard if k in self.ops.restrictions},
            "ok": opset_ok and not unsupported,
        }


def check_precision(precision: str, choices: tuple[str, ...], calib_dir: Any, calibrator: str) -> None:
    """One line for a precision a target does not build, int8 without calibration images, a bad --calib."""
    if precision not in choices:
        raise InputError(f"--precision must be one of {', '.join(choices)}, got {precision!r}")
    if precision == "int8" and calib_dir is None:
        raise InputError(f"--precision int8 needs --calib DIR: a folder of representative images for {calibrator}")
    if calib_dir is not None and not Path(calib_dir).is_dir():
        raise InputError(f"--calib {calib_dir} is not a directory of images")


_REGISTRY: dict[str, Target] = {}


def register(target: Target) -> Target:
    if target.name in _REGISTRY:
        raise ValueError(f"export target {target.name!r} is registered twice")
    _REGISTRY[target.name] = target
    return target


def _load() -> dict[str, Target]:
    for module in BUILTIN:
        importlib.import_module(f"{__name__}.{module}")
    return _REGISTRY


def names() -> tuple[str, ...]:
    return tuple(_load())


def all_targets() -> tuple[Target, ...]:
    return tuple(_load().values())


def get(name: str) -> Target:
    targets = _load()
    if name not in targets:
        raise InputError(f"--target {name!r} is not an export target; choose one of {', '.join(targets)}")
    return targets[name]


def for_artifact(path: str | Path) -> Target:
    """The target whose artifact ``path`` is: by its suffix (a directory: by its manifest's kind). Its manifest is
    then read with that kind, so a manifest of another kind is refused."""
    from ..manifest import manifest_path, read_manifest

    path = Path(path)
    if path.is_dir():
        kind = read_manifest(path).kind if manifest_path(path).exists() else None
        found = [t for t in all_targets() if "" in t.suffixes and kind in (None, t.artifact)]
    else:
        found = [t for t in all_targets() if path.suffix.lower() in t.suffixes]
    if not found:
        known = ", ".join(s or "a directory" for t in all_targets() for s in t.suffixes)
        raise InputError(f"{path} is not a model m2f exports ({known}); pass a model written by `m2f export`")
    return found[0]
