"""The logic of the Triton Inference Server ensemble's Python-backend models, as plain functions.

``pre``: encoded image bytes -> ``pixel_values`` (1, 3, Hp, Wp) float32 and ``image_info`` (6,) int32 = image
(resized) h, w, original h, w, padded h, w; exactly `m2f predict`'s pre-processing (EXIF orientation, RGB, PIL
bilinear resize of the short edge to the config's test_size, capped at its max size, ``(x - mean) / std``, zero
padding to the size divisibility). ``post``: the network's ``pred_logits``, ``pred_masks`` and ``image_info`` ->
one JSON document shaped like `m2f serve`'s answer (task, height, width, segments with COCO RLE masks), from the
NumPy post-processing of :mod:`m2f.export.postprocess_numpy`.

The repository writer copies this file and postprocess_numpy.py into each Python model (package ``m2f_triton``):
the server needs numpy and Pillow only, no torch and no m2f install, and it runs exactly the code the tests ran.
So this module imports nothing of m2f but its sibling, and its refusals are :class:`RequestError` (a ValueError;
the model.py wrapper answers the request with it as a one-line Triton error).
"""
from __future__ import annotations

import io
import json
import math
from typing import Any

import numpy as np

from . import postprocess_numpy as pp

MAX_IMAGE_BYTES = 20 * 1024 * 1024  # as `m2f serve`


class RequestError(ValueError):
    """A request the ensemble refuses; one line that names the problem and the fix."""


def settings_from_config(config: Any, task: str | None = None) -> dict[str, Any]:
    """What both Python models need from an m2f ``Mask2FormerConfig`` (written as JSON beside them)."""
    from m2f.labels import labels_for_config

    labels = labels_for_config(config)
    post = config.postprocess
    return {"model": config.name, "task": task or config.default_task, "default_task": config.default_task,
            "test_size": list(config.test_size), "size_divisibility": config.size_divisibility,
            "pixel_mean": list(config.pixel_mean), "pixel_std": list(config.pixel_std),
            "thing_classes": sorted(int(c) for c in config.thing_classes), "names": list(labels.names),
            "dataset_ids": [int(i) for i in labels.dataset_ids],
            "postprocess": {"object_mask_threshold": post.object_mask_threshold,
                            "overlap_threshold": post.overlap_threshold, "instance_topk": post.instance_topk}}


# -- pre-processing --------------------------------------------------------------------------------------------


def decode(data: bytes) -> np.ndarray:
    """(H, W, 3) uint8 RGB, EXIF orientation applied (as m2f.preprocess.load_image reads files)."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    if not data:
        raise RequestError("the request has no image (empty IMAGE); send the encoded image bytes")
    if len(data) > MAX_IMAGE_BYTES:
        raise RequestError(f"the image is {len(data)} bytes, over the limit of {MAX_IMAGE_BYTES}; send a smaller one")
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            rgb = ImageOps.exif_transpose(img).convert("RGB")
    except UnidentifiedImageError:
        raise RequestError("IMAGE is not an image Pillow can read; send PNG or JPEG bytes") from None
    except Image.DecompressionBombError:
        raise RequestError("the image has too many pixels to decode safely; send a smaller image") from None
    except (OSError, ValueError, SyntaxError):
        raise RequestError("the image cannot be decoded: it is truncated or corrupt; send the whole file") from None
    return np.asarray(rgb, dtype=np.uint8).copy()


def resized_shape(height: int, width: int, shortest: int, max_size: int) -> tuple[int, int]:
    """detectron2 ResizeShortestEdge's output size (the rule of m2f.preprocess.resized_shape)."""
    scale = shortest / min(height, width)
    new_h, new_w = (float(shortest), scale * width) if height < width else (scale * height, float(shortest))
    if max(new_h, new_w) > max_size:
        rescale = max_size / max(new_h, new_w)
        new_h, new_w = new_h * rescale, new_w * rescale
    return int(new_h + 0.5), int(new_w + 0.5)


def _resize(image: np.ndarray, shortest: int, max_size: int) -> np.ndarray:
    """PIL bilinear on the uint8 image, as m2f.preprocess resizes uint8 images."""
    from PIL import Image

    size = resized_shape(image.shape[0], image.shape[1], shortest, max_size)
    if size == image.shape[:2]:
        return image
    return np.asarray(Image.fromarray(image).resize((size[1], size[0]), Image.BILINEAR))


