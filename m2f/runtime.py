"""How m2f uses the machine: CPU threads, timings, progress. One place, so every command behaves the same.

Threads. PyTorch's and ONNX Runtime's default is one thread per core of the whole machine; their workers spin
while waiting, so on a shared machine (other processes on the cores, a container limited to a few cores) a run
with too many threads is many times slower than with one. The default here is the number of physical cores this
process may run on (its CPU affinity and its cgroup CPU quota), less the cores other processes keep busy (the
1-minute load average), capped at :data:`MAX_DEFAULT_THREADS`; ``--threads N`` or ``M2F_NUM_THREADS`` override it.
Every command that computes calls :func:`use_threads` once; ONNX Runtime sessions take
:func:`ort_session_options`. Data-loader workers run one thread each (torch's own rule for worker processes).

Progress. :func:`progress_bar` is a tqdm bar on a terminal and a plain line every tenth of the work (or every
:data:`LOG_EVERY_S` seconds) when stderr is a log; :func:`stage` prints a line when a long step starts and when it
ends. ``--quiet`` (:func:`set_quiet`) silences both.
"""
from __future__ import annotations

import contextlib
import io
import math
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from .errors import ConfigError, InputError

MAX_DEFAULT_THREADS = 8  # past this, one image's ops gain little and a shared machine loses more
LOG_EVERY_S = 30.0
THREADS_ENV = "M2F_NUM_THREADS"

_threads: int | None = None  # set by use_threads()
_quiet = False


# ---------------------------------------------------------------------------------------------------------------
# threads
# ---------------------------------------------------------------------------------------------------------------


def _physical_cores(cpus: set[int]) -> int:
    """Distinct (package, core) pairs among ``cpus`` (hyper-threads share a core); len(cpus) where Linux's
    topology files are missing."""
    cores = set()
    for cpu in cpus:
        topology = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            cores.add(((topology / "physical_package_id").read_text().strip(),
                       (topology / "core_id").read_text().strip()))
        except OSError:
            return len(cpus)
    return len(cores) or len(cpus)


def _cgroup_quota() -> int | None:
    """CPUs a cgroup v2 quota allows (``cpu.max``, rounded up), or None where there is no quota."""
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
    except (OSError, ValueError):
        return None
    if quota == "max":
        return None
    return max(1, math.ceil(int(quota) / int(period)))


def available_cores() -> int:
    """Physical cores this process may run on: its affinity, its cgroup quota."""
    cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))
    cores = _physical_cores(cpus)
    quota = _cgroup_quota()
    return max(1, min(cores, quota) if quota is not None else cores)


def default_threads() -> int:
    """``M2F_NUM_THREADS`` if set, else the idle physical cores available (at least 1, at most 8)."""
    text = os.environ.get(THREADS_ENV, "").strip()
    if text:
        try:
            return _checked(int(text), THREADS_ENV)
        except ValueError:
            raise ConfigError(f"{THREADS_ENV}={text!r} is not a whole number; set it to a thread count "
                              "such as 1, or unset it") from None
    cores = available_cores()
    try:
        busy = int(os.getloadavg()[0])  # cores other processes keep running (we have not started yet)
    except (AttributeError, OSError):
        busy = 0
    return max(1, min(cores - busy, MAX_DEFAULT_THREADS))


def _checked(threads: int, where: str) -> int:
    if threads < 1:
        raise InputError(f"{where} must be at least 1 thread, got {threads}")
    return threads


def use_threads(requested: int | None = None) -> int:
    """Set PyTorch's intra-op thread count to ``requested`` (``--threads``) or :func:`default_threads`; return it.
    ONNX Runtime sessions created afterwards with :func:`ort_session_options` use the same count."""
    import torch

    global _threads
    _threads = _checked(requested, "--threads") if requested is not None else default_threads()
    torch.set_num_threads(_threads)
    return _threads


def threads() -> int:
    """The thread count set by :func:`use_threads` (the default one if no command set it)."""
    return _threads if _threads is not None else default_threads()


def ort_session_options(intra_op_threads: int | None = None) -> Any:
    """``onnxruntime.SessionOptions`` with :func:`threads` intra-op threads, one inter-op thread (the graph runs
    sequentially) and no spinning between runs. Every ONNX Runtime session m2f creates should take these."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = intra_op_threads or threads()
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    # spinning workers take the cores a shared machine's other processes need
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


def median_ms(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> float:
    """Median wall time of ``fn()`` in milliseconds over ``repeats`` runs after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


