"""Config validation: every field of m2f_config.json, of an HF config.json and of the Python dataclasses is checked
before a tensor is made, and a bad one is refused in one line naming the file, the field, the value and what is
allowed."""
from __future__ import annotations

import json

import pytest
import torch

from m2f.checkpoints.hf import config_from_hf
from m2f.checkpoints.native import CONFIG_NAME, read_native_config, save_pretrained
from m2f.cli import main
from m2f.config import Mask2FormerConfig, ResNetConfig, SwinConfig, TransformerDecoderConfig, preset
from m2f.errors import CheckpointError, ConfigError
from m2f.model import build_model
from m2f.pixel_decoder import MultiScaleDeformableAttention
from m2f.transformer_decoder import PackedAttentionProjections
from tests.utils import resnet_config

# (m2f_config.json content, expected message): the cases of the issue first, then their siblings
BAD_CONFIGS = [
    ({"transformer_decoder": {"hidden_dim": -64}}, r"transformer_decoder\.hidden_dim must be a multiple of 4 in 4\.\.8192, got -64"),
    ({"transformer_decoder": {"num_heads": 0}}, r"transformer_decoder\.num_heads must be an integer in 1\.\.256, got 0"),
    ({"transformer_decoder": {"num_heads": 3}}, r"num_heads must be an integer dividing transformer_decoder\.hidden_dim \(256\), got 3"),
    ({"transformer_decoder": {"num_queries": 1e9}}, r"num_queries must be an integer in 1\.\.4096, got 1000000000\.0"),
    ({"transformer_decoder": {"num_queries": 10**9}}, r"num_queries must be an integer in 1\.\.4096, got 1000000000$"),
    ({"transformer_decoder": {"num_queries": -1}}, r"num_queries must be an integer in 1\.\.4096, got -1"),
    ({"transformer_decoder": {"hidden_dim": "abc"}}, r"hidden_dim must be a multiple of 4 in 4\.\.8192, got 'abc'"),
    ({"pixel_mean": [123.0, 116.0]}, r"pixel_mean must be 3 finite numbers .*, got \[123\.0, 116\.0\]"),
    ({"pixel_mean": [1, "2", 3]}, r"pixel_mean must be 3 finite numbers"),
    ({"pixel_std": [58.0, 0, 57.0]}, r"pixel_std must be 3 finite positive numbers"),
    ({"pixel_std": [58.0, float("nan"), 57.0]}, r"pixel_std must be 3 finite positive numbers"),
    ({"transformer_decoder": {"num_layers": 0}}, r"transformer_decoder\.num_layers must be an integer in 1\.\.128, got 0"),
    ({"transformer_decoder": {"pre_norm": 1}}, r"transformer_decoder\.pre_norm must be true or false, got 1"),
    ({"transformer_decoder": {"dropout": 1.0}}, r"transformer_decoder\.dropout must be a number in \[0, 1\), got 1\.0"),
    ({"transformer_decoder": {"layer_norm_eps": 0}}, r"layer_norm_eps must be a number in \(0, 1\), got 0"),
    ({"pixel_decoder": {"conv_dim": 48}}, r"pixel_decoder\.conv_dim must be a multiple of pixel_decoder\.norm_groups \(32\)"),
    ({"pixel_decoder": {"conv_dim": 30, "norm_groups": 1}}, r"pixel_decoder\.conv_dim must be a multiple of 4"),
    ({"pixel_decoder": {"num_heads": 3}}, r"pixel_decoder\.num_heads must be an integer dividing pixel_decoder\.conv_dim"),
    ({"pixel_decoder": {"num_points": 10**6}}, r"pixel_decoder\.num_points must be an integer in 1\.\.64"),
    ({"pixel_decoder": {"num_feature_levels": 5}}, r"pixel_decoder\.num_feature_levels must be an integer in 1\.\.4"),
    ({"pixel_decoder": {"common_stride": 16}}, r"pixel_decoder\.common_stride must be a multiple of 4 in 4\.\.8"),
    ({"pixel_decoder": {"common_stride": 8, "num_feature_levels": 2}}, r"common_stride must be 4 when .*num_feature_levels"),
    ({"backbone": {"depths": [3, 4, 6]}}, r"backbone\.depths must be 4 integers in 1\.\.128"),
    ({"backbone": {"depths": [3, 4, True, 3]}}, r"backbone\.depths must be 4 integers"),
    ({"backbone": {"hidden_sizes": [256, 512, 1024, 2050]}}, r"backbone\.hidden_sizes must be multiples of backbone\.bottleneck_reduction \(4\)"),
    ({"backbone": {"norm": "gn"}}, r"backbone\.norm must be one of 'frozen_bn', 'bn', got 'gn'"),
    ({"backbone": {"type": "swin", "num_heads": [3, 6, 12, 25]}}, r"backbone\.num_heads must be divisors .*stage 4: 25 does not divide 768"),
    ({"backbone": {"type": "swin", "embed_dim": 4096}}, r"backbone\.embed_dim must be an integer in 1\.\.1024"),
    ({"backbone": {"type": "swin", "patch_size": 2}}, r"backbone\.patch_size must be an integer in 4\.\.4"),
    ({"backbone": {"type": "swin", "drop_path_rate": -0.1}}, r"backbone\.drop_path_rate must be a number in \[0, 1\)"),
    ({"backbone": {"type": "vit"}}, r"backbone\.type must be 'resnet' or 'swin', got 'vit'"),
    ({"backbone": [1, 2]}, r"section backbone must be a JSON object of fields, got list"),
    ({"postprocess": {"overlap_threshold": 1.5}}, r"postprocess\.overlap_threshold must be a number in \[0, 1\]"),
    ({"postprocess": {"instance_topk": 0}}, r"postprocess\.instance_topk must be an integer in 1\.\.10000"),
    ({"num_classes": True}, r"num_classes must be an integer in 1\.\.100000, got True"),
    ({"num_classes": 3, "thing_classes": [0, 3]}, r"thing_classes must be a list of distinct class ids in 0\.\.2"),
    ({"num_classes": 3, "thing_classes": [1, 1]}, r"thing_classes must be a list of distinct class ids"),
    ({"num_classes": 3, "dataset_ids": [1, 2, 2]}, r"dataset_ids must be a list of 3 distinct integers"),
    ({"num_classes": 3, "dataset_ids": [1, 2]}, r"dataset_ids must be a list of 3 distinct integers"),
    ({"num_classes": 2, "class_names": ["cat", 7]}, r"class_names must be a list of 2 strings"),
    ({"size_divisibility": -32}, r"size_divisibility must be an integer in 0\.\.1024, got -32"),
    ({"test_size": [800]}, r"test_size must be 2 integers in 1\.\.8192 \(shortest side, longest side\)"),
    ({"test_size": [800, "1333"]}, r"test_size must be 2 integers"),
    ({"test_size": [1333, 800]}, r"test_size must be \(shortest side, longest side\) with the longest >= the shortest"),
    ({"default_task": "depth"}, r"default_task must be one of 'panoptic', 'instance', 'semantic'"),
    ({"pixel_decoder": {"colour": 1}}, r"unknown field\(s\) pixel_decoder\.colour"),
]


