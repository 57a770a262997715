"""The scripted new-user walk-through: README.md's `cpu` blocks, run as written and in order in a scratch folder laid
out like a fresh clone (``m2f/assets/default``), offline. Every fenced block must say what it needs, so that no
command of the README is left unverified by accident."""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

from m2f.assets import default_checkpoint_path
from tests.utils import offline_env

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


def test_readme_walkthrough(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("clone")  # the commands' working folder, laid out like a fresh clone
    (tmp_path / "m2f" / "assets").mkdir(parents=True)
    os.symlink(default_checkpoint_path(), tmp_path / "m2f" / "assets" / "default")
    env = offline_env(tmp_path_factory.mktemp("hf_home"))
    env.pop("TRITON_INTERPRET", None)  # a plain CPU user
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # `m2f` of this environment
    start = time.perf_counter()
    for lang, tag, body in readme_blocks():
        if tag != "cpu":
            continue
        if lang == "bash":
            for command in (line for line in body.splitlines() if line.strip() and not line.startswith("#")):
                run = subprocess.run(["bash", "-c", command], cwd=tmp_path, env=env, capture_output=True, text=True,
                                     timeout=600)
                assert run.returncode == 0, f"README command failed: {command}\n{run.stderr[-3000:]}"
        else:
            # outside the clone: Python puts a script's folder first on sys.path, and this clone's m2f/ holds only
            # assets (a real clone's m2f/ is the package itself)
            script = tmp_path_factory.mktemp("snippet") / "readme_snippet.py"
            script.write_text(body, encoding="utf-8")
            run = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                                 timeout=600)
            assert run.returncode == 0, f"README Python snippet failed:\n{run.stderr[-3000:]}"
            assert run.stdout.splitlines()[-1] == "pass", run.stdout
            assert run.stderr == "", run.stderr  # no warnings either
    # what the walk-through promises to have made
    for made in ("synth/panoptic.json", "preds", "pq.json", "my-model/model.safetensors", "model.onnx",
                 "model.onnx.json", "model_repository", "run/model/m2f_config.json", "my-small-model", "small.onnx"):
        assert (tmp_path / made).exists(), f"{made} missing after the README walk-through"
    print(f"README walk-through: {time.perf_counter() - start:.0f} s")  # the time README quotes (pytest -s shows it)


def test_walkthrough_commands_exist():
    """Each `m2f SUBCOMMAND` of the README is one the CLI has (a renamed command fails here first, in a second)."""
    from m2f.cli import SUBCOMMANDS

    for _, _, body in readme_blocks():
        for line in body.splitlines():
            words = shlex.split(line, comments=True) if line.startswith("m2f ") else []
            if words:
                assert words[1] in SUBCOMMANDS, line
