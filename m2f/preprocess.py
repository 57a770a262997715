"""Images in, a padded normalised batch out: what the official ``MaskFormer.forward`` does before the backbone.

The official pipeline (detectron2 ``DefaultPredictor`` + ``MaskFormer``): read the image as RGB with its EXIF
orientation applied, optionally ``ResizeShortestEdge`` (test time: one short-edge length, a max size, bilinear via
PIL on uint8 images), normalise ``(x - pixel_mean) / pixel_std`` on 0..255 values, then ``ImageList.from_tensors``
zero-pads (in normalised space) the bottom and right of every image to the largest height / width of the batch,
rounded up to ``size_divisibility``. :func:`preprocess` does exactly that.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F

from .config import Mask2FormerConfig
from .errors import InputError

ImageInput = Union[np.ndarray, torch.Tensor]


def load_image(path: str | os.PathLike) -> np.ndarray:
    """Read an image file as an (H, W, 3) uint8 RGB array with its EXIF orientation applied.

    Raises :class:`InputError` (one line, naming the file) if it is missing, a directory, or not a readable image.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    path = Path(path)
    if not path.exists():
        raise InputError(f"image {path} does not exist; check the path")
    if path.is_dir():
        raise InputError(f"image {path} is a directory; pass image files (e.g. {path}/*.jpg)")
    try:
        with Image.open(path) as img:
            img.load()  # decode now: truncated / corrupt data fails here, not later
            img = ImageOps.exif_transpose(img)
            rgb = img.convert("RGB")
    except UnidentifiedImageError:
        raise InputError(f"image {path} is not in an image format Pillow can read; convert it to PNG or JPEG") from None
    except Image.DecompressionBombError as exc:
        raise InputError(f"image {path} is too large to decode safely ({_one_line(exc)})") from None
    except (OSError, ValueError, SyntaxError) as exc:  # truncated / corrupt data, unreadable file
        problem = _one_line(exc)
        raise InputError(f"image {path} cannot be decoded ({problem}); the file is corrupt or truncated") from None
    return np.asarray(rgb, dtype=np.uint8).copy()


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


@dataclass
class Batch:
    """A batch ready for the network.

    pixel_values: (B, 3, Hp, Wp) float32, normalised, zero-padded at the bottom / right to ``size_divisibility``.
    image_sizes: per image (h, w) fed to the network (after the optional resize, before padding).
    original_sizes: per image (H, W) as given (results are reported at this size).
    """

    pixel_values: torch.Tensor
    image_sizes: list[tuple[int, int]]
    original_sizes: list[tuple[int, int]]

    @property
    def padded_size(self) -> tuple[int, int]:
        return int(self.pixel_values.shape[-2]), int(self.pixel_values.shape[-1])


def resized_shape(height: int, width: int, shortest: int, max_size: int | None = None) -> tuple[int, int]:
    """detectron2 ``ResizeShortestEdge.get_output_shape``: scale the short edge to ``shortest`` unless the long
    edge would exceed ``max_size``, in which case the long edge becomes ``max_size``; round half up."""
    scale = shortest / min(height, width)
    new_h, new_w = (float(shortest), scale * width) if height < width else (scale * height, float(shortest))
    if max_size is not None and max(new_h, new_w) > max_size:
        rescale = max_size / max(new_h, new_w)
        new_h, new_w = new_h * rescale, new_w * rescale
    return int(new_h + 0.5), int(new_w + 0.5)


def padded_shape(sizes: Sequence[tuple[int, int]], size_divisibility: int) -> tuple[int, int]:
    """detectron2 ``ImageList.from_tensors``: the largest (h, w) of the batch rounded up to the divisibility."""
    h = max(s[0] for s in sizes)
    w = max(s[1] for s in sizes)
    if size_divisibility > 1:
        h = int(math.ceil(h / size_divisibility) * size_divisibility)
        w = int(math.ceil(w / size_divisibility) * size_divisibility)
    return h, w


