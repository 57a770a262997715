"""ResNet backbone with the official detectron2 layout (BasicStem + bottleneck / basic blocks).

Parameter names equal those of detectron2's ``build_resnet_backbone`` (what official Mask2Former
checkpoints store under ``backbone.``): ``stem.conv1.weight``, ``stem.conv1.norm.*``,
``res2.0.conv1.weight``, ``res2.0.conv1.norm.*``, ``res2.0.shortcut.weight``, ``res2.0.shortcut.norm.*``, ...

Outputs ``res2..res5`` at strides 4, 8, 16, 32. Every stride-2 layer (7x7/2 conv, 3x3/2 max-pool, the
first block of res3..res5) rounds up, so an H x W input gives ceil(H / s) x ceil(W / s) maps.
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from m2f.errors import ConfigError

STAGE_NAMES = ("res2", "res3", "res4", "res5")
STAGE_STRIDES = {"res2": 4, "res3": 8, "res4": 16, "res5": 32}


class FrozenBatchNorm2d(nn.Module):
    """BatchNorm2d with fixed statistics and affine terms, all four stored as buffers (no num_batches_tracked).

    Initialised to the identity (running_var = 1 - eps), like detectron2's FrozenBatchNorm2d.
    """

    def __init__(self, num_features: int, eps: float = 1e-5):
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features) - eps)

    def forward(self, x: Tensor) -> Tensor:  # (B, C, H, W)
        # training=False: a single fused op that exporters turn into BatchNormalization (foldable into the conv)
        return F.batch_norm(
            x, self.running_mean, self.running_var, self.weight, self.bias, training=False, eps=self.eps
        )

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}"


def _make_norm(kind: str, channels: int, eps: float) -> nn.Module:
    if kind == "frozen_bn":
        return FrozenBatchNorm2d(channels, eps=eps)
    if kind == "bn":
        return nn.BatchNorm2d(channels, eps=eps)
    raise ConfigError(f"unknown ResNet norm {kind!r}; use 'frozen_bn' (inference, fine-tuning) or 'bn'")


class ConvNorm(nn.Conv2d):
    """A bias-free convolution followed by its normalisation, stored as the child ``norm`` (detectron2 naming)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        *,
        stride: int = 1,
        norm: str = "frozen_bn",
        norm_eps: float = 1e-5,
    ):
        super().__init__(
            in_channels, out_channels, kernel_size, stride=stride, padding=kernel_size // 2, bias=False
        )
        self.norm = _make_norm(norm, out_channels, norm_eps)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(super().forward(x))


class BasicStem(nn.Module):
    """7x7/2 conv + norm + ReLU, then a 3x3/2 max-pool: stride 4."""

    def __init__(
        self, in_channels: int = 3, out_channels: int = 64, *, norm: str = "frozen_bn", norm_eps: float = 1e-5
    ):
        super().__init__()
        self.conv1 = ConvNorm(in_channels, out_channels, 7, stride=2, norm=norm, norm_eps=norm_eps)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.conv1(x))
        return F.max_pool2d(x, kernel_size=3, stride=2, padding=1)


