"""Synthetic panoptic scenes in COCO panoptic format, deterministic by seed.

Each scene is a few "stuff" bands (sky, grass, water; wavy borders, textured) with "thing" shapes on top
(circle, square, triangle; several instances, random size, rotation and colour, partly occluding each other).
Written as::

    OUT/images/000000.png      RGB image
    OUT/panoptic/000000.png    segment ids as R + 256 G + 256² B (0 = void)
    OUT/panoptic.json          {"info", "images", "annotations": [{"segments_info": [...]}], "categories"}

Image ``i`` of seed ``s`` depends only on ``(s, i)``: ``--num 10`` is a prefix of ``--num 200``, and the same
seed gives byte-identical files. Seeds used by the shipped model: 0 (training), 1 (evaluation), 4242 (the
bundled demo samples); see ``m2f/assets/default/TRAINING.md``.
"""
from __future__ import annotations

import contextlib
import io
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from m2f.errors import InputError
from m2f.io import atomic_dir, check_can_write
from m2f.runtime import progress_bar

GENERATOR_VERSION = 1

# (category id, name, isthing, visualisation colour). Ids start at 1 as in COCO; contiguous class = row index.
CATEGORIES: tuple[tuple[int, str, int, tuple[int, int, int]], ...] = (
    (1, "circle", 1, (220, 20, 60)),
    (2, "square", 1, (0, 0, 230)),
    (3, "triangle", 1, (250, 170, 30)),
    (4, "sky", 0, (70, 130, 180)),
    (5, "grass", 0, (107, 142, 35)),
    (6, "water", 0, (0, 80, 160)),
)
THING_NAMES = ("circle", "square", "triangle")
STUFF_NAMES = ("sky", "grass", "water")
_CATEGORY_ID = {name: cid for cid, name, _, _ in CATEGORIES}

# Base colours of the stuff textures (per-image jitter is added).
_STUFF_BASE = {"sky": (135, 190, 235), "grass": (70, 150, 60), "water": (30, 90, 170)}

MAX_INSTANCES = 6
MIN_VISIBLE_FRACTION = 0.55  # an occluded instance keeps at least this much of its own area
MIN_VISIBLE_PIXELS = 40


@dataclass(frozen=True)
class Scene:
    image: np.ndarray  # (H, W, 3) uint8
    segment_ids: np.ndarray  # (H, W) int64, 0 = void
    segments: list[dict]  # COCO panoptic segments_info entries


def rgb_to_id(rgb: np.ndarray) -> np.ndarray:
    """COCO panoptic PNG colours (..., 3) -> segment ids (...)."""
    rgb = rgb.astype(np.int64)
    return rgb[..., 0] + 256 * rgb[..., 1] + 256 * 256 * rgb[..., 2]


