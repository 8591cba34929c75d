"""The shapes world: deterministic, captions true to the pictures, exact colours, every value reachable."""

import itertools
import random
import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from latentforge.training import world
from latentforge.training.world import (
    BACKGROUNDS,
    COLOURS,
    INVERSE,
    KINDS,
    POSITIONS,
    RELATIONS,
    SIZES,
    CaptionFolder,
    Scene,
    Shape,
    ShapesWorld,
    canonical_caption,
    caption,
    draw,
    grammar_prompts,
    sample_scene,
)


def _alt(words) -> str:
    """A regex alternation of the given words or phrases."""
    return "|".join(re.escape(w) for w in words)


COLOUR, KIND, SIZE = _alt(COLOURS), _alt(KINDS), _alt(SIZES)
BACKGROUND, POSITION, RELATION = _alt(BACKGROUNDS), _alt(POSITIONS), _alt(RELATIONS)
CANONICAL_ONE = re.compile(rf"^a ({SIZE}) ({COLOUR}) ({KIND}) ({POSITION}), ({BACKGROUND}) background$")
CANONICAL_TWO = re.compile(rf"^a ({COLOUR}) ({KIND}) ({RELATION}) a ({COLOUR}) ({KIND}), ({BACKGROUND}) background$")
PAIR_PHRASE = re.compile(rf"a (?:small )?({COLOUR}) ({KIND}) (?:is )?({RELATION}) a (?:small )?({COLOUR}) ({KIND})")


def parse_canonical(text: str) -> dict:
    """The words of a canonical caption, independently of world.py's templates."""
    if m := CANONICAL_ONE.match(text):
        size, colour, kind, position, background = m.groups()
        return {"background": background, "objects": [(colour, kind, size)], "position": position}
    if m := CANONICAL_TWO.match(text):
        colour1, kind1, relation, colour2, kind2, background = m.groups()
        objects = [(colour1, kind1, None), (colour2, kind2, None)]
        return {"background": background, "objects": objects, "relation": relation}
    raise AssertionError(f"not a canonical caption: {text!r}")


def describe(scene: Scene) -> dict:
    """The same words, read off the scene."""
    if scene.position is not None:
        shape = scene.objects[0]
        return {"background": scene.background, "objects": [(shape.colour, shape.kind, shape.size)],
                "position": scene.position}  # fmt: skip
    objects = [(o.colour, o.kind, None) for o in scene.objects]
    return {"background": scene.background, "objects": objects, "relation": scene.relation}


def pixel(image: Image.Image, point: tuple[float, float]) -> tuple[int, int, int]:
    """The RGB of the pixel containing `point` (fractions of the side)."""
    return image.getpixel((int(point[0] * image.width), int(point[1] * image.height)))


def scenes(n: int, seed: int = 0, fraction: float = 0.3) -> list[Scene]:
    """n scenes from one seeded stream."""
    rng = random.Random(seed)
    return [sample_scene(rng, fraction) for _ in range(n)]


# --------------------------------------------------------------------------- determinism


def test_same_seed_same_items_and_different_seeds_differ():
    a, b, c = ShapesWorld(7), ShapesWorld(7), ShapesWorld(8)
    items_a, items_b, items_c = ([w.item(i) for i in range(12)] for w in (a, b, c))
    for (xa, ta), (xb, tb) in zip(items_a, items_b):
        assert torch.equal(xa, xb) and ta == tb
    assert [t for _, t in items_a] != [t for _, t in items_c]
    differing = sum(not torch.equal(xa, xc) for (xa, _), (xc, _) in zip(items_a, items_c))
    assert differing >= 10


