"""The shapes world: captioned 64 x 64 images of one or two coloured shapes, endless and seeded.

Every item is a pure function of (seed, index), so data-parallel ranks and loader workers can each
take their own slice (`ShapesWorld.iterate(start, step)`) and still see exactly the same data.
Geometry is in fractions of the image side, so a scene draws at any size.
"""

from __future__ import annotations

import copy
import dataclasses
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from ..images import image_to_tensor, load_image

BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (255, 255, 255),
    "black": (0, 0, 0),
    "gray": (128, 128, 128),
}
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 40),
    "purple": (150, 60, 190),
    "orange": (245, 140, 30),
}
KINDS: tuple[str, ...] = ("circle", "square", "triangle")  # what scenes hold by default (the shipped model's world)
# kinds that are drawn, captioned and judged like the others but only sampled when asked for (`kinds=`), so that
# the default world, and every recipe and test built on it, stays what it was: the concepts taught as add-ons
EXTRA_KINDS: tuple[str, ...] = ("star",)
ALL_KINDS: tuple[str, ...] = KINDS + EXTRA_KINDS
STAR_POINTS = 5
STAR_INNER = 0.5  # inner / outer radius (a regular pentagram's is 0.38: its points are too thin to survive 8x8 latents)
SIZES: dict[str, float] = {"small": 0.22, "large": 0.44}  # side as a fraction of the image side
POSITIONS: dict[str, tuple[float, float]] = {
    "on the left": (0.25, 0.5),
    "on the right": (0.75, 0.5),
    "at the top": (0.5, 0.25),
    "at the bottom": (0.5, 0.75),
    "in the center": (0.5, 0.5),
}
# relation -> (centre of the first object, centre of the second), as fractions (x, y)
RELATIONS: dict[str, tuple[tuple[float, float], tuple[float, float]]] = {
    "to the left of": ((0.25, 0.5), (0.75, 0.5)),
    "to the right of": ((0.75, 0.5), (0.25, 0.5)),
    "above": ((0.5, 0.25), (0.5, 0.75)),
    "below": ((0.5, 0.75), (0.5, 0.25)),
}
INVERSE: dict[str, str] = {
    "to the left of": "to the right of",
    "to the right of": "to the left of",
    "above": "below",
    "below": "above",
}
SIZE_JITTER = 0.05  # side varies by up to +-5 %
PLACE_JITTER = 0.03  # centres move by up to +-3 % of the image side
MARGIN = 0.02  # objects keep this far (fraction of the side) from the image edge
SUPERSAMPLE = 4  # drawn at 4x and box-downsampled: edges anti-aliased, interiors exact

SINGLE_TEMPLATES: tuple[str, ...] = (
    "a {size} {colour} {shape} {position}, {background} background",  # canonical
    "{position}, a {size} {colour} {shape} on a {background} background",
    "a {colour} {shape}, {size}, {position}, {background} background",
    "a {background} background with a {size} {colour} {shape} {position}",
    "{size} {colour} {shape} {position} on {background}",
)
PAIR_TEMPLATES: tuple[str, ...] = (
    "a {colour1} {shape1} {relation} a {colour2} {shape2}, {background} background",  # canonical
    "a {colour2} {shape2} {inverse} a {colour1} {shape1}, {background} background",
    "a {background} background, a {colour1} {shape1} {relation} a {colour2} {shape2}",
    "a small {colour1} {shape1} {relation} a small {colour2} {shape2} on a {background} background",
    "two shapes on {background}: a {colour1} {shape1} {relation} a {colour2} {shape2}",
)
CANONICAL_WEIGHT = 0.4  # share of captions in the canonical form (the evaluation prompts' form)


def _check_size(size: object) -> int:
    """An image side in pixels (a whole number >= 8), or a ValueError."""
    if isinstance(size, bool) or not isinstance(size, int) or size < 8:
        raise ValueError(f"size must be a whole number of pixels, at least 8, got {size!r}")
    return size


def check_fraction(fraction: object) -> float:
    """A two-objects fraction in [0, 1], or a ValueError."""
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 <= fraction <= 1.0:
        raise ValueError(f"two_objects_fraction must be a number between 0 and 1, got {fraction!r}")
    return float(fraction)