def id_to_rgb(ids: np.ndarray) -> np.ndarray:
    """Segment ids (...) -> COCO panoptic PNG colours (..., 3) uint8."""
    ids = ids.astype(np.int64)
    return np.stack([ids % 256, (ids // 256) % 256, (ids // 65536) % 256], axis=-1).astype(np.uint8)


def parse_size(text: str) -> tuple[int, int]:
    try:
        h, w = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise InputError(f"bad size {text!r}: write it as HxW, e.g. 128x128") from None
    if h < 32 or w < 32 or h > 4096 or w > 4096:
        raise InputError(f"bad size {text!r}: height and width must be between 32 and 4096")
    return h, w


def categories_json() -> list[dict]:
    return [
        {"id": cid, "name": name, "isthing": isthing, "color": list(color), "supercategory": "shape" if isthing else "background"}
        for cid, name, isthing, color in CATEGORIES
    ]


# ---------------------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------------------


def _smooth_noise(rng: np.random.Generator, height: int, width: int, cells: int) -> np.ndarray:
    """Low-frequency noise in [-1, 1]: a coarse random grid upsampled bilinearly."""
    coarse = rng.uniform(-1.0, 1.0, size=(cells + 1, cells + 1)).astype(np.float32)
    img = Image.fromarray(coarse, mode="F").resize((width, height), Image.BILINEAR)
    return np.asarray(img, dtype=np.float32)


def _stuff_texture(name: str, rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """(H, W, 3) float32 texture of one stuff class over the whole canvas."""
    base = np.array(_STUFF_BASE[name], dtype=np.float32) + rng.uniform(-18, 18, size=3).astype(np.float32)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    if name == "sky":
        # brighter towards the horizon, soft clouds
        gradient = (yy / height)[..., None] * np.array([40, 30, 10], dtype=np.float32)
        clouds = np.clip(_smooth_noise(rng, height, width, 4), 0.2, 1.0) - 0.2
        tex = base + gradient + clouds[..., None] * 120.0
        tex += rng.normal(0, 2.0, size=(height, width, 1)).astype(np.float32)
    elif name == "grass":
        blades = rng.normal(0, 1.0, size=(height, width)).astype(np.float32)
        blades = 0.5 * blades + 0.5 * np.roll(blades, 1, axis=0)  # short vertical streaks
        tex = base + blades[..., None] * np.array([14, 26, 10], dtype=np.float32)
        tex += _smooth_noise(rng, height, width, 6)[..., None] * 15.0
    elif name == "water":
        freq = rng.uniform(0.25, 0.6)
        phase = rng.uniform(0, 2 * math.pi)
        ripples = np.sin(freq * yy + 0.15 * np.sin(0.2 * xx + phase) * 6.0 + phase)
        tex = base + ripples[..., None] * np.array([10, 18, 24], dtype=np.float32)
        tex += rng.normal(0, 3.0, size=(height, width, 1)).astype(np.float32)
    else:  # pragma: no cover - CATEGORIES and this function are edited together
        raise ValueError(name)
    return tex


def _stuff_layout(rng: np.random.Generator, height: int, width: int) -> tuple[list[str], np.ndarray]:
    """Pick 1-3 stuff classes as horizontal bands with wavy borders; returns names and a (H, W) band index."""
    count = int(rng.integers(1, 4))
    names = list(rng.permutation(STUFF_NAMES)[:count])
    if "sky" in names:  # the sky is on top
        names.remove("sky")
        names.insert(0, "sky")
    xx = np.arange(width, dtype=np.float32) + 0.5
    yy = np.arange(height, dtype=np.float32)[:, None] + 0.5
    band = np.zeros((height, width), dtype=np.int64)
    cuts = np.sort(rng.uniform(0.2, 0.8, size=count - 1)) * height
    for k, cut in enumerate(cuts):
        amplitude = rng.uniform(1.5, 0.08 * height)
        freq = rng.uniform(0.5, 2.5) * 2 * math.pi / width
        phase = rng.uniform(0, 2 * math.pi)
        border = cut + amplitude * np.sin(freq * xx + phase)  # (W,)
        band[yy >= border[None, :]] = k + 1
    return names, band


def _shape_mask(kind: str, cx: float, cy: float, size: float, angle: float, height: int, width: int) -> np.ndarray:
    """Boolean (H, W) mask of one shape, tested at pixel centres. ``size`` is the radius / half side."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    dx, dy = xx + 0.5 - cx, yy + 0.5 - cy
    if kind == "circle":
        return dx * dx + dy * dy <= size * size
    cos, sin = math.cos(angle), math.sin(angle)
    u, v = cos * dx + sin * dy, -sin * dx + cos * dy
    if kind == "square":
        return (np.abs(u) <= size) & (np.abs(v) <= size)
    if kind == "triangle":  # equilateral, circumradius ``size``: inside all three edge half-planes
        inside = np.ones((height, width), dtype=bool)
        for k in range(3):
            normal = 2 * math.pi * k / 3 + math.pi / 3  # edge normals point between the vertices
            inside &= math.cos(normal) * u + math.sin(normal) * v <= size * 0.5
        return inside
    raise ValueError(kind)  # pragma: no cover


# Radius / half side / circumradius ranges, in fractions of min(H, W); triangles are bigger for similar area.
_SIZE_RANGE = {"circle": (0.065, 0.17), "square": (0.06, 0.15), "triangle": (0.1, 0.22)}


def _thing_colour(rng: np.random.Generator, background: np.ndarray) -> np.ndarray:
    """A saturated random colour that stands out from ``background`` (mean RGB under the shape)."""
    colour = np.zeros(3, dtype=np.float32)
    for _ in range(20):
        hue = rng.uniform(0, 1)
        sat = rng.uniform(0.45, 1.0)
        val = rng.uniform(0.45, 1.0)
        colour = np.array(_hsv_to_rgb(hue, sat, val), dtype=np.float32) * 255.0
        if np.linalg.norm(colour - background) >= 90.0:
            break
    return colour


def _hsv_to_rgb(h: float, s: float, v: float) -> tuple[float, float, float]:
    i = int(h * 6.0) % 6
    f = h * 6.0 - int(h * 6.0)
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    return [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i]


def render_scene(seed: int, index: int, height: int = 128, width: int = 128) -> Scene:
    """Scene ``index`` of ``seed``: depends only on these (and the generator version)."""
    rng = np.random.default_rng(np.random.SeedSequence([GENERATOR_VERSION, seed, index]))
    names, band = _stuff_layout(rng, height, width)
    canvas = np.zeros((height, width, 3), dtype=np.float32)
    segment_ids = np.zeros((height, width), dtype=np.int64)
    segments: list[dict] = []
    stuff_owner = {}
    for k, name in enumerate(names):
        region = band == k
        if not region.any():
            continue
        canvas[region] = _stuff_texture(name, rng, height, width)[region]
        segment_id = _CATEGORY_ID[name] * 1000
        segment_ids[region] = segment_id
        stuff_owner[segment_id] = _CATEGORY_ID[name]

    # Things: place one at a time; reject a placement that hides too much of an earlier instance.
    instances: list[tuple[int, int, np.ndarray]] = []  # (segment id, category id, full mask)
    num_things = int(rng.integers(1, MAX_INSTANCES + 1))
    short = min(height, width)
    for n in range(num_things):
        kind = THING_NAMES[int(rng.integers(0, len(THING_NAMES)))]
        lo, hi = _SIZE_RANGE[kind]
        for _attempt in range(20):
            size = rng.uniform(lo, hi) * short
            cx = rng.uniform(0.6 * size, width - 0.6 * size)
            cy = rng.uniform(0.6 * size, height - 0.6 * size)
            angle = rng.uniform(0, 2 * math.pi)
            mask = _shape_mask(kind, cx, cy, size, angle, height, width)
            if mask.sum() < MIN_VISIBLE_PIXELS:
                continue
            ok = True
            for other_id, _, other in instances:
                visible = other & (segment_ids == other_id)
                left = int(visible.sum()) - int((visible & mask).sum())
                if left < MIN_VISIBLE_FRACTION * other.sum() or left < MIN_VISIBLE_PIXELS:
                    ok = False
                    break
            if ok:
                break
        else:
            continue  # no placement found: skip this instance
        background = canvas[mask].mean(axis=0)
        colour = _thing_colour(rng, background)
        # flat colour with a soft linear shading and a little noise
        yy, xx = np.nonzero(mask)
        direction = rng.uniform(0, 2 * math.pi)
        shade = ((xx - cx) * math.cos(direction) + (yy - cy) * math.sin(direction)) / max(size, 1.0)
        pixels = colour[None, :] + shade[:, None] * rng.uniform(8, 25) + rng.normal(0, 4.0, size=(len(xx), 1))
        canvas[yy, xx] = pixels
        segment_id = _CATEGORY_ID[kind] * 1000 + n + 1
        segment_ids[mask] = segment_id
        instances.append((segment_id, _CATEGORY_ID[kind], mask))

    image = np.clip(np.rint(canvas), 0, 255).astype(np.uint8)
    owners = dict(stuff_owner)
    owners.update({sid: cid for sid, cid, _ in instances})
    for segment_id in np.unique(segment_ids):
        if segment_id == 0:
            continue
        region = segment_ids == segment_id
        ys, xs = np.nonzero(region)
        x0, y0 = int(xs.min()), int(ys.min())
        segments.append(
            {
                "id": int(segment_id),
                "category_id": int(owners[int(segment_id)]),
                "iscrowd": 0,
                "area": int(region.sum()),
                "bbox": [x0, y0, int(xs.max()) - x0 + 1, int(ys.max()) - y0 + 1],
            }
        )
    return Scene(image=image, segment_ids=segment_ids, segments=segments)


def _png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG", optimize=False, compress_level=6)
    return buffer.getvalue()


def write_dataset(out: str | Path, num: int, seed: int, size: tuple[int, int] = (128, 128), force: bool = False,
                  progress: bool = False) -> Path:
    """Write ``num`` scenes of ``seed`` to ``out`` (atomically: a failure leaves nothing behind)."""
    if num < 1:
        raise InputError(f"--num must be >= 1, got {num}")
    if seed < 0:
        raise InputError(f"--seed must be >= 0, got {seed}")
    out = check_can_write(out, force=force, directory=True)
    height, width = size
    images, annotations = [], []
    with contextlib.ExitStack() as stack:
        # closed on an error too, so the error line does not land on the bar's line
        bar = stack.enter_context(progress_bar(num, "synth", quiet=not progress))
        tmp = stack.enter_context(atomic_dir(out))
        (tmp / "images").mkdir()
        (tmp / "panoptic").mkdir()
        for index in range(num):
            scene = render_scene(seed, index, height, width)
            name = f"{index:06d}.png"
            (tmp / "images" / name).write_bytes(_png_bytes(scene.image))
            (tmp / "panoptic" / name).write_bytes(_png_bytes(id_to_rgb(scene.segment_ids)))
            images.append({"id": index, "file_name": name, "height": height, "width": width})
            annotations.append({"image_id": index, "file_name": name, "segments_info": scene.segments})
            bar.update(1)
        meta = {
            "info": {"description": "m2f synthetic shapes", "generator_version": GENERATOR_VERSION, "seed": seed,
                     "num_images": num, "height": height, "width": width},
            "images": images,
            "annotations": annotations,
            "categories": categories_json(),
        }
        (tmp / "panoptic.json").write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
    return out
