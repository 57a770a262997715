"""Frozen configuration dataclasses and the official named presets.

A :class:`Mask2FormerConfig` fully describes an architecture plus the label set and inference defaults; it
round-trips through JSON (``to_dict`` / ``from_dict``), which is what ``m2f convert`` writes beside the weights.

Presets follow the official Mask2Former YAMLs (facebookresearch/Mask2Former ``configs/``): name them
``<backbone>-<dataset>-<task>``, e.g. ``r50-coco-panoptic`` or ``swin-l-ade20k-semantic``; see :func:`preset`.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal, Union

from .errors import M2FError

Task = Literal["panoptic", "instance", "semantic"]
TASKS: tuple[str, ...] = ("panoptic", "instance", "semantic")


@dataclass(frozen=True)
class ResNetConfig:
    """ResNet backbone (torchvision / detectron2 "basic" stem). Outputs res2..res5 at strides 4..32."""

    depths: tuple[int, ...] = (3, 4, 6, 3)  # blocks per stage: R50 (3, 4, 6, 3), R101 (3, 4, 23, 3)
    stem_channels: int = 64
    hidden_sizes: tuple[int, ...] = (256, 512, 1024, 2048)  # output channels of res2..res5
    block: Literal["bottleneck", "basic"] = "bottleneck"
    bottleneck_reduction: int = 4  # bottleneck width = out_channels // reduction
    stride_in_1x1: bool = False  # False: stride on the 3x3 conv (torchvision weights, the official configs)
    norm: Literal["frozen_bn", "bn"] = "frozen_bn"
    norm_eps: float = 1e-5
    type: Literal["resnet"] = "resnet"

    @property
    def out_channels(self) -> tuple[int, ...]:
        return tuple(self.hidden_sizes)


@dataclass(frozen=True)
class SwinConfig:
    """Swin Transformer backbone as in the official D2SwinTransformer. Outputs res2..res5 at strides 4..32."""

    embed_dim: int = 96
    depths: tuple[int, ...] = (2, 2, 6, 2)
    num_heads: tuple[int, ...] = (3, 6, 12, 24)
    window_size: int = 7
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    patch_size: int = 4
    pretrain_img_size: int = 224
    drop_path_rate: float = 0.3
    ape: bool = False  # absolute position embedding (off in every official config)
    patch_norm: bool = True
    layer_norm_eps: float = 1e-5
    type: Literal["swin"] = "swin"

    @property
    def out_channels(self) -> tuple[int, ...]:
        return tuple(self.embed_dim * 2**i for i in range(len(self.depths)))


BackboneConfig = Union[ResNetConfig, SwinConfig]


@dataclass(frozen=True)
class PixelDecoderConfig:
    """MSDeformAttnPixelDecoder: deformable encoder over res3..res5, FPN level(s) down to ``common_stride``."""

    conv_dim: int = 256
    mask_dim: int = 256
    num_encoder_layers: int = 6
    num_heads: int = 8
    num_points: int = 4
    ffn_dim: int = 1024
    num_feature_levels: int = 3  # res3..res5 go through the deformable encoder
    common_stride: int = 4
    norm_groups: int = 32
    dropout: float = 0.0
    layer_norm_eps: float = 1e-5


@dataclass(frozen=True)
class TransformerDecoderConfig:
    """MultiScaleMaskedTransformerDecoder. ``num_layers`` excludes the prediction on the learnable queries."""

    hidden_dim: int = 256
    num_queries: int = 100
    num_heads: int = 8
    ffn_dim: int = 2048
    num_layers: int = 9  # official DEC_LAYERS: 10 = 9 layers + the initial prediction
    pre_norm: bool = False
    enforce_input_proj: bool = False
    dropout: float = 0.0
    mask_mlp_layers: int = 3
    layer_norm_eps: float = 1e-5


@dataclass(frozen=True)
class PostProcessConfig:
    """Inference defaults of the official YAMLs (the Python defaults in the official code differ)."""

    object_mask_threshold: float = 0.8
    overlap_threshold: float = 0.8
    instance_topk: int = 100


@dataclass(frozen=True)
class Mask2FormerConfig:
    backbone: BackboneConfig = field(default_factory=ResNetConfig)
    pixel_decoder: PixelDecoderConfig = field(default_factory=PixelDecoderConfig)
    transformer_decoder: TransformerDecoderConfig = field(default_factory=TransformerDecoderConfig)
    postprocess: PostProcessConfig = field(default_factory=PostProcessConfig)
    num_classes: int = 133  # excluding the "no object" class
    # Label set. class_names[i] names contiguous class i; thing_classes lists the contiguous ids of "thing"
    # classes (instances are counted separately); the rest are "stuff". Empty names: "class_<i>".
    class_names: tuple[str, ...] = ()
    thing_classes: tuple[int, ...] = ()
    # Dataset-specific category ids written into COCO panoptic / instance JSON (contiguous id -> dataset id);
    # empty means the contiguous id is the category id.
    dataset_ids: tuple[int, ...] = ()
    default_task: str = "panoptic"
    # Normalisation of RGB pixels in 0..255 (ImageNet mean / std, as the official configs).
    pixel_mean: tuple[float, float, float] = (123.675, 116.28, 103.53)
    pixel_std: tuple[float, float, float] = (58.395, 57.12, 57.375)
    size_divisibility: int = 32
    # Test-time detectron2 ResizeShortestEdge (INPUT.MIN_SIZE_TEST, INPUT.MAX_SIZE_TEST) of the model's dataset:
    # what `m2f predict` resizes to unless told otherwise. The default is detectron2's (the COCO configs').
    test_size: tuple[int, int] = (800, 1333)
    name: str = ""  # preset name, or where the config came from

    def __post_init__(self) -> None:
        if self.num_classes < 1:
            raise M2FError(f"num_classes must be >= 1, got {self.num_classes}")
        if self.class_names and len(self.class_names) != self.num_classes:
            raise M2FError(
                f"config lists {len(self.class_names)} class names for {self.num_classes} classes; "
                "give one name per class or none"
            )
        if self.default_task not in TASKS:
            raise M2FError(f"default_task must be one of {', '.join(TASKS)}, got {self.default_task!r}")

    # -- label helpers -------------------------------------------------------------------------------
    def class_name(self, index: int) -> str:
        return self.class_names[index] if self.class_names else f"class_{index}"

    def is_thing(self, index: int) -> bool:
        return index in set(self.thing_classes)

    def dataset_id(self, index: int) -> int:
        return self.dataset_ids[index] if self.dataset_ids else index

    # -- serialisation -------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return _to_jsonable(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Mask2FormerConfig":
        try:
            data = dict(data)
            backbone = dict(data.pop("backbone", {}))
            kind = backbone.get("type", "resnet")
            backbone_cls = {"resnet": ResNetConfig, "swin": SwinConfig}.get(kind)
            if backbone_cls is None:
                raise M2FError(f"unknown backbone type {kind!r} in config (expected 'resnet' or 'swin')")
            return cls(
                backbone=_from_jsonable(backbone_cls, backbone),
                pixel_decoder=_from_jsonable(PixelDecoderConfig, data.pop("pixel_decoder", {})),
                transformer_decoder=_from_jsonable(TransformerDecoderConfig, data.pop("transformer_decoder", {})),
                postprocess=_from_jsonable(PostProcessConfig, data.pop("postprocess", {})),
                **_coerce_fields(cls, data),
            )
        except TypeError as exc:  # unknown or missing field
            raise M2FError(f"not an m2f config: {exc}") from None

    def replace(self, **changes: Any) -> "Mask2FormerConfig":
        return dataclasses.replace(self, **changes)


def _to_jsonable(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: _to_jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (tuple, list)):
        return [_to_jsonable(x) for x in obj]
    return obj


def _coerce_fields(cls: type, data: dict[str, Any]) -> dict[str, Any]:
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise M2FError(f"unknown field(s) {', '.join(unknown)} for {cls.__name__}")
    return {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}


def _from_jsonable(cls: type, data: dict[str, Any]) -> Any:
    return cls(**_coerce_fields(cls, dict(data)))


# ---------------------------------------------------------------------------------------------------
# Presets
# ---------------------------------------------------------------------------------------------------

BACKBONE_PRESETS: dict[str, BackboneConfig] = {
    "r50": ResNetConfig(depths=(3, 4, 6, 3)),
    "r101": ResNetConfig(depths=(3, 4, 23, 3)),
    "swin-t": SwinConfig(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), window_size=7),
    "swin-s": SwinConfig(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24), window_size=7),
    "swin-b": SwinConfig(
        embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32), window_size=12, pretrain_img_size=384
    ),
    "swin-l": SwinConfig(
        embed_dim=192, depths=(2, 2, 18, 2), num_heads=(6, 12, 24, 48), window_size=12, pretrain_img_size=384
    ),
}

# dataset -> (num_classes, task). Label names live in m2f.labels (filled per dataset).
DATASET_PRESETS: dict[str, tuple[int, str]] = {
    "coco-panoptic": (133, "panoptic"),
    "coco-instance": (80, "instance"),
    "ade20k-semantic": (150, "semantic"),
    "cityscapes-semantic": (19, "semantic"),
}

# dataset -> test_size (MIN_SIZE_TEST, MAX_SIZE_TEST) of the official configs
_TEST_SIZES: dict[str, tuple[int, int]] = {
    "coco-panoptic": (800, 1333),
    "coco-instance": (800, 1333),
    "ade20k-semantic": (512, 2048),
    "cityscapes-semantic": (1024, 2048),
}

# Swin-L on COCO uses 200 queries in the official configs; every other preset uses 100.
_QUERIES_OVERRIDE = {("swin-l", "coco-panoptic"): 200, ("swin-l", "coco-instance"): 200}


def preset_names() -> list[str]:
    return [f"{b}-{d}" for b in BACKBONE_PRESETS for d in DATASET_PRESETS]


def preset(name: str) -> Mask2FormerConfig:
    """The official configuration named ``<backbone>-<dataset>-<task>``, e.g. ``swin-t-coco-panoptic``."""
    for backbone_name, backbone in BACKBONE_PRESETS.items():
        for dataset_name, (num_classes, task) in DATASET_PRESETS.items():
            if name == f"{backbone_name}-{dataset_name}":
                from .labels import dataset_labels  # local: labels are only needed when a preset is built

                labels = dataset_labels(dataset_name)
                queries = _QUERIES_OVERRIDE.get((backbone_name, dataset_name), 100)
                return Mask2FormerConfig(
                    backbone=backbone,
                    transformer_decoder=TransformerDecoderConfig(num_queries=queries),
                    num_classes=num_classes,
                    class_names=labels.names,
                    thing_classes=labels.thing_classes,
                    dataset_ids=labels.dataset_ids,
                    default_task=task,
                    test_size=_TEST_SIZES[dataset_name],
                    name=name,
                )
    raise M2FError(f"unknown preset {name!r}; choose one of: {', '.join(preset_names())}")
