"""An analytic judge for shapes-world images: it reads background, objects and their layout back.

No learned model: the background is the dominant border colour, objects are the connected regions
of palette-coloured pixels, and each object's colour, shape, size and position come from simple
measurements (median colour, IoU with ideal masks, bounding box, centre). Images of any size are
read at 64 x 64.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from .world import ALL_KINDS, BACKGROUNDS, COLOURS, POSITIONS, SIZES, Scene, star_mask

JUDGE_SIZE = 64  # images are read at this size (area-averaged down, or resized up)
COLOUR_THRESHOLD = 60.0  # RGB distance within which a pixel counts as a palette colour
MIN_AREA = 16  # components smaller than this (pixels at 64 x 64) are noise
BORDER = 2  # the border ring (pixels) that decides the background
SIZE_SPLIT = (SIZES["small"] * SIZES["large"]) ** 0.5  # box side (fraction) between small and large

_PALETTE_NAMES = tuple(COLOURS)
_PALETTE = np.array([COLOURS[c] for c in _PALETTE_NAMES], dtype=np.float64)
_BACKGROUND_NAMES = tuple(BACKGROUNDS)
_BACKGROUND_RGB = np.array([BACKGROUNDS[b] for b in _BACKGROUND_NAMES], dtype=np.float64)


@dataclass(frozen=True)
class ObjectReading:
    """One object as read: colour, shape kind, size word, centre and box (fractions of the side)."""

    colour: str
    kind: str
    size: str
    center: tuple[float, float]  # the bounding box centre, (x, y)
    position: str  # the nearest of the five anchor points
    box: tuple[float, float, float, float]  # left, top, right, bottom
    area: float  # fraction of the image
    shape_iou: tuple[tuple[str, float], ...]  # IoU with each ideal shape in the same box


@dataclass(frozen=True)
class Reading:
    """What the judge sees: the background and the objects, largest first."""

    background: str
    objects: tuple[ObjectReading, ...]

    def object_of_colour(self, colour: str) -> ObjectReading | None:
        """The largest object of `colour`, or None."""
        return next((o for o in self.objects if o.colour == colour), None)


def relation_between(a: ObjectReading, b: ObjectReading) -> str:
    """How a stands to b: the axis with the larger centre separation decides."""
    dx, dy = a.center[0] - b.center[0], a.center[1] - b.center[1]
    if abs(dx) >= abs(dy):
        return "to the left of" if dx < 0 else "to the right of"
    return "above" if dy < 0 else "below"


# --------------------------------------------------------------------------- pixels


def _pixels(image: Image.Image) -> np.ndarray:
    """The image as (64, 64, 3) float64 RGB (area-averaged when larger)."""
    if not isinstance(image, Image.Image):
        raise ValueError(f"judge_image needs a PIL image, got {type(image).__name__}")
    image = image.convert("RGB")
    if image.size != (JUDGE_SIZE, JUDGE_SIZE):
        shrinking = min(image.size) >= JUDGE_SIZE
        image = image.resize((JUDGE_SIZE, JUDGE_SIZE), Image.Resampling.BOX if shrinking else Image.Resampling.BICUBIC)
    return np.asarray(image, dtype=np.float64)


def _distances(pixels: np.ndarray, colours: np.ndarray) -> np.ndarray:
    """RGB distance of every pixel (H, W) to every colour (K, 3) -> (H, W, K)."""
    return np.linalg.norm(pixels[:, :, None, :] - colours[None, None, :, :], axis=-1)


def read_background(pixels: np.ndarray) -> str:
    """The dominant colour of the border ring, as the nearest of the three backgrounds."""
    ring = np.ones(pixels.shape[:2], dtype=bool)
    ring[BORDER:-BORDER, BORDER:-BORDER] = False
    border = pixels[ring]  # (N, 3)
    nearest = np.argmin(_distances(border[None], np.concatenate([_BACKGROUND_RGB, _PALETTE]))[0], axis=-1)
    votes = np.bincount(nearest[nearest < len(_BACKGROUND_NAMES)], minlength=len(_BACKGROUND_NAMES))
    if votes.sum() == 0:  # the whole border is object-coloured: fall back to the median
        median = np.median(border, axis=0)
        return _BACKGROUND_NAMES[int(np.argmin(np.linalg.norm(_BACKGROUND_RGB - median, axis=-1)))]
    return _BACKGROUND_NAMES[int(np.argmax(votes))]


def palette_mask(pixels: np.ndarray, background: str) -> np.ndarray:
    """Pixels within COLOUR_THRESHOLD of a palette colour and nearer to it than to the background."""
    to_palette = _distances(pixels, _PALETTE).min(axis=-1)
    to_background = np.linalg.norm(pixels - np.asarray(BACKGROUNDS[background], dtype=np.float64), axis=-1)
    return (to_palette < COLOUR_THRESHOLD) & (to_palette < to_background)


def connected_components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """4-connected components of a boolean mask: labels (0 = outside, 1..n) and n.

    Union-find in numpy: each pixel points at the smallest index reachable so far; neighbours merge
    by taking minima, and pointer jumping (label = label[label]) shortens the chains, until stable."""
    h, w = mask.shape
    outside = h * w
    labels = np.where(mask, np.arange(h * w).reshape(h, w), outside)
    while True:
        merged = labels.copy()
        np.minimum(merged[1:], labels[:-1], out=merged[1:])
        np.minimum(merged[:-1], labels[1:], out=merged[:-1])
        np.minimum(merged[:, 1:], labels[:, :-1], out=merged[:, 1:])
        np.minimum(merged[:, :-1], labels[:, 1:], out=merged[:, :-1])
        merged = np.where(mask, merged, outside)
        flat = np.append(merged.ravel(), outside)
        merged = flat[merged]  # pointer jumping: follow each label to its own label
        if np.array_equal(merged, labels):
            break
        labels = merged
    roots, dense = np.unique(labels, return_inverse=True)
    dense = dense.reshape(h, w) + 1
    dense[~mask] = 0
    return dense, int(np.count_nonzero(roots < outside))


# --------------------------------------------------------------------------- objects


def ideal_mask(kind: str, height: int, width: int) -> np.ndarray:
    """The ideal shape filling a height x width box, sampled at pixel centres."""
    y = (np.arange(height, dtype=np.float64) + 0.5)[:, None] / height  # 0..1 down the box
    x = (np.arange(width, dtype=np.float64) + 0.5)[None, :] / width
    if kind == "circle":
        return (x - 0.5) ** 2 + (y - 0.5) ** 2 <= 0.25
    if kind == "square":
        return np.ones((height, width), dtype=bool)
    if kind == "triangle":  # apex up at the top centre, base along the bottom
        return np.abs(x - 0.5) <= y / 2
    if kind == "star":  # five points, one straight up, touching the four sides of the box
        return star_mask(x, y)
    raise ValueError(f"unknown shape kind {kind!r}; expected one of {', '.join(ALL_KINDS)}")


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two boolean masks of the same shape."""
    union = np.count_nonzero(a | b)
    return np.count_nonzero(a & b) / union if union else 0.0


