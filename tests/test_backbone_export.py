"""Backbones export: torch.export at a fixed size (no data-dependent control flow, no float64 anywhere) and
ONNX with dynamic batch / height / width (shapes are computed from tensor.shape, never baked in)."""
from __future__ import annotations

import warnings

import pytest
import torch

from m2f.backbones import build_backbone
from m2f.config import ResNetConfig, SwinConfig
from tests.utils import rel_err

CONFIGS = {
    "swin": SwinConfig(embed_dim=16, depths=(2, 1, 1, 1), num_heads=(2, 2, 4, 4), window_size=4, drop_path_rate=0.2),
    "resnet": ResNetConfig(depths=(1, 1, 2, 1), stem_channels=8, hidden_sizes=(16, 24, 32, 48)),
}




@torch.no_grad()
def randomize(model: torch.nn.Module, g: torch.Generator) -> None:
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if not t.is_floating_point():
            continue
        if name.endswith("running_var"):
            t.copy_(torch.rand(t.shape, generator=g) + 0.5)
        elif t.ndim >= 2:
            t.copy_(torch.randn(t.shape, generator=g) / t[0].numel() ** 0.5)
        else:
            t.copy_(0.5 * torch.randn(t.shape, generator=g) + (1.0 if name.endswith("weight") else 0.0))


def make(name: str, g: torch.Generator) -> torch.nn.Module:
    model = build_backbone(CONFIGS[name]).eval()
    randomize(model, g)
    dtypes = {t.dtype for t in model.state_dict().values()}
    assert dtypes <= {torch.float32, torch.int64}, dtypes
    return model


@pytest.mark.parametrize("name", list(CONFIGS))
def test_torch_export_fixed_size(rng, name):
    model = make(name, rng)
    x = torch.randn(2, 3, 83, 117, generator=rng)
    program = torch.export.export(model, (x,))
    float64 = [n for n in program.graph.nodes if getattr(n.meta.get("val"), "dtype", None) == torch.float64]
    assert not float64, f"float64 in the exported graph: {float64[:3]}"
    with torch.no_grad():
        ref = model(x)
    out = program.module()(x)
    for key in ref:
        assert rel_err(out[key], ref[key]) <= 1e-6, (key, rng.seed_value)


@pytest.mark.parametrize("name", ["swin"])  # the ResNet has no size arithmetic of its own
def test_onnx_dynamic_height_width(rng, name, tmp_path):
    onnxruntime = pytest.importorskip("onnxruntime")
    model = make(name, rng)
    names = list(model.out_channels)
    path = tmp_path / f"{name}.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript-based exporter is deprecated in favour of dynamo
        torch.onnx.export(
            model, (torch.randn(2, 3, 157, 243, generator=rng),), str(path), dynamo=False, opset_version=17,
            input_names=["images"], output_names=names,
            dynamic_axes={"images": {0: "batch", 2: "height", 3: "width"},
                          **{n: {0: "batch", 2: f"{n}_h", 3: f"{n}_w"} for n in names}},
        )
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for shape in [(1, 3, 99, 130), (3, 3, 64, 70)]:  # other batch and sizes than at export, odd paddings
        x = torch.randn(*shape, generator=rng)
        outs = session.run(names, {"images": x.numpy()})
        with torch.no_grad():
            ref = model(x)
        for key, out in zip(names, outs):
            assert out.shape == tuple(ref[key].shape), (key, out.shape, ref[key].shape)
            err = rel_err(torch.from_numpy(out), ref[key])
            assert err <= 1e-5, f"{name} {key} at {shape}: rel_err {err:.3g} (seed {rng.seed_value})"