@pytest.mark.parametrize("data, message", BAD_CONFIGS)
def test_bad_config_fields_are_refused_with_path_value_and_allowed(data, message):
    with pytest.raises(ConfigError, match=message) as info:
        Mask2FormerConfig.from_dict(json.loads(json.dumps(data)))  # through JSON, as a file would be read
    assert "\n" not in str(info.value)


def test_python_construction_presets_and_replace_go_through_the_same_checks():
    with pytest.raises(ConfigError, match=r"transformer_decoder\.num_heads must be an integer dividing"):
        TransformerDecoderConfig(hidden_dim=64, num_heads=3)
    with pytest.raises(ConfigError, match=r"pixel_mean must be 3 finite numbers"):
        preset("r50-coco-panoptic").replace(pixel_mean=(1.0, 2.0))
    with pytest.raises(ConfigError, match=r"backbone must be a ResNetConfig or SwinConfig, got 'r50'"):
        Mask2FormerConfig(backbone="r50")
    with pytest.raises(ConfigError, match=r"backbone\.window_size must be an integer in 1\.\.128, got 0"):
        SwinConfig(window_size=0)
    # accepted values are normalised, so a config built from lists equals (and hashes like) the tuple one
    cfg = Mask2FormerConfig(backbone=ResNetConfig(depths=[1, 1, 1, 1]), pixel_mean=[120, 110, 100], num_classes=2)
    assert cfg.backbone.depths == (1, 1, 1, 1) and cfg.pixel_mean == (120.0, 110.0, 100.0)
    assert hash(cfg) == hash(Mask2FormerConfig.from_dict(cfg.to_dict()))


def test_module_constructors_raise_config_errors():
    with pytest.raises(ConfigError, match="d_model must be divisible by n_heads"):
        MultiScaleDeformableAttention(d_model=30, n_heads=4)
    with pytest.raises(ConfigError, match="embed_dim must be divisible by num_heads"):
        PackedAttentionProjections(30, 4)


def _tiny_config(**changes) -> Mask2FormerConfig:
    return resnet_config(hidden_sizes=(16, 16, 32, 32), dim=16, heads=2, ffn_dim=16, queries=3, decoder_layers=1,
                         num_classes=2, pixel_decoder={"norm_groups": 4}, **changes)


