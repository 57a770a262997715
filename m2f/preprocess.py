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
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F

from .config import Mask2FormerConfig
from .errors import InputError

ImageInput = Union[np.ndarray, torch.Tensor]


# Partly transparent images are composited over this colour: what image viewers show them on (a white page).
TRANSPARENT_BACKGROUND = (255, 255, 255)
# A short edge more than this many times below the model's input size is "far smaller" (the image gets a note).
_FAR_SMALLER = 4


class InputNote(UserWarning):
    """Something about an input the user should know, that m2f handled (transparency, extra frames, CMYK, a tiny
    image, no segment found). The CLI prints each as one ``m2f: note: ...`` line; filter them with ``warnings``."""


def load_image(path: str | os.PathLike) -> np.ndarray:
    """Read an image file as an (H, W, 3) uint8 RGB array with its EXIF orientation applied.

    Conversions, each announced by an :class:`InputNote` warning where it changes what the file shows:
    16-bit pixels (grayscale or RGB) keep their top 8 bits (``>> 8``); transparent pixels (alpha channel, palette or
    grayscale transparency) are composited over :data:`TRANSPARENT_BACKGROUND` (white); CMYK is converted without
    colour management; of a multi-frame file (animated GIF / PNG, multi-page TIFF) only the first frame is read.
    Raises :class:`InputError` (one line, naming the file) if it is missing, a directory, not a readable image,
    floating-point or 32-bit integer data, or larger than Pillow's decompression-bomb limit.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    path = Path(path)
    if not path.exists():
        raise InputError(f"image {path} does not exist; check the path")
    if path.is_dir():
        raise InputError(f"image {path} is a directory; pass image files (e.g. {path}/*.jpg)")
    notes = []
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", Image.DecompressionBombWarning)
            img = Image.open(path)
        for warning in caught:
            if issubclass(warning.category, Image.DecompressionBombWarning):
                notes.append(f"image {path} is very large ({_one_line(warning.message)}); decoding it anyway")
            else:  # not ours to handle: pass it on
                warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
        with img:
            frames = getattr(img, "n_frames", 1)
            img.load()  # decode now (the first frame): truncated / corrupt data fails here, not later
            rgb = _to_rgb(ImageOps.exif_transpose(img), path, notes)
    except UnidentifiedImageError:
        raise InputError(f"image {path} is not in an image format Pillow can read; convert it to PNG or JPEG") from None
    except Image.DecompressionBombError as exc:
        raise InputError(f"image {path} is too large to decode safely ({_one_line(exc)}); downscale it first, or "
                         "raise PIL.Image.MAX_IMAGE_PIXELS if you trust the file") from None
    except (OSError, ValueError, SyntaxError) as exc:  # truncated / corrupt data, unreadable file
        problem = _one_line(exc)
        raise InputError(f"image {path} cannot be decoded ({problem}); the file is corrupt or truncated") from None
    # MPO (camera JPEGs) holds previews / other views of the same picture, not further inputs
    if frames > 1 and img.format != "MPO":
        notes.append(f"image {path} has {frames} frames; m2f segments the first only (save the others as "
                     "separate images to segment them)")
    for note in notes:
        warnings.warn(note, InputNote, stacklevel=2)
    return rgb


def _to_rgb(img, path: Path, notes: list[str]) -> np.ndarray:
    """(H, W, 3) uint8 RGB of a decoded PIL image; appends what the user should know to ``notes``."""
    mode = img.mode
    if mode == "F":
        raise InputError(f"image {path} has floating-point pixels, whose range is unknown; save it as an 8- or "
                         "16-bit PNG")
    alpha = None
    if mode.startswith("I"):  # I;16 / I;16B / ...: 16-bit; I: 32-bit integers, which Pillow gives 16-bit data as
        values = np.asarray(img).astype(np.int64)
        if values.size and (values.min() < 0 or values.max() > 0xFFFF):
            raise InputError(f"image {path} has 32-bit integer pixels ({values.min()}..{values.max()}); m2f reads "
                             "8- and 16-bit images: save it as an 8- or 16-bit PNG")
        if "transparency" in img.info:  # one gray value marks transparent pixels
            alpha = np.where(values == img.info["transparency"], 0, 255).astype(np.uint8)
        rgb = np.repeat((values >> 8).astype(np.uint8)[..., None], 3, axis=2)  # the top 8 of 16 bits
    else:
        if mode == "CMYK":
            notes.append(f"image {path} is CMYK; converted to RGB without colour management (colours may be off: "
                         "convert it to RGB yourself for exact colours)")
        if "A" in img.getbands() or "a" in img.getbands() or "transparency" in img.info:
            rgba = np.asarray(img.convert("RGBA"))
            rgb, alpha = rgba[..., :3], rgba[..., 3]
        else:
            rgb = np.asarray(img.convert("RGB"))
    if alpha is not None and (alpha < 255).any():
        transparent = float((alpha < 255).mean())
        notes.append(f"image {path} has transparent pixels ({transparent:.0%} of the image); composited over "
                     "white (flatten it yourself for another background)")
        rgb = _composite(rgb, alpha, TRANSPARENT_BACKGROUND)
    return np.array(rgb, dtype=np.uint8)  # a writable copy (PIL arrays are read-only)


def _composite(rgb: np.ndarray, alpha: np.ndarray, background: tuple[int, int, int]) -> np.ndarray:
    """``rgb`` over a solid ``background`` (uint8, rounded to nearest): (rgb * a + bg * (255 - a)) / 255."""
    a = alpha.astype(np.uint32)[..., None]
    bg = np.asarray(background, dtype=np.uint32)
    return ((rgb.astype(np.uint32) * a + bg * (255 - a) + 127) // 255).astype(np.uint8)


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
    names: Sequence[str] | None = None,
) -> Batch:
    """Resize (optional), normalise and pad ``images`` into one :class:`Batch` on ``device`` (default: CPU).

    images: (H, W, 3) numpy arrays (uint8 RGB as from :func:`load_image`) or (3, H, W) RGB tensors in 0..255.
    resize_shortest / max_size: detectron2's test-time ``ResizeShortestEdge(resize_shortest, max_size)``, done as
        detectron2 does it: PIL bilinear on uint8 images (round to uint8), torch bilinear on float images. None:
        no resize (the default; ``max_size`` alone is an error). ``*config.test_size`` is the model's official one.
    names: what notes call each image (e.g. its file); default ``image <index>``.

    An image far smaller than the model's input size (the resize target, else ``config.test_size``) gets an
    :class:`InputNote`: few or no segments are to be expected.
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
        _note_if_far_smaller(names[index] if names is not None else f"image {index}", height, width, config,
                             resize_shortest)
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


