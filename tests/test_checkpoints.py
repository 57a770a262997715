"""Checkpoint loading: official detectron2 .pkl / .pth, m2f's own format, HF config translation, bad inputs."""
from __future__ import annotations

import json
import os
import pickle
import random

import numpy as np
import pytest
import torch

import m2f
from m2f.checkpoints import from_pretrained, read_checkpoint, save_pretrained
from m2f.checkpoints.hf import config_from_hf
from m2f.config import Mask2FormerConfig, PixelDecoderConfig, ResNetConfig, SwinConfig, TransformerDecoderConfig
from m2f.errors import CheckpointError, M2FError
from tests.test_model import hf_resnet_backbone, tiny_hf_model
from tests.test_pixel_decoder import perturb_
from tests.utils import fresh_seed

ENC_LAYERS, DEC_LAYERS = 2, 3


def d2_config(backbone: str = "resnet") -> Mask2FormerConfig:
    if backbone == "swin":
        bb = SwinConfig(embed_dim=16, depths=(2, 1, 1, 2), num_heads=(1, 2, 2, 4), window_size=3)
    else:
        bb = ResNetConfig(depths=(1, 2, 1, 1), stem_channels=16, hidden_sizes=(32, 64, 96, 128))
    return Mask2FormerConfig(
        backbone=bb,
        pixel_decoder=PixelDecoderConfig(conv_dim=32, mask_dim=32, num_encoder_layers=ENC_LAYERS, num_heads=4, ffn_dim=48),
        transformer_decoder=TransformerDecoderConfig(hidden_dim=32, num_queries=5, num_heads=4, ffn_dim=40,
                                                     num_layers=DEC_LAYERS, enforce_input_proj=True),
        num_classes=4,
        name="test-d2",
    )


