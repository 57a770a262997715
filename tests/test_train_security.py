"""Training state and training / eval inputs: nothing m2f reads runs code, and every bad input is one line with
exit 2 that leaves the run folder as it was."""
from __future__ import annotations

import json
import os
import shlex
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from m2f.cli import main
from m2f.data.synth import write_dataset
from m2f.errors import CheckpointError, M2FError


class _Payload:
    """Unpickling this runs ``touch MARKER``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


def _tiny_config_json(path: Path, **decoder) -> Path:
    from m2f.config import Mask2FormerConfig, PixelDecoderConfig, ResNetConfig, TransformerDecoderConfig

    cfg = Mask2FormerConfig(
        backbone=ResNetConfig(depths=(1, 1, 1, 1), block="basic", stem_channels=8, hidden_sizes=(8, 16, 24, 32),
                              norm="bn"),
        pixel_decoder=PixelDecoderConfig(conv_dim=16, mask_dim=16, num_encoder_layers=1, num_heads=2, num_points=2,
                                         ffn_dim=32, norm_groups=4),
        transformer_decoder=TransformerDecoderConfig(**{"hidden_dim": 16, "num_queries": 6, "num_heads": 2,
                                                        "ffn_dim": 32, "num_layers": 2, **decoder}),
        num_classes=6,
    )
    path.write_text(json.dumps(cfg.to_dict()))
    return path


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    from tests.utils import fresh_seed

    return write_dataset(tmp_path_factory.mktemp("data") / "synth", num=2, seed=fresh_seed("security-synth"),
                         size=(64, 64))


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, synth) -> Path:
    """A one-iteration run (its training state, no final model: the checkpoint of a run in progress)."""
    root = tmp_path_factory.mktemp("run")
    run = root / "run"
    argv = ["train", "--config", str(_tiny_config_json(root / "tiny.json")), "--data", str(synth), "--out", str(run),
            "--iters", "2", "--batch-size", "1", "--num-points", "196", "--device", "cpu", "--quiet"]
    assert main(argv) == 0
    shutil.rmtree(run / "model")  # as if still training: eval then reads the training state
    return run


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("m2f: error:"), err
    assert "\n" not in err and "Traceback" not in err, err
    return err


def _assert_refused(capsys, argv: list[str], needle: str) -> str:
    """``m2f argv`` exits 2 with a one-line error that contains ``needle``; returns the error."""
    assert main(argv) == 2
    err = _one_line_error(capsys)
    assert needle in err, err
    return err


def _damaged_copy(source: Path, target: Path, case: tuple) -> str:
    """Copy ``source`` to ``target`` and apply the case's damage to the copy; returns the case's expected text."""
    damage, needle = case
    shutil.copytree(source, target)
    damage(target)
    return needle


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------------------------------
# crafted pickles wherever m2f looks for training state, through every command that reads it
# ---------------------------------------------------------------------------------------------------

PLACES = ["legacy-checkpoint.pt", "legacy-torch-zip", "manifest", "tensor-file"]
COMMANDS = ["eval-run-dir", "eval-state-file", "eval-reference", "train-resume"]


def _plant(run: Path, place: str, marker: Path) -> Path:
    """Put the payload where ``place`` says; returns the state file an `m2f eval --checkpoint FILE` would name."""
    payload = _Payload(marker)
    if place.startswith("legacy"):  # an old run: only checkpoint.pt
        for p in [run / "checkpoint.json", *run.glob("checkpoint-*.safetensors")]:
            p.unlink()
        if place == "legacy-torch-zip":
            torch.save({"model": {}, "rng": payload}, run / "checkpoint.pt")
        else:
            import pickle

            (run / "checkpoint.pt").write_bytes(pickle.dumps({"model": payload}))
        return run / "checkpoint.pt"
    import pickle

    if place == "manifest":
        (run / "checkpoint.json").write_bytes(pickle.dumps(payload))
        return run / "checkpoint.json"
    tensors = next(run.glob("checkpoint-*.safetensors"))
    tensors.write_bytes(pickle.dumps(payload))
    return tensors


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("place", PLACES)
def test_a_crafted_pickle_never_runs(tmp_path, trained_run, synth, capsys, place, command):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    marker = tmp_path / "PWNED"
    state_file = _plant(run, place, marker)
    before = _snapshot(run)
    metrics = tmp_path / "metrics.json"
    eval_ = ["eval", "--data", str(synth), "--json", str(metrics), "--quiet", "--limit", "1"]
    argv = {"eval-run-dir": [*eval_, "--checkpoint", str(run)],
            "eval-state-file": [*eval_, "--checkpoint", str(state_file)],
            "eval-reference": [*eval_, "--reference-checkpoint", str(run)],
            "train-resume": ["train", "--data", str(synth), "--out", str(run), "--resume", "--quiet"]}[command]
    assert main(argv) == 2
    err = _one_line_error(capsys)
    assert not marker.exists(), f"the payload ran through `m2f {' '.join(argv)}`"
    assert str(run) in err
    if place.startswith("legacy"):
        assert "older m2f" in err and "--force" in err, err
    assert _snapshot(run) == before and not metrics.exists()


def test_a_crafted_checkpoint_pt_elsewhere_never_runs(tmp_path, synth, capsys):
    """`m2f eval --checkpoint any/checkpoint.pt`: the name alone makes it training state, which is refused."""
    marker = tmp_path / "PWNED"
    any_dir = tmp_path / "any"
    any_dir.mkdir()
    torch.save({"x": _Payload(marker)}, any_dir / "checkpoint.pt")
    _assert_refused(capsys, ["eval", "--data", str(synth), "--checkpoint", str(any_dir / "checkpoint.pt"), "--quiet"],
                    "older m2f")
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------------
# torch's refusal keeps its warning, never its advice
# ---------------------------------------------------------------------------------------------------


def _assert_refusal_without_advice(message: str) -> None:
    assert "weights_only=True" in message and "arbitrary code" in message and "never" in message, message
    assert "Re-running" not in message and "trusted source" not in message and "add_safe_globals" not in message
    assert "\n" not in message


@pytest.mark.parametrize("name", ["model_final.pth", "model.pkl"])
def test_torch_refusal_through_eval(tmp_path, synth, capsys, name):
    marker = tmp_path / "PWNED"
    torch.save({"model": {"sem_seg_head.x": torch.ones(2)}, "extra": _Payload(marker)}, tmp_path / name)
    argv = ["eval", "--data", str(synth), "--checkpoint", str(tmp_path / name), "--preset", "r50-coco-panoptic"]
    assert main([*argv, "--quiet"]) == 2
    _assert_refusal_without_advice(_one_line_error(capsys))
    assert not marker.exists()


def test_torch_refusal_of_hf_pytorch_model_bin(tmp_path):
    from m2f.checkpoints import from_pretrained

    marker = tmp_path / "PWNED"
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps({"model_type": "mask2former"}))
    torch.save({"w": _Payload(marker)}, tmp_path / "hf" / "pytorch_model.bin")
    with pytest.raises(M2FError) as info:  # CheckpointError, or ConfigError when the config is refused first
        from_pretrained(tmp_path / "hf")
    assert not marker.exists()
    if "pytorch_model.bin" in str(info.value):  # the config may be refused first (another engineer's checks)
        _assert_refusal_without_advice(str(info.value))


def test_torch_refusal_helper(tmp_path):
    from m2f.checkpoints import torch_load_weights

    marker = tmp_path / "PWNED"
    torch.save([_Payload(marker)], tmp_path / "x.pt")
    with pytest.raises(CheckpointError, match=r"x\.pt needs posix\.system") as info:
        torch_load_weights(tmp_path / "x.pt")
    _assert_refusal_without_advice(str(info.value))
    assert not marker.exists()
    (tmp_path / "cut.pt").write_bytes((tmp_path / "x.pt").read_bytes()[:50])
    with pytest.raises(CheckpointError, match=r"cut\.pt is not a readable torch file"):
        torch_load_weights(tmp_path / "cut.pt")


# ---------------------------------------------------------------------------------------------------
# --resume on state of another shape or structure
# ---------------------------------------------------------------------------------------------------


def _edit_manifest(edit):
    def apply(run: Path) -> None:
        data = json.loads((run / "checkpoint.json").read_text())
        (run / "checkpoint.json").write_text(json.dumps(edit(data)))
    return apply


def _set(key, value):
    def edit(data):
        data[key] = value
        return data
    return edit


def _drop(key):
    def edit(data):
        del data[key]
        return data
    return edit


def _nested(path, value):
    def edit(data):
        target = data
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
        return data
    return edit


def _tensors_of_another_model(run: Path) -> None:
    from safetensors.torch import load_file, save_file

    tensors = next(run.glob("checkpoint-*.safetensors"))
    state = load_file(tensors)
    key = next(k for k in state if k.startswith("model.") and "query_feat" in k)
    state[key] = torch.cat([state[key], state[key]])  # 12 queries instead of 6
    save_file(state, tensors)


RESUME_CASES = {
    "not-a-dict": (_edit_manifest(lambda d: [d]), "not m2f training state"),
    "missing-rng": (_edit_manifest(_drop("rng")), 'lacks "rng"'),
    "iteration-string": (_edit_manifest(_set("iteration", "1")), '"iteration" is a str'),
    "iteration-bool": (_edit_manifest(_set("iteration", True)), '"iteration" is a bool'),
    "version": (_edit_manifest(_set("version", 99)), "version 99"),
    "options-type": (_edit_manifest(_nested(["options", "optim", "lr"], "fast")), "optim.lr is 'fast'"),
    "options-unknown": (_edit_manifest(_nested(["options", "colour"], 1)), "unknown field"),
    "rng": (_edit_manifest(_nested(["rng", 0, "torch"], "AAAA")), "RNG state of rank 0"),
    "world-size": (_edit_manifest(_set("world_size", 2)), "do not fit together"),
    "tensors-path": (_edit_manifest(_set("tensors", "../elsewhere.safetensors")), "not a checkpoint-*"),
    "tensors-missing": (lambda run: next(run.glob("checkpoint-*.safetensors")).unlink(), "which is missing"),
    "config-shape": (_edit_manifest(_nested(["config", "transformer_decoder", "num_queries"], 9)), "does not fit"),
    "tensor-shape": (_tensors_of_another_model, "shape mismatch"),
    "optimizer-groups": (_edit_manifest(_nested(["optimizer_groups", 0, "name"], "other.weight")),
                         "other parameters"),
    "log-row": (lambda run: (run / "log.jsonl").write_text("{broken\n"), "log.jsonl line 1"),
}


@pytest.mark.parametrize("case", sorted(RESUME_CASES))
def test_resume_on_bad_state(tmp_path, trained_run, synth, capsys, case):
    run = tmp_path / "run"
    needle = _damaged_copy(trained_run, run, RESUME_CASES[case])
    before = _snapshot(run)
    _assert_refused(capsys, ["train", "--data", str(synth), "--out", str(run), "--resume", "--iters", "3", "--quiet",
                             "--num-points", "196"], needle)
    assert _snapshot(run) == before


@pytest.mark.parametrize("decoder", [{"num_queries": 8}, {"hidden_dim": 32}])
def test_resume_with_a_config_of_another_shape(tmp_path, trained_run, synth, capsys, decoder):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    before = _snapshot(run)
    other = _tiny_config_json(tmp_path / "other.json", **decoder)
    assert main(["train", "--config", str(other), "--data", str(synth), "--out", str(run), "--resume",
                 "--iters", "3", "--quiet"]) == 2
    err = _one_line_error(capsys)
    field = next(iter(decoder))
    assert "another shape" in err and f"transformer_decoder.{field}" in err, err
    assert _snapshot(run) == before


# ---------------------------------------------------------------------------------------------------
# divergence and learning rates
# ---------------------------------------------------------------------------------------------------


def test_divergence_stops_and_keeps_the_last_good_checkpoint(tmp_path, synth, capsys):
    from m2f.train.state import load_state

    run = tmp_path / "run"
    argv = ["train", "--config", str(_tiny_config_json(tmp_path / "tiny.json")), "--data", str(synth), "--out",
            str(run), "--iters", "6", "--batch-size", "1", "--num-points", "196", "--device", "cpu", "--quiet",
            "--checkpoint-every", "1", "--lr", "1e30"]
    assert main(argv) == 2
    err = _one_line_error(capsys)
    assert "training diverged at iteration" in err and "lower --lr than 1e+30" in err, err
    state = load_state(run)  # whole and finite: the diverged iteration was never saved
    assert f"checkpoint of iteration {state.iteration}" in err
    assert all(torch.isfinite(t).all() for t in state.model.values())
    assert not (run / "model").exists()
    assert not [p.name for p in run.iterdir() if p.name.endswith(".partial")]


def test_force_removes_the_replaced_runs_state_before_training(tmp_path, trained_run, synth, capsys):
    from m2f.train.state import has_state

    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    assert has_state(run)
    argv = ["train", "--config", str(_tiny_config_json(tmp_path / "tiny.json")), "--data", str(synth), "--out",
            str(run), "--iters", "6", "--batch-size", "1", "--num-points", "196", "--device", "cpu", "--quiet",
            "--checkpoint-every", "100", "--lr", "1e30", "--force"]
    assert main(argv) == 2  # diverges before its first save
    _one_line_error(capsys)
    assert not has_state(run) and not list(run.glob("checkpoint*")), sorted(p.name for p in run.iterdir())
    _assert_refused(capsys, ["train", "--data", str(synth), "--out", str(run), "--resume", "--device", "cpu", "--quiet"],
                    "holds no training state")


@pytest.mark.parametrize("extra, needle", [
    (["--lr", "0"], "--lr 0.0 is not a positive"), (["--lr=-1e-4"], "--lr -0.0001"),
    (["--lr", "nan"], "--lr nan"), (["--lr", "inf"], "--lr inf"), (["--weight-decay", "nan"], "--weight-decay nan"),
    (["--clip=-1"], "--clip -1.0 is not a non-negative"), (["--warmup-factor", "0"], "--warmup-factor"),
    (["--warmup-iters=-1"], "--warmup-iters"), (["--scale-range", "0.5,inf"], "--scale-range"),
])
def test_bad_learning_options_are_refused_up_front(tmp_path, synth, capsys, extra, needle):
    out = tmp_path / "run"
    argv = ["train", "--config", str(_tiny_config_json(tmp_path / "tiny.json")), "--data", str(synth), "--out",
            str(out), "--iters", "1", "--quiet", *extra]
    _assert_refused(capsys, argv, needle)
    assert not out.exists()


# ---------------------------------------------------------------------------------------------------
# dataset problems, through `m2f train` and `m2f eval`
# ---------------------------------------------------------------------------------------------------


def _json_edit(edit):
    def apply(root: Path) -> None:
        meta = json.loads((root / "panoptic.json").read_text())
        edit(meta, _first_annotation(meta))
        (root / "panoptic.json").write_text(json.dumps(meta))
    return apply


def _first_annotation(meta: dict) -> dict:
    """The annotation of the first image in file-name order (the one `m2f train` reads before writing)."""
    first = min(meta["images"], key=lambda i: i["file_name"])
    return next(a for a in meta["annotations"] if a["image_id"] == first["id"])


def _first_png(root: Path) -> Path:
    meta = json.loads((root / "panoptic.json").read_text())
    return root / "panoptic" / _first_annotation(meta)["file_name"]


def _resize_png(root: Path) -> None:
    png = _first_png(root)
    with Image.open(png) as img:
        img.resize((32, 32), Image.NEAREST).save(png)


def _unlisted_pixels(root: Path) -> None:
    png = _first_png(root)
    ids = np.asarray(Image.open(png).convert("RGB")).copy()
    ids[0, 0] = (7, 7, 7)  # segment id 7 + 256·7 + 65536·7, which segments_info does not list
    Image.fromarray(ids).save(png)


def _set_category(value):
    return _json_edit(lambda meta, ann: ann["segments_info"][0].__setitem__("category_id", value))


DATA_CASES = {
    "category-string": (_set_category("1"), "category_id '1' (str)"),
    "category-float": (_set_category(1.0), "category_id 1.0 (float)"),
    "category-bool": (_set_category(True), "category_id True (bool)"),
    "category-null": (_set_category(None), "category_id None (NoneType)"),
    "category-unknown": (_set_category(99), "category_id 99, which 'categories' does not list"),
    "segment-not-in-png": (_json_edit(lambda meta, ann: ann["segments_info"].append(
        {"id": 123456, "category_id": 1, "iscrowd": 0})), "ids [123456]"),
    "segment-duplicate": (_json_edit(lambda meta, ann: ann["segments_info"].append(
        dict(ann["segments_info"][0]))), "more than once"),
    "segment-id-string": (_json_edit(lambda meta, ann: ann["segments_info"][0].__setitem__("id", "5")), "id '5'"),
    "segment-missing-id": (_json_edit(lambda meta, ann: ann["segments_info"][0].pop("id")), "lacks 'id'"),
    "segment-iscrowd": (_json_edit(lambda meta, ann: ann["segments_info"][0].__setitem__("iscrowd", "no")),
                        "iscrowd 'no'"),
    "png-pixels-unlisted": (_unlisted_pixels, "does not list"),
    "png-missing": (lambda root: _first_png(root).unlink(), "does not exist"),
    "png-size": (_resize_png, "32x32 but image"),
    "image-duplicate-id": (_json_edit(lambda meta, ann: meta["images"].append(dict(meta["images"][0]))),
                           "more than once"),
    "image-file-name": (_json_edit(lambda meta, ann: meta["images"][0].__setitem__("file_name", 3)), "file_name 3"),
    "annotation-unknown-image": (_json_edit(lambda meta, ann: ann.__setitem__("image_id", "nope")), "image_id 'nope'"),
    "annotation-duplicate": (_json_edit(lambda meta, ann: meta["annotations"].append(dict(ann))), "more than once"),
    "segments-info-type": (_json_edit(lambda meta, ann: ann.__setitem__("segments_info", {})), "segments_info {}"),
    "category-id-string": (_json_edit(lambda meta, ann: meta["categories"][0].__setitem__("id", "1")), "id '1'"),
    "category-duplicate": (_json_edit(lambda meta, ann: meta["categories"].append(dict(meta["categories"][0]))),
                           "more than once"),
}


@pytest.mark.parametrize("command", ["train", "eval"])
@pytest.mark.parametrize("case", sorted(DATA_CASES))
def test_dataset_problems(tmp_path, synth, capsys, case, command):
    data = tmp_path / "data"
    needle = _damaged_copy(synth, data, DATA_CASES[case])
    out = tmp_path / ("run" if command == "train" else "metrics.json")
    if command == "train":
        argv = ["train", "--config", str(_tiny_config_json(tmp_path / "tiny.json")), "--data", str(data), "--out",
                str(out), "--iters", "1", "--batch-size", "1", "--quiet"]
    else:
        argv = ["eval", "--data", str(data), "--json", str(out), "--limit", "1", "--quiet"]
    _assert_refused(capsys, argv, needle)
    assert not out.exists()
