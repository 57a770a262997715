"""OS faults while writing, the export manifest + model pair, and output permissions.

Every OS error met while writing (disk full, read-only file system, permission denied, a file in the way of a
directory, a directory where a file goes) is one ``m2f: error:`` line naming the path and the fix, exit status 2,
and leaves no partial or temporary file. The tests run as root, for whom permissions do not stop a write, so
EACCES / EROFS / ENOSPC are injected at the lowest write call; not-a-directory and is-a-directory are real.

A manifest is committed after its model and records the model's size and sha256: an export killed at either
rename leaves either the old pair, or a model that every manifest reader refuses until it is re-exported.
"""
from __future__ import annotations

import errno
import json
import os
import pathlib
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

import m2f.cli.presets
from m2f.assets import default_checkpoint_path
from m2f.cli import main
from m2f.errors import InputError, OutputError
from m2f.io import atomic_dir, atomic_path, write_bytes_atomic, write_json_atomic
from tests.utils import without_progress

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper  # noqa: E402

from m2f.export.manifest import MANIFEST_FORMAT, manifest_path, read_manifest  # noqa: E402
from m2f.export.onnx_export import to_onnx  # noqa: E402


def _cli(capsys, argv: list[str]) -> tuple[int, str]:
    code = main(argv)
    return code, capsys.readouterr().err


def _assert_one_line_error(code: int, err: str, *needles: str) -> None:
    assert code == 2, err
    lines = without_progress(err)
    assert len(lines) == 1 and lines[0].startswith("m2f: error: ") and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], lines[0]


def _tree(root: Path) -> set[str]:
    """Every file and directory under ``root`` (temporary ``.partial`` files included: there must be none)."""
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def _inject(monkeypatch, owner: Any, name: str, code: int, under: Path, arg: int = 0, named: bool = True) -> None:
    """Make ``owner.name`` fail with ``code`` when its path argument ``arg`` lies under ``under`` (else run it).

    ``named=False`` raises the error without a file name, as ``write()`` on a full disk does.
    """
    real: Callable[..., Any] = getattr(owner, name)

    def failing(*args: Any, **kwargs: Any) -> Any:
        path = Path(os.fsdecode(args[arg]))
        if path.is_relative_to(under):
            raise OSError(code, os.strerror(code), *([str(path)] if named else []))
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, failing)


# ---------------------------------------------------------------------------------------------------
# m2f.io: each OS fault is one OutputError naming the path and the fix
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("owner,name,code,named,needle", [
    (os, "open", errno.EACCES, True, "permission denied; fix its permissions or use another path"),
    (os, "open", errno.EROFS, True, "read-only file system; use a path on a writable file system"),
    (pathlib.Path, "write_bytes", errno.ENOSPC, False, "no space left on the device; free some space"),
    (pathlib.Path, "write_bytes", errno.EDQUOT, False, "disk quota exceeded; free some space"),
    (os, "replace", errno.EROFS, True, "read-only file system"),
])
def test_atomic_write_faults_name_the_target_and_leave_nothing(tmp_path, monkeypatch, owner, name, code, named,
                                                                needle):
    target = tmp_path / "out" / "result.json"
    _inject(monkeypatch, owner, name, code, tmp_path, named=named)
    with pytest.raises(OutputError, match=f"^cannot write {target}: {needle}"):
        write_json_atomic(target, {"a": 1})
    assert _tree(tmp_path) <= {"out"}  # at most the (empty) parent directory


def test_a_fault_inside_a_temporary_directory_names_the_target(tmp_path, monkeypatch):
    target = tmp_path / "dataset"
    _inject(monkeypatch, pathlib.Path, "write_bytes", errno.EACCES, tmp_path)  # named: a temp file in the temp dir
    with pytest.raises(OutputError, match=f"^cannot write {target / 'inner.json'}: permission denied"):
        with atomic_dir(target) as tmp:
            write_json_atomic(tmp / "inner.json", {})
    assert _tree(tmp_path) == set()


def test_a_file_in_the_way_of_a_directory_is_named(tmp_path):
    (tmp_path / "afile").write_text("x")
    for write in (lambda p: write_json_atomic(p, {}), lambda p: atomic_dir(p).__enter__()):
        with pytest.raises(OutputError, match=r"afile is a file, not a directory; remove it or choose another path"):
            write(tmp_path / "afile" / "sub" / "x")
    assert _tree(tmp_path) == {"afile"}


