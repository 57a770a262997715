"""Atomic output helpers, the CLI's error contract, and backend selection."""
from __future__ import annotations

import re
import subprocess
import sys

import pytest
import torch

from m2f.cli import main
from m2f.errors import BackendUnavailableError, M2FError
from m2f.io import atomic_dir, atomic_path, check_can_write, write_json_atomic
from m2f.kernels import resolve_backend


def test_atomic_path_leaves_nothing_when_the_writer_fails(tmp_path):
    target = tmp_path / "out.bin"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("writer crashed")
    assert list(tmp_path.iterdir()) == []


def test_atomic_path_replaces_on_success(tmp_path):
    target = tmp_path / "out.json"
    target.write_text("old")
    write_json_atomic(target, {"a": 1})
    assert target.read_text().strip().startswith("{") and list(tmp_path.iterdir()) == [target]


def test_atomic_dir_is_all_or_nothing(tmp_path):
    target = tmp_path / "model"
    with pytest.raises(ValueError):
        with atomic_dir(target) as tmp:
            (tmp / "a.txt").write_text("x")
            raise ValueError("boom")
    assert not target.exists() and list(tmp_path.iterdir()) == []
    with atomic_dir(target) as tmp:
        (tmp / "a.txt").write_text("x")
    assert (target / "a.txt").read_text() == "x"


def test_check_can_write_refuses_to_overwrite_without_force(tmp_path):
    existing = tmp_path / "f.onnx"
    existing.write_text("x")
    with pytest.raises(M2FError, match="--force"):
        check_can_write(existing)
    assert check_can_write(existing, force=True) == existing


@pytest.mark.parametrize(
    "argv, message",
    [
        (["bench", "kernels", "--sizes", "800x", "--device", "cpu"], "bad size"),
        (["bench", "kernels", "--batch", "1,x", "--device", "cpu"], "bad batch list"),
        (["bench", "kernels", "--dtype", "float8", "--device", "cpu"], "unknown dtype"),
        (["presets-unknown"], "argument COMMAND: invalid choice: 'presets-unknown'"),  # argparse's own
    ],
)
def test_cli_prints_user_errors_as_one_line_without_traceback(capsys, argv, message):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"m2f: error: {message}") and err.count("\n") == 1 and "Traceback" not in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown where there is no GPU")
def test_gpu_benchmark_without_a_gpu_says_so(capsys):
    assert main(["bench", "kernels", "--device", "cuda"]) == 2
    assert "no CUDA GPU found" in capsys.readouterr().err


def test_cli_exit_status_in_a_real_process():
    proc = subprocess.run(
        [sys.executable, "-m", "m2f", "bench", "kernels", "--sizes", "12x", "--device", "cpu"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().startswith("m2f: error: bad size") and "Traceback" not in proc.stderr


def test_backend_selection():
    cpu = torch.device("cpu")
    assert resolve_backend("auto", cpu) == "torch"
    assert resolve_backend("torch", cpu) == "torch"
    with pytest.raises(BackendUnavailableError, match="choose one of"):
        resolve_backend("cuda", cpu)


def test_a_closed_pipe_is_not_an_error():
    # `m2f presets | head -1`: the reader leaves early; m2f exits quietly instead of printing an internal error
    proc = subprocess.Popen([sys.executable, "-m", "m2f", "presets"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # before m2f (still importing) writes a line: its writes meet a closed pipe
    stderr = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 0 and stderr == "", stderr


@pytest.mark.parametrize("text, needle", [
    ('{"a": 1, "a": 2}', "key 'a' appears twice in one object"),
    ('{"x": {"b": 1, "b": 1}}', "key 'b' appears twice"),
    ('{"a": NaN}', "NaN is not a JSON number"),
    ('{"a": -Infinity}', "-Infinity is not a JSON number"),
    ('{"a": 1,}', r"at line 1 column 9"),
])
def test_json_m2f_reads_is_strict(tmp_path, text, needle):
    from m2f.errors import InputError
    from m2f.io import read_json

    path = tmp_path / "x.json"
    path.write_text(text)
    with pytest.raises(InputError, match=rf"^{re.escape(str(path))} is not valid JSON \(.*{needle}.*\); fix it"):
        read_json(path)


def test_json_read_faults_are_one_line(tmp_path):
    from m2f.errors import CheckpointError, InputError
    from m2f.io import read_json

    (tmp_path / "latin1.json").write_bytes(b'{"a": "\xe9"}')
    with pytest.raises(CheckpointError, match=r"latin1.json is not a UTF-8 JSON text file; do this"):
        read_json(tmp_path / "latin1.json", error=CheckpointError, fix="do this")
    with pytest.raises(InputError, match=rf"cannot read {re.escape(str(tmp_path))}: Is a directory"):
        read_json(tmp_path)
    with pytest.raises(InputError, match=r"cannot read .*missing.json: No such file"):
        read_json(tmp_path / "missing.json")


@pytest.mark.parametrize("damage", ["duplicate-key", "nan"])
def test_a_model_config_with_json_m2f_cannot_trust_is_refused(tmp_path, capsys, damage):
    import json
    import shutil

    from m2f.assets import default_checkpoint_path

    ckpt = tmp_path / "model"
    shutil.copytree(default_checkpoint_path(), ckpt)
    text = (ckpt / "m2f_config.json").read_text()
    if damage == "duplicate-key":  # the writer's intent is unknown: json would silently keep the last one
        text = text.replace('{', '{"num_classes": 5, ', 1)
    else:
        data = json.loads(text)
        data["pixel_mean"][0] = float("nan")
        text = json.dumps(data)
    (ckpt / "m2f_config.json").write_text(text)
    image = next(p for p in (default_checkpoint_path().parent / "samples").iterdir() if p.suffix == ".png")
    assert main(["predict", str(image), "--checkpoint", str(ckpt), "--out", str(tmp_path / "out"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("m2f: error:") and "\n" not in err and "m2f_config.json is not valid JSON" in err, err
    assert not (tmp_path / "out").exists()


def test_a_damaged_preprocessor_config_is_refused_not_replaced_by_defaults(tmp_path):
    from m2f.checkpoints.hf import read_json as read_hf_json
    from m2f.errors import CheckpointError

    (tmp_path / "preprocessor_config.json").write_text('{"image_mean": [0.5, 0.5')
    with pytest.raises(CheckpointError, match=r"preprocessor_config.json is not valid JSON .*is the directory complete"):
        read_hf_json(tmp_path / "preprocessor_config.json")