def test_native_config_with_a_bad_field_names_the_file_and_convert_writes_nothing(tmp_path, capsys):
    src = save_pretrained(build_model(_tiny_config()), tmp_path / "ckpt")
    meta = json.loads((src / CONFIG_NAME).read_text())
    meta["pixel_mean"] = [123.675, 116.28]
    (src / CONFIG_NAME).write_text(json.dumps(meta))
    with pytest.raises(ConfigError, match=rf"{CONFIG_NAME}: pixel_mean must be 3 finite numbers .*got \[123\.675, 116\.28\]"):
        read_native_config(src)
    out = tmp_path / "out"
    assert main(["convert", str(src), "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("m2f: error: ") and err.count("\n") == 1 and "pixel_mean" in err and str(src) in err, err
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


@pytest.mark.parametrize("version", [True, 0, "1"])
def test_native_format_version_must_be_a_version_number(tmp_path, version):
    src = save_pretrained(build_model(_tiny_config()), tmp_path / "ckpt")
    meta = json.loads((src / CONFIG_NAME).read_text())
    meta["format_version"] = version
    (src / CONFIG_NAME).write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="format_version .* not a version number"):
        read_native_config(src)


def _hf(**changes) -> dict:
    base = {
        "model_type": "mask2former", "feature_size": 32, "mask_feature_size": 32, "hidden_dim": 32,
        "encoder_layers": 1, "encoder_feedforward_dim": 32, "num_attention_heads": 4, "decoder_layers": 3,
        "dim_feedforward": 32, "num_queries": 5, "id2label": {"0": "cat", "1": "dog"},
        "backbone_config": {"model_type": "resnet", "embedding_size": 8, "hidden_sizes": [16, 16, 32, 32],
                            "depths": [1, 1, 1, 1], "out_features": ["stage1", "stage2", "stage3", "stage4"]},
    }
    base.update(changes)
    return base


# (HF config.json changes, expected message): errors use HF's names; derived values say how they are derived
BAD_HF_CONFIGS = [
    ({"hidden_dim": "abc"}, r"hf:x config\.json: hidden_dim must be a multiple of 4 in 4\.\.8192, got 'abc'"),
    ({"hidden_dim": -64}, r"config\.json: hidden_dim must be a multiple of 4 .*got -64"),
    ({"num_attention_heads": 3}, r"config\.json: num_attention_heads must be an integer dividing feature_size \(32\), got 3"),
    ({"num_attention_heads": 0}, r"config\.json: num_attention_heads must be an integer in 1\.\.32, got 0"),
    ({"num_queries": 1e9}, r"config\.json: num_queries must be an integer in 1\.\.4096, got 1000000000\.0"),
    ({"num_queries": -1}, r"config\.json: num_queries must be an integer in 1\.\.4096, got -1"),
    ({"feature_size": 48}, r"config\.json: feature_size must be a multiple of pixel_decoder\.norm_groups \(32\)"),
    ({"decoder_layers": 1}, r"config\.json: decoder_layers - 1 must be an integer in 1\.\.128, got 0"),
    ({"decoder_layers": "ten"}, r"config\.json: decoder_layers - 1 must be an integer .*got 'ten'"),
    ({"pre_norm": "no"}, r"config\.json: pre_norm must be true or false, got 'no'"),
    ({"id2label": ["cat", "dog"]}, r"config\.json: id2label must be an object .*got \['cat', 'dog'\]"),
    ({"id2label": {"zero": "cat"}}, r"config\.json: id2label\['zero'\] must be a class name \(string\) under an integer key"),
    ({"id2label": {"0": 5}}, r"config\.json: id2label\['0'\] must be a class name"),
    ({"id2label": {"0": "cat", "2": "dog"}}, r"config\.json: id2label must be keyed by the class indices 0\.\.1"),
    ({"id2label": {}, "num_labels": 0}, r"config\.json: num_labels must be an integer in 1\.\.100000, got 0"),
    ({"backbone_config": {**_hf()["backbone_config"], "depths": [1, 1, 0, 1]}},
     r"config\.json: backbone_config\.depths must be 4 integers in 1\.\.128"),
]


@pytest.mark.parametrize("changes, message", BAD_HF_CONFIGS)
def test_bad_hf_config_fields_are_refused_under_hf_names(changes, message):
    with pytest.raises(ConfigError, match=message) as info:
        config_from_hf(json.loads(json.dumps(_hf(**changes))), name="hf:x")
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("preprocessor, message", [
    ({"image_mean": [0.5, 0.5]}, r"hf:x preprocessor_config\.json: 255 \* image_mean must be 3 finite numbers .*got \(127\.5, 127\.5\)"),
    ({"image_std": [0.2, "x", 0.2]}, r"preprocessor_config\.json: 255 \* image_std must be 3 finite positive numbers"),
    ({"size_divisor": -1}, r"preprocessor_config\.json: size_divisor must be an integer in 0\.\.1024, got -1"),
])
def test_bad_hf_preprocessor_fields_are_refused_not_ignored(preprocessor, message):
    with pytest.raises(ConfigError, match=message):
        config_from_hf(_hf(), name="hf:x", preprocessor=preprocessor)


def test_valid_hf_config_still_translates():
    cfg = config_from_hf(_hf(), name="hf:x", preprocessor={"image_mean": [0.5, 0.5, 0.5], "size_divisor": 64})
    assert cfg.transformer_decoder.num_layers == 2 and cfg.class_names == ("cat", "dog")
    assert cfg.pixel_mean == (127.5, 127.5, 127.5) and cfg.size_divisibility == 64
    assert isinstance(build_model(cfg), torch.nn.Module)