def check_kinds(kinds: object) -> tuple[str, ...]:
    """A non-empty tuple of distinct known shape kinds (any sequence of them), or a ValueError."""
    if isinstance(kinds, str) or not isinstance(kinds, (tuple, list)) or not kinds:
        raise ValueError(f"kinds must be a non-empty list of shape kinds from {', '.join(ALL_KINDS)}, got {kinds!r}")
    for kind in kinds:
        _check_choice("shape kind", kind, ALL_KINDS)
    if len(set(kinds)) != len(kinds):
        raise ValueError(f"kinds lists a shape twice: {list(kinds)}")
    return tuple(kinds)


def _check_choice(name: str, value: object, allowed) -> None:
    """Raise a ValueError naming the allowed values when `value` is not one of them."""
    if value not in allowed:
        raise ValueError(f"unknown {name} {value!r}; expected one of {', '.join(map(repr, allowed))}")


@dataclass(frozen=True)
class Shape:
    """One object: kind, colour, size word, centre (x, y) and side, both as fractions of the image side."""

    kind: str
    colour: str
    size: str
    center: tuple[float, float]
    side: float

    def __post_init__(self) -> None:
        _check_choice("shape kind", self.kind, ALL_KINDS)
        _check_choice("colour", self.colour, tuple(COLOURS))
        _check_choice("size", self.size, tuple(SIZES))
        if not 0.0 < self.side <= 1.0:
            raise ValueError(f"side is a fraction of the image side in (0, 1], got {self.side}")
        if len(self.center) != 2 or not all(0.0 <= c <= 1.0 for c in self.center):
            raise ValueError(f"center is (x, y) as fractions of the image side in [0, 1], got {self.center}")

    def box(self) -> tuple[float, float, float, float]:
        """The bounding box (left, top, right, bottom) in fractions of the image side."""
        half = self.side / 2
        return self.center[0] - half, self.center[1] - half, self.center[0] + half, self.center[1] + half


@dataclass(frozen=True)
class Scene:
    """A background and one object (with its position word) or two (with their relation word)."""

    background: str
    objects: tuple[Shape, ...]
    position: str | None = None
    relation: str | None = None  # how objects[0] stands to objects[1]

    def __post_init__(self) -> None:
        _check_choice("background", self.background, tuple(BACKGROUNDS))
        if len(self.objects) == 1:
            _check_choice("position", self.position, tuple(POSITIONS))
            if self.relation is not None:
                raise ValueError("a one-object scene has a position, not a relation; pass relation=None")
        elif len(self.objects) == 2:
            _check_choice("relation", self.relation, tuple(RELATIONS))
            if self.position is not None:
                raise ValueError("a two-object scene has a relation, not a position; pass position=None")
            if self.objects[0].colour == self.objects[1].colour:
                raise ValueError("the two objects of a scene must have different colours")
        else:
            raise ValueError(f"a scene has one or two objects, got {len(self.objects)}")


# --------------------------------------------------------------------------- sampling


def _jittered_side(rng: random.Random, size: str) -> float:
    """The nominal side of `size`, varied by up to SIZE_JITTER."""
    return SIZES[size] * (1.0 + rng.uniform(-SIZE_JITTER, SIZE_JITTER))


def _place(rng: random.Random, anchor: tuple[float, float], side: float) -> tuple[float, float]:
    """The anchor moved by up to PLACE_JITTER, then kept so the object lies MARGIN inside the image."""
    low, high = side / 2 + MARGIN, 1.0 - side / 2 - MARGIN
    return tuple(min(max(a + rng.uniform(-PLACE_JITTER, PLACE_JITTER), low), high) for a in anchor)


def _sample_one(rng: random.Random, background: str, kinds: tuple[str, ...]) -> Scene:
    """One object of any of `kinds`, any colour and size, at one of the five positions."""
    kind, colour, size = rng.choice(kinds), rng.choice(tuple(COLOURS)), rng.choice(tuple(SIZES))
    position = rng.choice(tuple(POSITIONS))
    side = _jittered_side(rng, size)
    shape = Shape(kind, colour, size, _place(rng, POSITIONS[position], side), side)
    return Scene(background, (shape,), position=position)


