"""Frozen configuration dataclasses and the official named presets.

A :class:`Mask2FormerConfig` fully describes an architecture plus the label set and inference defaults; it
round-trips through JSON (``to_dict`` / ``from_dict``), which is what ``m2f convert`` writes beside the weights.

Every dataclass validates its fields in ``__post_init__``, so presets, JSON and Python construction all go through
the same checks before a tensor is made; a bad field raises :class:`ConfigFieldError` naming its path
(``transformer_decoder.num_heads``), the value and what is allowed.

Presets follow the official Mask2Former YAMLs (facebookresearch/Mask2Former ``configs/``): name them
``<backbone>-<dataset>-<task>``, e.g. ``r50-coco-panoptic`` or ``swin-l-ade20k-semantic``; see :func:`preset`.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, NoReturn, Union

from .errors import ConfigError

Task = Literal["panoptic", "instance", "semantic"]
TASKS: tuple[str, ...] = ("panoptic", "instance", "semantic")

# Upper bounds: far above the largest official value (in brackets), far below sizes that cannot fit in memory, so
# that a typo (an extra digit, 1e9 queries = 256 GB of query embeddings) is refused here, not by the allocator.
MAX_CHANNELS = 8192  # any width: hidden / conv / mask / FFN dims, backbone stage widths [2048]
MAX_LAYERS = 128  # layers of a stack, blocks of a backbone stage, mask MLP layers [23: ResNet-101 res4]
MAX_QUERIES = 4096  # learnable queries [200]; each one predicts an H/4 x W/4 mask per decoder layer
MAX_CLASSES = 100_000  # [1203: LVIS]
MAX_POINTS = 64  # deformable sampling points per head and level [4]
MAX_WINDOW = 128  # Swin window side [12]; its bias table has (2 * window - 1)^2 rows per head
MAX_MLP_RATIO = 16.0  # Swin MLP width / block width [4]
MAX_IMAGE_SIDE = 8192  # Swin pretrain_img_size [384], test-time resize sides [2048]
MAX_SIZE_DIVISIBILITY = 1024  # [32]
MAX_TOPK = 10_000  # instance predictions kept per image [100]
MAX_DATASET_ID = 2**31 - 1  # category ids are written to COCO JSON and int32 panoptic PNG ids


class ConfigFieldError(ConfigError):
    """A config field holds a value that is not allowed.

    The parts stay apart so that a reader of another format (an HF ``config.json``) can report the error under that
    format's field name (:meth:`renamed`).
    """

    def __init__(self, field: str, value: Any, allowed: str, source: str = "") -> None:
        self.field, self.value, self.allowed, self.source = field, value, allowed, source
        where = f"{source}: " if source else ""
        super().__init__(f"{where}{field} must be {allowed}, got {_short_repr(value)}")

    def renamed(self, names: dict[str, str], source: str) -> "ConfigFieldError":
        """The same error from ``source`` under its format's field names (``names``: our path -> theirs)."""
        allowed = self.allowed
        for ours in sorted(names, key=len, reverse=True):  # longest first: "a.b_c" before "a.b"
            allowed = allowed.replace(ours, names[ours])
        return ConfigFieldError(names.get(self.field, self.field), self.value, allowed, source)


def _short_repr(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 5] + " ...)"


# -- field checks: each reads ``obj.<name>``, raises ConfigFieldError under the field's path, and normalises the
# -- value in place (lists to tuples, ints to floats) so that equal configs compare and hash equal.


def _path(obj: Any, name: str) -> str:
    return f"{obj.SECTION}.{name}" if obj.SECTION else name


def _fail(obj: Any, name: str, allowed: str) -> NoReturn:
    raise ConfigFieldError(_path(obj, name), getattr(obj, name), allowed)


