"""Test set-up: Triton runs in its interpreter where there is no GPU; GPU / TensorRT tests skip, counted."""
from __future__ import annotations

import importlib.util
import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
# Must be set before any @triton.jit function is created (triton reads it at decoration time).
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU; none here")
    skip_trt = pytest.mark.skip(reason="needs TensorRT >= 10.7 and a CUDA GPU; not installable here")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)
        if "tensorrt" in item.keywords and not (HAS_TENSORRT and HAS_CUDA):
            item.add_marker(skip_trt)


class SeededGenerator(torch.Generator):
    """A torch.Generator that remembers its seed (the C type takes no new attributes; a subclass does)."""

    seed_value: int


@pytest.fixture
def rng() -> torch.Generator:
    """A fresh seed per test run, so inputs are never fixed; put ``rng.seed_value`` in assertion messages."""
    seed = int.from_bytes(os.urandom(4), "little")
    g = SeededGenerator()
    g.manual_seed(seed)
    g.seed_value = seed
    return g