def _sample_pair(rng: random.Random, background: str, kinds: tuple[str, ...]) -> Scene:
    """Two small objects of different colours at the quarter points of the relation's axis."""
    relation = rng.choice(tuple(RELATIONS))
    colours = rng.sample(tuple(COLOURS), 2)
    objects = []
    for colour, anchor in zip(colours, RELATIONS[relation]):
        side = _jittered_side(rng, "small")
        objects.append(Shape(rng.choice(kinds), colour, "small", _place(rng, anchor, side), side))
    return Scene(background, tuple(objects), relation=relation)


def sample_scene(rng: random.Random, two_objects_fraction: float = 0.3, kinds: tuple[str, ...] = KINDS) -> Scene:
    """A random scene: two objects with probability `two_objects_fraction`, else one; each object's kind drawn
    uniformly from `kinds` (the default KINDS draws exactly what it always drew)."""
    two_objects_fraction, kinds = check_fraction(two_objects_fraction), check_kinds(kinds)
    background = rng.choice(tuple(BACKGROUNDS))
    if rng.random() < two_objects_fraction:
        return _sample_pair(rng, background, kinds)
    return _sample_one(rng, background, kinds)


# --------------------------------------------------------------------------- drawing


def _coverage(shape: Shape, size: int) -> np.ndarray:
    """How much of each pixel (size x size, in [0, 1]) the shape covers, sampled 4 x 4 per pixel."""
    n = size * SUPERSAMPLE
    coords = (np.arange(n, dtype=np.float64) + 0.5) / n  # sample centres, fractions of the side
    x, y = coords[None, :], coords[:, None]
    (cx, cy), half = shape.center, shape.side / 2
    if shape.kind == "circle":
        inside = (x - cx) ** 2 + (y - cy) ** 2 <= half**2
    elif shape.kind == "square":
        inside = (np.abs(x - cx) <= half) & (np.abs(y - cy) <= half)
    elif shape.kind == "triangle":  # apex up: base = height = side, the box centred on `center`
        top = cy - half
        inside = (y <= cy + half) & (np.abs(x - cx) <= (y - top) / 2)
    else:  # star: the five-pointed star filling the box
        inside = star_mask((x - cx) / shape.side + 0.5, (y - cy) / shape.side + 0.5)
    return inside.reshape(size, SUPERSAMPLE, size, SUPERSAMPLE).mean(axis=(1, 3))


def star_polygon(points: int = STAR_POINTS, inner: float = STAR_INNER) -> np.ndarray:
    """The star's corners (2 * points, 2) as (x, y) in the unit box: one point straight up, the star stretched
    to touch all four sides of the box (as the triangle fills its box, base = height)."""
    angles = -np.pi / 2 + np.arange(2 * points) * np.pi / points
    radii = np.where(np.arange(2 * points) % 2 == 0, 1.0, inner)
    corners = np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)
    low, high = corners.min(axis=0), corners.max(axis=0)
    return (corners - low) / (high - low)


