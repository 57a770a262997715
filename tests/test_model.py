"""The full model: parity with Hugging Face Mask2FormerForUniversalSegmentation (Swin and ResNet backbones)
through ``m2f.from_pretrained``, full-size forwards, the output structure, init and backend handling."""
from __future__ import annotations

import dataclasses
import time

import pytest
import torch

import m2f
from m2f.config import BACKBONE_PRESETS, Mask2FormerConfig
from m2f.errors import BackendUnavailableError, InputError
from tests.utils import TINY_HF_LABELS, TINY_HF_QUERIES, hf_resnet_backbone, perturb_, rel_err, resnet_config, tiny_hf_model

transformers = pytest.importorskip("transformers")

# (B, 3, H, W): non-square; every Swin stage (24x40 .. 3x5) is larger than its window (2), so HF's Swin keeps
# the configured window like the official one does.
INPUT_SHAPE = (2, 3, 96, 160)


def hf_swin_backbone():
    return transformers.SwinConfig(
        embed_dim=16, depths=[2, 1, 2, 2], num_heads=[1, 2, 2, 4], window_size=2, drop_path_rate=0.0,
        out_features=["stage1", "stage2", "stage3", "stage4"],
    )


def save_hf(model, path):
    model.save_pretrained(path)
    return path


@pytest.mark.parametrize("backbone", ["swin", "resnet"])
def test_matches_transformers_through_from_pretrained(backbone, tmp_path, rng):
    hf_backbone = hf_swin_backbone() if backbone == "swin" else hf_resnet_backbone()
    hf = tiny_hf_model(hf_backbone, rng)
    model = m2f.from_pretrained(save_hf(hf, tmp_path / "hf"))
    assert not model.training and model.config.backbone.type == backbone
    assert model.config.num_classes == TINY_HF_LABELS and model.config.class_names == tuple(f"thing{i}" for i in range(TINY_HF_LABELS))
    pixel_values = torch.randn(*INPUT_SHAPE, generator=rng)
    with torch.no_grad():
        out = model(pixel_values)
        ref = hf(pixel_values, output_auxiliary_logits=True)
    assert out.pred_logits.shape == (2, TINY_HF_QUERIES, TINY_HF_LABELS + 1)
    assert out.pred_masks.shape == (2, TINY_HF_QUERIES, 24, 40)
    e_logits = rel_err(out.pred_logits, ref.class_queries_logits)
    e_masks = rel_err(out.pred_masks, ref.masks_queries_logits)
    print(f"{backbone}: rel_err logits {e_logits:.3g}, masks {e_masks:.3g}")
    assert e_logits <= 1e-5, f"{backbone} logits rel_err {e_logits:.3g} (seed {rng.seed_value})"
    assert e_masks <= 1e-5, f"{backbone} masks rel_err {e_masks:.3g} (seed {rng.seed_value})"
    assert len(out.aux_outputs) == len(ref.auxiliary_logits) == 4
    for i, ((logits, masks), aux) in enumerate(zip(out.aux_outputs, ref.auxiliary_logits)):
        assert rel_err(logits, aux["class_queries_logits"]) <= 1e-5, f"aux {i} logits (seed {rng.seed_value})"
        assert rel_err(masks, aux["masks_queries_logits"]) <= 1e-5, f"aux {i} masks (seed {rng.seed_value})"


def small_resnet_config() -> Mask2FormerConfig:
    return resnet_config(hidden_sizes=(32, 32, 64, 64), dim=32, heads=4, ffn_dim=64, queries=6, decoder_layers=4,
                         stem_channels=16)


def test_output_structure_and_odd_input_size(rng):
    torch.manual_seed(rng.seed_value)
    model = m2f.build_model(small_resnet_config()).eval()
    assert model.training is False and model.backend == "torch"
    x = torch.randn(1, 3, 70, 98, generator=rng)  # not a multiple of 32
    with torch.no_grad():
        out = model(x)
    assert isinstance(out, m2f.Mask2FormerOutput)
    assert out.pred_logits.shape == (1, 6, 4)
    assert out.pred_masks.shape[:2] == (1, 6) and out.pred_masks.shape[2:] == (18, 25)
    assert len(out.aux_outputs) == 4  # initial prediction + layers 1..3
    assert all(a[0].shape == out.pred_logits.shape and a[1].shape == out.pred_masks.shape for a in out.aux_outputs)
    assert all(torch.isfinite(t).all() for t in (out.pred_logits, out.pred_masks))
    with pytest.raises(dataclasses.FrozenInstanceError):
        out.pred_logits = out.pred_masks  # type: ignore[misc]
    with pytest.raises(InputError, match=r"\(B, 3, H, W\)"):
        model(x[:, :2])


