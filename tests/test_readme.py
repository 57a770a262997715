"""The scripted new-user walk-through: README.md's `cpu` blocks, run as written and in order in a scratch folder laid
out like a fresh clone (``m2f/assets/default``), offline. Every fenced block must say what it needs, so that no
command of the README is left unverified by accident.

The walk-through times each command (wall and CPU seconds) and prints the table README quotes (``pytest -s``); to
measure it for README, on an idle machine::

    M2F_README_TIMINGS=readme-timings.md .venv/bin/python -m pytest -q -p no:cacheprovider -s \
        tests/test_readme.py -k walkthrough
"""
from __future__ import annotations

import datetime
import os
import platform
import re
import resource
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

from m2f import runtime
from m2f.assets import default_checkpoint_path
from tests.utils import offline_env, without_progress

README = Path(__file__).resolve().parents[1] / "README.md"
# what a fenced block needs: `cpu` (run here), `long` (runs on a CPU, minutes), `setup` (make targets),
# `network` (downloads), `gpu`
TAGS = ("cpu", "long", "setup", "network", "gpu")
_FENCE = re.compile(r"^```(\w+)([^\n]*)\n(.*?)^```", re.S | re.M)

pytest.importorskip("onnxruntime")


def readme_blocks() -> list[tuple[str, str, str]]:
    """(language, tag, body) of every fenced block, in order."""
    return [(lang, info.strip(), body) for lang, info, body in _FENCE.findall(README.read_text(encoding="utf-8"))]


def test_every_block_says_what_it_needs():
    blocks = [(lang, tag) for lang, tag, _ in readme_blocks() if lang in ("bash", "python")]
    assert blocks, "no fenced blocks found in README.md"
    untagged = [(lang, tag) for lang, tag in blocks if tag not in TAGS]
    assert not untagged, f"blocks without one of the tags {TAGS}: {untagged}"
    assert ("bash", "cpu") in blocks and ("python", "cpu") in blocks


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def timings_table(rows: list[tuple[str, float, float]], load_before: float, threads_before: int) -> str:
    """Markdown for README: the machine, its load and the thread setting, then one row per command (wall and CPU
    seconds) and the total."""
    load_after = os.getloadavg()
    head = (f"Measured {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC on {platform.machine()}, "
            f"{runtime.available_cores()} physical cores available, load average {load_before:.2f} before / "
            f"{load_after[0]:.2f} after; threads: `--threads` where a command has it, else m2f's default "
            f"({threads_before} at the start; `{runtime.THREADS_ENV}` "
            f"{os.environ.get(runtime.THREADS_ENV) or 'unset'}).\n\n")
    lines = ["| command | wall s | CPU s |", "| --- | --- | --- |"]
    lines += [f"| {what} | {wall:.1f} | {cpu:.1f} |" for what, wall, cpu in rows]
    lines.append(f"| total | {sum(r[1] for r in rows):.1f} | {sum(r[2] for r in rows):.1f} |")
    return head + "\n".join(lines) + "\n"


def test_readme_walkthrough(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("clone")  # the commands' working folder, laid out like a fresh clone
    (tmp_path / "m2f" / "assets").mkdir(parents=True)
    os.symlink(default_checkpoint_path(), tmp_path / "m2f" / "assets" / "default")
    env = offline_env(tmp_path_factory.mktemp("hf_home"))
    env.pop("TRITON_INTERPRET", None)  # a plain CPU user
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # `m2f` of this environment
    timings: list[tuple[str, float, float]] = []  # (what ran, wall s, CPU s of its processes)
    load_before, threads_before = os.getloadavg()[0], runtime.default_threads()

    def timed(name: str, argv: list[str]) -> subprocess.CompletedProcess:
        wall, cpu = time.perf_counter(), _children_cpu_s()
        run = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        timings.append((name, time.perf_counter() - wall, _children_cpu_s() - cpu))
        return run

    for lang, tag, body in readme_blocks():
        if tag != "cpu":
            continue
        if lang == "bash":
            for command in (line for line in body.splitlines() if line.strip() and not line.startswith("#")):
                run = timed(f"`{command.split('  #')[0].strip()}`", ["bash", "-c", command])
                assert run.returncode == 0, f"README command failed: {command}\n{run.stderr[-3000:]}"
        else:
            # outside the clone: Python puts a script's folder first on sys.path, and this clone's m2f/ holds only
            # assets (a real clone's m2f/ is the package itself)
            script = tmp_path_factory.mktemp("snippet") / "readme_snippet.py"
            script.write_text(body, encoding="utf-8")
            run = timed("the Python block (`python cpu`)", [sys.executable, str(script)])
            assert run.returncode == 0, f"README Python snippet failed:\n{run.stderr[-3000:]}"
            assert run.stdout.splitlines()[-1] == "pass", run.stdout
            assert without_progress(run.stderr) == [], run.stderr  # stage lines, but no warnings
    # what the walk-through promises to have made
    for made in ("synth/panoptic.json", "preds", "pq.json", "my-model/model.safetensors", "model.onnx",
                 "model.onnx.json", "model_repository", "run/model/m2f_config.json", "my-small-model", "small.onnx"):
        assert (tmp_path / made).exists(), f"{made} missing after the README walk-through"
    table = timings_table(timings, load_before, threads_before)
    print("\n" + table)  # what README quotes (pytest -s shows it)
    if os.environ.get("M2F_README_TIMINGS"):
        Path(os.environ["M2F_README_TIMINGS"]).write_text(table, encoding="utf-8")


def test_walkthrough_commands_exist():
    """Each `m2f SUBCOMMAND` of the README is one the CLI has (a renamed command fails here first, in a second)."""
    from m2f.cli import SUBCOMMANDS

    for _, _, body in readme_blocks():
        for line in body.splitlines():
            words = shlex.split(line, comments=True) if line.startswith("m2f ") else []
            if words:
                assert words[1] in SUBCOMMANDS, line