def star_mask(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Which points (x, y: broadcastable arrays of unit-box coordinates) lie inside the star (even-odd rule)."""
    corners = star_polygon()
    inside = np.zeros(np.broadcast_shapes(np.shape(x), np.shape(y)), dtype=bool)
    for (x0, y0), (x1, y1) in zip(corners, np.roll(corners, -1, axis=0)):
        if y0 == y1:
            continue  # a horizontal edge never crosses a horizontal ray
        crosses = (y0 > y) != (y1 > y)
        inside ^= crosses & (x < x0 + (y - y0) * (x1 - x0) / (y1 - y0))
    return inside


def draw(scene: Scene, size: int = 64) -> Image.Image:
    """The scene as a size x size RGB image; fully covered pixels have the exact palette colour."""
    _check_size(size)
    canvas = np.empty((size, size, 3), dtype=np.float64)
    canvas[:] = BACKGROUNDS[scene.background]
    for shape in scene.objects:
        cover = _coverage(shape, size)[..., None]
        canvas = canvas * (1.0 - cover) + np.asarray(COLOURS[shape.colour], dtype=np.float64) * cover
    return Image.fromarray(np.rint(canvas).astype(np.uint8), "RGB")


# --------------------------------------------------------------------------- captions


def _fields(scene: Scene) -> dict[str, str]:
    """The words a caption template is filled with."""
    first = scene.objects[0]
    fields = {"background": scene.background, "size": first.size, "colour": first.colour, "shape": first.kind}
    if scene.position is not None:
        fields["position"] = scene.position
    if scene.relation is not None:
        second = scene.objects[1]
        fields.update(
            colour1=first.colour, shape1=first.kind, colour2=second.colour, shape2=second.kind,
            relation=scene.relation, inverse=INVERSE[scene.relation],
        )  # fmt: skip
    return fields


def _templates(scene: Scene) -> tuple[str, ...]:
    """The caption templates for the scene's kind (one object or two)."""
    return SINGLE_TEMPLATES if len(scene.objects) == 1 else PAIR_TEMPLATES


def canonical_caption(scene: Scene) -> str:
    """The canonical caption: `a {size} {colour} {shape} {position}, {bg} background` or the pair form."""
    return _templates(scene)[0].format(**_fields(scene))


def _pick_template(scene: Scene, rng: random.Random) -> str:
    """A caption template for the scene's kind, the canonical one with weight CANONICAL_WEIGHT."""
    templates = _templates(scene)
    rest = (1.0 - CANONICAL_WEIGHT) / (len(templates) - 1)
    return rng.choices(templates, weights=[CANONICAL_WEIGHT] + [rest] * (len(templates) - 1))[0]


def caption(scene: Scene, rng: random.Random) -> str:
    """A caption naming everything drawn, in a template and word order chosen by `rng`."""
    return _pick_template(scene, rng).format(**_fields(scene))


def twin(scene: Scene, rng: random.Random) -> Scene:
    """The scene's hard negative: the same objects laid out the other way. Two objects trade places (so
    the relation becomes its inverse: "a red circle above a blue square" -> "... below ..."); one
    object moves to another of the five positions."""
    if len(scene.objects) == 2:
        a, b = scene.objects
        swapped = (dataclasses.replace(a, center=b.center), dataclasses.replace(b, center=a.center))
        return Scene(scene.background, swapped, relation=INVERSE[scene.relation])
    (shape,) = scene.objects
    position = rng.choice([p for p in POSITIONS if p != scene.position])
    moved = dataclasses.replace(shape, center=_place(rng, POSITIONS[position], shape.side))
    return Scene(scene.background, (moved,), position=position)


def grammar_prompts(
    rng: random.Random, two_objects_fraction: float = 0.3, kinds: tuple[str, ...] = KINDS
) -> tuple[str, Scene]:
    """An evaluation prompt in one of the two canonical forms, with the scene it asks for."""
    scene = sample_scene(rng, two_objects_fraction, kinds)
    return canonical_caption(scene), scene


def image_tensor(image: Image.Image) -> torch.Tensor:
    """A PIL image as a (3, H, W) float32 tensor in [-1, 1]."""
    return image_to_tensor(image)[0]


# --------------------------------------------------------------------------- datasets


def _check_seed(seed: object) -> int:
    """A non-negative whole-number seed, or a ValueError."""
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a whole number >= 0, got {seed!r}")
    return seed


class ShapesWorld(IterableDataset):
    """Endless (image tensor (3, size, size) in [-1, 1], caption) pairs; item i depends only on (seed, i).

    With `twins`, items come in hard-negative pairs: item 2k + 1 is the twin of item 2k (see `twin`),
    captioned in the same template, so a contrastive batch must tell "above" from "below". `kinds` are the
    shapes objects are drawn from (default KINDS; e.g. ALL_KINDS to mix stars into the ordinary scenes)."""

    def __init__(
        self, seed: int, size: int = 64, two_objects_fraction: float = 0.3, twins: bool = False,
        kinds: tuple[str, ...] = KINDS,
    ) -> None:  # fmt: skip
        self.seed = _check_seed(seed)
        self.size = _check_size(size)
        self.two_objects_fraction = check_fraction(two_objects_fraction)
        self.twins = bool(twins)
        self.kinds = check_kinds(kinds)

    def paired(self) -> ShapesWorld:
        """A copy (of the same class) whose items come in scene / twin pairs."""
        world = copy.copy(self)
        world.twins = True
        return world

    def rng_at(self, index: int) -> random.Random:
        """The random stream of item `index` (independent of every other item)."""
        if isinstance(index, bool) or not isinstance(index, int) or index < 0:
            raise ValueError(f"item index must be a whole number >= 0, got {index!r}")
        return random.Random(f"latentforge-shapes:{self.seed}:{index}")

    def example_at(self, index: int) -> tuple[Scene, str]:
        """Item `index` as its scene and caption."""
        base, second = divmod(index, 2) if self.twins else (index, 0)
        rng = self.rng_at(base)
        scene = sample_scene(rng, self.two_objects_fraction, self.kinds)
        template = _pick_template(scene, rng)
        if second:
            scene = twin(scene, rng)
        return scene, template.format(**_fields(scene))

    def scene_at(self, index: int) -> Scene:
        """The scene of item `index`."""
        return self.example_at(index)[0]

    def item(self, index: int) -> tuple[torch.Tensor, str]:
        """Item `index`: (image tensor (3, size, size) in [-1, 1], caption)."""
        scene, text = self.example_at(index)
        return image_tensor(draw(scene, self.size)), text

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str]:
        """Random access: the same as `item(index)`."""
        return self.item(index)

    def iterate(self, start: int = 0, step: int = 1) -> Iterator[tuple[torch.Tensor, str]]:
        """Items start, start + step, start + 2 step, ... forever (rank r of n: iterate(r, n))."""
        if isinstance(step, bool) or not isinstance(step, int) or step < 1:
            raise ValueError(f"step must be a whole number >= 1, got {step!r}")
        self.rng_at(start)  # checks start
        index = start
        while True:
            yield self.item(index)
            index += step

    def __iter__(self) -> Iterator[tuple[torch.Tensor, str]]:
        """All items in order; DataLoader workers each take every num_workers-th item."""
        info = get_worker_info()
        return self.iterate(0, 1) if info is None else self.iterate(info.id, info.num_workers)


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def fit_square(image: Image.Image, size: int) -> Image.Image:
    """Resize so the shorter side is `size`, then crop the centre size x size."""
    width, height = image.size
    if (width, height) == (size, size):
        return image
    scale = size / min(width, height)
    new = (max(size, round(width * scale)), max(size, round(height * scale)))
    image = image.resize(new, Image.Resampling.LANCZOS)
    left, top = (new[0] - size) // 2, (new[1] - size) // 2
    return image.crop((left, top, left + size, top + size))


