"""Where a Mask2Former forward spends its GPU time: per stage (CUDA events) and per kernel (torch.profiler).

    python -m m2f.bench.profile_model --out DIR [--presets r50-coco-panoptic] [--size 1024x1024] [--batch 1]
        [--variants torch:float32,triton:float32,triton:bfloat16]

For every variant (backend:dtype; bfloat16 casts the model and input): median milliseconds of the backbone,
pixel decoder and transformer decoder run separately, of the whole forward, and the 15 kernels that take the
most GPU time. Writes ``profile.json`` (every number printed) to --out. GPU only.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

import m2f
from m2f.bench.common import environment, time_fn
from m2f.io import write_json_atomic

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def cuda_median_ms(fn) -> float:
    return time_fn(fn, warmup_ms=50.0, rep_ms=200.0).median_ms


def profile_variant(preset: str, backend: str, dtype: torch.dtype, height: int, width: int, batch: int) -> dict:
    torch.manual_seed(0)
    model = m2f.build_model(m2f.preset(preset), backend=backend).eval().cuda().to(dtype)
    x = torch.randn(batch, 3, height, width, device="cuda", dtype=dtype)
    with torch.no_grad():
        features = model.backbone(x)
        pixel = model.pixel_decoder(features)
        stages = {
            "backbone": cuda_median_ms(lambda: model.backbone(x)),
            "pixel_decoder": cuda_median_ms(lambda: model.pixel_decoder(features)),
            "transformer_decoder": cuda_median_ms(
                lambda: model.transformer_decoder(pixel.multi_scale_features, pixel.mask_features)),
            "forward": cuda_median_ms(lambda: model(x)),
        }
        activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
        with torch.profiler.profile(activities=activities) as prof:
            for _ in range(5):
                model(x)
            torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if getattr(e, "device_time_total", getattr(e, "cuda_time_total", 0)) > 0]

    def device_us(e) -> float:
        return float(getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0.0)) / 5

    kernels = sorted((e for e in events if not e.key.startswith("aten::") and not e.key.startswith("m2f::")),
                     key=device_us, reverse=True)
    total_us = sum(device_us(e) for e in kernels)
    top = [{"kernel": e.key[:120], "ms_per_forward": device_us(e) / 1e3, "calls_per_forward": e.count // 5,
            "share": device_us(e) / total_us if total_us else None} for e in kernels[:15]]
    by_cpu = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:12]
    cpu_top = [{"op": e.key[:120], "self_cpu_ms_per_forward": e.self_cpu_time_total / 5e3,
                "calls_per_forward": e.count // 5} for e in by_cpu]
    return {"preset": preset, "cpu_top_ops": cpu_top, "backend": backend, "dtype": str(dtype).replace("torch.", ""), "batch": batch,
            "height": height, "width": width, "stages_ms": stages, "gpu_kernel_ms_per_forward": total_us / 1e3,
            "kernel_launches_per_forward": sum(e.count for e in kernels) // 5, "top_kernels": top}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--presets", default="r50-coco-panoptic")
    p.add_argument("--size", default="1024x1024")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--variants", default="torch:float32,triton:float32,triton:bfloat16")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("profile_model needs a CUDA GPU")
    height, width = (int(v) for v in args.size.split("x"))
    results = []
    for preset in args.presets.split(","):
        for variant in args.variants.split(","):
            backend, dtype = variant.split(":")
            r = profile_variant(preset, backend, DTYPES[dtype], height, width, args.batch)
            results.append(r)
            print(f"\n{preset} {backend} {dtype} b{args.batch} {args.size}: " +
                  ", ".join(f"{k} {v:.2f} ms" for k, v in r["stages_ms"].items()) +
                  f"; GPU kernel time {r['gpu_kernel_ms_per_forward']:.2f} ms in {r['kernel_launches_per_forward']} launches")
            for k in r["top_kernels"]:
                print(f"  {k['ms_per_forward']:7.3f} ms {100 * k['share']:5.1f}% x{k['calls_per_forward']:<4d} {k['kernel'][:90]}")
            print("  host (self CPU time per forward):")
            for c in r["cpu_top_ops"]:
                print(f"  {c['self_cpu_ms_per_forward']:7.3f} ms x{c['calls_per_forward']:<4d} {c['op'][:90]}")
    write_json_atomic(Path(args.out) / "profile.json", {**environment(), "profiles": results})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
