"""`m2f bench model` / `m2f bench report` on the CPU with a tiny config: rows, shared weights, agreement, files,
error rows, the README table, bad input. (The GPU backends are exercised by the GPU session, not here.)"""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from m2f.bench import model as bench_model
from m2f.bench.common import BenchRow, environment, write_results
from m2f.cli import main
from m2f.config import Mask2FormerConfig, PixelDecoderConfig, ResNetConfig, TransformerDecoderConfig
from m2f.errors import InputError
from tests.utils import fresh_seed

pytest.importorskip("transformers")

SCHEMA_ROW_KEYS = {"suite", "case", "backend", "dtype", "batch", "height", "width", "median_ms", "p90_ms",
                   "peak_mem_mb", "rel_err"}


def tiny_config(**pixel) -> Mask2FormerConfig:
    """Small, and expressible as a HF Mask2Former (32 norm groups, one head count, 4 points, 3 levels)."""
    return Mask2FormerConfig(
        backbone=ResNetConfig(depths=(1, 1, 1, 1), stem_channels=16, hidden_sizes=(32, 32, 64, 64)),
        pixel_decoder=PixelDecoderConfig(**{"conv_dim": 32, "mask_dim": 32, "num_encoder_layers": 1, "num_heads": 4,
                                            "ffn_dim": 64, **pixel}),
        transformer_decoder=TransformerDecoderConfig(hidden_dim=32, num_queries=6, num_heads=4, ffn_dim=48, num_layers=2),
        num_classes=5, thing_classes=(0, 1, 2), name="tiny-r",
    )


def strict_json(path):
    def reject(constant):
        raise AssertionError(f"{path} holds {constant}: not strict JSON")

    return json.loads(path.read_text(), parse_constant=reject)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models on a shared CPU: one intra-op thread is ~5x faster than threads fighting other jobs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    """One CPU run through the CLI: hf-eager + m2f-torch at 64x96, batch 1 and 2, float32 (+ two skipped backends)."""
    out = tmp_path_factory.mktemp("bench")
    seed = fresh_seed("cli_run")
    argv = ["bench", "model", "--device", "cpu", "--config", json.dumps(tiny_config().to_dict()), "--sizes", "64x96",
            "--batch", "1,2", "--dtype", "float32", "--backends", "hf-eager,m2f-torch,m2f-triton,onnxruntime",
            "--out", str(out), "--rep-ms", "20", "--warmup-ms", "20", "--seed", str(seed), "--no-progress"]
    assert main(argv) == 0
    files = sorted(out.iterdir())
    return out, files, seed