def _note_if_far_smaller(name: str, height: int, width: int, config: Mask2FormerConfig,
                         resize_shortest: int | None) -> None:
    input_size = resize_shortest if resize_shortest is not None else config.test_size[0]
    if min(height, width) * _FAR_SMALLER >= input_size:
        return
    how = (f"it is upscaled {input_size / min(height, width):.1f}x" if resize_shortest is not None
           else "it is not resized")
    warnings.warn(f"{name} is {height}x{width}, far smaller than the model's input size (short edge {input_size}); "
                  f"{how}, expect few or no segments", InputNote, stacklevel=3)


# ---------------------------------------------------------------------------------------------------------------
# memory: refuse what cannot fit before allocating it
# ---------------------------------------------------------------------------------------------------------------


def inference_bytes(config: Mask2FormerConfig, input_size: tuple[int, int], original_size: tuple[int, int],
                    task: str) -> int:
    """About how many bytes one image needs to be segmented for ``task``: the network at its padded ``input_size``
    plus the post-processing at its ``original_size`` (within ~10% of the measured peak for the default model).

    Network, float32 per input pixel: the input; backbone stages; the deformable encoder's sampled values, which
    the plain-PyTorch op materialises as (tokens, conv_dim, levels x points) twice (the grid_sample results and
    their weighted product; the dominant term); the mask features and every decoder layer's mask logits (kept as
    auxiliary outputs), at stride 4. Post-processing, what the task surely holds at the original size: semantic,
    all queries' mask probabilities and all classes' probabilities; instance, the top-k masks (logits, probabilities,
    binary); panoptic, only its per-pixel maps, since how many queries it keeps is known only after the network
    ran (so for panoptic this is a lower bound).
    """
    pixel, decoder = config.pixel_decoder, config.transformer_decoder
    strides = [4 * 2**i for i in range(len(config.backbone.out_channels))]  # res2..res5
    backbone = sum(2 * c / s**2 for c, s in zip(config.backbone.out_channels, strides))
    tokens = sum(1 / s**2 for s in strides[-pixel.num_feature_levels:])
    deformable = 2 * tokens * pixel.conv_dim * pixel.num_feature_levels * pixel.num_points
    masks = (pixel.mask_dim + (decoder.num_layers + 1) * decoder.num_queries) / pixel.common_stride**2
    network = 4 * (3 + backbone + deformable + masks) * input_size[0] * input_size[1]
    queries = decoder.num_queries
    per_original_pixel = {  # bytes
        "semantic": 4 * (2 * queries + config.num_classes),
        "instance": 9 * min(config.postprocess.instance_topk, queries * config.num_classes),
        "panoptic": 24,  # assigned query (int64), its prob (float32), segment ids (int32), masks of them
    }[task]
    return int(network + 4 * queries * input_size[0] * input_size[1]
               + per_original_pixel * original_size[0] * original_size[1])


def available_memory_bytes(device: str | torch.device) -> int | None:
    """Free memory of ``device``: the GPU's free memory, or the system's available RAM (Linux); None if unknown."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None
