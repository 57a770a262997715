"""Shared benchmark plumbing: timing, the results schema, and the JSON / markdown / PNG writers.

Every suite produces :class:`BenchRow` records; :func:`write_results` stores them as
``<out>/<date>-<gpu>-<suite>.{json,md,png}`` with the device, library versions and git sha, so that committed
files under ``bench/results/`` say exactly what was measured where. Never write a number that was not measured.
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import math
import os
import platform
import re
import statistics
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch

from m2f.io import atomic_path, write_json_atomic, write_text_atomic


@dataclass
class BenchRow:
    """One measured case. Field names follow the committed results schema (bench/results/*.json)."""

    suite: str  # "kernels" or "model"
    case: str  # e.g. "ms_deform_attn/fwd" or "swin-t-coco-panoptic"
    backend: str  # e.g. "triton", "torch-grid_sample", "sdpa-bool-mask", "hf-eager"
    dtype: str  # "float32" / "float16" / "bfloat16"
    batch: int
    height: int  # input image size the shapes derive from
    width: int
    median_ms: float
    p90_ms: float
    peak_mem_mb: float | None = None
    rel_err: float | None = None  # against the float32 (or float64) reference named in extra["reference"]
    extra: dict[str, Any] = field(default_factory=dict)  # gbps, speedup, shapes, ... (suite-specific)


@dataclass(frozen=True)
class Timing:
    median_ms: float
    p90_ms: float
    samples: int


def time_fn(fn: Callable[[], Any], warmup_ms: float = 100.0, rep_ms: float = 500.0, min_reps: int = 5) -> Timing:
    """Median and p90 of ``fn()``'s run time.

    On CUDA: ``triton.testing.do_bench`` (CUDA events, cache flushed between runs). Elsewhere: wall clock
    around each call (CPU timings; only meaningful against other CPU timings).
    """
    if torch.cuda.is_available():
        from triton.testing import do_bench

        median, p90 = do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=[0.5, 0.9])
        return Timing(float(median), float(p90), samples=-1)
    fn()  # warm-up: lazy initialisation, allocator
    times: list[float] = []
    deadline = time.perf_counter() + rep_ms / 1e3
    while len(times) < min_reps or time.perf_counter() < deadline:
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return Timing(statistics.median(times), times[min(len(times) - 1, int(math.ceil(0.9 * len(times))) - 1)], len(times))


def peak_memory_mb(fn: Callable[[], Any]) -> float | None:
    """Peak CUDA memory allocated while ``fn`` runs (None on the CPU, where it is not tracked)."""
    if not torch.cuda.is_available():
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 2**20


def environment() -> dict[str, Any]:
    """Where and with what the numbers were measured."""
    import triton

    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        device = f"{props.name} (sm_{props.major}{props.minor}, {props.multi_processor_count} SMs)"
    else:
        device = f"cpu: {platform.processor() or platform.machine()} x{os.cpu_count()}"
    return {
        "device": device,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "git_sha": git_sha(),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def git_sha() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent, timeout=10
        )
        sha = out.stdout.strip()
        if not sha:
            return "unknown"
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).parent,
            timeout=10,
        ).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def device_slug(env: dict[str, Any]) -> str:
    name = env["device"].split(" (")[0].split(":")[0]
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "device"


def write_results(rows: Sequence[BenchRow], out_dir: str | os.PathLike, suite: str, title: str,
                  env: dict[str, Any] | None = None, plot: Callable[[Sequence[BenchRow], Path], None] | None = None
                  ) -> dict[str, Path]:
    """Write ``<date>-<device>-<suite>.json`` (+ ``.md`` table, + ``.png`` when ``plot`` is given); atomically."""
    env = env or environment()
    out_dir = Path(out_dir)
    stem = f"{env['created'][:10]}-{device_slug(env)}-{suite}"
    payload = {**env, "suite": suite, "rows": [dataclasses.asdict(r) for r in rows]}
    paths = {"json": write_json_atomic(out_dir / f"{stem}.json", payload)}
    paths["md"] = write_text_atomic(out_dir / f"{stem}.md", markdown_table(rows, title, env))
    if plot is not None:
        with atomic_path(out_dir / f"{stem}.png") as tmp:
            plot(rows, tmp)
        paths["png"] = out_dir / f"{stem}.png"
    return paths


def load_results(path: str | os.PathLike) -> tuple[dict[str, Any], list[BenchRow]]:
    data = json.loads(Path(path).read_text())
    rows = [BenchRow(**r) for r in data.pop("rows")]
    return data, rows


def _fmt(x: Any) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        if x != x:
            return "nan"
        return f"{x:.3g}" if abs(x) < 1e-2 or abs(x) >= 1e4 else f"{x:.3f}".rstrip("0").rstrip(".")
    return str(x)


def markdown_table(rows: Iterable[BenchRow], title: str, env: dict[str, Any], extra_keys: Sequence[str] = ()) -> str:
    rows = list(rows)
    keys = list(extra_keys) or sorted({k for r in rows for k, v in r.extra.items() if isinstance(v, (int, float))})
    head = ["case", "backend", "dtype", "batch", "H×W", "median ms", "p90 ms", "peak MB", "rel err", *keys]
    lines = [
        f"# {title}",
        "",
        f"Device: {env['device']} · torch {env['torch']} · triton {env['triton']} · git {env['git_sha']} · "
        f"{env['created']}",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for r in rows:
        cells = [r.case, r.backend, r.dtype, r.batch, f"{r.height}×{r.width}", r.median_ms, r.p90_ms,
                 r.peak_mem_mb, r.rel_err, *(r.extra.get(k) for k in keys)]
        lines.append("| " + " | ".join(_fmt(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def bar_plot(rows: Sequence[BenchRow], path: Path, title: str, group: Callable[[BenchRow], str] | None = None) -> None:
    """Grouped horizontal bars of median time per backend, one group per case / shape / dtype."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    group = group or (lambda r: f"{r.case} {r.dtype} b{r.batch} {r.height}×{r.width}")
    groups = list(dict.fromkeys(group(r) for r in rows))
    backends = list(dict.fromkeys(r.backend for r in rows))
    fig, ax = plt.subplots(figsize=(10, 0.45 * len(groups) * max(1, len(backends)) + 1.5))
    height = 0.8 / max(1, len(backends))
    for i, backend in enumerate(backends):
        ys, xs = [], []
        for j, g in enumerate(groups):
            match = [r for r in rows if r.backend == backend and group(r) == g]
            if match:
                ys.append(j + i * height)
                xs.append(match[0].median_ms)
        ax.barh(ys, xs, height=height, label=backend)
    ax.set_yticks([j + 0.4 - height / 2 for j in range(len(groups))], groups, fontsize=8)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel("median time (ms, log scale)")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=120)
    plt.close(fig)
