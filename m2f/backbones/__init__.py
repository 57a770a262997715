"""Backbones of Mask2Former: ResNet (detectron2 layout) and Swin (official D2SwinTransformer).

:func:`build_backbone` turns a :class:`~m2f.config.ResNetConfig` or :class:`~m2f.config.SwinConfig` into a
module whose ``forward(x)`` maps images (B, 3, H, W) to ``{"res2", "res3", "res4", "res5"}`` feature maps at
strides 4, 8, 16, 32 (sizes rounded up), with ``out_channels`` and ``out_strides`` dicts. Its state_dict
keys are the official checkpoint's ``backbone.*`` keys without the prefix; :mod:`m2f.backbones.convert`
renames Hugging Face and detectron2 checkpoints into it.
"""
from __future__ import annotations

from torch import nn

from m2f.config import ResNetConfig, SwinConfig
from m2f.errors import ConfigError

from .resnet import ResNet
from .swin import SwinTransformer


def build_backbone(cfg: ResNetConfig | SwinConfig) -> nn.Module:
    """The backbone described by ``cfg``, randomly initialised, in training mode (call ``.eval()``)."""
    if isinstance(cfg, ResNetConfig):
        return ResNet(
            depths=tuple(cfg.depths),
            stem_channels=cfg.stem_channels,
            hidden_sizes=tuple(cfg.hidden_sizes),
            block=cfg.block,
            bottleneck_reduction=cfg.bottleneck_reduction,
            stride_in_1x1=cfg.stride_in_1x1,
            norm=cfg.norm,
            norm_eps=cfg.norm_eps,
        )
    if isinstance(cfg, SwinConfig):
        return SwinTransformer(
            embed_dim=cfg.embed_dim,
            depths=tuple(cfg.depths),
            num_heads=tuple(cfg.num_heads),
            window_size=cfg.window_size,
            mlp_ratio=cfg.mlp_ratio,
            qkv_bias=cfg.qkv_bias,
            patch_size=cfg.patch_size,
            pretrain_img_size=cfg.pretrain_img_size,
            drop_path_rate=cfg.drop_path_rate,
            ape=cfg.ape,
            patch_norm=cfg.patch_norm,
            layer_norm_eps=cfg.layer_norm_eps,
        )
    raise ConfigError(f"unknown backbone config {type(cfg).__name__}; expected ResNetConfig or SwinConfig")


__all__ = ["build_backbone", "ResNet", "SwinTransformer"]
