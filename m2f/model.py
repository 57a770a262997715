"""The Mask2Former network: backbone -> pixel decoder -> masked-attention transformer decoder.

Same module tree and parameter names as the official implementation below the top level
(``backbone``, ``pixel_decoder`` = official ``sem_seg_head.pixel_decoder``, ``transformer_decoder`` = official
``sem_seg_head.predictor``). Input: images normalised as the official model does ((x - mean) / std on 0..255
pixels, the same tensor HF's processor produces), padded (the official pipeline pads to a multiple of 32).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from m2f.config import Mask2FormerConfig
from m2f.errors import BackendUnavailableError, InputError
from m2f.kernels import BACKENDS
from m2f.pixel_decoder import MSDeformAttnPixelDecoder
from m2f.transformer_decoder import MultiScaleMaskedTransformerDecoder


@dataclass(frozen=True)
class Mask2FormerOutput:
    """Predictions of one forward pass.

    Attributes:
        pred_logits: (B, Q, K + 1) class logits of the last layer; index K is "no object".
        pred_masks: (B, Q, H / 4, W / 4) mask logits of the last layer (at the mask features' stride).
        aux_outputs: ``(pred_logits, pred_masks)`` of every earlier prediction, in order: the one on the
            learnable queries, then after decoder layers 1 .. num_layers - 1 (``num_layers`` pairs in all).
    """

    pred_logits: torch.Tensor
    pred_masks: torch.Tensor
    aux_outputs: tuple[tuple[torch.Tensor, torch.Tensor], ...] = ()


# a pytree node, so that torch.export / torch.compile can return it
torch.export.register_dataclass(Mask2FormerOutput, serialized_type_name="m2f.model.Mask2FormerOutput")


class Mask2Former(nn.Module):
    """Mask2Former for universal (panoptic / instance / semantic) segmentation.

    Args:
        config: the architecture (see :mod:`m2f.config`; presets via :func:`m2f.preset`).
        backend: attention kernels: "torch" (PyTorch reference, exports anywhere), "triton" (fused GPU kernels),
            or "auto" (Triton on CUDA tensors, PyTorch elsewhere). Fixed at build time.
    """

    def __init__(self, config: Mask2FormerConfig, backend: str = "torch") -> None:
        super().__init__()
        if backend not in BACKENDS:
            raise BackendUnavailableError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
        from m2f.backbones import build_backbone  # the backbones package is only needed when a model is built

        self.config = config
        self._backend = backend
        self.backbone = build_backbone(config.backbone)
        self.pixel_decoder = MSDeformAttnPixelDecoder(
            dict(self.backbone.out_channels), dict(self.backbone.out_strides), config.pixel_decoder, backend=backend
        )
        self.transformer_decoder = MultiScaleMaskedTransformerDecoder(
            in_channels=config.pixel_decoder.conv_dim,
            num_classes=config.num_classes,
            mask_dim=config.pixel_decoder.mask_dim,
            config=config.transformer_decoder,
            backend=backend,
        )

    @property
    def backend(self) -> str:
        return self._backend

    @property
    def num_classes(self) -> int:
        return self.config.num_classes

    def forward(self, pixel_values: torch.Tensor) -> Mask2FormerOutput:  # (B, 3, H, W) normalised
        if pixel_values.dim() != 4 or pixel_values.shape[1] != 3:
            raise InputError(
                f"pixel_values must be (B, 3, H, W) normalised RGB, got shape {tuple(pixel_values.shape)}; "
                "see m2f's preprocessing for how to prepare images"
            )
        features = self.backbone(pixel_values)  # {"res2": (B, C2, H/4, W/4), ..., "res5": (B, C5, H/32, W/32)}
        pixel = self.pixel_decoder(features)
        classes, masks = self.transformer_decoder(pixel.multi_scale_features, pixel.mask_features)
        return Mask2FormerOutput(
            pred_logits=classes[-1],
            pred_masks=masks[-1],
            aux_outputs=tuple(zip(classes[:-1], masks[:-1])),
        )

    def extra_repr(self) -> str:
        return f"backend={self._backend!r}, num_classes={self.config.num_classes}"


def build_model(config: Mask2FormerConfig, backend: str = "torch") -> Mask2Former:
    """A Mask2Former with freshly initialised weights (the official initialisation), in training mode."""
    return Mask2Former(config, backend=backend)
