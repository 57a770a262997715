"""``m2f demo``: the whole product on the embedded default model, in about a minute on a laptop CPU.

1. load the shipped default model (m2f/assets/default: trained by ``m2f train`` on ``m2f data synth`` scenes);
2. segment the bundled sample images (panoptic) and write overlays + COCO-format outputs;
3. export the model to ONNX and verify it with ONNX Runtime against PyTorch on those images;
4. time PyTorch and ONNX Runtime on one image and print a table.

Everything goes to ``--out`` (default ``demo_out``), replaced as a whole when the run succeeds; ``demo.json`` there
records every number printed.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from m2f.errors import InputError


# what a demo run writes into --out: a folder holding anything else is not replaced
DEMO_OWNED = ("predictions/*", "model.onnx", "model.onnx.json", "demo.json")


def register(sub: argparse._SubParsersAction) -> None:
    from m2f.cli.options import add_device_option, add_out_option, add_quiet_option, add_threads_option

    p = sub.add_parser("demo", help="segment the bundled samples with the default model, export, verify, time")
    add_out_option(p, "output folder, replaced on success (only if it holds nothing but an earlier demo's files)",
                   default="demo_out", old=("--output",))
    add_device_option(p)
    p.add_argument("--repeats", type=int, default=10, metavar="N",
                   help="timed runs per backend, after one warm-up run (the median is reported)")
    p.add_argument("--no-export", action="store_true", help="skip the ONNX export, check and ONNX Runtime timing")
    add_threads_option(p)
    add_quiet_option(p)
    p.set_defaults(func=run)


def _random_fallback_config():
    from m2f.config import Mask2FormerConfig, PixelDecoderConfig, ResNetConfig, TransformerDecoderConfig

    return Mask2FormerConfig(
        backbone=ResNetConfig(depths=(1, 1, 1, 1), block="basic", stem_channels=16, hidden_sizes=(16, 32, 64, 128)),
        pixel_decoder=PixelDecoderConfig(conv_dim=64, mask_dim=64, num_encoder_layers=2, ffn_dim=128),
        transformer_decoder=TransformerDecoderConfig(hidden_dim=64, num_queries=16, ffn_dim=128, num_layers=3),
        num_classes=6,
        test_size=(128, 512),  # the bundled samples' size, like the trained default model
        name="random-fallback",
    )


def _load_default_model(device: str) -> tuple[Any, str, bool]:
    """The shipped model, or (saying so) a random-weights one if the package lacks it."""
    from m2f.assets import default_checkpoint_path
    from m2f.checkpoints import from_pretrained
    from m2f.errors import CheckpointError

    try:
        path = default_checkpoint_path()
    except CheckpointError:
        from m2f.model import build_model

        print("warning: the trained default model is missing from this install: using RANDOM weights")
        return build_model(_random_fallback_config()).eval().to(device), "random weights", False
    return from_pretrained(path, device=device), str(path), True


def run(args: argparse.Namespace) -> int:
    from m2f import runtime
    from m2f.cli.predict import notes_to_stderr

    runtime.set_quiet(args.quiet)
    with notes_to_stderr(args.quiet):
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    import torch

    from m2f import runtime
    from m2f.assets import sample_images
    from m2f.cli.predict import ImageEntry, image_ids_for, output_names, predict_entries, unique_stems
    from m2f.io import atomic_dir, write_json_atomic
    from m2f.outputs import check_only_owned
    from m2f.preprocess import load_image, preprocess

    if args.repeats < 1:
        raise InputError("--repeats must be at least 1")
    threads = runtime.use_threads(args.threads)
    device = runtime.resolve_device(args.device)
    check_only_owned(Path(args.out), DEMO_OWNED, "`m2f demo`")
    samples = sample_images()
    if not samples:
        raise InputError("the bundled sample images are missing from this install (m2f/assets/samples)")

    started = time.perf_counter()
    model, source, trained = _load_default_model(device)
    config = model.config
    images = [load_image(p) for p in samples]
    summary: dict[str, Any] = {"model": source, "trained": trained, "config": config.name, "device": device,
                               "threads": threads, "repeats": args.repeats, "warmup_runs": 1,
                               "images": [str(p) for p in samples]}

    with atomic_dir(args.out) as work:
        # 2. segment the samples
        entries = []
        stems = unique_stems(samples)
        for path, stem, image_id, image in zip(samples, stems, image_ids_for(stems), images):
            entry = ImageEntry(path=path, stem=stem, image_id=image_id, height=image.shape[0],
                               width=image.shape[1])
            entry.outputs = output_names(stem, "panoptic")
            entries.append(entry)
        resize_shortest, max_size = config.test_size  # as `m2f predict` does by default
        predict_entries(model, entries, "panoptic", work / "predictions", device=device,
                        resize_shortest=resize_shortest, max_size=max_size, progress=not args.quiet)
        summary["outputs"] = sorted(str(p.relative_to(work)) for p in (work / "predictions").iterdir())

        # 4a. PyTorch timing on the first image
        batch = preprocess(images[:1], config, *config.test_size, device=device)
        with torch.inference_mode():
            torch_ms = runtime.median_ms(lambda: model(batch.pixel_values), args.repeats)
        rows = [("PyTorch eager", device, torch_ms, "reference")]

        if not args.no_export:
            rows += _export_and_verify(model, images, work, device, args.repeats, summary)
        summary["timings_ms"] = {name: ms for name, _, ms, _ in rows}
        summary["wall_s"] = round(time.perf_counter() - started, 2)
        write_json_atomic(work / "demo.json", summary)

    _print_table(rows, summary, Path(args.out))
    return 0


def _export_and_verify(model: Any, images: list, work: Path, device: str, repeats: int,
                       summary: dict[str, Any]) -> list[tuple[str, str, float, str]]:
    """Export at the samples' size, compare ONNX Runtime with PyTorch on every sample, time ONNX Runtime."""
    import numpy as np
    import onnxruntime as ort
    import torch

    from m2f import postprocess as post
    from m2f import runtime
    from m2f.export import to_onnx
    from m2f.preprocess import preprocess

    config = model.config
    batch = preprocess(images, config, *config.test_size, device="cpu")
    height, width = batch.padded_size
    onnx_path = work / "model.onnx"
    t0 = time.perf_counter()
    with runtime.stage("exporting the model to ONNX"):
        to_onnx(model.cpu(), onnx_path, height=height, width=width, batch=1, force=True)
    summary["export_s"] = round(time.perf_counter() - t0, 2)
    model.to(device)
    session = ort.InferenceSession(str(onnx_path), runtime.ort_session_options(),
                                   providers=["CPUExecutionProvider"])

    worst: dict[str, float] = {"pred_logits": 0.0, "pred_masks": 0.0}
    same_panoptic = 0
    for i in range(len(images)):
        x = batch.pixel_values[i : i + 1]
        with torch.inference_mode():
            ref = model(x.to(device))
        got = dict(zip(["pred_logits", "pred_masks"],
                       session.run(["pred_logits", "pred_masks"], {"pixel_values": x.numpy()})))
        for name, ref_t in (("pred_logits", ref.pred_logits), ("pred_masks", ref.pred_masks)):
            r = ref_t.float().cpu().numpy().astype(np.float64)
            err = float(np.linalg.norm(got[name] - r) / max(np.linalg.norm(r), 1e-30))
            worst[name] = max(worst[name], err)
        size = ([batch.image_sizes[i]], [batch.original_sizes[i]], batch.padded_size)
        a = post.panoptic(ref.pred_logits.cpu(), ref.pred_masks.cpu(), *size, thing_classes=config.thing_classes)[0]
        b = post.panoptic(torch.from_numpy(got["pred_logits"]), torch.from_numpy(got["pred_masks"]), *size,
                          thing_classes=config.thing_classes)[0]
        same_panoptic += int(torch.equal(a.segmentation, b.segmentation)
                             and [(s.id, s.label) for s in a.segments] == [(s.id, s.label) for s in b.segments])
    summary["onnx"] = {"file": str(onnx_path.name), "rel_err": worst,
                       "identical_panoptic": f"{same_panoptic}/{len(images)}"}

    x0 = batch.pixel_values[:1].numpy()
    ort_ms = runtime.median_ms(lambda: session.run(None, {"pixel_values": x0}), repeats)
    note = (f"logits rel err {worst['pred_logits']:.1e}, masks {worst['pred_masks']:.1e}, "
            f"panoptic identical {same_panoptic}/{len(images)}")
    return [("ONNX Runtime", "cpu", ort_ms, note)]


def _print_table(rows: list[tuple[str, str, float, str]], summary: dict[str, Any], out: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    weights = "trained on synthetic scenes" if summary["trained"] else "RANDOM weights (no trained default)"
    table = Table(title=f"m2f demo: {summary['config'] or 'default model'} ({weights}), one image",
                  caption=f"median of {summary['repeats']} runs after {summary['warmup_runs']} warm-up run, "
                          f"{summary['threads']} CPU thread(s) (--threads)")
    table.add_column("backend")
    table.add_column("device")
    table.add_column("median ms", justify="right")
    table.add_column("check")
    for name, device, ms, note in rows:
        table.add_row(name, device, f"{ms:.1f}", note)
    console.print(table)
    console.print(f"segmented {len(summary['images'])} sample images -> {out / 'predictions'} "
                  f"(overlays *_overlay.png, COCO panoptic PNG + JSON); summary {out / 'demo.json'}; "
                  f"{summary['wall_s']} s in all")
