"""Configs: JSON round trip, validation, presets' official hyperparameters."""
from __future__ import annotations

import json

import pytest

from m2f.config import (
    Mask2FormerConfig,
    PixelDecoderConfig,
    ResNetConfig,
    SwinConfig,
    TransformerDecoderConfig,
    preset,
    preset_names,
)
from m2f.errors import M2FError


def test_round_trip_through_json_keeps_every_field():
    cfg = Mask2FormerConfig(
        backbone=SwinConfig(embed_dim=48, depths=(1, 1, 3, 1), num_heads=(2, 4, 8, 16), window_size=5),
        pixel_decoder=PixelDecoderConfig(conv_dim=64, num_encoder_layers=2),
        transformer_decoder=TransformerDecoderConfig(num_queries=17, num_layers=4),
        num_classes=3,
        class_names=("a", "b", "c"),
        thing_classes=(0, 2),
        default_task="instance",
    )
    again = Mask2FormerConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg
    assert isinstance(again.backbone, SwinConfig) and again.backbone.depths == (1, 1, 3, 1)


def test_resnet_backbone_is_the_default_and_round_trips():
    cfg = Mask2FormerConfig(backbone=ResNetConfig(depths=(1, 2, 1, 1), block="basic"), num_classes=5)
    assert Mask2FormerConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"num_classes": 0}, "num_classes"),
        ({"num_classes": 2, "class_names": ["x"]}, "class_names must be a list of 2 strings"),
        ({"default_task": "depth"}, "default_task"),
        ({"no_such_field": 1}, "no_such_field"),
        ({"backbone": {"type": "vit"}}, "backbone.type must be 'resnet' or 'swin', got 'vit'"),
    ],
)
def test_invalid_configs_raise_a_named_error(bad, message):
    with pytest.raises(M2FError, match=message):
        Mask2FormerConfig.from_dict(bad)


def test_presets_carry_the_official_hyperparameters():
    r50 = preset("r50-coco-panoptic")
    assert r50.num_classes == 133 and r50.transformer_decoder.num_queries == 100
    assert r50.backbone.depths == (3, 4, 6, 3) and not r50.backbone.stride_in_1x1
    assert r50.pixel_decoder.num_encoder_layers == 6 and r50.pixel_decoder.ffn_dim == 1024
    assert r50.transformer_decoder.num_layers == 9 and r50.transformer_decoder.ffn_dim == 2048
    assert r50.postprocess.object_mask_threshold == 0.8 and r50.postprocess.overlap_threshold == 0.8
    assert preset("r101-coco-instance").backbone.depths == (3, 4, 23, 3)
    assert preset("swin-l-coco-panoptic").transformer_decoder.num_queries == 200
    assert preset("swin-l-ade20k-semantic").transformer_decoder.num_queries == 100
    assert preset("swin-b-cityscapes-semantic").backbone.window_size == 12
    assert preset("swin-t-ade20k-semantic").num_classes == 150
    # MIN_SIZE_TEST / MAX_SIZE_TEST of the official configs (ADE20K Swin-B / Swin-L: the _res640 ones)
    assert preset("r50-coco-panoptic").test_size == (800, 1333)
    assert preset("swin-t-ade20k-semantic").test_size == (512, 2048)
    assert preset("swin-l-ade20k-semantic").test_size == preset("swin-b-ade20k-semantic").test_size == (640, 2560)
    assert preset("swin-l-cityscapes-semantic").test_size == (1024, 2048)


def test_every_preset_builds_with_labels_matching_its_classes():
    for name in preset_names():
        cfg = preset(name)
        assert len(cfg.class_names) == cfg.num_classes, name
        assert all(0 <= i < cfg.num_classes for i in cfg.thing_classes), name


def test_unknown_preset_lists_the_valid_ones():
    with pytest.raises(M2FError, match="r50-coco-panoptic"):
        preset("r50-coco")
