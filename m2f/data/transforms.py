"""Training augmentation and batching.

:class:`ScaleJitterCrop` is the official "large scale jitter" (detectron2 ``ResizeScale`` + ``FixedSizeCrop`` +
``RandomFlip``): resize so that the image fits the target size times a random scale, flip, then crop / pad to the
target size. Randomness comes from a ``torch.Generator`` the caller seeds per (seed, epoch, index), so a sample's
augmentation does not depend on data-loader workers or on where a run was resumed.

:func:`collate` normalises and zero-pads images like :func:`m2f.preprocess.preprocess` (bottom / right, to the
batch's largest size rounded up to ``size_divisibility``) and pads the target masks with zeros (no segment).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .datasets import Sample


@dataclass(frozen=True)
class ScaleJitterCrop:
    size: tuple[int, int]  # output (H, W)
    scale_range: tuple[float, float] = (0.1, 2.0)  # official LSJ
    hflip: bool = True

    def __call__(self, sample: Sample, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns image (3, H, W) uint8, masks (N, H, W) bool, labels (N,) int64; crowd and emptied segments dropped."""
        image = torch.from_numpy(sample.image).permute(2, 0, 1)  # (3, h, w)
        keep = ~sample.iscrowd
        masks = torch.from_numpy(sample.masks[keep])  # (N, h, w)
        labels = torch.from_numpy(sample.labels[keep])
        h, w = image.shape[1:]
        out_h, out_w = self.size
        lo, hi = self.scale_range
        scale = lo + (hi - lo) * float(torch.rand((), generator=generator))
        factor = min(out_h * scale / h, out_w * scale / w)
        new_h, new_w = max(1, int(round(h * factor))), max(1, int(round(w * factor)))
        if (new_h, new_w) != (h, w):
            image = F.interpolate(image[None].float(), size=(new_h, new_w), mode="bilinear", align_corners=False)[0]
            image = image.round().clamp(0, 255).to(torch.uint8)
            if masks.shape[0]:
                masks = F.interpolate(masks[None].to(torch.uint8), size=(new_h, new_w), mode="nearest")[0].bool()
            else:
                masks = torch.zeros((0, new_h, new_w), dtype=torch.bool)
        if self.hflip and float(torch.rand((), generator=generator)) < 0.5:
            image, masks = image.flip(-1), masks.flip(-1)
        # random crop when larger than the target, zero pad (bottom / right) when smaller
        top = int(torch.randint(0, max(new_h - out_h, 0) + 1, (), generator=generator))
        left = int(torch.randint(0, max(new_w - out_w, 0) + 1, (), generator=generator))
        image = image[:, top:top + out_h, left:left + out_w]
        masks = masks[:, top:top + out_h, left:left + out_w]
        ch, cw = image.shape[1:]
        if (ch, cw) != (out_h, out_w):
            image = F.pad(image, (0, out_w - cw, 0, out_h - ch))
            masks = F.pad(masks, (0, out_w - cw, 0, out_h - ch))
        nonempty = masks.flatten(1).any(1) if masks.shape[0] else torch.zeros(0, dtype=torch.bool)
        return image, masks[nonempty], labels[nonempty]


def collate(items: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], pixel_mean: Sequence[float],
            pixel_std: Sequence[float], size_divisibility: int = 32) -> tuple[torch.Tensor, list[dict]]:
    """(image uint8 (3,h,w), masks (N,h,w), labels (N,)) items -> pixel_values (B,3,Hp,Wp), targets.

    targets[i] = {"labels": (N,) int64, "masks": (N, Hp, Wp) bool} at the padded input resolution.
    """
    heights = [int(img.shape[1]) for img, _, _ in items]
    widths = [int(img.shape[2]) for img, _, _ in items]
    div = max(size_divisibility, 1)
    hp, wp = math.ceil(max(heights) / div) * div, math.ceil(max(widths) / div) * div
    mean = torch.tensor(pixel_mean, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(pixel_std, dtype=torch.float32).view(3, 1, 1)
    pixel_values = torch.zeros(len(items), 3, hp, wp)
    targets = []
    for i, (image, masks, labels) in enumerate(items):
        h, w = image.shape[1:]
        pixel_values[i, :, :h, :w] = (image.float() - mean) / std
        padded = torch.zeros((masks.shape[0], hp, wp), dtype=torch.bool)
        padded[:, :h, :w] = masks
        targets.append({"labels": labels.long(), "masks": padded})
    return pixel_values, targets


def sample_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """The augmentation RNG of one sample: a pure function of (seed, epoch, index)."""
    mixed = np.random.SeedSequence([seed, epoch, index]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(mixed) & ((1 << 63) - 1))
