"""`m2f bench serve`: `m2f serve` under load on loopback, with and without batching, on one and two replicas.

For each setting, one Ray Serve application of the same model runs; after one warm-up request per replica,
``clients`` threads send ``requests`` PNG requests in all (the bundled sample images, round robin) and each
request's latency and the size of the batch it ran in (the ``X-Batch-Size`` response header) are recorded.
Throughput is requests / wall time of the whole burst. Everything stays on 127.0.0.1.
"""
from __future__ import annotations

import socket
import time
import urllib.error
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from m2f.io import atomic_path, write_json_atomic


@dataclass(frozen=True)
class Setting:
    replicas: int
    max_batch: int  # 1: no batching

    @property
    def label(self) -> str:
        batching = f"batch <= {self.max_batch}" if self.max_batch > 1 else "no batching"
        return f"{self.replicas} replica{'s' if self.replicas > 1 else ''}, {batching}"


@dataclass
class ServeRow:
    replicas: int
    max_batch: int
    batch_wait_ms: float
    clients: int
    requests: int
    failed: int
    wall_s: float
    throughput_rps: float
    p50_ms: float
    p99_ms: float
    mean_batch: float  # mean size of the batches these requests ran in
    batch_sizes: dict[str, int] = field(default_factory=dict)  # batch size -> number of batches


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, body: bytes) -> tuple[bool, float, int]:
    """(succeeded, latency in s, batch size the request ran in; 0 when unknown)."""
    request = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": "image/png"})
    start = time.perf_counter()
    try:
        with urllib.request.urlopen(request, timeout=300) as response:
            response.read()
            ok, batch = response.status == 200, int(response.headers.get("X-Batch-Size", 0))
    except (urllib.error.URLError, OSError):
        ok, batch = False, 0
    return ok, time.perf_counter() - start, batch


def _batches(sizes_seen: Sequence[int]) -> Counter[int]:
    """Batches by size, from the size each request reported: a batch of k is reported by its k requests."""
    per_size = Counter(s for s in sizes_seen if s > 0)
    return Counter({size: count // size for size, count in per_size.items()})


def measure(url: str, bodies: Sequence[bytes], clients: int, requests: int) -> tuple[list, list, list, float]:
    """(succeeded, latency in s, batch size) per request, and the wall time of the whole burst."""
    with ThreadPoolExecutor(clients) as pool:
        start = time.perf_counter()
        answers = list(pool.map(lambda i: _post(url, bodies[i % len(bodies)]), range(requests)))
        wall = time.perf_counter() - start
    ok, latencies, batches = (list(column) for column in zip(*answers))
    return ok, latencies, batches, wall


def run(spec: Any, settings: Sequence[Setting], clients: int, requests: int, batch_wait_ms: float,
        bodies: Sequence[bytes], progress: Any = print) -> list[ServeRow]:
    """Measure every setting in one Ray session (``spec``: an m2f.serve.app.ModelSpec)."""
    import ray
    from ray import serve

    from m2f.serve.app import build_app

    port = _free_port()
    ray.init(num_cpus=max(2, max(s.replicas for s in settings)), include_dashboard=False, log_to_driver=False)
    rows = []
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        url = f"http://127.0.0.1:{port}/predict"
        for setting in settings:
            progress(f"{setting.label}: starting")
            serve.run(build_app(spec, setting.replicas, setting.max_batch, batch_wait_ms), route_prefix="/")
            # warm up every replica (first calls are slow), unmeasured
            measure(url, bodies, setting.replicas, 2 * setting.replicas)
            ok, latencies, sizes, wall = measure(url, bodies, clients, requests)
            served = [s for s, good in zip(sizes, ok) if good]
            latency_ms = np.asarray([t for t, good in zip(latencies, ok) if good] or [float("nan")]) * 1000
            batches = _batches(served)
            rows.append(ServeRow(
                replicas=setting.replicas, max_batch=setting.max_batch, batch_wait_ms=batch_wait_ms,
                clients=clients, requests=requests, failed=ok.count(False), wall_s=wall,
                throughput_rps=ok.count(True) / wall, p50_ms=float(np.percentile(latency_ms, 50)),
                p99_ms=float(np.percentile(latency_ms, 99)),
                mean_batch=float(np.mean(served)) if served else float("nan"),
                batch_sizes={str(k): v for k, v in sorted(batches.items())}))
            serve.delete("default")
    finally:
        serve.shutdown()
        ray.shutdown()
    return rows


def table(rows: Sequence[ServeRow], title: str):
    from rich.table import Table

    t = Table(title=title)
    for column in ("replicas", "max batch", "requests", "failed", "req/s", "p50 ms", "p99 ms", "mean batch",
                   "batches by size"):
        t.add_column(column, justify="right")
    for r in rows:
        t.add_row(str(r.replicas), str(r.max_batch), str(r.requests), str(r.failed), f"{r.throughput_rps:.2f}",
                  f"{r.p50_ms:.0f}", f"{r.p99_ms:.0f}", f"{r.mean_batch:.2f}",
                  " ".join(f"{k}:{v}" for k, v in r.batch_sizes.items()))
    return t


def plot(rows: Sequence[ServeRow], path: Path, title: str) -> None:
    """Throughput and p50 / p99 latency per setting; linear axes from zero."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [Setting(r.replicas, r.max_batch).label.replace(", ", "\n") for r in rows]
    x = np.arange(len(rows))
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    left.bar(x, [r.throughput_rps for r in rows], color="tab:blue")
    left.set_ylabel("throughput (requests / s)")
    right.bar(x - 0.2, [r.p50_ms for r in rows], width=0.4, label="p50")
    right.bar(x + 0.2, [r.p99_ms for r in rows], width=0.4, label="p99")
    right.set_ylabel("latency (ms)")
    right.legend()
    for ax in (left, right):
        ax.set_xticks(x, labels, fontsize=8)
        ax.set_ylim(bottom=0)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=120)
    plt.close(fig)


def write(rows: Sequence[ServeRow], out_dir: str | Path, env: dict[str, Any], settings: dict[str, Any],
          title: str) -> dict[str, Path]:
    """``<date>-<device>-serve.{json,png}`` in ``out_dir``, each written atomically."""
    from .common import device_slug

    out_dir = Path(out_dir)
    stem = f"{env['created'][:10]}-{device_slug(env)}-serve"
    payload = {**env, "suite": "serve", "settings": settings,
               "rows": [{k: (None if isinstance(v, float) and v != v else v) for k, v in asdict(r).items()}
                        for r in rows]}
    paths = {"json": write_json_atomic(out_dir / f"{stem}.json", payload)}
    with atomic_path(out_dir / f"{stem}.png") as tmp:
        plot(rows, tmp, title)
    paths["png"] = out_dir / f"{stem}.png"
    return paths