def test_rows_shared_weights_and_agreement(cli_run):
    out, files, seed = cli_run
    assert {f.suffix for f in files} == {".json", ".md", ".png"} and all(f.name.endswith("-model" + f.suffix) for f in files)
    data = strict_json(next(f for f in files if f.suffix == ".json"))
    assert {"device", "torch", "triton", "git_sha", "created", "rows", "suite", "skipped"} <= set(data)
    assert data["suite"] == "model" and data["settings"]["seed"] == seed
    rows = data["rows"]
    assert sorted((r["backend"], r["batch"]) for r in rows) == [("hf-eager", 1), ("hf-eager", 2), ("m2f-torch", 1),
                                                                ("m2f-torch", 2)]
    for r in rows:
        msg = f"{r['backend']} b{r['batch']} (seed {seed})"
        assert SCHEMA_ROW_KEYS <= set(r), msg
        assert r["suite"] == "model" and r["case"] == "tiny-r" and (r["height"], r["width"]) == (64, 96), msg
        assert "error" not in r["extra"], f"{msg}: {r['extra'].get('error')}"
        assert 0 < r["median_ms"] <= r["p90_ms"], msg
        assert r["extra"]["images_per_s"] == pytest.approx(r["batch"] * 1e3 / r["median_ms"]), msg
        assert r["extra"]["precision"] == "float32", msg
        for key in ("panoptic_pixel_agreement", "panoptic_same", "semantic_pixel_agreement", "rel_err_masks"):
            assert key in r["extra"], f"{msg}: {key}"
        # same weights through the converter: HF eager agrees with m2f-torch to float32 rounding
        bound = 0.0 if r["backend"] == "m2f-torch" else 1e-4
        print(f"{msg}: {r['median_ms']:.1f} ms, rel err logits {r['rel_err']:.3g} masks {r['extra']['rel_err_masks']:.3g}")
        assert r["rel_err"] <= bound and r["extra"]["rel_err_masks"] <= bound, msg
        # Random weights give near-uniform class scores: float32 rounding (~1e-7) may flip an argmax at a near-tie,
        # so agreement is ~1, not exactly 1 (m2f-torch against itself is exact).
        exact = r["backend"] == "m2f-torch"
        for key in ("panoptic_pixel_agreement", "semantic_pixel_agreement"):
            assert r["extra"][key] == 1.0 if exact else r["extra"][key] >= 0.98, f"{msg}: {key} {r['extra'][key]}"
        assert r["extra"]["panoptic_same"] is True or not exact, msg
    skipped = " | ".join(data["skipped"])
    assert "m2f-triton float32: skipped: Triton kernels need a CUDA GPU" in skipped
    assert "onnxruntime float32: skipped: no CUDA provider in onnxruntime" in skipped
    md = next(f for f in files if f.suffix == ".md").read_text()
    assert "## Speedup over hf-eager float32" in md and "| tiny-r | 1 | 64×96 | 1.00× |" in md
    assert next(f for f in files if f.suffix == ".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_failing_backend_is_recorded_and_the_run_goes_on(tmp_path, monkeypatch, rng):
    def boom(self, x, batch):
        raise RuntimeError("simulated kernel failure")

    monkeypatch.setattr(bench_model.HFRunner, "prepare", boom)
    result = bench_model.run([("tiny-r", tiny_config())], sizes=[(32, 64)], batches=[1], dtypes=[torch.float32],
                             backends=["hf-eager", "m2f-torch"], device=torch.device("cpu"), warmup_ms=0, rep_ms=5,
                             seed=rng.seed_value, progress=False)
    hf, ours = result.rows
    assert hf.backend == "hf-eager" and hf.median_ms is None and "simulated kernel failure" in hf.extra["error"]
    assert ours.backend == "m2f-torch" and ours.median_ms > 0 and ours.rel_err == 0.0, f"seed {rng.seed_value}"
    paths = bench_model.write(result, tmp_path)
    data = strict_json(paths["json"])
    assert data["rows"][0]["median_ms"] is None and "error" in data["rows"][0]["extra"]
    assert "## Errors" in paths["md"].read_text()


def test_hf_twin_rejects_what_hf_cannot_build():
    bench_model.hf_config_for(tiny_config())  # expressible
    with pytest.raises(InputError, match="cannot be expressed as a Hugging Face Mask2Former"):
        bench_model.hf_config_for(tiny_config(num_points=2))


def test_report_between_markers_is_idempotent(cli_run, tmp_path, capsys):
    out, files, _ = cli_run
    results = tmp_path / "results"
    results.mkdir()
    model_json = next(f for f in files if f.suffix == ".json")
    (results / model_json.name).write_text(model_json.read_text())
    kernel_rows = [BenchRow("kernels", "ms_deform_attn/fwd", "triton", "float32", 1, 512, 512, 0.5, 0.6,
                            extra={"speedup": 3.0}),
                   BenchRow("kernels", "ms_deform_attn/fwd", "torch-grid_sample", "float32", 1, 512, 512, 1.5, 1.6)]
    write_results(kernel_rows, results, suite="kernels-ms_deform_attn", title="k", env=environment())
    readme = tmp_path / "README.md"
    readme.write_text("# m2f\n\nintro\n\n<!-- perf-table:start -->\nold table\n<!-- perf-table:end -->\n\nafter\n")
    assert main(["bench", "report", "--results", str(results), "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert text.startswith("# m2f\n\nintro\n\n<!-- perf-table:start -->\n") and text.endswith("<!-- perf-table:end -->\n\nafter\n")
    assert "old table" not in text and "speedup vs hf-eager fp32" in text
    assert "| tiny-r | hf-eager | float32 | 1 | 64×96 |" in text and "1.00× |" in text
    assert "| ms_deform_attn | ms_deform_attn/fwd | triton | float32 | 1 | 512×512 | 0.5 | 3.00× |" in text
    assert "torch-grid_sample" not in text  # kernel rows without a speedup are left out of the compact table
    assert main(["bench", "report", "--results", str(results), "--readme", str(readme)]) == 0
    assert readme.read_text() == text

    plain = tmp_path / "PLAIN.md"
    plain.write_text("# no markers\n")
    capsys.readouterr()
    assert main(["bench", "report", "--results", str(results), "--readme", str(plain)]) == 0
    printed = capsys.readouterr().out
    assert "| tiny-r | hf-eager |" in printed and "has no <!-- perf-table:start -->" in printed
    assert plain.read_text() == "# no markers\n"


@pytest.mark.parametrize("args, message", [
    (["--sizes", "64x90"], "not a multiple of 32"),
    (["--sizes", "64by96"], "bad size"),
    (["--backends", "hf-eager,tensorrt"], "unknown backend tensorrt"),
    (["--models", "r51-coco-panoptic"], "unknown model r51-coco-panoptic"),
    (["--dtype", "float16"], "float32 and bfloat16 only"),
    (["--batch", "0"], "must be positive"),
    (["--config", "/nonexistent/cfg.json"], "no such file"),
    (["--config", "{\"bogus\": 1}"], "not an m2f config"),
])
def test_cli_bad_input_is_one_line_exit_2(args, message, capsys, tmp_path):
    code = main(["bench", "model", "--device", "cpu", "--out", str(tmp_path), *args])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("m2f: error: ") and message in err and err.count("\n") == 1, err
    assert not list(tmp_path.iterdir())


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_cli_cuda_without_gpu(capsys):
    assert main(["bench", "model", "--device", "cuda"]) == 2
    assert "no CUDA GPU found" in capsys.readouterr().err


def test_cli_help():
    out = subprocess.run([sys.executable, "-m", "m2f", "bench", "model", "--help"], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0 and "--compile-batches" in out.stdout and "--backends" in out.stdout


def test_time_budget_skips_and_marks_incomplete():
    result = bench_model.run([("tiny-r", tiny_config())], sizes=[(32, 64)], batches=[1, 2],
                             dtypes=[torch.float32, torch.bfloat16], backends=["hf-eager", "m2f-torch"],
                             device=torch.device("cpu"), budget_s=0.0, progress=False)
    assert result.rows == [] and not result.complete
    assert len(result.skipped) == 4 and all("time budget of 0 s spent" in s for s in result.skipped)
