"""Backend selection for the attention ops: "torch" (plain PyTorch reference), "triton" (fused kernels), "auto"."""
from __future__ import annotations

import os
import platform

import torch

from m2f.errors import BackendUnavailableError

BACKENDS = ("auto", "torch", "triton")


def triton_interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


def triton_missing_message() -> str:
    """What to do when the Triton kernels are asked for and triton does not import (it ships for Linux only)."""
    if platform.system() == "Linux":
        return "backend='triton' needs the triton package: pip install 'triton>=3.6' (or use backend='torch')"
    return (f"backend='triton' needs the triton package, which is built for Linux only (this is {platform.system()}); "
            "use backend='torch' (or 'auto'), which runs and exports everywhere")


def check_backend_name(backend: str) -> str:
    """``backend`` if it names a backend; a one-line error listing the valid names otherwise."""
    if backend not in BACKENDS:
        raise BackendUnavailableError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    return backend


def resolve_backend(backend: str, device: torch.device) -> str:
    """Turn "auto" into a concrete backend for tensors on ``device``; check that the one asked for can run.

    "auto" picks Triton on CUDA when Triton imports, the PyTorch reference otherwise (CPU, MPS, or no Triton).
    Triton on the CPU runs only under ``TRITON_INTERPRET=1`` (slow; meant for tests).
    """
    check_backend_name(backend)
    if backend == "auto":
        return "triton" if device.type == "cuda" and triton_importable() else "torch"
    if backend == "triton":
        if not triton_importable():
            raise BackendUnavailableError(triton_missing_message())
        if device.type != "cuda" and not triton_interpreter_enabled():
            raise BackendUnavailableError(
                f"backend='triton' needs CUDA tensors (got {device.type}); use backend='torch' on the CPU, "
                "or set TRITON_INTERPRET=1 to run the kernels in Triton's (slow) interpreter"
            )
    return backend