def _nearest(point: tuple[float, float], anchors: dict[str, tuple[float, float]]) -> str:
    """The name of the anchor nearest to `point`."""
    return min(anchors, key=lambda name: (anchors[name][0] - point[0]) ** 2 + (anchors[name][1] - point[1]) ** 2)


def read_object(pixels: np.ndarray, component: np.ndarray, kinds: tuple[str, ...] = ALL_KINDS) -> ObjectReading:
    """Colour, shape (the best of `kinds`), size and position of one component (a boolean mask of the image)."""
    n = pixels.shape[0]
    median = np.median(pixels[component], axis=0)
    colour = _PALETTE_NAMES[int(np.argmin(np.linalg.norm(_PALETTE - median, axis=-1)))]
    rows, cols = np.nonzero(component)
    top, bottom, left, right = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
    crop = component[top:bottom, left:right]
    ious = tuple((kind, float(_iou(crop, ideal_mask(kind, *crop.shape)))) for kind in kinds)
    kind = max(ious, key=lambda pair: pair[1])[0]
    box = (float(left) / n, float(top) / n, float(right) / n, float(bottom) / n)
    center = ((box[0] + box[2]) / 2, (box[1] + box[3]) / 2)
    size = "large" if max(box[2] - box[0], box[3] - box[1]) > SIZE_SPLIT else "small"
    area = float(np.count_nonzero(component)) / component.size
    return ObjectReading(colour, kind, size, center, _nearest(center, POSITIONS), box, area, ious)


def judge_image(image: Image.Image, kinds: tuple[str, ...] = ALL_KINDS) -> Reading:
    """Read an image: background, then each palette-coloured region of MIN_AREA pixels or more, its shape the
    best fit among `kinds` (default: every kind the world can draw, the extra ones included)."""
    pixels = _pixels(image)
    background = read_background(pixels)
    labels, count = connected_components(palette_mask(pixels, background))
    sizes = np.bincount(labels.ravel(), minlength=count + 1)
    objects = [read_object(pixels, labels == k, kinds) for k in range(1, count + 1) if sizes[k] >= MIN_AREA]
    return Reading(background, tuple(sorted(objects, key=lambda o: -o.area)))


# --------------------------------------------------------------------------- scoring


def _score_one(reading: Reading, target: Scene) -> dict[str, bool]:
    """Attribute checks of a one-object target against the largest object read."""
    want = target.objects[0]
    got = reading.objects[0] if reading.objects else None
    return {
        "colour": got is not None and got.colour == want.colour,
        "shape": got is not None and got.kind == want.kind,
        "size": got is not None and got.size == want.size,
        "position": got is not None and got.position == target.position,
    }


def _score_two(reading: Reading, target: Scene) -> dict[str, bool]:
    """Attribute checks of a two-object target: each object found by colour, then their relation."""
    found = [reading.object_of_colour(want.colour) for want in target.objects]
    both = all(o is not None for o in found)
    pairs = list(zip(found, target.objects))
    return {
        "colour": both,
        "shape": both and all(got.kind == want.kind for got, want in pairs),
        "size": both and all(got.size == want.size for got, want in pairs),
        "relation": both and relation_between(found[0], found[1]) == target.relation,
    }


def score(reading: Reading, target: Scene) -> dict[str, bool]:
    """Which attributes of `target` the reading got right, plus count (objects read) and all."""
    result = {"background": reading.background == target.background}
    result |= _score_one(reading, target) if len(target.objects) == 1 else _score_two(reading, target)
    result["count"] = len(reading.objects) == len(target.objects)
    result["all"] = all(result.values())
    return result
