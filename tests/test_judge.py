"""The analytic judge reads drawn shapes-world images back; the evaluation loop counts with it."""

import random
from collections import deque
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image, ImageFilter

from latentforge.config import SamplingDefaults
from latentforge.training.evaluate import eval_prompts, evaluate, format_report
from latentforge.training.judge import connected_components, judge_image, score
from latentforge.training.world import (
    BACKGROUNDS,
    KINDS,
    POSITIONS,
    RELATIONS,
    SIZES,
    Scene,
    Shape,
    draw,
    sample_scene,
)

ATTRIBUTES = ("background", "colour", "shape", "size", "position", "relation", "count", "all")


def one(kind="circle", colour="red", size="large", position="in the center", background="white") -> Scene:
    """A one-object scene at the exact anchor and nominal size."""
    shape = Shape(kind, colour, size, POSITIONS[position], SIZES[size])
    return Scene(background, (shape,), position=position)


def two(relation="above", first=("red", "circle"), second=("blue", "square"), background="gray") -> Scene:
    """A two-object scene at the relation's quarter points."""
    centres = RELATIONS[relation]
    objects = tuple(Shape(k, c, "small", p, SIZES["small"]) for (c, k), p in zip((first, second), centres))
    return Scene(background, objects, relation=relation)


def degrade(image: Image.Image, rng: np.random.Generator, sigma: float = 10.0, blur: float = 0.6) -> Image.Image:
    """A slight Gaussian blur, then Gaussian noise of `sigma` (in 0-255 units)."""
    array = np.asarray(image.filter(ImageFilter.GaussianBlur(blur)), dtype=np.float64)
    array = array + rng.normal(0.0, sigma, array.shape)
    return Image.fromarray(np.clip(np.rint(array), 0, 255).astype(np.uint8))


def accuracy(images_and_scenes) -> dict[str, float]:
    """Per-attribute accuracy of the judge against the true scenes."""
    hits, totals = {}, {}
    for image, scene in images_and_scenes:
        for key, ok in score(judge_image(image), scene).items():
            hits[key], totals[key] = hits.get(key, 0) + ok, totals.get(key, 0) + 1
    return {key: hits[key] / totals[key] for key in totals}


def random_scenes(n: int, seed: int) -> list[Scene]:
    """n scenes of the world, one seeded stream."""
    rng = random.Random(seed)
    return [sample_scene(rng) for _ in range(n)]


# --------------------------------------------------------------------------- accuracy on the world


def test_judge_reads_drawn_world_images(record_property):
    result = accuracy((draw(s), s) for s in random_scenes(300, seed=10))
    print(f"\njudge accuracy on 300 drawn scenes: {result}")
    record_property("judge_accuracy_clean", result)
    assert set(result) == set(ATTRIBUTES)
    assert all(value >= 0.98 for value in result.values()), result


def test_judge_reads_noisy_blurred_images(record_property):
    rng = np.random.default_rng(0)
    result = accuracy((degrade(draw(s), rng), s) for s in random_scenes(150, seed=11))
    print(f"\njudge accuracy on 150 noisy (sigma 10/255) blurred (0.6 px) scenes: {result}")
    record_property("judge_accuracy_noisy", result)
    assert all(value >= 0.98 for value in result.values()), result


def test_judge_reads_larger_images_the_same():
    for scene in random_scenes(30, seed=12):
        assert score(judge_image(draw(scene, 256)), scene)["all"], scene


# --------------------------------------------------------------------------- targeted cases


