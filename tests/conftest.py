"""Test set-up: Triton runs in its interpreter where there is no GPU; GPU / TensorRT tests skip, counted.

Randomness: every random input comes from one session seed (printed in the header, shared with xdist workers).
Each test and each fixture derives its own seed from it and its name, so ``M2F_TEST_SEED=N pytest NODEID`` replays a
failure exactly, alone or in the whole suite; a failing test's report prints that command.
"""
from __future__ import annotations

import os

import pytest
import torch

from tests import utils

HAS_CUDA = torch.cuda.is_available()
# Must be set before any @triton.jit function is created (triton reads it at decoration time).
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

HAS_TENSORRT = utils.has_tensorrt_runtime()


def pytest_configure(config: pytest.Config) -> None:
    worker_input = getattr(config, "workerinput", None)  # set on xdist workers by pytest_configure_node below
    if worker_input is not None and "m2f_test_seed" in worker_input:
        utils.set_session_seed(int(worker_input["m2f_test_seed"]))
    else:
        utils.set_session_seed(utils.session_seed_from_env())


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node) -> None:  # xdist controller: every worker draws from the same session seed
    node.workerinput["m2f_test_seed"] = utils.session_seed()


def pytest_report_header(config: pytest.Config) -> str:
    return f"M2F_TEST_SEED={utils.session_seed()} (set it to replay this run's random inputs)"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call):
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        report.sections.append(
            ("m2f random seed", f"replay: M2F_TEST_SEED={utils.session_seed()} python -m pytest '{item.nodeid}'")
        )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU; none here")
    skip_trt = pytest.mark.skip(reason="needs a TensorRT runtime (>= 10.3) and a CUDA GPU; not installable here")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)
        if "tensorrt" in item.keywords and not (HAS_TENSORRT and HAS_CUDA):
            item.add_marker(skip_trt)


@pytest.fixture
def rng(request: pytest.FixtureRequest) -> torch.Generator:
    """A generator seeded for this test from the session seed; put ``rng.seed_value`` in assertion messages."""
    return utils.seeded_generator(request.node.nodeid)