def test_iterate_slices_equal_the_sequential_stream():
    w = ShapesWorld(3)
    sequential = list(itertools.islice(iter(w), 12))
    for start, step in ((0, 1), (5, 3), (1, 2)):
        sliced = list(itertools.islice(w.iterate(start, step), 4))
        for k, (x, text) in enumerate(sliced):
            index = start + k * step
            x_ref, text_ref = sequential[index] if index < 12 else w.item(index)
            assert torch.equal(x, x_ref) and text == text_ref, (start, step, k)
    ranks = [list(itertools.islice(w.iterate(r, 3), 4)) for r in range(3)]
    interleaved = [ranks[i % 3][i // 3] for i in range(12)]
    assert all(torch.equal(x, y) and s == t for (x, s), (y, t) in zip(interleaved, sequential))


def test_item_depends_only_on_seed_and_index():
    w = ShapesWorld(11)
    late = w.item(1000)  # asked first, before any other item
    _ = [w.item(i) for i in range(5)]
    again = ShapesWorld(11).item(1000)
    assert torch.equal(late[0], again[0]) and late[1] == again[1]
    assert w.scene_at(1000) == ShapesWorld(11).scene_at(1000)


def test_loader_workers_take_disjoint_interleaved_slices(monkeypatch):
    w = ShapesWorld(5)
    monkeypatch.setattr(world, "get_worker_info", lambda: SimpleNamespace(id=1, num_workers=2))
    worker_items = list(itertools.islice(iter(w), 3))
    assert [t for _, t in worker_items] == [w.item(i)[1] for i in (1, 3, 5)]


def test_items_are_float_tensors_in_range():
    x, text = ShapesWorld(0).item(0)
    assert x.shape == (3, 64, 64) and x.dtype == torch.float32
    assert x.min() >= -1.0 and x.max() <= 1.0 and isinstance(text, str) and text
    x128, _ = ShapesWorld(0, size=128).item(0)
    assert x128.shape == (3, 128, 128)


def test_bad_arguments_are_refused_clearly():
    with pytest.raises(ValueError, match="seed"):
        ShapesWorld(-1)
    with pytest.raises(ValueError, match="two_objects_fraction"):
        ShapesWorld(0, two_objects_fraction=1.5)
    with pytest.raises(ValueError, match="size"):
        ShapesWorld(0, size=3)
    with pytest.raises(ValueError, match="step"):
        next(ShapesWorld(0).iterate(0, 0))
    with pytest.raises(ValueError, match="unknown colour 'pink'"):
        Shape("circle", "pink", "small", (0.5, 0.5), 0.2)
    with pytest.raises(ValueError, match="different colours"):
        shape = Shape("circle", "red", "small", (0.25, 0.5), 0.2)
        Scene("white", (shape, shape), relation="above")
    with pytest.raises(ValueError, match="relation"):
        Scene("white", (Shape("circle", "red", "small", (0.5, 0.5), 0.2),), position="in the center", relation="above")


# --------------------------------------------------------------------------- captions


def test_canonical_captions_name_exactly_the_scene():
    for scene in scenes(400, seed=1):
        assert parse_canonical(canonical_caption(scene)) == describe(scene)


def test_grammar_prompts_are_canonical_with_their_scene():
    rng = random.Random(2)
    for _ in range(200):
        prompt, scene = grammar_prompts(rng)
        assert parse_canonical(prompt) == describe(scene)


def _words_in(text: str, words) -> list[str]:
    """Which of `words` (phrases) occur in text, each as many times as it occurs."""
    return [w for w in words for _ in re.finditer(rf"\b{re.escape(w)}\b", text)]


def test_every_caption_template_tells_the_truth():
    rng = random.Random(3)
    for scene in scenes(500, seed=3):
        text = caption(scene, rng)
        assert _words_in(text, BACKGROUNDS) == [scene.background], text
        assert sorted(_words_in(text, COLOURS)) == sorted(o.colour for o in scene.objects), text
        assert sorted(_words_in(text, KINDS)) == sorted(o.kind for o in scene.objects), text
        if scene.position is not None:
            assert _words_in(text, POSITIONS) == [scene.position], text
            assert _words_in(text, SIZES) == [scene.objects[0].size], text
            continue
        m = PAIR_PHRASE.search(text)
        assert m, text
        subject, relation, reference = m.groups()[:2], m.group(3), m.groups()[3:]
        first, second = ((o.colour, o.kind) for o in scene.objects)
        assert (subject, relation, reference) in {
            (first, scene.relation, second),
            (second, INVERSE[scene.relation], first),
        }, text
        assert set(_words_in(text, SIZES)) <= {"small"}, text


def _form(text: str) -> str:
    """The caption with every attribute word replaced by its kind: the template it came from."""
    for tag, words in (("{p}", POSITIONS), ("{r}", RELATIONS), ("{c}", COLOURS), ("{k}", KINDS),
                       ("{z}", SIZES), ("{b}", BACKGROUNDS)):  # fmt: skip
        text = re.sub(_alt(sorted(words, key=len, reverse=True)), tag, text)
    return text


def test_several_templates_for_each_kind_of_scene():
    rng = random.Random(4)
    forms = {1: set(), 2: set()}
    for scene in scenes(400, seed=4, fraction=0.5):
        forms[len(scene.objects)].add(_form(caption(scene, rng)))
    assert "a {z} {c} {k} {p}, {b} background" in forms[1]
    assert "a {c} {k} {r} a {c} {k}, {b} background" in forms[2]
    assert len(forms[1]) >= 4 and len(forms[2]) >= 4, forms


def test_twins_are_the_same_objects_laid_out_the_other_way():
    """Item 2k of a twins world is item k of the plain world; item 2k + 1 is its hard negative: two
    objects trade places (the relation inverts), one object moves; the caption keeps its template."""
    plain = ShapesWorld(9, 32, two_objects_fraction=0.5)
    twins = ShapesWorld(9, 32, two_objects_fraction=0.5, twins=True)
    assert plain.paired().example_at(7) == twins.example_at(7) and not plain.twins
    kinds = set()
    for k in range(60):
        (scene, text), (other, other_text) = twins.example_at(2 * k), twins.example_at(2 * k + 1)
        assert (scene, text) == plain.example_at(k)
        assert other.background == scene.background and other_text != text
        words = [[(o.colour, o.kind, o.size) for o in s.objects] for s in (scene, other)]
        assert words[0] == words[1]
        assert _form(other_text) == _form(text)
        if len(scene.objects) == 2:
            kinds.add(2)
            assert other.relation == INVERSE[scene.relation]
            assert [o.center for o in other.objects] == [o.center for o in reversed(scene.objects)]
        else:
            kinds.add(1)
            assert other.position != scene.position
            assert _words_in(other_text, POSITIONS) == [other.position]
        image = np.asarray(draw(other, 32))
        for shape in other.objects:  # drawn where the twin says
            assert tuple(image[int(shape.center[1] * 32), int(shape.center[0] * 32)]) == COLOURS[shape.colour]
    assert kinds == {1, 2}


# --------------------------------------------------------------------------- drawing


def test_object_interiors_have_the_exact_palette_colour():
    for scene in scenes(300, seed=5):
        for size in (64, 128):
            image = draw(scene, size)
            for shape in scene.objects:
                assert pixel(image, shape.center) == COLOURS[shape.colour], (scene, size)
            assert image.getpixel((0, 0)) == BACKGROUNDS[scene.background]


def test_objects_lie_inside_the_image():
    for scene in scenes(300, seed=6):
        for shape in scene.objects:
            left, top, right, bottom = shape.box()
            assert 0.0 < left and 0.0 < top and right < 1.0 and bottom < 1.0, shape
        pixels = np.asarray(draw(scene))
        ring = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
        assert (ring == BACKGROUNDS[scene.background]).all(), scene


def test_two_objects_both_drawn_apart_and_small():
    pairs = [s for s in scenes(300, seed=7, fraction=1.0)]
    assert all(len(s.objects) == 2 for s in pairs)
    for scene in pairs:
        a, b = scene.objects
        assert a.colour != b.colour and a.size == b.size == "small"
        (al, at, ar, ab), (bl, bt, br, bb) = a.box(), b.box()
        assert ar < bl or br < al or ab < bt or bb < at, scene  # boxes disjoint
        pixels = np.asarray(draw(scene)).reshape(-1, 3)
        for shape in scene.objects:
            assert (pixels == COLOURS[shape.colour]).all(axis=1).sum() >= 40, scene
        dx, dy = a.center[0] - b.center[0], a.center[1] - b.center[1]
        expected = {"to the left of": dx < -0.4, "to the right of": dx > 0.4, "above": dy < -0.4, "below": dy > 0.4}
        assert expected[scene.relation] and min(abs(dx), abs(dy)) < 0.1, scene


def test_sizes_and_places_follow_the_words():
    for scene in scenes(300, seed=8, fraction=0.0):
        shape = scene.objects[0]
        assert abs(shape.side / SIZES[shape.size] - 1) <= 0.05 + 1e-9
        anchor = POSITIONS[scene.position]
        assert max(abs(shape.center[0] - anchor[0]), abs(shape.center[1] - anchor[1])) <= 0.05, scene


def test_every_attribute_value_occurs():
    sample = scenes(400, seed=9)
    objects = [o for s in sample for o in s.objects]
    assert {s.background for s in sample} == set(BACKGROUNDS)
    assert {o.kind for o in objects} == set(KINDS)
    assert {o.colour for o in objects} == set(COLOURS)
    assert {o.size for o in objects} == set(SIZES)
    assert {s.position for s in sample} - {None} == set(POSITIONS)
    assert {s.relation for s in sample} - {None} == set(RELATIONS)
    pairs = sum(len(s.objects) == 2 for s in sample) / len(sample)
    assert 0.2 < pairs < 0.4, pairs


def test_objects_fraction_extremes():
    assert all(len(s.objects) == 1 for s in scenes(100, fraction=0.0))
    assert all(len(s.objects) == 2 for s in scenes(100, fraction=1.0))


# --------------------------------------------------------------------------- caption folders


def test_caption_folder_reads_resizes_and_crops(tmp_path):
    wide = np.zeros((64, 128, 3), dtype=np.uint8)
    wide[:, :16], wide[:, 16:112], wide[:, 112:] = (255, 0, 0), (0, 255, 0), (0, 0, 255)
    Image.fromarray(wide).save(tmp_path / "a_wide.png")
    (tmp_path / "a_wide.txt").write_text("a green field\n", encoding="utf-8")
    Image.new("RGB", (200, 200), (255, 255, 255)).save(tmp_path / "b_white.jpg", quality=95)
    (tmp_path / "b_white.txt").write_text("white", encoding="utf-8")
    (tmp_path / "notes.txt").write_text("not a caption of anything", encoding="utf-8")
    folder = CaptionFolder(tmp_path, size=32)
    assert len(folder) == 2
    (x0, t0), (x1, t1) = list(folder)
    assert (t0, t1) == ("a green field", "white")
    assert x0.shape == x1.shape == (3, 32, 32) and x0.dtype == torch.float32
    green = torch.tensor([-1.0, 1.0, -1.0])[:, None, None]
    assert (x0 - green).abs().max() < 0.05  # the red and blue sides were cropped away
    assert (x1 - 1.0).abs().max() < 0.05


def test_caption_folder_errors_are_clear(tmp_path):
    with pytest.raises(ValueError, match="no images"):
        CaptionFolder(tmp_path)
    with pytest.raises(ValueError, match="not a folder"):
        CaptionFolder(tmp_path / "missing")
    Image.new("RGB", (16, 16)).save(tmp_path / "cat.png")
    with pytest.raises(ValueError, match=r"without a caption: cat\.png.*cat\.txt"):
        CaptionFolder(tmp_path)
