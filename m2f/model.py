"""The Mask2Former network: backbone -> pixel decoder -> masked-attention transformer decoder.

Same module tree and parameter names as the official implementation below the top level
(``backbone``, ``pixel_decoder`` = official ``sem_seg_head.pixel_decoder``, ``transformer_decoder`` = official
``sem_seg_head.predictor``). Input: images normalised as the official model does ((x - mean) / std on 0..255
pixels, the same tensor HF's processor produces), padded (the official pipeline pads to a multiple of 32).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from m2f.config import Mask2FormerConfig
from m2f.errors import InputError
from m2f.kernels import check_backend_name
from m2f.pixel_decoder import MSDeformAttnPixelDecoder, MultiScaleDeformableAttention
from m2f.transformer_decoder import CrossAttentionLayer, MultiScaleMaskedTransformerDecoder

# The modules that call an attention kernel: each holds its own ``backend``, nothing above them keeps a copy.
ATTENTION_LEAVES = (MultiScaleDeformableAttention, CrossAttentionLayer)


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
            or "auto" (Triton on CUDA tensors, PyTorch elsewhere); :meth:`set_backend` switches it later.
    """

    def __init__(self, config: Mask2FormerConfig, backend: str = "torch") -> None:
        super().__init__()
        from m2f.backbones import build_backbone  # the backbones package is only needed when a model is built

        self.config = config
        self.backbone = build_backbone(config.backbone)
        self.pixel_decoder = MSDeformAttnPixelDecoder(
            dict(self.backbone.out_channels), dict(self.backbone.out_strides), config.pixel_decoder
        )
        self.transformer_decoder = MultiScaleMaskedTransformerDecoder(
            in_channels=config.pixel_decoder.conv_dim,
            num_classes=config.num_classes,
            mask_dim=config.pixel_decoder.mask_dim,
            config=config.transformer_decoder,
        )
        self.set_backend(backend)

    @classmethod
    def from_pretrained(cls, path: str | Path, **kwargs: Any) -> "Mask2Former":
        """:func:`m2f.from_pretrained`: a local checkpoint (HF, detectron2 with ``preset=``, m2f) or a hub id
        (``OWNER/NAME[@REVISION]``), in eval mode; ``preset``, ``config``, ``backend`` and ``device`` as there."""
        from m2f.checkpoints import from_pretrained

        return from_pretrained(path, **kwargs)

    def save_pretrained(self, path: str | Path, force: bool = False) -> Path:
        """Write this model as an m2f checkpoint directory (``m2f_config.json`` + ``model.safetensors``), atomically;
        refuses to replace ``path`` unless ``force``."""
        from m2f.checkpoints import save_pretrained

        return save_pretrained(self, path, force=force)

    def post_process(self, outputs: "Mask2FormerOutput", batch: Any, task: str | None = None) -> list:
        """:func:`m2f.postprocess.run` with this model's config: thresholds, top-k and thing classes from
        ``self.config`` (``task`` defaults to ``config.default_task``)."""
        from m2f.postprocess import run

        return run(outputs, batch, self.config, task=task)

    def attention_leaves(self) -> list[nn.Module]:
        """The modules that call an attention kernel, each holding its ``backend``."""
        return [m for m in self.modules() if isinstance(m, ATTENTION_LEAVES)]

    def set_backend(self, backend: str) -> "Mask2Former":
        """Switch every attention leaf to ``backend`` ("torch", "triton", "auto"); returns the model."""
        check_backend_name(backend)
        for leaf in self.attention_leaves():
            leaf.backend = backend
        return self

    @property
    def backend(self) -> str:
        """The leaves' backend; "mixed" only where code switched single leaves (export's plugin copies)."""
        names = {leaf.backend for leaf in self.attention_leaves()}
        return names.pop() if len(names) == 1 else "mixed"

    @property
    def num_classes(self) -> int:
        return self.config.num_classes

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def check_input(self, pixel_values: torch.Tensor) -> None:
        """Raise InputError naming the fix unless ``pixel_values`` is what :meth:`forward` takes.

        Looks only at the tensor's type, dtype, device and shape (never its values): no host sync, and nothing that
        tracing (torch.compile, torch.export, ONNX export) cannot see through.
        """
        prepare = "prepare images with m2f.preprocess.preprocess(images, model.config)"
        if not isinstance(pixel_values, torch.Tensor):
            raise InputError(f"pixel_values must be a torch.Tensor, got {type(pixel_values).__name__}; {prepare}")
        if pixel_values.dim() != 4 or pixel_values.shape[1] != 3:
            raise InputError(
                f"pixel_values must be (B, 3, H, W) normalised RGB, got shape {tuple(pixel_values.shape)}; {prepare}"
            )
        if not pixel_values.is_floating_point():
            raise InputError(f"pixel_values is {pixel_values.dtype}, not normalised floats; {prepare}")
        if pixel_values.dtype != self.dtype:
            raise InputError(
                f"pixel_values is {pixel_values.dtype} but the model is {self.dtype}; pass "
                f"pixel_values.to({self.dtype}) (or cast the model with model.to(dtype))"
            )
        if pixel_values.device != self.device:
            raise InputError(
                f"pixel_values is on {pixel_values.device} but the model is on {self.device}; pass "
                "pixel_values.to(model.device)"
            )
        batch, _, height, width = pixel_values.shape
        if batch == 0:
            raise InputError("pixel_values is an empty batch (B = 0); pass at least one image")
        # GroupNorm needs two values per group; the smallest map it normalises is the coarsest (the backbones round up)
        stride = max(self.backbone.out_strides.values())
        coarsest = (-(-height // stride), -(-width // stride))
        per_group = self.config.pixel_decoder.conv_dim // self.config.pixel_decoder.norm_groups
        if per_group * coarsest[0] * coarsest[1] < 2:
            raise InputError(
                f"pixel_values of {height}x{width} is too small for this model: its 1/{stride} feature map "
                f"({coarsest[0]}x{coarsest[1]}) leaves one value per GroupNorm group; make one side at least "
                f"{stride + 1} pixels"
            )

    def forward(self, pixel_values: torch.Tensor) -> Mask2FormerOutput:  # (B, 3, H, W) normalised
        self.check_input(pixel_values)
        features = self.backbone(pixel_values)  # {"res2": (B, C2, H/4, W/4), ..., "res5": (B, C5, H/32, W/32)}
        pixel = self.pixel_decoder(features)
        classes, masks = self.transformer_decoder(pixel.multi_scale_features, pixel.mask_features)
        return Mask2FormerOutput(
            pred_logits=classes[-1],
            pred_masks=masks[-1],
            aux_outputs=tuple(zip(classes[:-1], masks[:-1])),
        )

    def extra_repr(self) -> str:
        return f"backend={self.backend!r}, num_classes={self.config.num_classes}"


def build_model(config: Mask2FormerConfig, backend: str = "torch") -> Mask2Former:
    """A Mask2Former with freshly initialised weights (the official initialisation), in training mode."""
    return Mask2Former(config, backend=backend)