def is_int(value: Any) -> bool:
    """An ``int`` that is not a ``bool`` (JSON ``true`` is not a size)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _is_finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _int(obj: Any, name: str, lo: int, hi: int, multiple_of: int = 1, why: str = "") -> int:
    value = getattr(obj, name)
    if not is_int(value) or not lo <= value <= hi or value % multiple_of:
        kind = f"a multiple of {multiple_of}" if multiple_of > 1 else "an integer"
        _fail(obj, name, f"{kind} in {lo}..{hi}{why}")
    return value


def _divisor_of(obj: Any, name: str, of: str) -> int:
    total = getattr(obj, of)
    value = _int(obj, name, 1, total)
    if total % value:
        _fail(obj, name, f"an integer dividing {_path(obj, of)} ({total})")
    return value


def _number(obj: Any, name: str, lo: float, hi: float, *, open_lo: bool = False, open_hi: bool = False) -> float:
    value = getattr(obj, name)
    if not _is_finite_number(value) or value < lo or value > hi or (open_lo and value == lo) or (open_hi and value == hi):
        _fail(obj, name, f"a number in {'(' if open_lo else '['}{lo:g}, {hi:g}{')' if open_hi else ']'}")
    object.__setattr__(obj, name, float(value))
    return float(value)


def _bool(obj: Any, name: str) -> bool:
    if not isinstance(getattr(obj, name), bool):
        _fail(obj, name, "true or false")
    return getattr(obj, name)


def _choice(obj: Any, name: str, choices: tuple[str, ...]) -> str:
    value = getattr(obj, name)
    if not isinstance(value, str) or value not in choices:
        _fail(obj, name, "one of " + ", ".join(repr(c) for c in choices))
    return value


def _sequence(obj: Any, name: str, allowed: str, length: int | None = None) -> tuple:
    value = getattr(obj, name)
    if not isinstance(value, (tuple, list)) or (length is not None and len(value) != length):
        _fail(obj, name, allowed)
    object.__setattr__(obj, name, tuple(value))
    return tuple(value)


def _ints(obj: Any, name: str, length: int, lo: int, hi: int, why: str = "") -> tuple[int, ...]:
    allowed = f"{length} integers in {lo}..{hi}{why}"
    values = _sequence(obj, name, allowed, length)
    if not all(is_int(v) and lo <= v <= hi for v in values):
        _fail(obj, name, allowed)
    return values


_STAGES = "res2..res5"


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

    SECTION: ClassVar[str] = "backbone"

    def __post_init__(self) -> None:
        _ints(self, "depths", 4, 1, MAX_LAYERS, f" (blocks of {_STAGES})")
        _int(self, "stem_channels", 1, MAX_CHANNELS)
        hidden_sizes = _ints(self, "hidden_sizes", 4, 1, MAX_CHANNELS, f" (channels of {_STAGES})")
        block = _choice(self, "block", ("bottleneck", "basic"))
        reduction = _int(self, "bottleneck_reduction", 1, MAX_CHANNELS)
        if block == "bottleneck" and any(c % reduction for c in hidden_sizes):
            _fail(self, "hidden_sizes", f"multiples of backbone.bottleneck_reduction ({reduction})")
        _bool(self, "stride_in_1x1")
        _choice(self, "norm", ("frozen_bn", "bn"))
        _number(self, "norm_eps", 0.0, 1.0, open_lo=True, open_hi=True)
        _choice(self, "type", ("resnet",))

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

    SECTION: ClassVar[str] = "backbone"

    def __post_init__(self) -> None:
        # stage i is embed_dim * 2^i wide: res5 is 8x embed_dim
        _int(self, "embed_dim", 1, MAX_CHANNELS // 8, why=" (res5 is 8 x embed_dim wide)")
        _ints(self, "depths", 4, 1, MAX_LAYERS, f" (blocks of {_STAGES})")
        heads = _ints(self, "num_heads", 4, 1, MAX_CHANNELS, f" (heads of {_STAGES})")
        for stage, (width, h) in enumerate(zip(self.out_channels, heads)):
            if width % h:
                _fail(self, "num_heads", f"divisors of the stage widths {self.out_channels} (stage {stage + 1}: {h} "
                      f"does not divide {width})")
        _int(self, "window_size", 1, MAX_WINDOW)
        _number(self, "mlp_ratio", 0.0, MAX_MLP_RATIO, open_lo=True)
        _bool(self, "qkv_bias")
        _int(self, "patch_size", 4, 4, why=f" ({_STAGES} at strides 4..32)")
        _int(self, "pretrain_img_size", self.patch_size, MAX_IMAGE_SIDE)
        _number(self, "drop_path_rate", 0.0, 1.0, open_hi=True)
        _bool(self, "ape")
        _bool(self, "patch_norm")
        _number(self, "layer_norm_eps", 0.0, 1.0, open_lo=True, open_hi=True)
        _choice(self, "type", ("swin",))

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

    SECTION: ClassVar[str] = "pixel_decoder"

    def __post_init__(self) -> None:
        # the sine position encoding has conv_dim / 2 features, in (sin, cos) pairs
        _int(self, "conv_dim", 4, MAX_CHANNELS, multiple_of=4)
        _int(self, "mask_dim", 1, MAX_CHANNELS)
        _int(self, "num_encoder_layers", 1, MAX_LAYERS)
        _divisor_of(self, "num_heads", "conv_dim")
        _int(self, "num_points", 1, MAX_POINTS)
        _int(self, "ffn_dim", 1, MAX_CHANNELS)
        levels = _int(self, "num_feature_levels", 1, 4, why=f" (the coarsest of {_STAGES} the encoder refines)")
        # the FPN adds the levels below the encoder's from res2 up, and the transformer decoder takes three maps:
        # stride 8 works only when the encoder's finest level is res3 (the official 3 levels)
        stride = _int(self, "common_stride", 4, 8, multiple_of=4)
        if stride == 8 and levels != 3:
            _fail(self, "common_stride", "4 when pixel_decoder.num_feature_levels is not 3")
        groups = _int(self, "norm_groups", 1, MAX_CHANNELS)
        if self.conv_dim % groups:
            _fail(self, "conv_dim", f"a multiple of pixel_decoder.norm_groups ({groups}), the GroupNorm groups")
        _number(self, "dropout", 0.0, 1.0, open_hi=True)
        _number(self, "layer_norm_eps", 0.0, 1.0, open_lo=True, open_hi=True)


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

    SECTION: ClassVar[str] = "transformer_decoder"

    def __post_init__(self) -> None:
        # the sine position encoding has hidden_dim / 2 features, in (sin, cos) pairs
        _int(self, "hidden_dim", 4, MAX_CHANNELS, multiple_of=4)
        _int(self, "num_queries", 1, MAX_QUERIES)
        _divisor_of(self, "num_heads", "hidden_dim")
        _int(self, "ffn_dim", 1, MAX_CHANNELS)
        _int(self, "num_layers", 1, MAX_LAYERS)
        _bool(self, "pre_norm")
        _bool(self, "enforce_input_proj")
        _number(self, "dropout", 0.0, 1.0, open_hi=True)
        _int(self, "mask_mlp_layers", 1, MAX_LAYERS)
        _number(self, "layer_norm_eps", 0.0, 1.0, open_lo=True, open_hi=True)


@dataclass(frozen=True)
class PostProcessConfig:
    """Inference defaults of the official YAMLs (the Python defaults in the official code differ)."""

    object_mask_threshold: float = 0.8
    overlap_threshold: float = 0.8
    instance_topk: int = 100

    SECTION: ClassVar[str] = "postprocess"

    def __post_init__(self) -> None:
        _number(self, "object_mask_threshold", 0.0, 1.0)
        _number(self, "overlap_threshold", 0.0, 1.0)
        _int(self, "instance_topk", 1, MAX_TOPK)


_SECTIONS: dict[str, tuple[type, ...]] = {
    "backbone": (ResNetConfig, SwinConfig),
    "pixel_decoder": (PixelDecoderConfig,),
    "transformer_decoder": (TransformerDecoderConfig,),
    "postprocess": (PostProcessConfig,),
}
_BACKBONE_TYPES: dict[str, type] = {"resnet": ResNetConfig, "swin": SwinConfig}


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
    size_divisibility: int = 32  # inputs are padded to a multiple of it; 0 or 1: no padding (detectron2's rule)
    # Test-time detectron2 ResizeShortestEdge (INPUT.MIN_SIZE_TEST, INPUT.MAX_SIZE_TEST) of the model's dataset:
    # what `m2f predict` resizes to unless told otherwise. The default is detectron2's (the COCO configs').
    test_size: tuple[int, int] = (800, 1333)
    name: str = ""  # preset name, or where the config came from

    SECTION: ClassVar[str] = ""

    def __post_init__(self) -> None:
        for section, classes in _SECTIONS.items():
            if not isinstance(getattr(self, section), classes):
                _fail(self, section, "a " + " or ".join(c.__name__ for c in classes))
        n = _int(self, "num_classes", 1, MAX_CLASSES)
        names = _sequence(self, "class_names", f"a list of {n} class names (or empty)")
        if names and (len(names) != n or not all(isinstance(s, str) for s in names)):
            _fail(self, "class_names", f"a list of {n} strings, one per class, or empty (it has {len(names)} items)")
        things = _sequence(self, "thing_classes", f"a list of class ids in 0..{n - 1}")
        if not all(is_int(i) and 0 <= i < n for i in things) or len(set(things)) != len(things):
            _fail(self, "thing_classes", f"a list of distinct class ids in 0..{n - 1}")
        ids = _sequence(self, "dataset_ids", f"a list of {n} dataset category ids (or empty)")
        if ids and (len(ids) != n or not all(is_int(i) and 0 <= i <= MAX_DATASET_ID for i in ids)
                    or len(set(ids)) != n):
            _fail(self, "dataset_ids", f"a list of {n} distinct integers in 0..{MAX_DATASET_ID}, one per class, or empty")
        _choice(self, "default_task", TASKS)
        mean = _sequence(self, "pixel_mean", "3 finite numbers (R, G, B on 0..255)", 3)
        if not all(_is_finite_number(m) for m in mean):
            _fail(self, "pixel_mean", "3 finite numbers (R, G, B on 0..255)")
        std = _sequence(self, "pixel_std", "3 finite positive numbers (R, G, B on 0..255)", 3)
        if not all(_is_finite_number(s) and s > 0 for s in std):
            _fail(self, "pixel_std", "3 finite positive numbers (R, G, B on 0..255)")
        object.__setattr__(self, "pixel_mean", tuple(float(m) for m in mean))
        object.__setattr__(self, "pixel_std", tuple(float(s) for s in std))
        _int(self, "size_divisibility", 0, MAX_SIZE_DIVISIBILITY)
        short, longest = _ints(self, "test_size", 2, 1, MAX_IMAGE_SIDE, " (shortest side, longest side)")
        if longest < short:
            _fail(self, "test_size", "(shortest side, longest side) with the longest >= the shortest")
        if not isinstance(self.name, str):
            _fail(self, "name", "a string")

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
        """The config of a JSON object (``to_dict``'s output); raises ConfigError naming the bad field."""
        data = dict(_section_dict(data, ""))
        sections: dict[str, Any] = {}
        for section, classes in _SECTIONS.items():
            fields = _section_dict(data.pop(section, {}), section)
            if section == "backbone":
                kind = fields.get("type", "resnet")
                if not isinstance(kind, str) or kind not in _BACKBONE_TYPES:
                    raise ConfigFieldError("backbone.type", kind, "'resnet' or 'swin'")
                classes = (_BACKBONE_TYPES[kind],)
            sections[section] = classes[0](**_known_fields(classes[0], fields, section))
        return cls(**sections, **_known_fields(cls, data, ""))

    def replace(self, **changes: Any) -> "Mask2FormerConfig":
        return dataclasses.replace(self, **changes)


def _to_jsonable(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: _to_jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (tuple, list)):
        return [_to_jsonable(x) for x in obj]
    return obj


def _section_dict(value: Any, section: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        what = f"section {section}" if section else "an m2f config"
        raise ConfigError(f"{what} must be a JSON object of fields, got {type(value).__name__}")
    return value


def _known_fields(cls: type, data: dict[str, Any], section: str) -> dict[str, Any]:
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(names))
    if unknown:
        where = f"{section}." if section else ""
        raise ConfigError(
            f"unknown field(s) {', '.join(where + str(k) for k in unknown)} in the config; "
            f"{cls.__name__} has: {', '.join(names)}"
        )
    return data


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
# The ADE20K Swin-B / Swin-L configs are the `_res640` ones: MIN_SIZE_TEST 640, MAX_SIZE_TEST 2560.
_TEST_SIZE_OVERRIDE = {("swin-b", "ade20k-semantic"): (640, 2560), ("swin-l", "ade20k-semantic"): (640, 2560)}


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
                    test_size=_TEST_SIZE_OVERRIDE.get((backbone_name, dataset_name), _TEST_SIZES[dataset_name]),
                    name=name,
                )
    raise ConfigError(f"unknown preset {name!r}; choose one of: {', '.join(preset_names())}")