def preprocess(images: list[np.ndarray], settings: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """(H, W, 3) uint8 images -> pixel_values (B, 3, Hp, Wp) float32 (one padded size for the batch, or the
    graph's fixed ``input_size``), image_info (B, 6) int32."""
    resized = [_resize(image, *settings["test_size"]) for image in images]
    divisor = max(int(settings["size_divisibility"]), 1)
    padded = tuple(math.ceil(max(r.shape[axis] for r in resized) / divisor) * divisor for axis in (0, 1))
    fixed = settings.get("input_size")
    if fixed is not None:
        if padded[0] > fixed[0] or padded[1] > fixed[1]:
            raise RequestError(f"the image resized to {padded[0]}x{padded[1]} does not fit the model's fixed input "
                               f"{fixed[0]}x{fixed[1]}; export the model with --dynamic")
        padded = tuple(fixed)
    mean = np.asarray(settings["pixel_mean"], dtype=np.float32)[:, None, None]
    std = np.asarray(settings["pixel_std"], dtype=np.float32)[:, None, None]
    pixels = np.zeros((len(images), 3, *padded), dtype=np.float32)  # the padding is 0 after normalising, as in m2f
    info = np.zeros((len(images), 6), dtype=np.int32)
    for i, (image, r) in enumerate(zip(images, resized)):
        pixels[i, :, : r.shape[0], : r.shape[1]] = (r.transpose(2, 0, 1).astype(np.float32) - mean) / std
        info[i] = (*r.shape[:2], *image.shape[:2], *padded)
    return pixels, info


# -- post-processing -------------------------------------------------------------------------------------------


def rle(mask: np.ndarray) -> dict[str, Any]:
    """COCO's compressed RLE of a binary (H, W) mask: run lengths in column-major order, starting with a run of
    zeros, each written as the difference to the run two back (from the third on) in 5-bit groups, '0' + value."""
    flat = np.asarray(mask, dtype=bool).ravel(order="F")
    changes = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    bounds = np.concatenate([[0], changes, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat.size and flat[0]:
        counts = [0, *counts]
    text = []
    for i, count in enumerate(counts):
        value = count - counts[i - 2] if i > 2 else count
        more = True
        while more:
            group = value & 0x1F
            value >>= 5  # arithmetic shift: a negative difference ends in all ones
            more = value != -1 if group & 0x10 else value != 0
            text.append(chr(group + (0x20 if more else 0) + 48))
    return {"size": [int(s) for s in mask.shape], "counts": "".join(text)}


def _segment(label: int, score: float | None, mask: np.ndarray, settings: dict[str, Any]) -> dict[str, Any]:
    return {"label": int(label), "name": settings["names"][label], "category_id": int(settings["dataset_ids"][label]),
            "score": None if score is None else float(score), "area": int(mask.sum()), "mask": rle(mask)}


def segments(task: str, result: Any, settings: dict[str, Any]) -> list[dict[str, Any]]:
    """One image's NumPy result as `m2f serve`'s segments (m2f.serve.encode.segments_json)."""
    if task == "panoptic":
        ids = result.segmentation
        return [{**_segment(s["category_id"], s["score"], ids == s["id"], settings), "id": int(s["id"]),
                 "isthing": bool(s["isthing"])} for s in result.segments]
    if task == "instance":
        return [_segment(int(c), float(s), m, settings) for m, c, s in zip(result.masks, result.labels, result.scores)]
    classes = result.argmax(0)
    return [_segment(int(c), None, classes == c, settings) for c in np.unique(classes)]


def postprocess(pred_logits: np.ndarray, pred_masks: np.ndarray, image_info: np.ndarray,
                settings: dict[str, Any]) -> str:
    """One image: (Q, K+1), (Q, h, w), (6,) -> the JSON answer (task, height, width, segments)."""
    task, post = settings["task"], settings["postprocess"]
    image_size, original_size, padded = (tuple(int(v) for v in image_info[i:i + 2]) for i in (0, 2, 4))
    masks = pp.postprocess_masks(np.asarray(pred_masks, dtype=np.float32), padded, image_size, original_size)
    if task == "panoptic":
        result = pp.panoptic_inference(pred_logits, masks, settings["thing_classes"], post["object_mask_threshold"],
                                       post["overlap_threshold"])
    elif task == "instance":
        things = settings["thing_classes"] if settings["default_task"] == "panoptic" else None
        result = pp.instance_inference(pred_logits, masks, post["instance_topk"], things)
    else:
        result = pp.semantic_inference(pred_logits, masks)
    return json.dumps({"task": task, "height": original_size[0], "width": original_size[1],
                       "segments": segments(task, result, settings)})


# -- the two Python models' requests (model.py calls these with each request's inputs) --------------------------
# Every tensor has a leading batch axis B: Triton's own under max_batch_size > 0, else a dims entry of 1.


def run_pre(inputs: dict[str, np.ndarray], settings: dict[str, Any]) -> dict[str, np.ndarray]:
    """IMAGE (B, 1) encoded bytes -> pixel_values (B, 3, Hp, Wp) float32, image_info (B, 6) int32."""
    pixels, info = preprocess([decode(bytes(data)) for data in inputs["IMAGE"].reshape(-1)], settings)
    return {"pixel_values": pixels, "image_info": info}


def run_post(inputs: dict[str, np.ndarray], settings: dict[str, Any]) -> dict[str, np.ndarray]:
    """pred_logits (B, Q, K+1), pred_masks (B, Q, h, w), image_info (B, 6) -> SEGMENTS (B, 1) JSON bytes."""
    answers = [postprocess(logits, masks, info, settings).encode("utf-8")
               for logits, masks, info in zip(inputs["pred_logits"], inputs["pred_masks"], inputs["image_info"])]
    return {"SEGMENTS": np.asarray(answers, dtype=object).reshape(-1, 1)}