# ---------------------------------------------------------------------------------------------------------------
# progress
# ---------------------------------------------------------------------------------------------------------------


def set_quiet(quiet: bool) -> None:
    global _quiet
    _quiet = bool(quiet)


def quiet_library_prints() -> contextlib.AbstractContextManager[Any]:
    """Under ``--quiet``, swallows what a library prints on stdout itself (ONNX Runtime's calibrator steps, NNCF's
    progress bars); otherwise does nothing."""
    return contextlib.redirect_stdout(io.StringIO()) if _quiet else contextlib.nullcontext()


def _on_terminal() -> bool:
    return sys.stderr.isatty()


class _LogLines:
    """tqdm's interface, as plain lines for a log: one every tenth of ``total`` or every LOG_EVERY_S seconds."""

    def __init__(self, total: int, desc: str, unit: str, initial: int = 0) -> None:
        self.total, self.desc, self.unit, self.n = total, desc, unit, initial
        self._start = self._last_time = time.perf_counter()
        self._last_tenth = initial * 10 // max(total, 1)
        self._postfix = ""

    def set_postfix(self, **values: Any) -> None:
        """Shown in the next line, after the description (the line still ends with the count and the time)."""
        self._postfix = " (" + ", ".join(f"{key} {value}" for key, value in values.items()) + ")"

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.perf_counter()
        tenth = self.n * 10 // max(self.total, 1)
        if tenth > self._last_tenth or now - self._last_time >= LOG_EVERY_S or self.n >= self.total:
            self._last_tenth, self._last_time = tenth, now
            print(f"m2f: {self.desc}{self._postfix}: {self.n}/{self.total} {self.unit} ({now - self._start:.1f} s)",
                  file=sys.stderr, flush=True)

    def write(self, text: str, file: Any = None) -> None:
        """A message between progress lines (tqdm's ``write``); printed under quiet too."""
        print(text, file=file or sys.stderr, flush=True)

    def close(self) -> None:
        pass

    def __enter__(self) -> "_LogLines":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class _Silent(_LogLines):
    def update(self, n: int = 1) -> None:
        self.n += n


def progress_bar(total: int, desc: str, unit: str = "img", quiet: bool | None = None, initial: int = 0) -> Any:
    """A context manager with ``update(n)``, ``set_postfix(**values)`` and ``write(text, file)``: tqdm on a terminal,
    plain lines in a log, nothing when quiet (``quiet`` None: as :func:`set_quiet` said). ``initial``: the work
    already done (a resumed run)."""
    if quiet if quiet is not None else _quiet:
        return _Silent(total, desc, unit, initial)
    if _on_terminal():
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, unit=unit, initial=initial, file=sys.stderr, dynamic_ncols=True)
    return _LogLines(total, desc, unit, initial)


def track(items: Iterable[Any], total: int, desc: str, unit: str = "img") -> Iterator[Any]:
    """Iterate ``items`` with a :func:`progress_bar`."""
    with progress_bar(total, desc, unit) as bar:
        for item in items:
            yield item
            bar.update(1)


@contextlib.contextmanager
def stage(what: str) -> Iterator[None]:
    """``m2f: WHAT ...`` when a long step starts and ``m2f: WHAT: done (S s)`` when it ends (nothing if quiet).
    The export code calls this for its steps, so a 5-minute export is not 5 silent minutes."""
    if _quiet:
        yield
        return
    print(f"m2f: {what} ...", file=sys.stderr, flush=True)
    start = time.perf_counter()
    yield
    print(f"m2f: {what}: done ({time.perf_counter() - start:.1f} s)", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------------------------
# devices
# ---------------------------------------------------------------------------------------------------------------

DEVICES = ("auto", "cpu", "cuda")


def resolve_device(requested: str | None) -> str:
    """``auto`` (or None) -> ``cuda`` when available, else ``cpu``; ``cuda`` without a GPU is refused."""
    import torch

    if requested in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda") and not torch.cuda.is_available():
        from .errors import BackendUnavailableError

        raise BackendUnavailableError(f"--device {requested} was asked for but no CUDA GPU is available; use "
                                      "--device cpu (or auto)")
    return requested