def test_a_directory_where_a_file_goes(tmp_path):
    (tmp_path / "d").mkdir()
    with pytest.raises(OutputError, match=r"cannot write .*/d: it is a directory; give a file name"):
        write_bytes_atomic(tmp_path / "d", b"x")
    assert _tree(tmp_path) == {"d"}


def test_replacing_a_directory_puts_the_old_one_back_when_the_new_cannot_move_in(tmp_path, monkeypatch):
    target = tmp_path / "model"
    target.mkdir()
    (target / "old.txt").write_text("old")
    real = os.replace

    def fail_moving_in(src, dst):  # the second rename: the new directory onto the target
        if Path(dst) == target and Path(src).name.endswith(".partial") and not (Path(src) / "old.txt").exists():
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(src))
        return real(src, dst)

    monkeypatch.setattr(os, "replace", fail_moving_in)
    with pytest.raises(OutputError, match=f"cannot write {target}: read-only file system"):
        with atomic_dir(target) as tmp:
            (tmp / "new.txt").write_text("new")
    assert _tree(tmp_path) == {"model", "model/old.txt"}


# ---------------------------------------------------------------------------------------------------
# The commands: exit 2, one line, nothing left
# ---------------------------------------------------------------------------------------------------


def _sample_image() -> str:
    return str(Path(m2f.cli.presets.__file__).parents[1] / "assets" / "samples" / "synth_4242_0.png")