def official_keys(cfg: Mask2FormerConfig) -> list[str]:
    """The key names of an official Mask2Former checkpoint (detectron2 ResNet or D2SwinTransformer +
    MSDeformAttnPixelDecoder + MultiScaleMaskedTransformerDecoder), written out from the official module tree."""
    wb = ("weight", "bias")
    if cfg.backbone.type == "swin":
        keys = [f"backbone.patch_embed.{m}.{w}" for m in ("proj", "norm") for w in wb]
        for stage, depth in enumerate(cfg.backbone.depths):
            for block in range(depth):
                p = f"backbone.layers.{stage}.blocks.{block}."
                keys += [p + "attn.relative_position_bias_table", p + "attn.relative_position_index"]
                keys += [p + m + "." + w for m in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2") for w in wb]
            if stage < 3:
                keys += [f"backbone.layers.{stage}.downsample.reduction.weight"]
                keys += [f"backbone.layers.{stage}.downsample.norm.{w}" for w in wb]
        keys += [f"backbone.norm{i}.{w}" for i in range(4) for w in wb]  # the output norms of D2SwinTransformer
    else:
        bn = ("weight", "bias", "running_mean", "running_var")  # FrozenBatchNorm2d
        keys = ["backbone.stem.conv1.weight"] + [f"backbone.stem.conv1.norm.{n}" for n in bn]
        for stage, depth in zip(range(2, 6), cfg.backbone.depths):
            for block in range(depth):
                p = f"backbone.res{stage}.{block}."
                convs = ["conv1", "conv2", "conv3"] + (["shortcut"] if block == 0 else [])
                for conv in convs:
                    keys += [p + conv + ".weight"] + [p + conv + ".norm." + n for n in bn]
    pd = "sem_seg_head.pixel_decoder."
    for i in range(3):
        keys += [f"{pd}input_proj.{i}.{j}.{w}" for j in (0, 1) for w in ("weight", "bias")]
    keys.append(pd + "transformer.level_embed")
    for layer in range(ENC_LAYERS):
        p = f"{pd}transformer.encoder.layers.{layer}."
        for sub in ("self_attn.sampling_offsets", "self_attn.attention_weights", "self_attn.value_proj",
                    "self_attn.output_proj", "norm1", "linear1", "linear2", "norm2"):
            keys += [p + sub + ".weight", p + sub + ".bias"]
    keys += [pd + "mask_features.weight", pd + "mask_features.bias"]
    keys += [pd + "adapter_1.weight", pd + "adapter_1.norm.weight", pd + "adapter_1.norm.bias"]
    keys += [pd + "layer_1.weight", pd + "layer_1.norm.weight", pd + "layer_1.norm.bias"]
    pr = "sem_seg_head.predictor."
    for layer in range(DEC_LAYERS):
        for mod, attn in (("transformer_self_attention_layers", "self_attn"),
                          ("transformer_cross_attention_layers", "multihead_attn")):
            p = f"{pr}{mod}.{layer}."
            keys += [p + attn + ".in_proj_weight", p + attn + ".in_proj_bias", p + attn + ".out_proj.weight",
                     p + attn + ".out_proj.bias", p + "norm.weight", p + "norm.bias"]
        p = f"{pr}transformer_ffn_layers.{layer}."
        keys += [p + n + "." + w for n in ("linear1", "linear2", "norm") for w in ("weight", "bias")]
    keys += [pr + "decoder_norm.weight", pr + "decoder_norm.bias", pr + "query_feat.weight", pr + "query_embed.weight",
             pr + "level_embed.weight", pr + "class_embed.weight", pr + "class_embed.bias"]
    keys += [f"{pr}input_proj.{i}.{w}" for i in range(3) for w in ("weight", "bias")]
    keys += [f"{pr}mask_embed.layers.{i}.{w}" for i in range(3) for w in ("weight", "bias")]
    return keys


def to_ours(key: str) -> str:
    for official, ours in (("sem_seg_head.pixel_decoder.", "pixel_decoder."), ("sem_seg_head.predictor.", "transformer_decoder.")):
        if key.startswith(official):
            return ours + key[len(official):]
    return key


def official_state(cfg: Mask2FormerConfig, gen: torch.Generator) -> dict[str, np.ndarray]:
    """Random arrays under the official names, shaped like our model's tensors of the same (renamed) name."""
    ours = m2f.build_model(cfg).state_dict()
    keys = official_keys(cfg)
    assert {to_ours(k) for k in keys} == set(ours), "our parameter names must mirror the official ones"
    state = {}
    for k in keys:
        t = torch.randn(ours[to_ours(k)].shape, generator=gen)
        if k.endswith("relative_position_index"):  # a fixed function of the window size, checked on load
            t = ours[k]
        elif k.endswith("running_var"):
            t = t.abs() + 0.5
        state[k] = t.numpy()
    state["criterion.empty_weight"] = np.ones(cfg.num_classes + 1, dtype=np.float32)
    return state


def write_pkl(path, state: dict[str, np.ndarray]):
    with open(path, "wb") as f:
        pickle.dump({"model": state, "__author__": "test", "matching_heuristics": True}, f, protocol=2)
    return path


def write_pth(path, state: dict[str, np.ndarray]):
    torch.save({"model": {k: torch.from_numpy(v) for k, v in state.items()}, "iteration": 3}, path)
    return path


@pytest.mark.parametrize("backbone", ["resnet", "swin"])
def test_detectron2_pkl_and_pth_load_every_tensor(tmp_path, rng, backbone):
    cfg = d2_config(backbone)
    state = official_state(cfg, rng)
    from_pkl = from_pretrained(write_pkl(tmp_path / "model_final.pkl", state), config=cfg)
    from_pth = from_pretrained(write_pth(tmp_path / "model_final.pth", state), config=cfg)
    assert not from_pkl.training
    for name, value in from_pkl.state_dict().items():
        official = {to_ours(k): k for k in state}[name]
        np.testing.assert_array_equal(value.numpy(), state[official], err_msg=name)
        torch.testing.assert_close(from_pth.state_dict()[name], value, rtol=0, atol=0)
    x = torch.randn(1, 3, 64, 96, generator=rng)
    with torch.no_grad():
        a, b = from_pkl(x), from_pth(x)
    torch.testing.assert_close(a.pred_masks, b.pred_masks, rtol=0, atol=0)


def test_detectron2_missing_extra_and_misshaped_keys_are_listed(tmp_path, rng):
    cfg = d2_config()
    state = official_state(cfg, rng)
    del state["sem_seg_head.predictor.query_embed.weight"]
    state["sem_seg_head.predictor.bogus_head.weight"] = np.zeros(3, dtype=np.float32)
    with pytest.raises(CheckpointError) as info:
        from_pretrained(write_pkl(tmp_path / "a.pkl", state), config=cfg)
    msg = str(info.value)
    assert "1 missing key(s): transformer_decoder.query_embed.weight" in msg
    assert "1 unexpected key(s): transformer_decoder.bogus_head.weight" in msg
    assert "\n" not in msg

    state = official_state(cfg, rng)
    state["sem_seg_head.predictor.class_embed.weight"] = np.zeros((9, 32), dtype=np.float32)
    with pytest.raises(CheckpointError) as info:
        from_pretrained(write_pth(tmp_path / "b.pth", state), config=cfg)
    assert "transformer_decoder.class_embed.weight checkpoint (9, 32) vs model (5, 32)" in str(info.value)


def test_detectron2_without_preset_asks_for_one(tmp_path, rng):
    path = write_pkl(tmp_path / "model_final.pkl", official_state(d2_config(), rng))
    with pytest.raises(CheckpointError, match=r"--preset.*m2f presets"):
        from_pretrained(path)


def test_pkl_is_read_without_running_code(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({"model": {"sem_seg_head.x": Evil()}}, protocol=2))
    with pytest.raises(CheckpointError, match="refusing to load"):
        from_pretrained(path, config=d2_config())
    assert not marker.exists()


def test_native_round_trip(tmp_path, rng):
    cfg = d2_config().replace(class_names=("a", "b", "c", "d"))
    torch.manual_seed(rng.seed_value)
    model = m2f.build_model(cfg).eval()
    perturb_(model, rng)
    save_pretrained(model, tmp_path / "native")
    meta = json.loads((tmp_path / "native" / "m2f_config.json").read_text())
    assert meta["format"] == "m2f" and meta["format_version"] == 1
    loaded = from_pretrained(tmp_path / "native")
    assert loaded.config == cfg
    for name, value in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], value, rtol=0, atol=0)
    with pytest.raises(M2FError, match="already exists"):
        save_pretrained(model, tmp_path / "native")
    save_pretrained(model, tmp_path / "native", force=True)
    meta.pop("format")
    (tmp_path / "native" / "m2f_config.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="format"):
        from_pretrained(tmp_path / "native")


def test_hf_config_translation():
    hf = {
        "model_type": "mask2former", "feature_size": 128, "mask_feature_size": 96, "hidden_dim": 192,
        "encoder_feedforward_dim": 512, "encoder_layers": 4, "decoder_layers": 10, "num_attention_heads": 4,
        "dim_feedforward": 1024, "num_queries": 200, "pre_norm": True, "enforce_input_projection": True,
        "common_stride": 4, "id2label": {"1": "cat", "0": "dog", "2": "sky"},
        "backbone_config": hf_resnet_backbone().to_dict(),
    }
    cfg = config_from_hf(hf, name="x")
    assert cfg.pixel_decoder == PixelDecoderConfig(conv_dim=128, mask_dim=96, num_encoder_layers=4, num_heads=4, ffn_dim=512)
    td = cfg.transformer_decoder
    assert (td.hidden_dim, td.num_queries, td.num_heads, td.ffn_dim, td.num_layers) == (192, 200, 4, 1024, 9)
    assert td.pre_norm and td.enforce_input_proj
    assert cfg.num_classes == 3 and cfg.class_names == ("dog", "cat", "sky")
    assert cfg.backbone == ResNetConfig(depths=(1, 2, 1, 1), stem_channels=16, hidden_sizes=(16, 32, 48, 64))


def test_hf_directory_with_a_missing_tensor_is_rejected(tmp_path, rng):
    from safetensors.torch import load_file, save_file

    tiny_hf_model(hf_resnet_backbone(), rng).save_pretrained(tmp_path / "hf")
    weights = tmp_path / "hf" / "model.safetensors"
    state = load_file(str(weights))
    del state["model.transformer_module.decoder.layers.1.fc2.weight"]
    save_file(state, str(weights), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"1 missing key\(s\): transformer_decoder.transformer_ffn_layers.1.linear2.weight"):
        from_pretrained(tmp_path / "hf")


PNG = bytes.fromhex("89504e470d0a1a0a0000000d49484452000000010000000108060000001f15c4890000000d4944415478da63f8ffff3f0005fe02fe"
                    "a7d6a4d00000000049454e44ae426082")


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda d: d / "nope", "does not exist"),
        (lambda d: (d / "rand.bin").write_bytes(random.Random(fresh_seed()).randbytes(256).replace(b"\x80", b"\x00").replace(b"PK", b"pk")) and d / "rand.bin", "not a checkpoint"),
        (lambda d: (d / "notes.txt").write_text("hello\n") and d / "notes.txt", "not a checkpoint"),
        (lambda d: (d / "cat.png").write_bytes(PNG) and d / "cat.png", "not a checkpoint"),
        (lambda d: (d / "trunc.pkl").write_bytes(pickle.dumps({"model": {"a": 1}}, protocol=2)[:-5]) and d / "trunc.pkl", "not a readable"),
        (lambda d: (d / "empty").mkdir() or d / "empty", "without config.json"),
        (lambda d: (d / "bert").mkdir() or (d / "bert" / "config.json").write_text('{"model_type": "bert"}') and d / "bert", "'bert' model, not Mask2Former"),
        (lambda d: (d / "noweights").mkdir() or (d / "noweights" / "config.json").write_text('{"model_type": "mask2former"}') and d / "noweights", "no weights"),
        (lambda d: torch.save({"model": {"conv1.weight": torch.zeros(2)}}, d / "resnet.pth") or d / "resnet.pth", "not a Mask2Former checkpoint"),
        (lambda d: torch.save({"model.pixel_level_module.decoder.level_embed": torch.zeros(2)}, d / "hf.bin") or d / "hf.bin", "Hugging Face"),
    ],
    ids=["missing", "random-bytes", "text", "png", "truncated-pickle", "empty-dir", "other-model", "no-weights",
         "other-network", "bare-hf-state"],
)
def test_bad_inputs_raise_one_line_checkpoint_errors(tmp_path, make, match):
    path = make(tmp_path)
    with pytest.raises(CheckpointError, match=match) as info:
        read_checkpoint(path, config=d2_config())
    assert "\n" not in str(info.value)
