"""Overlay pictures of predictions: the image blended with one colour per segment, segment contours, class names.

Stuff classes and semantic classes use their class colour; each thing instance gets its class colour jittered by
a generator seeded with its index, so pictures are deterministic. Names are drawn with PIL's default font at
the innermost pixel of each segment (farthest from any segment boundary). Only the first comma-separated synonym
of a name is drawn (ADE20K lists several).
"""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage

from .labels import Color, DatasetLabels
from .postprocess import InstanceResult, PanopticResult, SemanticResult

DEFAULT_ALPHA = 0.5
CONTOUR_COLOR: Color = (255, 255, 255)


def _jitter(color: Color, index: int) -> Color:
    """A per-instance variant of a class colour: +-~20% per channel, from a generator seeded with ``index``."""
    delta = np.random.default_rng(index).uniform(-0.2, 0.2, 3) * 255
    jittered = np.clip(np.asarray(color, dtype=np.float64) + delta, 0, 255)
    return tuple(int(round(c)) for c in jittered)  # type: ignore[return-value]


def _short_name(name: str) -> str:
    return name.split(",")[0].strip()


def _to_numpy(x: torch.Tensor | np.ndarray) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def _boundaries(segment_map: np.ndarray) -> np.ndarray:
    """(H, W) bool: pixels whose right or lower neighbour belongs to another segment (and vice versa)."""
    edge = np.zeros(segment_map.shape, dtype=bool)
    horizontal = segment_map[:, 1:] != segment_map[:, :-1]
    vertical = segment_map[1:, :] != segment_map[:-1, :]
    edge[:, 1:] |= horizontal
    edge[:, :-1] |= horizontal
    edge[1:, :] |= vertical
    edge[:-1, :] |= vertical
    return edge


def _label_anchors(segment_map: np.ndarray, ids: list[int]) -> dict[int, tuple[int, int]]:
    """For each id, the (x, y) of its pixel farthest from a segment boundary / the image border (of those tied at
    that distance, the one nearest their centroid)."""
    inner = ~_boundaries(segment_map)
    inner[0, :] = inner[-1, :] = inner[:, 0] = inner[:, -1] = False
    distance = ndimage.distance_transform_edt(inner)
    flat_ids = segment_map.ravel()
    order = np.lexsort((-distance.ravel(), flat_ids))  # by id, then distance descending, then raster order
    sorted_ids = flat_ids[order]
    sorted_dist = distance.ravel()[order]
    anchors = {}
    width = segment_map.shape[1]
    for seg_id in ids:
        first, last = np.searchsorted(sorted_ids, seg_id, "left"), np.searchsorted(sorted_ids, seg_id, "right")
        if first == last:
            continue
        tied = int(np.count_nonzero(sorted_dist[first:last] == sorted_dist[first]))
        ys, xs = np.divmod(order[first : first + tied], width)
        # of the tied pixels (a ridge, e.g. the middle line of a rectangle), the one nearest their centroid
        pick = int(np.argmin((ys - ys.mean()) ** 2 + (xs - xs.mean()) ** 2))
        anchors[seg_id] = (int(xs[pick]), int(ys[pick]))
    return anchors


def _mask_anchor(mask: np.ndarray) -> tuple[int, int]:
    """(x, y) of the mask pixel farthest from the mask's edge (the image border counts as an edge)."""
    distance = ndimage.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]
    y, x = np.unravel_index(int(np.argmax(distance)), mask.shape)
    return int(x), int(y)