@pytest.mark.parametrize("background", BACKGROUNDS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("size", SIZES)
def test_each_shape_size_and_background(kind, size, background):
    colours = {"white": "purple", "black": "yellow", "gray": "green"}
    scene = one(kind, colours[background], size, "in the center", background)
    reading = judge_image(draw(scene))
    assert score(reading, scene) == dict.fromkeys(("background", "colour", "shape", "size", "position", "count", "all"), True)
    assert reading.objects[0].kind == kind and reading.background == background


@pytest.mark.parametrize("position", POSITIONS)
def test_each_position(position):
    for kind, size in (("triangle", "large"), ("circle", "small")):
        scene = one(kind, "orange", size, position, "black")
        reading = judge_image(degrade(draw(scene), np.random.default_rng(1)))
        assert reading.objects[0].position == position, (kind, size, reading)
        assert score(reading, scene)["all"]


@pytest.mark.parametrize("relation", RELATIONS)
def test_each_relation(relation):
    scene = two(relation, ("yellow", "triangle"), ("purple", "circle"), "white")
    reading = judge_image(degrade(draw(scene), np.random.default_rng(2)))
    result = score(reading, scene)
    assert result["relation"] and result["all"], (reading, result)
    assert set(result) == {"background", "colour", "shape", "size", "relation", "count", "all"}


def test_wrong_targets_are_caught_attribute_by_attribute():
    reading = judge_image(draw(one("circle", "red", "large", "on the left", "white")))
    wrong = {
        "colour": one("circle", "blue", "large", "on the left", "white"),
        "shape": one("square", "red", "large", "on the left", "white"),
        "size": one("circle", "red", "small", "on the left", "white"),
        "position": one("circle", "red", "large", "on the right", "white"),
        "background": one("circle", "red", "large", "on the left", "gray"),
    }
    for attribute, target in wrong.items():
        result = score(reading, target)
        assert [k for k, ok in result.items() if not ok] == [attribute, "all"], (attribute, result)


def test_swapped_relation_and_missing_objects_are_caught():
    scene = two("to the left of", ("red", "circle"), ("green", "square"))
    reading = judge_image(draw(scene))
    assert score(reading, two("to the right of", ("red", "circle"), ("green", "square")))["relation"] is False
    assert score(reading, two("to the left of", ("green", "square"), ("red", "circle")))["relation"] is False
    assert score(reading, one("circle", "red", "small", "on the left", "gray"))["count"] is False
    blank = score(judge_image(Image.new("RGB", (64, 64), BACKGROUNDS["black"])), scene)
    assert blank["background"] is False and not any(blank[k] for k in ("colour", "shape", "relation", "count", "all"))


def test_specks_of_colour_are_not_objects():
    image = draw(one("square", "blue", "large", "in the center", "white"))
    image.paste((220, 40, 40), (2, 2, 5, 5))  # a 3 x 3 red speck
    reading = judge_image(image)
    assert [o.colour for o in reading.objects] == ["blue"]


def _components_by_bfs(mask: np.ndarray) -> list[set]:
    """Reference: 4-connected components as sets of pixels, by breadth-first search."""
    seen, parts = np.zeros_like(mask), []
    for start in zip(*np.nonzero(mask)):
        if seen[start]:
            continue
        part, queue = set(), deque([start])
        seen[start] = True
        while queue:
            y, x = queue.popleft()
            part.add((y, x))
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < mask.shape[0] and 0 <= nx < mask.shape[1] and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    queue.append((ny, nx))
        parts.append(part)
    return parts


def test_connected_components_match_a_flood_fill():
    rng = np.random.default_rng(3)
    spiral = np.zeros((15, 15), dtype=bool)  # one long winding component
    spiral[1, 1:14], spiral[1:14, 13], spiral[13, 1:14], spiral[3:14, 1], spiral[3, 1:12], spiral[3:12, 11] = (True,) * 6
    for mask in [spiral, np.eye(6, dtype=bool)] + [rng.random((20, 24)) < p for p in (0.3, 0.5, 0.6)]:
        labels, count = connected_components(mask)
        ours = sorted(sorted(zip(*np.nonzero(labels == k))) for k in range(1, count + 1))
        reference = sorted(sorted(part) for part in _components_by_bfs(mask))
        assert ours == reference and (labels[~mask] == 0).all()


def test_judge_refuses_non_images():
    with pytest.raises(ValueError, match="PIL image"):
        judge_image(np.zeros((64, 64, 3)))


# --------------------------------------------------------------------------- the evaluation loop


class DrawingPipe:
    """A stand-in pipeline that draws each evaluation prompt's own target (or a fixed wrong scene)."""

    def __init__(self, targets: dict[str, Scene], wrong: Scene | None = None, default_cfg_scale=7.0):
        self.targets, self.wrong, self.calls = targets, wrong, []
        self.config = SimpleNamespace(defaults=SamplingDefaults(cfg_scale=default_cfg_scale))

    def generate(self, prompt, negative_prompt="", steps=None, sampler=None, cfg_scale=None, seed=None,
                 width=None, height=None, batch_size=1):  # fmt: skip
        self.calls.append({"prompt": prompt, "cfg_scale": cfg_scale, "seed": seed, "width": width,
                           "height": height, "steps": steps, "sampler": sampler})  # fmt: skip
        return [draw(self.wrong or self.targets[prompt])]


def test_evaluate_counts_right_and_wrong_images():
    prompts = eval_prompts(24, seed=5)
    targets = {prompt: scene for prompt, scene, _ in prompts}
    perfect = DrawingPipe(targets)
    result = evaluate(perfect, n=24, seed=5, cfg_scales=(1.0, None), steps=4)
    assert [s["cfg_scale"] for s in result["scales"]] == [1.0, 7.0]
    for scale in result["scales"]:
        assert scale["single_object"] == scale["two_objects"] == scale["all"] == 1.0
        assert all(v == 1.0 for v in scale["accuracy"].values())
        assert scale["counts"]["single_object"] + scale["counts"]["two_objects"] == 24
    first = perfect.calls[0]
    assert (first["width"], first["height"], first["steps"], first["sampler"]) == (None, None, 4, None)
    assert [c["seed"] for c in perfect.calls[:24]] == [c["seed"] for c in perfect.calls[24:]]
    assert [c["seed"] for c in perfect.calls[:24]] == [s for _, _, s in eval_prompts(24, seed=5)]  # reproducible
    assert len({c["seed"] for c in perfect.calls}) > 20

    wrong = DrawingPipe(targets, wrong=two("above", ("red", "circle"), ("blue", "square"), "gray"), default_cfg_scale=4.5)
    bad = evaluate(wrong, n=24, seed=5, cfg_scales=(None,))["scales"][0]
    assert bad["cfg_scale"] == 4.5 and bad["single_object"] == 0.0 and bad["all"] < 0.2
    report = format_report(result)
    assert report.splitlines()[0].startswith("| cfg | background | colour |")
    assert "| 7 (default) |" in report and "| 1 |" in report


def test_evaluate_refuses_bad_arguments():
    with pytest.raises(ValueError, match="n must be"):
        evaluate(DrawingPipe({}), n=0)
    with pytest.raises(ValueError, match="cfg_scales is empty"):
        evaluate(DrawingPipe({}), n=1, cfg_scales=())
