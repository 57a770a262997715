"""The suite's randomness replays: one variable, M2F_TEST_SEED, fixes every seed a failing test printed."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

_PROBE = '''
from tests.utils import fresh_seed

def test_draws(rng):
    print("DRAWS", rng.seed_value, fresh_seed(), fresh_seed("fixture-key"))
    assert False, "fails on purpose"
'''


def _run(tmp_path: Path, seed: str | None) -> str:
    probe = REPO / "tests" / f"_probe_seed_{os.getpid()}_{tmp_path.name}.py"
    probe.write_text(_PROBE)
    env = {k: v for k, v in os.environ.items() if k != "M2F_TEST_SEED"}
    if seed is not None:
        env["M2F_TEST_SEED"] = seed
    try:
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider", str(probe)],
                              cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    finally:
        probe.unlink()
    assert proc.returncode == 1, proc.stdout + proc.stderr
    return proc.stdout


def test_failure_report_prints_the_seed_and_the_seed_replays(tmp_path):
    first = _run(tmp_path, None)
    replay = re.search(r"replay: M2F_TEST_SEED=(\d+) python -m pytest", first)
    assert replay, first
    draws = re.search(r"DRAWS (\d+) (\d+) (\d+)", first).groups()
    again = _run(tmp_path, replay.group(1))
    assert re.search(r"DRAWS (\d+) (\d+) (\d+)", again).groups() == draws
    assert len(set(draws)) == 3  # each draw its own seed
    other = _run(tmp_path, str(int(replay.group(1)) + 1))
    assert re.search(r"DRAWS (\d+) (\d+) (\d+)", other).groups() != draws
