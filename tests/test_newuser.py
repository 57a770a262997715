"""What a new user meets first: a quiet install, the presets table, the model object's ecosystem methods, export from a
model of any backend on the CPU, check_onnx(path, model), m2f without triton, and quiet exports."""
from __future__ import annotations

import dataclasses
import importlib.util
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import m2f
from m2f.assets import default_checkpoint_path
from m2f.cli import main
from m2f.errors import InputError
from tests.utils import without_progress

pytest.importorskip("onnxruntime")


REPO = Path(__file__).resolve().parents[1]


def test_editable_install_is_quiet(tmp_path):
    """`make install`'s `pip install --quiet -e .` prints nothing: pip >= 25 shows a build backend's warnings even
    under --quiet, and setuptools warns on every editable install of m2f's four-folder layout (build_backend/)."""
    source = tmp_path / "clone"  # a copy, so that the install's m2f.egg-info is not written into this checkout
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(".*", "*.egg-info", "__pycache__", "build", "dist",
                                                                 "demo_out", "out"))
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", tmp_path / "venv"], check=True, timeout=60)
    # this environment's pip and setuptools (the versions `make install` uses), without its installed packages (not
    # imported here: setuptools' distutils shim refuses to load after the standard library's distutils)
    tools = tmp_path / "tools"
    tools.mkdir()
    for name in ("pip", "setuptools", "_distutils_hack"):
        os.symlink(Path(importlib.util.find_spec(name).origin).parent, tools / name)
    site_packages = Path(importlib.util.find_spec("setuptools").origin).parents[1]
    for info in site_packages.glob("setuptools-*.dist-info"):  # its entry points are its commands
        os.symlink(info, tools / info.name)
    python = tmp_path / "venv" / "bin" / "python"
    site = Path(subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], check=True,
                               capture_output=True, text=True, timeout=60).stdout.strip())
    (site / "build_tools.pth").write_text(f"{tools}\n")
    shutil.copy(site_packages / "distutils-precedence.pth", site)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env["PIP_CONFIG_FILE"] = os.devnull  # this machine's pip settings are not the project's
    run = subprocess.run([python, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--no-index",
                          "-e", str(source)], capture_output=True, text=True, timeout=300, env=env)
    assert run.returncode == 0, run.stderr
    assert (run.stdout, run.stderr) == ("", ""), run.stdout + run.stderr
    # the editable install finds m2f in the clone, and m2f.kernels / m2f.export / m2f.bench in its root folders
    found = subprocess.run([python, "-c", "import importlib.util; print(importlib.util.find_spec('m2f').origin)"],
                           cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert found.stdout.strip() == str(source / "m2f" / "__init__.py"), found.stderr
    finder = next(site.glob("__editable__*finder.py")).read_text()
    for name, folder in (("m2f.kernels", "kernels"), ("m2f.export", "export"), ("m2f.bench", "bench")):
        assert f"'{name}': '{source / folder}'" in finder, finder


@pytest.fixture(scope="module")
def default_model():
    return m2f.Mask2Former.from_pretrained(default_checkpoint_path())


def test_presets_table_names_the_official_config_files(capsys):
    assert main(["presets"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:5] == ["preset", "backbone", "dataset", "task", "queries"]
    rows = {line.split()[0]: line for line in lines[1:-1]}
    assert sorted(rows) == sorted(m2f.preset_names())
    assert rows["swin-l-coco-panoptic"].split()[3:6] == ["panoptic", "200", "133"]
    assert rows["r50-coco-panoptic"].endswith("configs/coco/panoptic-segmentation/maskformer2_R50_bs16_50ep.yaml")
    assert rows["swin-l-coco-panoptic"].endswith(
        "configs/coco/panoptic-segmentation/swin/maskformer2_swin_large_IN21k_384_bs16_100ep.yaml")
    assert rows["swin-b-ade20k-semantic"].endswith("swin/maskformer2_swin_base_IN21k_384_bs16_160k_res640.yaml")
    assert "1024 / 2048" in rows["r50-cityscapes-semantic"]


def test_model_behaves_as_the_ecosystem_expects(default_model, tmp_path, rng):
    assert {"Mask2Former", "from_pretrained", "save_pretrained", "build_model", "preset"} <= set(dir(m2f))
    assert default_model.device == torch.device("cpu") and not default_model.training
    default_model.save_pretrained(tmp_path / "copy")
    with pytest.raises(m2f.M2FError, match=r"copy already exists; pass force=True"):
        default_model.save_pretrained(tmp_path / "copy")
    again = m2f.Mask2Former.from_pretrained(tmp_path / "copy")
    assert again.config == default_model.config
    for name, tensor in default_model.state_dict().items():
        assert torch.equal(tensor, again.state_dict()[name]), name


def test_post_process_defaults_come_from_the_config(default_model, rng):
    from m2f import postprocess
    from m2f.preprocess import preprocess

    image = (torch.rand(70, 90, 3, generator=rng) * 255).to(torch.uint8).numpy()
    batch = preprocess([image], default_model.config)
    with torch.no_grad():
        out = default_model(batch.pixel_values)
    cfg = default_model.config
    args = (out.pred_logits, out.pred_masks, batch.image_sizes, batch.original_sizes, batch.padded_size)
    explicit = postprocess.panoptic(*args, thing_classes=cfg.thing_classes,
                                    object_mask_threshold=cfg.postprocess.object_mask_threshold,
                                    overlap_threshold=cfg.postprocess.overlap_threshold)[0]
    implicit = default_model.post_process(out, batch)[0]
    assert torch.equal(explicit.segmentation, implicit.segmentation) and explicit.segments == implicit.segments
    # a config that keeps no query (threshold 1: no probability exceeds it) gives an empty result through run()
    strict = cfg.replace(postprocess=dataclasses.replace(cfg.postprocess, object_mask_threshold=1.0))
    assert postprocess.run(out, batch, strict)[0].segments == []
    top3 = cfg.replace(postprocess=dataclasses.replace(cfg.postprocess, instance_topk=3))
    assert len(postprocess.run(out, batch, top3, task="instance")[0]) <= 3
    with pytest.raises(InputError, match=r"task must be one of panoptic, instance, semantic, got 'depth'"):
        postprocess.run(out, batch, cfg, task="depth")


def test_export_and_check_a_triton_backend_model_on_the_cpu(tmp_path, monkeypatch):
    """The README's Python snippet: a model built with backend="triton" exports on a CPU (the graph holds the standard
    ops) and check_onnx takes the model positionally."""
    from m2f.export import check_onnx, to_onnx

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # a plain CPU user: the Triton kernels cannot run here
    cfg = m2f.Mask2Former.from_pretrained(default_checkpoint_path()).config
    model = m2f.build_model(cfg, backend="triton").eval()
    to_onnx(model, tmp_path / "m.onnx", height=64, width=64)
    report = check_onnx(tmp_path / "m.onnx", model)
    assert report.verdict == "pass", report.reasons
    with pytest.raises(InputError, match=r"check_onnx's second argument must be a checkpoint path or an m2f model, "
                                         r"got int; call check_onnx\(path, model\)"):
        check_onnx(tmp_path / "m.onnx", 3)
    with pytest.raises(InputError, match=r"check_onnx got two models"):
        check_onnx(tmp_path / "m.onnx", model, model=model)


# Makes every `import triton` fail, as on macOS / Windows or a CPU-only Linux install without it.
_NO_TRITON = """
import importlib.abc, sys
class _NoTriton(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "triton" or name.startswith("triton."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, _NoTriton())
"""


def test_m2f_works_without_triton(tmp_path, rng):
    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=rng))
    script = _NO_TRITON + textwrap.dedent(f"""
        import sys, torch, m2f
        from m2f.cli import main
        from m2f.errors import BackendUnavailableError
        assert main(["export", "onnx", "--checkpoint", {str(default_checkpoint_path())!r}, "--output", "m.onnx",
                     "--height", "64", "--width", "64"]) == 0
        model = m2f.from_pretrained({str(default_checkpoint_path())!r}, backend="torch")
        torch.manual_seed({seed})
        with torch.no_grad():
            out = model(torch.randn(1, 3, 64, 64))
        assert torch.isfinite(out.pred_logits).all()
        try:
            m2f.from_pretrained({str(default_checkpoint_path())!r}, backend="triton")
        except BackendUnavailableError as exc:
            print("refused:", exc)
        assert "triton" not in sys.modules
    """)
    run = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "TRITON_INTERPRET": "0"})
    assert run.returncode == 0, f"seed {seed}: {run.stderr}"
    assert (tmp_path / "m.onnx").is_file()
    assert "refused: backend='triton' needs the triton package: pip install 'triton>=3.6' (or use backend='torch')" \
        in run.stdout