def _as_chw(image: ImageInput, index: int) -> torch.Tensor:
    """(3, H, W) tensor (uint8 stays uint8). numpy arrays are (H, W, 3) RGB; tensors are (3, H, W) RGB 0..255."""
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3:
            raise InputError(
                f"image {index} is a numpy array of shape {image.shape}; expected (H, W, 3) RGB "
                "(convert grayscale / RGBA first, e.g. with load_image)"
            )
        if image.dtype != np.uint8 and not np.issubdtype(image.dtype, np.floating):
            raise InputError(f"image {index} has dtype {image.dtype}; expected uint8 (0..255) or float 0..255 RGB")
        return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)
    if isinstance(image, torch.Tensor):
        if image.ndim != 3 or image.shape[0] != 3:
            raise InputError(
                f"image {index} is a tensor of shape {tuple(image.shape)}; expected (3, H, W) RGB with values 0..255"
            )
        if image.dtype != torch.uint8 and not image.is_floating_point():
            raise InputError(f"image {index} has dtype {image.dtype}; expected uint8 or float 0..255 RGB")
        return image
    raise InputError(f"image {index} is a {type(image).__name__}; expected a numpy array or a torch tensor")


def _resize(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """detectron2 ``ResizeTransform.apply_image``: PIL bilinear for uint8, else torch bilinear (align_corners=False)."""
    if tuple(image.shape[-2:]) == size:
        return image
    if image.dtype == torch.uint8:
        from PIL import Image

        pil = Image.fromarray(image.permute(1, 2, 0).cpu().numpy())
        resized = np.asarray(pil.resize((size[1], size[0]), Image.BILINEAR))
        return torch.from_numpy(resized.copy()).permute(2, 0, 1).to(image.device)
    out = F.interpolate(image[None].float(), size=size, mode="bilinear", align_corners=False)[0]
    return out.to(image.dtype)


def preprocess(
    images: Sequence[ImageInput],
    config: Mask2FormerConfig,
    resize_shortest: int | None = None,
    max_size: int | None = None,
    device: str | torch.device | None = None,
) -> Batch:
    """Resize (optional), normalise and pad ``images`` into one :class:`Batch` on ``device`` (default: CPU).

    images: (H, W, 3) numpy arrays (uint8 RGB as from :func:`load_image`) or (3, H, W) RGB tensors in 0..255.
    resize_shortest / max_size: detectron2's test-time ``ResizeShortestEdge(resize_shortest, max_size)``, done as
        detectron2 does it: PIL bilinear on uint8 images (round to uint8), torch bilinear on float images. None:
        no resize (the default; ``max_size`` alone is an error).
    """
    if len(images) == 0:
        raise InputError("no images to preprocess; pass at least one image")
    if resize_shortest is None and max_size is not None:
        raise InputError("max_size needs resize_shortest; pass both (e.g. 800 and 1333) or neither")
    if resize_shortest is not None and resize_shortest < 1:
        raise InputError(f"resize_shortest must be a positive number of pixels, got {resize_shortest}")
    if max_size is not None and max_size < 1:
        raise InputError(f"max_size must be a positive number of pixels, got {max_size}")
    device = torch.device(device) if device is not None else torch.device("cpu")

    chw, original_sizes, image_sizes = [], [], []
    for index, image in enumerate(images):
        t = _as_chw(image, index)
        height, width = int(t.shape[1]), int(t.shape[2])
        if height < 1 or width < 1:
            raise InputError(f"image {index} is empty ({height}x{width})")
        original_sizes.append((height, width))
        if resize_shortest is not None:
            t = _resize(t, resized_shape(height, width, resize_shortest, max_size))
        image_sizes.append((int(t.shape[1]), int(t.shape[2])))
        chw.append(t)

    padded_h, padded_w = padded_shape(image_sizes, config.size_divisibility)
    mean = torch.tensor(config.pixel_mean, dtype=torch.float32, device=device).view(3, 1, 1)
    std = torch.tensor(config.pixel_std, dtype=torch.float32, device=device).view(3, 1, 1)
    pixel_values = torch.zeros(len(chw), 3, padded_h, padded_w, dtype=torch.float32, device=device)
    for i, t in enumerate(chw):
        h, w = image_sizes[i]
        # move as uint8 (4x less traffic), normalise on the device; the padding stays 0 = normalised zero
        pixel_values[i, :, :h, :w] = (t.to(device).float() - mean) / std
    return Batch(pixel_values=pixel_values, image_sizes=image_sizes, original_sizes=original_sizes)
