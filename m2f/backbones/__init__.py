"""Backbones of Mask2Former, by registry: ResNet (detectron2 layout) and Swin (official D2SwinTransformer).

Each family is one :class:`BackboneSpec` in :data:`BACKBONES` (name -> config class, builder, Hugging Face config
translation both ways, HF / detectron2 state-dict key rules); :func:`backbone_spec` finds a config's family, so
nothing else branches on the backbone type (adding one: CONTRIBUTING.md). :func:`build_backbone` returns a
module meeting the :class:`Backbone` contract: ``forward(x)`` maps images (B, 3, H, W) to named feature maps
(``res2`` .. ``res5``), with ``out_channels`` and ``out_strides`` dicts that the pixel decoder, post-processing
and export read. Its state_dict keys are the official checkpoint's ``backbone.*`` keys without the prefix;
:mod:`m2f.backbones.convert` renames Hugging Face and detectron2 checkpoints into it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Protocol, runtime_checkable

from torch import Tensor, nn

from m2f.config import ResNetConfig, SwinConfig
from m2f.errors import ConfigError

from . import convert
from .resnet import ResNet
from .swin import SwinTransformer


@runtime_checkable
class Backbone(Protocol):
    """What Mask2Former needs of a backbone: named feature maps, their channels and strides (finest first)."""

    out_channels: Mapping[str, int]
    out_strides: Mapping[str, int]

    def __call__(self, pixel_values: Tensor) -> dict[str, Tensor]: ...


@dataclass(frozen=True)
class BackboneSpec:
    """One backbone family. ``name`` is Hugging Face's ``backbone_config.model_type`` for it."""

    name: str
    config_class: type
    build: Callable[[Any], nn.Module]
    config_from_hf: Callable[[dict], Any]  # HF backbone_config dict -> our config (CheckpointError if unfaithful)
    config_to_hf: Callable[[Any, list[str]], Any]  # our config, out_features -> a transformers config
    hf_rename: Callable[[str], Any]  # HF state-dict key (prefix stripped) -> convert.Action | None
    d2_rename: Callable[[str], Any] = convert.d2_rename  # detectron2 keys already carry our names


def _build_resnet(cfg: ResNetConfig) -> nn.Module:
    return ResNet(depths=tuple(cfg.depths), stem_channels=cfg.stem_channels, hidden_sizes=tuple(cfg.hidden_sizes),
                  block=cfg.block, bottleneck_reduction=cfg.bottleneck_reduction, stride_in_1x1=cfg.stride_in_1x1,
                  norm=cfg.norm, norm_eps=cfg.norm_eps)


def _build_swin(cfg: SwinConfig) -> nn.Module:
    return SwinTransformer(embed_dim=cfg.embed_dim, depths=tuple(cfg.depths), num_heads=tuple(cfg.num_heads),
                           window_size=cfg.window_size, mlp_ratio=cfg.mlp_ratio, qkv_bias=cfg.qkv_bias,
                           patch_size=cfg.patch_size, pretrain_img_size=cfg.pretrain_img_size,
                           drop_path_rate=cfg.drop_path_rate, ape=cfg.ape, patch_norm=cfg.patch_norm,
                           layer_norm_eps=cfg.layer_norm_eps)


BACKBONES: dict[str, BackboneSpec] = {}


def register_backbone(spec: BackboneSpec) -> BackboneSpec:
    if spec.name in BACKBONES or any(s.config_class is spec.config_class for s in BACKBONES.values()):
        raise ValueError(f"backbone {spec.name!r} ({spec.config_class.__name__}) is registered twice")
    BACKBONES[spec.name] = spec
    return spec


register_backbone(BackboneSpec("resnet", ResNetConfig, _build_resnet, convert.resnet_config_from_hf,
                               convert.resnet_config_to_hf, convert.hf_resnet_rename))
register_backbone(BackboneSpec("swin", SwinConfig, _build_swin, convert.swin_config_from_hf,
                               convert.swin_config_to_hf, convert.hf_swin_rename))


def backbone_spec(cfg: Any) -> BackboneSpec:
    """The registered family of a backbone config."""
    for spec in BACKBONES.values():
        if type(cfg) is spec.config_class:
            return spec
    known = ", ".join(s.config_class.__name__ for s in BACKBONES.values())
    raise ConfigError(f"unknown backbone config {type(cfg).__name__}; expected one of {known}")


def build_backbone(cfg: Any) -> nn.Module:
    """The backbone described by ``cfg``, randomly initialised, in training mode (call ``.eval()``)."""
    return backbone_spec(cfg).build(cfg)


__all__ = ["BACKBONES", "Backbone", "BackboneSpec", "backbone_spec", "build_backbone", "register_backbone", "ResNet",
           "SwinTransformer"]
