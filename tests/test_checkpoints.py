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
from m2f.config import PixelDecoderConfig, ResNetConfig
from m2f.errors import CheckpointError, M2FError
from tests.utils import d2_config, fresh_seed, hf_resnet_backbone, official_state, perturb_, tiny_hf_model, to_ours, write_pkl


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