class BottleneckBlock(nn.Module):
    """1x1 reduce, 3x3, 1x1 expand; the stride sits on the 3x3 (or on the first 1x1 when ``stride_in_1x1``)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        bottleneck_channels: int,
        stride: int = 1,
        stride_in_1x1: bool = False,
        norm: str = "frozen_bn",
        norm_eps: float = 1e-5,
    ):
        super().__init__()
        stride_1x1, stride_3x3 = (stride, 1) if stride_in_1x1 else (1, stride)
        conv = dict(norm=norm, norm_eps=norm_eps)
        self.conv1 = ConvNorm(in_channels, bottleneck_channels, 1, stride=stride_1x1, **conv)
        self.conv2 = ConvNorm(bottleneck_channels, bottleneck_channels, 3, stride=stride_3x3, **conv)
        self.conv3 = ConvNorm(bottleneck_channels, out_channels, 1, **conv)
        # detectron2 projects only when the channels change; torchvision / HF also when the stride does.
        # The two agree on every real ResNet; the union keeps shapes consistent for any config.
        needs_projection = in_channels != out_channels or stride != 1
        self.shortcut = ConvNorm(in_channels, out_channels, 1, stride=stride, **conv) if needs_projection else None

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.conv1(x))
        out = F.relu(self.conv2(out))
        out = self.conv3(out)
        shortcut = self.shortcut(x) if self.shortcut is not None else x
        return F.relu(out + shortcut)


class BasicBlock(nn.Module):
    """Two 3x3 convs (ResNet-18/34 style); the first carries the stride."""

    def __init__(
        self, in_channels: int, out_channels: int, *, stride: int = 1, norm: str = "frozen_bn", norm_eps: float = 1e-5
    ):
        super().__init__()
        conv = dict(norm=norm, norm_eps=norm_eps)
        self.conv1 = ConvNorm(in_channels, out_channels, 3, stride=stride, **conv)
        self.conv2 = ConvNorm(out_channels, out_channels, 3, **conv)
        needs_projection = in_channels != out_channels or stride != 1
        self.shortcut = ConvNorm(in_channels, out_channels, 1, stride=stride, **conv) if needs_projection else None

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.conv1(x))
        out = self.conv2(out)
        shortcut = self.shortcut(x) if self.shortcut is not None else x
        return F.relu(out + shortcut)


class ResNet(nn.Module):
    """ResNet trunk returning ``{"res2": (B, C2, H/4, W/4), ..., "res5": (B, C5, H/32, W/32)}`` (sizes rounded up)."""

    def __init__(
        self,
        *,
        depths: tuple[int, ...] = (3, 4, 6, 3),
        stem_channels: int = 64,
        hidden_sizes: tuple[int, ...] = (256, 512, 1024, 2048),
        block: Literal["bottleneck", "basic"] = "bottleneck",
        bottleneck_reduction: int = 4,
        stride_in_1x1: bool = False,
        norm: Literal["frozen_bn", "bn"] = "frozen_bn",
        norm_eps: float = 1e-5,
        in_channels: int = 3,
    ):
        super().__init__()
        if len(depths) != 4 or len(hidden_sizes) != 4:
            raise ConfigError(
                f"ResNet needs 4 stages (res2..res5); got depths={tuple(depths)}, hidden_sizes={tuple(hidden_sizes)}"
            )
        if min(depths) < 1:
            raise ConfigError(f"every ResNet stage needs at least one block; got depths={tuple(depths)}")
        if block not in ("bottleneck", "basic"):
            raise ConfigError(f"unknown ResNet block {block!r}; use 'bottleneck' or 'basic'")
        if block == "bottleneck" and any(c % bottleneck_reduction for c in hidden_sizes):
            raise ConfigError(
                f"hidden_sizes {tuple(hidden_sizes)} must be multiples of bottleneck_reduction={bottleneck_reduction}"
            )

        self.stem = BasicStem(in_channels, stem_channels, norm=norm, norm_eps=norm_eps)
        channels = stem_channels
        for index, (name, depth, out_channels) in enumerate(zip(STAGE_NAMES, depths, hidden_sizes)):
            blocks = []
            for block_index in range(depth):
                stride = 2 if (block_index == 0 and index > 0) else 1
                if block == "bottleneck":
                    blocks.append(
                        BottleneckBlock(
                            channels,
                            out_channels,
                            bottleneck_channels=out_channels // bottleneck_reduction,
                            stride=stride,
                            stride_in_1x1=stride_in_1x1,
                            norm=norm,
                            norm_eps=norm_eps,
                        )
                    )
                else:
                    blocks.append(BasicBlock(channels, out_channels, stride=stride, norm=norm, norm_eps=norm_eps))
                channels = out_channels
            self.add_module(name, nn.Sequential(*blocks))

        self.out_channels: dict[str, int] = dict(zip(STAGE_NAMES, (int(c) for c in hidden_sizes)))
        self.out_strides: dict[str, int] = dict(STAGE_STRIDES)

    def forward(self, x: Tensor) -> dict[str, Tensor]:  # x: (B, 3, H, W)
        x = self.stem(x)  # (B, stem, H/4, W/4)
        outputs = {}
        for name in STAGE_NAMES:
            x = getattr(self, name)(x)
            outputs[name] = x
        return outputs
