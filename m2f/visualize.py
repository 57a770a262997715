"""Overlay pictures of predictions: the image blended with one colour per segment, segment contours, class names.

Stuff classes and semantic classes use their class colour; each thing instance gets its class colour jittered by
a generator seeded with its index, so pictures are deterministic. Names are drawn with PIL's default (scalable)
font at the innermost pixel of each segment (farthest from any segment boundary). Only the first comma-separated
synonym of a name is drawn (ADE20K lists several).

Sizes follow the image (:func:`overlay_scale`): font and contour width grow with its short edge, so labels stay
legible on a 4000x3000 photo and do not swamp a 128-pixel one. Labels are placed largest segment first, moved
inside the image and off labels already placed; one that finds no free place is left out rather than drawn over
another. :func:`color_panoptic` is the segment map in the overlay's colours, for viewing beside the COCO
id-encoded PNG (whose small ids look black).
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
FONT_FRACTION = 0.025  # font size / the image's short edge
LINE_FRACTION = 1 / 500  # contour width / the image's short edge
MIN_FONT_PX = 8
LABEL_PAD_PX = 1


def overlay_scale(height: int, width: int) -> tuple[int, int]:
    """(font size in pixels, contour width in pixels) for an overlay of an image of this size."""
    short = min(height, width)
    return max(MIN_FONT_PX, round(short * FONT_FRACTION)), max(1, round(short * LINE_FRACTION))


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


def _thick(edges: np.ndarray, width: int) -> np.ndarray:
    """``edges`` grown to about ``width`` pixels."""
    if width <= 1:
        return edges
    return ndimage.binary_dilation(edges, iterations=width // 2) if width // 2 else edges


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


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


Box = tuple[int, int, int, int]  # x0, y0, x1, y1 (exclusive)


def _overlaps(a: Box, b: Box) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def place_labels(size: tuple[int, int], texts: list[tuple[tuple[int, int], str]], font_px: int
                 ) -> list[tuple[Box, int, int]]:
    """Boxes for ``texts`` ((x, y) anchor, text), in priority order, on a canvas of ``size`` (width, height):
    centred on the anchor, moved inside the canvas, then down / up in steps of one box height off boxes already
    placed. Returns (box, index into ``texts``, font size) for those that fit; a text wider than the canvas gets
    a smaller font."""
    width, height = size
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    placed: list[tuple[Box, int, int]] = []
    for index, ((x, y), text) in enumerate(texts):
        px = font_px
        while True:
            left, top, right, bottom = measure.textbbox((0, 0), text, font=_font(px))
            w, h = right - left + 2 * LABEL_PAD_PX, bottom - top + 2 * LABEL_PAD_PX
            if (w <= width and h <= height) or px <= MIN_FONT_PX:
                break
            px = max(MIN_FONT_PX, px * 3 // 4)
        if w > width or h > height:
            continue  # not even the smallest font fits: better no label than a cut one
        x0 = min(max(x - w // 2, 0), width - w)
        y_start = min(max(y - h // 2, 0), height - h)
        # candidate rows: the anchor's, then alternately below and above it
        rows = [y_start]
        for k in range(1, height // max(h, 1) + 2):
            rows += [y_start + k * h, y_start - k * h]
        for y0 in rows:
            if not 0 <= y0 <= height - h:
                continue
            box = (x0, y0, x0 + w, y0 + h)
            if not any(_overlaps(box, other) for other, _, _ in placed):
                placed.append((box, index, px))
                break
    return placed


def _draw_labels(canvas: Image.Image, texts: list[tuple[tuple[int, int], str, Color]], font_px: int) -> None:
    draw = ImageDraw.Draw(canvas)
    for (x0, y0, x1, y1), index, px in place_labels(canvas.size, [(a, t) for a, t, _ in texts], font_px):
        _, text, color = texts[index]
        font = _font(px)
        left, top, _, _ = draw.textbbox((0, 0), text, font=font)
        draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=(0, 0, 0))
        draw.text((x0 + LABEL_PAD_PX - left, y0 + LABEL_PAD_PX - top), text, fill=tuple(color), font=font)


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
    font_px, line_px = overlay_scale(*segment_map.shape)
    edges = _thick(_boundaries(segment_map), line_px) & painted  # contours on the segments' own side
    blended[edges] = CONTOUR_COLOR
    canvas = Image.fromarray(blended)
    anchors = _label_anchors(segment_map, sorted(names))
    areas = np.bincount(segment_map.ravel(), minlength=len(palette))
    by_area = sorted((i for i in names if i in anchors), key=lambda i: (-areas[i], i))  # big segments first
    _draw_labels(canvas, [(anchors[i], names[i], (255, 255, 255)) for i in by_area], font_px)
    return canvas


def draw_panoptic(image: np.ndarray, result: PanopticResult, labels: DatasetLabels,
                  alpha: float = DEFAULT_ALPHA) -> Image.Image:
    segmentation = _to_numpy(result.segmentation).astype(np.int64)
    image = _check_image(image, segmentation.shape)
    colors = _panoptic_colors(result, labels)
    names = {seg.id: _short_name(labels.names[seg.label]) for seg in result.segments}
    return _segment_map_overlay(image, segmentation, colors, names, alpha)


def _panoptic_colors(result: PanopticResult, labels: DatasetLabels) -> dict[int, Color]:
    return {seg.id: _jitter(labels.colors[seg.label], index) if seg.is_thing else labels.colors[seg.label]
            for index, seg in enumerate(result.segments)}


def color_panoptic(result: PanopticResult, labels: DatasetLabels) -> np.ndarray:
    """(H, W, 3) uint8: each segment in its overlay colour, void black."""
    segmentation = _to_numpy(result.segmentation).astype(np.int64)
    palette = np.zeros((int(segmentation.max(initial=0)) + 1, 3), dtype=np.uint8)
    for seg_id, color in _panoptic_colors(result, labels).items():
        palette[seg_id] = color
    return palette[segmentation]


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
    font_px, line_px = overlay_scale(*image.shape[:2])
    edges = np.zeros(image.shape[:2], dtype=bool)
    texts = []
    for rank, i in enumerate(reversed(selected)):
        mask = masks[i]
        if not mask.any():
            continue
        color = np.asarray(_jitter(labels.colors[int(classes[i])], len(selected) - 1 - rank), dtype=np.float32)
        out = _blend(out, np.broadcast_to(color, out.shape), mask, alpha)
        edges |= _thick(_boundaries(mask), line_px) & mask
        anchor = _mask_anchor(mask)
        texts.append((anchor, f"{_short_name(labels.names[int(classes[i])])} {scores[i]:.2f}", (255, 255, 255)))
    out[edges] = CONTOUR_COLOR
    canvas = Image.fromarray(out)
    _draw_labels(canvas, texts[::-1], font_px)  # best score first: it gets its place
    return canvas