def test_model_exports_with_dynamic_image_size(rng):
    """torch.export with symbolic H and W (multiples of 32): no data-dependent ops or value-based branching
    anywhere (spatial shapes come from tensor shapes), and the exported program agrees at another size."""
    from torch.export import Dim

    torch.manual_seed(rng.seed_value)
    model = m2f.build_model(small_resnet_config()).eval()
    perturb_(model, rng)
    h, w = Dim("h", min=2, max=64), Dim("w", min=2, max=64)
    exported = torch.export.export(
        model, (torch.randn(1, 3, 96, 128, generator=rng),), dynamic_shapes={"pixel_values": {2: 32 * h, 3: 32 * w}}
    )
    x = torch.randn(1, 3, 160, 64, generator=rng)
    with torch.no_grad():
        got, want = exported.module()(x), model(x)
    assert got.pred_masks.shape == (1, 6, 40, 16)
    assert rel_err(got.pred_masks, want.pred_masks) <= 1e-6, f"seed {rng.seed_value}"
    assert rel_err(got.aux_outputs[0][0], want.aux_outputs[0][0]) <= 1e-6, f"seed {rng.seed_value}"


def test_build_model_trains_and_rejects_unknown_backend():
    model = m2f.build_model(small_resnet_config())
    assert model.training
    assert {n.split(".")[0] for n, _ in model.named_parameters()} == {"backbone", "pixel_decoder", "transformer_decoder"}
    x = torch.randn(2, 3, 64, 64)
    out = model(x)
    loss = out.pred_logits.square().mean() + out.pred_masks.square().mean() + sum(
        l.square().mean() + m.square().mean() for l, m in out.aux_outputs
    )
    loss.backward()
    dec = model.transformer_decoder
    assert dec.query_feat.weight.grad is not None and dec.query_feat.weight.grad.abs().sum() > 0
    # the offsets / weights projections start at zero (Deformable DETR's init) but do get gradients
    attn = model.pixel_decoder.transformer.encoder.layers[0].self_attn
    assert attn.attention_weights.weight.grad.abs().sum() > 0 and attn.sampling_offsets.weight.grad.abs().sum() > 0
    with pytest.raises(BackendUnavailableError, match="unknown backend"):
        m2f.Mask2Former(small_resnet_config(), backend="cuda-magic")
    with pytest.raises(BackendUnavailableError, match="unknown backend"):
        m2f.from_pretrained("/nonexistent", backend="cuda-magic")


def test_backend_is_held_by_the_attention_leaves_only(monkeypatch, rng):
    """Only the modules that call a kernel hold ``backend``; ``set_backend`` validates once and switches what they
    call, and the model's ``backend`` (and its repr) reads it back from them."""
    import m2f.pixel_decoder
    import m2f.transformer_decoder

    model = m2f.build_model(small_resnet_config(), backend="auto").eval()
    holders = {type(m) for m in model.modules() if "backend" in vars(m)}
    assert holders == {m2f.pixel_decoder.MultiScaleDeformableAttention, m2f.transformer_decoder.CrossAttentionLayer}
    assert model.backend == "auto" and model.extra_repr().startswith("backend='auto'")

    called: list[tuple[str, str]] = []

    def recording(module, name: str):
        real = getattr(module, name)

        def op(*args, backend: str):
            called.append((name, backend))
            return real(*args, backend="torch")  # the CPU runs the reference whatever was asked for
        monkeypatch.setattr(module, name, op)

    recording(m2f.pixel_decoder, "ms_deform_attn")
    recording(m2f.transformer_decoder, "masked_attention_from_logits")
    x = torch.randn(1, 3, 64, 96, generator=rng)
    for backend in ("triton", "torch"):
        called.clear()
        assert model.set_backend(backend) is model and model.backend == backend
        with torch.no_grad():
            model(x)
        assert {name for name, _ in called} == {"ms_deform_attn", "masked_attention_from_logits"}
        assert {b for _, b in called} == {backend}, f"{backend}: the leaves called {called}"

    with pytest.raises(BackendUnavailableError, match=r"^unknown backend 'cuda'; choose one of auto, torch, triton$"):
        model.set_backend("cuda")
    assert model.backend == "torch"  # refused before any leaf changed
    model.transformer_decoder.transformer_cross_attention_layers[0].backend = "triton"  # one leaf, by hand
    assert model.backend == "mixed"


@pytest.mark.parametrize("backbone", ["swin-t", "r50"])
def test_full_size_panoptic_architecture_forward(backbone, rng):
    cfg = Mask2FormerConfig(backbone=BACKBONE_PRESETS[backbone], num_classes=133)
    torch.manual_seed(rng.seed_value)
    model = m2f.build_model(cfg).eval()
    x = torch.randn(1, 3, 256, 384, generator=rng)
    with torch.no_grad():
        start, cpu_start = time.perf_counter(), time.process_time()
        out = model(x)
        elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    print(f"{backbone} 1x3x256x384 forward: {elapsed:.2f} s wall, {cpu:.2f} s CPU ({torch.get_num_threads()} threads)")
    assert out.pred_logits.shape == (1, 100, 134)
    assert out.pred_masks.shape == (1, 100, 64, 96)
    assert len(out.aux_outputs) == 9
    assert torch.isfinite(out.pred_logits).all() and torch.isfinite(out.pred_masks).all()