def _draw_labels(canvas: Image.Image, texts: list[tuple[tuple[int, int], str, Color]]) -> None:
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    for (x, y), text, color in texts:
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        w, h = right - left, bottom - top
        x0 = int(min(max(x - w // 2, 0), max(canvas.width - w - 2, 0)))
        y0 = int(min(max(y - h // 2, 0), max(canvas.height - h - 2, 0)))
        draw.rectangle((x0, y0, x0 + w + 2, y0 + h + 2), fill=(0, 0, 0))
        draw.text((x0 + 1 - left, y0 + 1 - top), text, fill=tuple(color), font=font)


def _blend(image: np.ndarray, color_map: np.ndarray, painted: np.ndarray, alpha: float) -> np.ndarray:
    out = image.astype(np.float32)
    out[painted] = (1 - alpha) * out[painted] + alpha * color_map[painted]
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _check_image(image: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.shape[:2] != tuple(shape):
        raise ValueError(f"image of shape {image.shape} does not match the prediction size {tuple(shape)}")
    return image.astype(np.uint8, copy=False)


def _segment_map_overlay(
    image: np.ndarray,
    segment_map: np.ndarray,
    colors: dict[int, Color],
    names: dict[int, str],
    alpha: float,
) -> Image.Image:
    """Paint ``segment_map`` (0 = nothing) with ``colors[id]``, draw its contours and ``names[id]``."""
    palette = np.zeros((int(segment_map.max(initial=0)) + 1, 3), dtype=np.float32)
    for seg_id, color in colors.items():
        palette[seg_id] = color
    painted = segment_map > 0
    blended = _blend(image, palette[segment_map], painted, alpha)
    edges = _boundaries(segment_map) & painted  # contours on the segments' own side
    blended[edges] = CONTOUR_COLOR
    canvas = Image.fromarray(blended)
    anchors = _label_anchors(segment_map, sorted(names))
    _draw_labels(canvas, [(anchors[i], names[i], (255, 255, 255)) for i in sorted(names) if i in anchors])
    return canvas


def draw_panoptic(image: np.ndarray, result: PanopticResult, labels: DatasetLabels,
                  alpha: float = DEFAULT_ALPHA) -> Image.Image:
    segmentation = _to_numpy(result.segmentation).astype(np.int64)
    image = _check_image(image, segmentation.shape)
    colors, names = {}, {}
    for index, seg in enumerate(result.segments):
        base = labels.colors[seg.label]
        colors[seg.id] = _jitter(base, index) if seg.is_thing else base
        names[seg.id] = _short_name(labels.names[seg.label])
    return _segment_map_overlay(image, segmentation, colors, names, alpha)


def draw_semantic(image: np.ndarray, result: SemanticResult, labels: DatasetLabels,
                  alpha: float = DEFAULT_ALPHA) -> Image.Image:
    class_map = _to_numpy(result.labels).astype(np.int64)
    image = _check_image(image, class_map.shape)
    present = np.unique(class_map)
    # segment id = class + 1 so that 0 stays "nothing"
    colors = {int(c) + 1: labels.colors[int(c)] for c in present}
    names = {int(c) + 1: _short_name(labels.names[int(c)]) for c in present}
    return _segment_map_overlay(image, class_map + 1, colors, names, alpha)


def draw_instances(image: np.ndarray, result: InstanceResult, labels: DatasetLabels,
                   min_score: float = 0.5, alpha: float = DEFAULT_ALPHA) -> Image.Image:
    """Instances with score >= ``min_score``, lowest score first so the best ones end on top; label "name 0.87"."""
    masks = _to_numpy(result.masks).astype(bool)
    image = _check_image(image, masks.shape[1:])
    scores = _to_numpy(result.scores)
    classes = _to_numpy(result.labels)
    selected = [i for i in range(len(scores)) if scores[i] >= min_score]
    out = image.copy()
    edges = np.zeros(image.shape[:2], dtype=bool)
    texts = []
    for rank, i in enumerate(reversed(selected)):
        mask = masks[i]
        if not mask.any():
            continue
        color = np.asarray(_jitter(labels.colors[int(classes[i])], len(selected) - 1 - rank), dtype=np.float32)
        out = _blend(out, np.broadcast_to(color, out.shape), mask, alpha)
        edges |= _boundaries(mask) & mask
        anchor = _mask_anchor(mask)
        texts.append((anchor, f"{_short_name(labels.names[int(classes[i])])} {scores[i]:.2f}", (255, 255, 255)))
    out[edges] = CONTOUR_COLOR
    canvas = Image.fromarray(out)
    _draw_labels(canvas, texts)
    return canvas