def test_predict_out_through_a_file(tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    code, err = _cli(capsys, ["predict", _sample_image(), "--out", str(tmp_path / "afile" / "sub"), "--device", "cpu"])
    _assert_one_line_error(code, err, "afile is a file, not a directory")
    assert _tree(tmp_path) == {"afile"}


@pytest.mark.parametrize("exists", [False, True])
def test_predict_out_on_a_read_only_file_system(tmp_path, capsys, monkeypatch, exists):
    out = tmp_path / "out"
    if exists:  # the folder is there; creating any file in it fails
        out.mkdir()
        _inject(monkeypatch, os, "open", errno.EROFS, out)
    else:
        _inject(monkeypatch, os, "mkdir", errno.EROFS, out)
    code, err = _cli(capsys, ["predict", _sample_image(), "--out", str(out), "--device", "cpu"])
    _assert_one_line_error(code, err, str(out), "read-only file system; use a path on a writable file system")
    assert _tree(tmp_path) == ({"out"} if exists else set())


@pytest.mark.parametrize("force", [[], ["--force"]])
def test_export_onnx_output_is_a_directory(tmp_path, capsys, force):
    (tmp_path / "m.onnx").mkdir()
    code, err = _cli(capsys, ["export", "onnx", "--checkpoint", str(default_checkpoint_path()), "--output",
                              str(tmp_path / "m.onnx"), *force])
    _assert_one_line_error(code, err, "m.onnx is a directory; give a file name")
    assert _tree(tmp_path) == {"m.onnx"}  # no orphan manifest


@pytest.mark.parametrize("command", ["export onnx", "export tensorrt", "export triton-repo", "export check",
                                     "convert", "data synth"])
def test_outputs_through_a_file_are_refused_before_any_work(tmp_path, capsys, command):
    (tmp_path / "afile").write_text("x")
    model = tmp_path / "m.onnx"
    onnx.save(_graph("first"), model)
    out = str(tmp_path / "afile" / "out")
    ckpt = str(default_checkpoint_path())
    argv = {
        "export onnx": ["export", "onnx", "--checkpoint", ckpt, "--output", out],
        "export tensorrt": ["export", "tensorrt", "--onnx", str(model), "--output", out],
        "export triton-repo": ["export", "triton-repo", "--model", str(model), "--output", out],
        "export check": ["export", "check", str(model), "--checkpoint", ckpt, "--report", out],
        "convert": ["convert", ckpt, "--output", out],
        "data synth": ["data", "synth", "--out", out, "--num", "1", "--size", "32x32"],
    }[command]
    code, err = _cli(capsys, argv)
    _assert_one_line_error(code, err, "afile is a file, not a directory; remove it or choose another path")
    assert _tree(tmp_path) == {"afile", "m.onnx"}


def test_export_onnx_on_a_full_disk(tmp_path, monkeypatch):
    def full(module, args, f, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # write() on a full disk names no file

    monkeypatch.setattr(torch.onnx, "export", full)
    with pytest.raises(OutputError, match=f"^cannot write {tmp_path / 'm.onnx'}: no space left on the device"):
        to_onnx(torch.nn.Identity(), tmp_path / "m.onnx", height=64, width=64, simplify=False)
    assert _tree(tmp_path) == set()  # neither a partial model nor an orphan manifest


def test_convert_on_a_full_disk(tmp_path, capsys, monkeypatch):
    _inject(monkeypatch, pathlib.Path, "write_bytes", errno.ENOSPC, tmp_path, named=False)
    code, err = _cli(capsys, ["convert", str(default_checkpoint_path()), "--output", str(tmp_path / "conv")])
    _assert_one_line_error(code, err, f"cannot write {tmp_path / 'conv'}: no space left on the device")
    assert _tree(tmp_path) == set()


def test_train_checkpoint_on_a_full_disk(tmp_path, capsys, monkeypatch):
    from m2f.data.synth import write_dataset
    from tests.utils import fresh_seed

    data = write_dataset(tmp_path / "data", num=2, seed=fresh_seed(), size=(64, 64))
    run = tmp_path / "run"
    _inject(monkeypatch, pathlib.Path, "write_bytes", errno.ENOSPC, run, named=False)
    code, err = _cli(capsys, ["train", "--config", str(default_checkpoint_path() / "m2f_config.json"), "--data",
                              str(data), "--out", str(run), "--iters", "1", "--batch-size", "1", "--num-points", "64",
                              "--device", "cpu", "--quiet"])
    _assert_one_line_error(code, err, "no space left on the device")
    assert not [p.name for p in run.rglob("*") if p.name.endswith(".partial") or p.suffix == ".safetensors"]


@pytest.mark.parametrize("owner,name,code,named,needle", [
    (pathlib.Path, "write_bytes", errno.ENOSPC, False, "no space left on the device"),
    (os, "mkdir", errno.EACCES, True, "permission denied"),
])
def test_data_synth_write_faults(tmp_path, capsys, monkeypatch, owner, name, code, named, needle):
    _inject(monkeypatch, owner, name, code, tmp_path, named=named)
    code, err = _cli(capsys, ["data", "synth", "--out", str(tmp_path / "synth"), "--num", "2", "--size", "32x32"])
    _assert_one_line_error(code, err, str(tmp_path / "synth"), needle)
    assert _tree(tmp_path) == set()


def test_export_check_report_onto_a_directory(tmp_path, capsys):
    (tmp_path / "m.onnx").write_bytes(b"x")
    (tmp_path / "report").mkdir()
    code, err = _cli(capsys, ["export", "check", str(tmp_path / "m.onnx"), "--report", str(tmp_path / "report")])
    _assert_one_line_error(code, err, "report is a directory")
    assert _tree(tmp_path) == {"m.onnx", "report"}


def test_cli_last_resort_for_untranslated_os_errors(capsys, monkeypatch, tmp_path):
    def denied(args):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(tmp_path / "x"))

    monkeypatch.setattr(m2f.cli.presets, "run", denied)
    code, err = _cli(capsys, ["presets"])
    _assert_one_line_error(code, err, f"{tmp_path / 'x'}: permission denied; fix its permissions")

    def no_path(args):  # no file and not the disk: possibly a bug, so it stays an internal error
        raise OSError(errno.EBADF, os.strerror(errno.EBADF))

    monkeypatch.setattr(m2f.cli.presets, "run", no_path)
    code, err = _cli(capsys, ["presets"])
    assert code == 1 and err.startswith("m2f: internal error: OSError"), err


# ---------------------------------------------------------------------------------------------------
# Manifest + model: committed model first, manifest last; readers refuse a pair that does not match
# ---------------------------------------------------------------------------------------------------

SIZE = 64


def _graph(marker: str) -> Any:
    """A small valid ONNX model (opset 18) at the export size; ``marker`` tells two exports apart."""
    x = helper.make_tensor_value_info("pixel_values", TensorProto.FLOAT, [1, 3, SIZE, SIZE])
    y = helper.make_tensor_value_info("pred_logits", TensorProto.FLOAT, [1, 3, SIZE, SIZE])
    graph = helper.make_graph([helper.make_node("Relu", ["pixel_values"], ["pred_logits"])], "g", [x], [y])
    return helper.make_model(graph, producer_name=marker, opset_imports=[helper.make_opsetid("", 18)])


@pytest.fixture
def export(monkeypatch):
    """``export(path, marker, **kwargs)``: ``to_onnx`` with torch's exporter replaced by writing ``_graph(marker)``
    (what is tested is how the file and its manifest are committed, not the exporter)."""
    def run(path: Path, marker: str, **kwargs: Any):
        monkeypatch.setattr(torch.onnx, "export", lambda module, args, f, **kw: onnx.save(_graph(marker), f))
        return to_onnx(torch.nn.Identity(), path, height=SIZE, width=SIZE, simplify=False, **kwargs)

    return run


class Killed(BaseException):
    """Stands for the process being killed: nothing in m2f handles it."""


_REAL_REPLACE = os.replace


def _kill_at_rename_onto(monkeypatch, target: Path) -> None:
    def replace(src, dst):
        if Path(dst) == target:
            raise Killed(f"killed while renaming onto {target}")
        return _REAL_REPLACE(src, dst)

    monkeypatch.setattr(os, "replace", replace)


def _producer(path: Path) -> str:
    return onnx.load(str(path)).producer_name


def _assert_pair_refused(path: Path, capsys, needle: str) -> None:
    """Every manifest reader refuses the pair in one line: check, triton-repo, tensorrt build, eval."""
    from m2f.cli.exported import exported_config
    from m2f.export.tensorrt_build import build_engine

    for argv in (["export", "check", str(path)],
                 ["export", "triton-repo", "--model", str(path), "--output", str(path.parent / "repo")]):
        code, err = _cli(capsys, argv)
        _assert_one_line_error(code, err, needle, "re-export")
    for read in (lambda: build_engine(path, path.with_suffix(".engine")), lambda: exported_config(path, None)):
        with pytest.raises(InputError, match=needle):
            read()
    assert not (path.parent / "repo").exists() and not path.with_suffix(".engine").exists()


def test_manifest_records_the_model_and_check_accepts_the_pair(tmp_path, export):
    path = tmp_path / "m.onnx"
    result = export(path, "first")
    manifest = json.loads(manifest_path(path).read_text())
    assert manifest["format"] == MANIFEST_FORMAT and manifest["artifact"]["size"] == path.stat().st_size
    assert result.manifest.artifact == manifest["artifact"] and len(manifest["artifact"]["sha256"]) == 64
    assert read_manifest(path, kind="onnx").artifact == manifest["artifact"]
    assert _tree(tmp_path) == {"m.onnx", "m.onnx.json"}


def test_first_export_killed_at_each_rename(tmp_path, capsys, monkeypatch, export):
    path = tmp_path / "m.onnx"
    _kill_at_rename_onto(monkeypatch, path)  # before the model is in place: nothing at all
    with pytest.raises(Killed):
        export(path, "first")
    assert _tree(tmp_path) == set()

    _kill_at_rename_onto(monkeypatch, manifest_path(path))  # model in place, manifest not: refused as unexported
    with pytest.raises(Killed):
        export(path, "first")
    assert _tree(tmp_path) == {"m.onnx"}
    code, err = _cli(capsys, ["export", "check", str(path)])
    _assert_one_line_error(code, err, "m.onnx.json not found", "re-export")


def test_re_export_killed_at_each_rename(tmp_path, capsys, monkeypatch, export):
    path = tmp_path / "m.onnx"
    export(path, "old")
    _kill_at_rename_onto(monkeypatch, path)  # the old pair stays, still a valid pair
    with pytest.raises(Killed):
        export(path, "new", force=True)
    assert _tree(tmp_path) == {"m.onnx", "m.onnx.json"}
    assert _producer(path) == "old" and read_manifest(path, kind="onnx")

    _kill_at_rename_onto(monkeypatch, manifest_path(path))  # new model beside the old manifest
    with pytest.raises(Killed):
        export(path, "new", force=True)
    assert _tree(tmp_path) == {"m.onnx", "m.onnx.json"} and _producer(path) == "new"
    _assert_pair_refused(path, capsys, "does not match its manifest")

    monkeypatch.undo()
    export(path, "new", force=True)  # re-exporting repairs the pair
    assert read_manifest(path, kind="onnx") and _tree(tmp_path) == {"m.onnx", "m.onnx.json"}


def test_a_manifest_without_its_model_does_not_block_a_re_export(tmp_path, export):
    path = tmp_path / "m.onnx"
    export(path, "old")
    path.unlink()
    export(path, "new")  # no --force needed: the stale manifest is replaced
    assert _producer(path) == "new" and read_manifest(path, kind="onnx")


# ---------------------------------------------------------------------------------------------------
# Tampered manifests, corrupt models: one line each
# ---------------------------------------------------------------------------------------------------


def _edit(key: str, value: Any) -> Callable[[dict], None]:
    def apply(manifest: dict) -> None:
        if value is KeyError:
            del manifest[key]
        else:
            manifest[key] = value
    return apply


@pytest.mark.parametrize("tamper,needle", [
    ("json", "is not valid JSON"),
    (_edit("batch", "1"), "field 'batch' must be an integer, got '1'"),
    (_edit("dynamic", 0), "field 'dynamic' must be true or false"),
    (_edit("outputs", KeyError), "field 'outputs' is missing"),
    (_edit("inputs", [{"name": "pixel_values"}]), "an entry of 'inputs' is not a tensor"),
    (_edit("height", SIZE * 2), "disagree with its input shape"),
    (_edit("source", "a path"), "field 'source' must be an object or null"),
    (_edit("kind", "tensorrt"), "describes a 'tensorrt' file, not a 'onnx' one"),
    (_edit("format", "m2f-export-manifest/1"), "has manifest format 'm2f-export-manifest/1'"),
    (_edit("format", "m2f-export-manifest/9"), "has manifest format 'm2f-export-manifest/9'"),
    (_edit("format", "something-else"), "is not an m2f export manifest"),
    (_edit("artifact", {"size": 1}), "field 'artifact' must hold the model's size and sha256"),
    ("size", "the manifest says"),
    ("sha", "its sha256 differs from the manifest's"),
])
def test_check_refuses_a_tampered_manifest(tmp_path, capsys, export, tamper, needle):
    path = tmp_path / "m.onnx"
    export(path, "first")
    mpath = manifest_path(path)
    if tamper == "json":
        mpath.write_text(mpath.read_text()[:-10])
    elif tamper == "size":
        path.write_bytes(path.read_bytes() + b"\0")
    elif tamper == "sha":  # same size, one byte changed
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))
    else:
        manifest = json.loads(mpath.read_text())
        tamper(manifest)
        mpath.write_text(json.dumps(manifest))
    code, err = _cli(capsys, ["export", "check", str(path)])
    _assert_one_line_error(code, err, str(mpath) if tamper not in ("size", "sha") else str(path), needle,
                           "re-export")
    assert _tree(tmp_path) == {"m.onnx", "m.onnx.json"}


