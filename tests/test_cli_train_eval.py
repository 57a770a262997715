"""`m2f train` / `m2f eval` / `m2f data` from the command line: user errors are one line with exit 2 and leave no
output behind; a tiny end-to-end train -> eval run works."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from m2f.cli import main
from m2f.data.synth import write_dataset
from tests.utils import tiny_train_config


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("data") / "synth", num=4, seed=21, size=(64, 64))


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("m2f: error:"), err
    assert "\n" not in err and "Traceback" not in err, err
    return err


def _malformed(tmp_path: Path, synth: Path) -> Path:
    bad = tmp_path / "bad"
    shutil.copytree(synth, bad)
    (bad / "panoptic.json").write_text('{"images": [1, 2', encoding="utf-8")
    return bad


def _wrong_schema(tmp_path: Path, synth: Path) -> Path:
    bad = tmp_path / "schema"
    shutil.copytree(synth, bad)
    meta = json.loads((bad / "panoptic.json").read_text())
    del meta["annotations"][0]["segments_info"][0]["category_id"]
    (bad / "panoptic.json").write_text(json.dumps(meta))
    return bad


@pytest.fixture
def TRAIN(tmp_path) -> list[str]:
    """`m2f train` with a JSON config (the default architecture, 6 classes) and a 1-iteration budget."""
    path = tmp_path / "tiny_config.json"
    path.write_text(json.dumps({"num_classes": 6}))
    return ["train", "--config", str(path), "--iters", "1", "--batch-size", "1", "--quiet"]


@pytest.mark.parametrize("case", ["missing", "malformed", "schema", "empty"])
def test_train_bad_data(tmp_path, synth, capsys, case, TRAIN):
    data = {"missing": lambda: tmp_path / "nope", "malformed": lambda: _malformed(tmp_path, synth),
            "schema": lambda: _wrong_schema(tmp_path, synth), "empty": lambda: tmp_path}[case]()
    out = tmp_path / "run"
    assert main([*TRAIN, "--data", str(data), "--out", str(out)]) == 2
    err = _one_line_error(capsys)
    assert str(data.name) in err or "format" in err
    assert not out.exists()


@pytest.mark.parametrize("config, needle", [("no-such-preset", "neither a JSON file nor a preset"),
                                            ("missing.json", "does not exist"),
                                            ("broken.json", "not valid JSON"),
                                            ("unknown_field.json", "unknown field")])
def test_train_bad_config(tmp_path, synth, capsys, monkeypatch, config, needle):
    monkeypatch.chdir(tmp_path)
    Path("broken.json").write_text("{nope")
    Path("unknown_field.json").write_text(json.dumps({"num_classes": 3, "colour": "red"}))
    out = tmp_path / "run"
    argv = ["train", "--config", config, "--data", str(synth), "--out", str(out), "--iters", "1", "--quiet"]
    assert main(argv) == 2
    assert needle in _one_line_error(capsys)
    assert not out.exists()


@pytest.mark.parametrize("extra, needle", [(["--iters", "0"], "--iters"), (["--batch-size", "0"], "--batch-size"),
                                           (["--scale-range", "2,1"], "--scale-range"),
                                           (["--input-size", "12"], "--input-size"),
                                           (["--resume"], "no training state")])
def test_train_bad_options(tmp_path, synth, capsys, extra, needle, TRAIN):
    out = tmp_path / "run"
    assert main([*TRAIN, "--data", str(synth), "--out", str(out), *extra]) == 2
    assert needle in _one_line_error(capsys)
    assert not out.exists()


def test_train_refuses_non_empty_out(tmp_path, synth, capsys, TRAIN):
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main([*TRAIN, "--data", str(synth), "--out", str(out)]) == 2
    assert "--resume" in _one_line_error(capsys)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


@pytest.mark.parametrize("case", ["missing", "malformed"])
def test_eval_bad_data(tmp_path, synth, capsys, case):
    data = tmp_path / "nope" if case == "missing" else _malformed(tmp_path, synth)
    out = tmp_path / "metrics.json"
    assert main(["eval", "--data", str(data), "--json", str(out), "--quiet"]) == 2
    _one_line_error(capsys)
    assert not out.exists()


def test_eval_missing_checkpoint_and_onnx(tmp_path, synth, capsys):
    out = tmp_path / "metrics.json"
    assert main(["eval", "--data", str(synth), "--checkpoint", str(tmp_path / "none"), "--json", str(out)]) == 2
    assert "does not exist" in _one_line_error(capsys)
    assert main(["eval", "--data", str(synth), "--onnx", str(tmp_path / "none.onnx"), "--json", str(out)]) == 2
    _one_line_error(capsys)
    assert not out.exists()


def test_train_then_eval_end_to_end(tmp_path, synth, capsys):
    """Two iterations of a tiny model from the CLI, resumed to three, then `m2f eval` on the result."""

    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(tiny_train_config().to_dict()))
    run = tmp_path / "run"
    base = ["train", "--config", str(config), "--data", str(synth), "--out", str(run), "--batch-size", "2",
            "--num-points", "196", "--device", "cpu", "--quiet", "--log-every", "1"]
    assert main([*base, "--iters", "2"]) == 0
    assert main(["train", "--data", str(synth), "--out", str(run), "--resume", "--iters", "3", "--quiet"]) == 0
    assert [json.loads(r)["iter"] for r in (run / "log.jsonl").read_text().splitlines()] == [1, 2, 3]
    capsys.readouterr()
    metrics = tmp_path / "m" / "pq.json"
    assert main(["eval", "--data", str(synth), "--checkpoint", str(run / "model"), "--json", str(metrics),
                 "--limit", "2", "--quiet"]) == 0
    result = json.loads(metrics.read_text())
    assert result["task"] == "panoptic" and result["num_images"] == 2
    assert 0.0 <= result["PQ"] <= 100.0 and {"PQ_th", "PQ_st", "SQ", "RQ"} <= set(result)
    assert "PQ" in capsys.readouterr().out
    # the same model as its own reference: identical predictions score 100 wherever it predicts anything
    assert main(["eval", "--data", str(synth), "--checkpoint", str(run), "--reference-checkpoint", str(run / "model"),
                 "--task", "semantic", "--json", str(metrics), "--force", "--limit", "2", "--quiet"]) == 0
    assert json.loads(metrics.read_text())["mIoU"] == pytest.approx(100.0)


def test_init_keeps_fitting_tensors_and_reinitialises_the_class_head(tmp_path, capsys):
    """--init for fine-tuning on another label set: every tensor whose shape fits is copied, the rest is fresh."""
    import torch

    from m2f.checkpoints import save_pretrained
    from m2f.cli.train import _init_state
    from m2f.model import build_model

    source = build_model(tiny_train_config(num_classes=6))
    save_pretrained(source, tmp_path / "src")
    state = _init_state(str(tmp_path / "src"), tiny_train_config(num_classes=3))
    src = source.state_dict()
    copied = [k for k in state if src[k].shape == state[k].shape and torch.equal(state[k], src[k])]
    fresh = [k for k in state if src[k].shape != state[k].shape]
    assert fresh and all("class" in k for k in fresh), fresh
    assert len(copied) == len(state) - len(fresh)
    assert "newly initialised" in capsys.readouterr().out


def test_eval_onnx_against_pytorch(tmp_path, synth, rng):
    """An exported graph runs through onnxruntime with the same pre- and post-processing as PyTorch."""
    import torch

    from m2f.checkpoints import save_pretrained
    from m2f.evaluation.evaluate import RunnerPredictor, TorchPredictor
    from m2f.export import to_onnx
    from m2f.export.runner import open_runner
    from m2f.model import build_model
    from tests.utils import rel_err

    torch.manual_seed(rng.seed_value)
    model = build_model(tiny_train_config()).eval()
    save_pretrained(model, tmp_path / "model")
    onnx_path = tmp_path / "onnx" / "model.onnx"
    to_onnx(model, onnx_path, height=64, width=64, optimize=False, simplify=False)
    pixel_values = torch.randn(1, 3, 64, 64, generator=rng)
    got = RunnerPredictor(open_runner(onnx_path), model.config)(pixel_values)
    ref = TorchPredictor(model, model.config)(pixel_values)
    assert rel_err(got[0], ref[0]) < 1e-4 and rel_err(got[1], ref[1]) < 1e-4, f"seed {rng.seed_value}"
    metrics = tmp_path / "onnx_vs_torch.json"
    assert main(["eval", "--data", str(synth), "--onnx", str(onnx_path), "--reference-checkpoint",
                 str(tmp_path / "model"), "--task", "semantic", "--json", str(metrics), "--quiet"]) == 0
    result = json.loads(metrics.read_text())
    assert result["mIoU"] > 99.0 and result["num_images"] == 4, f"seed {rng.seed_value}: {result['mIoU']}"