class CaptionFolder(Dataset):
    """A fine-tuning folder: images with same-named .txt captions, as (tensor (3, size, size), caption)."""

    def __init__(self, root: str | Path, size: int = 64) -> None:
        self.root, self.size = Path(root), _check_size(size)
        if not self.root.is_dir():
            raise ValueError(f"{self.root}: not a folder; give a folder of images with same-named .txt captions")
        self.images = sorted(p for p in self.root.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not self.images:
            raise ValueError(
                f"{self.root}: no images ({', '.join(IMAGE_SUFFIXES)}) in the folder; "
                "put images there, each with a same-named .txt caption"
            )
        missing = [p.name for p in self.images if not p.with_suffix(".txt").is_file()]
        if missing:
            shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
            raise ValueError(
                f"{self.root}: {len(missing)} image(s) without a caption: {shown}; "
                "add a same-named .txt file beside each (e.g. cat.png -> cat.txt)"
            )

    def __len__(self) -> int:
        """The number of captioned images."""
        return len(self.images)

    def caption_at(self, index: int) -> str:
        """The caption of image `index` (its .txt file, whitespace stripped)."""
        return self.images[index].with_suffix(".txt").read_text(encoding="utf-8").strip()

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str]:
        """(image tensor (3, size, size) in [-1, 1], caption) of image `index`."""
        image = fit_square(load_image(self.images[index]), self.size)
        return image_tensor(image), self.caption_at(index)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, str]]:
        """Every item once, in file-name order."""
        return (self[i] for i in range(len(self)))
