"""`m2f train` under ``torchrun --nproc-per-node 2`` on the CPU (gloo): the ranks end with identical weights, the
loss equals a one-process run with the same total batch, only rank 0 writes, and ``--resume`` continues a
multi-process run exactly."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from m2f.cli import main
from m2f.train.state import load_state
from tests.utils import fresh_seed, rel_err, tiny_train_config

# Runs `m2f train` (the CLI's main) in each torchrun worker, then writes what this rank ended with: the model the
# loop trained (DDP-unwrapped), as safetensors, so the test can compare rank 1's weights with rank 0's.
# STOP_AFTER=N stops the run after iteration N with a checkpoint, as an interrupted run would.
_WORKER = """
import os, sys
from safetensors.torch import save_file
from m2f.cli import main
from m2f.train import loop

trained = {}
original = loop.Trainer._loop
def keep_model(self, start, stop_after, stream, model, *rest):
    original(self, start, stop_after, stream, model, *rest)
    trained["model"] = loop._unwrap(model)
loop.Trainer._loop = keep_model
if os.environ.get("STOP_AFTER"):
    train = loop.Trainer.train
    loop.Trainer.train = lambda self: train(self, stop_after=int(os.environ["STOP_AFTER"]))
code = main(sys.argv[1:])
state = {k: v.detach().contiguous() for k, v in trained["model"].state_dict().items()}
save_file(state, os.path.join(os.environ["DIGEST_DIR"], f"rank{os.environ['RANK']}.safetensors"))
sys.exit(code)
"""


def _tiny_config() -> dict:
    # frozen BatchNorm: a per-image model, as a one-process run with the same total batch sees it
    return tiny_train_config(norm="frozen_bn").to_dict()


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("multiprocess")
    seed = fresh_seed("multiprocess-data")
    assert main(["data", "synth", "--out", str(root / "data"), "--num", "5", "--seed", str(seed),
                 "--size", "48x64"]) == 0
    (root / "tiny.json").write_text(json.dumps(_tiny_config()))
    (root / "worker.py").write_text(_WORKER)
    return {"root": root, "seed": seed, "train_seed": fresh_seed("multiprocess-train") % 1000}


def _train_args(setup: dict, out: Path, iters: int, *extra: str) -> list[str]:
    return ["train", "--config", str(setup["root"] / "tiny.json"), "--data", str(setup["root"] / "data"),
            "--out", str(out), "--iters", str(iters), "--batch-size", "2", "--num-points", "64", "--device", "cpu",
            "--quiet", "--threads", "1", "--log-every", "1", "--lr", "1e-3", "--seed", str(setup["train_seed"]),
            *extra]


def _torchrun(setup: dict, argv: list[str], name: str, stop_after: int | None = None) -> tuple[str, Path]:
    """Two CPU processes running `m2f train` ARGV in an empty working folder; (stdout, folder of rank dumps)."""
    dumps, cwd = setup["root"] / f"{name}-dumps", setup["root"] / f"{name}-cwd"
    dumps.mkdir()
    cwd.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DIGEST_DIR": str(dumps)}
    if stop_after is not None:
        env["STOP_AFTER"] = str(stop_after)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(setup["root"] / "worker.py"), *argv]
    proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=150)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)  # torchrun and both workers
        proc.communicate()
        pytest.fail(f"{name}: torchrun did not finish in 150 s")
    assert proc.returncode == 0, f"{name} (seed {setup['seed']}): {stderr[-3000:]}"
    assert list(cwd.iterdir()) == [], f"{name}: a rank wrote into its working folder"
    return stdout, dumps


def _losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "log.jsonl").read_text().splitlines()]


def test_two_processes_match_one_and_resume_exactly(setup):
    root, seed = setup["root"], setup["seed"]
    straight = root / "straight"
    stdout, dumps = _torchrun(setup, _train_args(setup, straight, 4, "--checkpoint-every", "2"), "straight")

    # both ranks hold the same weights and buffers, and rank 0 saved exactly those
    rank0, rank1 = load_file(dumps / "rank0.safetensors"), load_file(dumps / "rank1.safetensors")
    saved = load_file(straight / "model" / "model.safetensors")
    assert rank0.keys() == rank1.keys() == saved.keys()
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), f"{key} differs between the ranks (seed {seed})"
        assert torch.equal(rank0[key], saved[key]), f"{key}: saved model is not rank 0's (seed {seed})"

    # only rank 0 writes: one log row per iteration, one report line, the run folder's usual files only
    assert [json.loads(r)["iter"] for r in (straight / "log.jsonl").read_text().splitlines()] == [1, 2, 3, 4]
    assert len((straight / "log.csv").read_text().splitlines()) == 1 + 4
    assert stdout.count("trained 4 iterations") == 1, stdout
    names = sorted(p.name for p in straight.iterdir())
    assert names == sorted(["checkpoint.json", next(straight.glob("checkpoint-*.safetensors")).name, "log.csv",
                            "log.jsonl", "loss.png", "model", "train_config.json"]), names
    state = load_state(straight)
    assert state.world_size == 2 and len(state.rng) == 2 and state.iteration == 4

    # one process with the same total batch: DDP averages the ranks' gradients and the logged losses, and every
    # normaliser (target masks, class weights) is averaged over the ranks, so the losses are the same up to float
    # rounding (the first iteration starts from identical weights; later ones from weights rounded differently)
    single = root / "single"
    assert main(_train_args(setup, single, 4)) == 0
    one, two = torch.tensor(_losses(single), dtype=torch.float64), torch.tensor(_losses(straight), dtype=torch.float64)
    assert rel_err(two[:1], one[:1]) < 1e-5, f"first loss {two[0]} vs one process {one[0]} (seed {seed})"
    assert rel_err(two, one) < 1e-3, f"losses {two.tolist()} vs one process {one.tolist()} (seed {seed})"
    alone = load_file(single / "model" / "model.safetensors")
    worst = max((rel_err(saved[k], alone[k]), k) for k in saved if saved[k].is_floating_point() and alone[k].any())
    assert worst[0] < 1e-2, f"weights differ from the one-process run: {worst} (seed {seed})"

    # --resume continues an interrupted two-process run exactly: 2 + 2 iterations end where 4 straight ones do
    halves = root / "halves"
    _torchrun(setup, _train_args(setup, halves, 4), "first-half", stop_after=2)
    assert load_state(halves).iteration == 2 and not (halves / "model").exists()
    _, dumps = _torchrun(setup, _train_args(setup, halves, 4, "--resume"), "second-half")
    resumed = load_file(halves / "model" / "model.safetensors")
    for key in saved:
        assert torch.equal(resumed[key], saved[key]), f"{key}: resumed run differs from the straight one (seed {seed})"
    assert torch.equal(load_file(dumps / "rank1.safetensors")[next(iter(saved))], resumed[next(iter(saved))])
    assert _losses(halves) == _losses(straight)


def test_batchnorm_on_several_cpu_processes_is_refused(setup, tmp_path, capsys, monkeypatch):
    config = _tiny_config()
    config["backbone"]["norm"] = "bn"
    path = tmp_path / "bn.json"
    path.write_text(json.dumps(config))
    for name, value in {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                        "MASTER_PORT": "1"}.items():
        monkeypatch.setenv(name, value)  # the refusal comes before any process group is formed
    out = tmp_path / "run"
    argv = _train_args(setup, out, 1)
    argv[argv.index("--config") + 1] = str(path)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("m2f: error:") and "\n" not in err, err
    assert "norm 'bn'" in err and "frozen_bn" in err, err
    assert not out.exists()
