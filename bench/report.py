"""The README's performance table, regenerated from the committed ``bench/results/*.json`` files.

``m2f bench report`` replaces the text between ``<!-- perf-table:start -->`` and ``<!-- perf-table:end -->`` in
README.md with :func:`perf_tables` (model suite: latency, throughput, memory, error, speedup over hf-eager float32;
kernel suites: the rows that carry a speedup). Only measured numbers appear: the tables are built from result files.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from m2f.bench.common import BenchRow, _fmt
from m2f.errors import InputError
from m2f.io import write_text_atomic

START, END = "<!-- perf-table:start -->", "<!-- perf-table:end -->"


def load_all(results_dir: str | os.PathLike) -> list[tuple[Path, dict[str, Any], list[BenchRow]]]:
    """Every result file under ``results_dir`` (sorted by name, i.e. by date), as (path, header, rows)."""
    results_dir = Path(results_dir)
    if not results_dir.is_dir():
        raise InputError(f"results directory {results_dir} does not exist; pass --results with `m2f bench` outputs")
    loaded = []
    for path in sorted(results_dir.glob("*.json")):
        try:
            data = json.loads(path.read_text())
            rows = [BenchRow(**r) for r in data.pop("rows")]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise InputError(f"{path} is not a benchmark result file ({type(exc).__name__}: {exc}); move it away") from None
        loaded.append((path, data, rows))
    return loaded


def _header(path: Path, data: dict[str, Any]) -> str:
    return (f"`{path.name}` · {data.get('device', '?')} · torch {data.get('torch', '?')} · "
            f"triton {data.get('triton', '?')} · git {str(data.get('git_sha', '?'))[:12]} · {data.get('created', '?')}")


def model_table(rows: list[BenchRow]) -> str:
    from m2f.bench.model import speedups

    ups = speedups(rows)
    head = ["case", "backend", "dtype", "batch", "H×W", "median ms", "images/s", "peak MB", "rel err",
            "speedup vs hf-eager fp32"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if not r.median_ms:
            continue
        up = ups.get(id(r))
        cells = [r.case, r.backend, r.dtype, r.batch, f"{r.height}×{r.width}", r.median_ms,
                 r.extra.get("images_per_s"), r.peak_mem_mb, r.rel_err, f"{up:.2f}×" if up else None]
        lines.append("| " + " | ".join(_fmt(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def kernel_table(suite: str, rows: list[BenchRow]) -> str:
    head = ["op", "case", "backend", "dtype", "batch", "H×W", "median ms", "speedup"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    op = suite.removeprefix("kernels-")
    for r in rows:
        if "speedup" not in r.extra or not r.median_ms:
            continue
        cells = [op, r.case, r.backend, r.dtype, r.batch, f"{r.height}×{r.width}", r.median_ms,
                 f"{r.extra['speedup']:.2f}×" if r.extra["speedup"] else None]
        lines.append("| " + " | ".join(_fmt(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def perf_tables(results_dir: str | os.PathLike) -> str:
    """Markdown for the README: one section per result file, model suites first, then kernels."""
    loaded = load_all(results_dir)
    parts = []
    for path, data, rows in loaded:
        if data.get("suite") == "model" and any(r.median_ms for r in rows):
            parts.append(f"**End to end** — {_header(path, data)}\n\n{model_table(rows)}")
    for path, data, rows in loaded:
        suite = str(data.get("suite", ""))
        if suite.startswith("kernels") and any("speedup" in r.extra for r in rows):
            parts.append(f"**Kernels ({suite.removeprefix('kernels-')})** — {_header(path, data)}\n\n"
                         f"{kernel_table(suite, rows)}")
    if not parts:
        return "No benchmark results yet: nothing measured on a GPU has been committed under bench/results.\n"
    return "\n".join(parts)


def update_readme(readme: str | os.PathLike, table: str) -> bool:
    """Replace the text between the markers (atomically). False when the markers are missing (file untouched)."""
    readme = Path(readme)
    if not readme.is_file():
        raise InputError(f"{readme} does not exist; pass --readme with the file holding the {START} markers")
    text = readme.read_text(encoding="utf-8")
    start, end = text.find(START), text.find(END)
    if start < 0 or end < 0 or end < start:
        return False
    new = text[: start + len(START)] + "\n" + table.rstrip("\n") + "\n" + text[end:]
    if new != text:
        write_text_atomic(readme, new)
    return True