def test_the_kernel_ops_stay_registered_when_transformers_probes_a_checkouts_kernels_folder():
    """From a checkout's root (its working directory on sys.path, as under pytest), ``import transformers`` probes
    Hugging Face's kernel-hub package by importing ``kernels``, which finds this repository's folder. That import
    must not define the m2f:: ops a second time: torch.library would delete m2f.kernels' definitions, leaving its
    op handles dangling (seen as ``ValueError: vector::reserve`` and crashes in later kernel calls)."""
    script = textwrap.dedent("""
        import importlib, sys
        import torch._library.custom_ops as custom_ops
        ops = {"ms_deform_attn": importlib.import_module("m2f.kernels.ms_deform_attn.op").ms_deform_attn_op,
               "masked_attention": importlib.import_module("m2f.kernels.masked_attention.op").masked_attention_op}
        import transformers.models.mask2former.modeling_mask2former  # noqa: F401 - the probe
        for name, op in ops.items():
            assert custom_ops.OPDEF_TO_LIB[f"m2f::{name}"] is op._lib, f"m2f::{name} was defined again"
        import kernels
        loaded = sorted(name for name in sys.modules if name.startswith("kernels."))
        assert kernels.__all__ == [] and not loaded, loaded
        try:
            import kernels.ms_deform_attn  # noqa: F401
        except ImportError:
            print("no submodule")
    """)
    run = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout == "no submodule\n"


def test_export_onnx_prints_no_warnings(tmp_path):
    run = subprocess.run([sys.executable, "-m", "m2f", "export", "onnx", "--checkpoint", str(default_checkpoint_path()),
                          "--output", "m.onnx", "--height", "64", "--width", "96"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    assert without_progress(run.stderr) == [], run.stderr  # stage lines only: no warning
    assert run.stdout.startswith("wrote m.onnx") and len(run.stdout.splitlines()) == 1