@pytest.mark.parametrize("content", ["random", "truncated", "empty", "text"])
def test_triton_repo_refuses_a_file_that_is_not_onnx(tmp_path, capsys, rng, content):
    model = tmp_path / "m.onnx"
    whole = _graph("first").SerializeToString()
    data = {
        "random": bytes(torch.randint(0, 256, (512,), generator=rng, dtype=torch.uint8).tolist()),
        "truncated": whole[: len(whole) * 2 // 3],
        "empty": b"",
        "text": b"this is not a model\n",
    }[content]
    model.write_bytes(data)
    code, err = _cli(capsys, ["export", "triton-repo", "--model", str(model), "--output", str(tmp_path / "repo")])
    assert code == 2, f"{err} (seed {rng.seed_value})"
    _assert_one_line_error(code, err, str(model), "re-export it")
    assert "not a readable ONNX file" in err or "not a complete ONNX model" in err, err
    assert _tree(tmp_path) == {"m.onnx"}


# ---------------------------------------------------------------------------------------------------
# Permissions: what a plain open(..., "w") / mkdir would give, under the caller's umask
# ---------------------------------------------------------------------------------------------------


@pytest.fixture(params=[0o022, 0o077], ids=["umask022", "umask077"])
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def _mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


def test_outputs_honour_the_umask(tmp_path, umask, export):
    file_mode, dir_mode = 0o666 & ~umask, 0o777 & ~umask
    write_json_atomic(tmp_path / "a.json", {})
    with atomic_path(tmp_path / "b.bin") as tmp:
        tmp.write_bytes(b"b")
    with atomic_dir(tmp_path / "d") as tmp:
        write_json_atomic(tmp / "inner.json", {})
    export(tmp_path / "m.onnx", "first")
    for name in ("a.json", "b.bin", "d/inner.json", "m.onnx", "m.onnx.json"):
        assert _mode(tmp_path / name) == file_mode, (name, oct(_mode(tmp_path / name)), oct(umask))
    assert _mode(tmp_path / "d") == dir_mode, oct(_mode(tmp_path / "d"))


def test_synth_dataset_honours_the_umask(tmp_path, capsys, umask):
    assert main(["data", "synth", "--out", str(tmp_path / "s"), "--num", "1", "--size", "32x32"]) == 0
    out = tmp_path / "s"
    for path in (out, out / "images", out / "panoptic"):
        assert _mode(path) == 0o777 & ~umask, (path, oct(_mode(path)))
    for path in (out / "panoptic.json", out / "images" / "000000.png"):
        assert _mode(path) == 0o666 & ~umask, (path, oct(_mode(path)))
