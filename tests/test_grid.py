"""The X/Y/Z plot: axes parsed as A1111 writes them (ranges too), one generate() call per combination with x
fastest, each cell the image its settings make alone, and a grid of the cells with room for the labels."""

import numpy as np
import pytest
from PIL import Image

import latentforge
from latentforge.grid import Axis, axis_names, parse_axis, xyz_plot


@pytest.mark.parametrize(
    "text, kind, values",
    [
        ("steps=10,20,30", "steps", (10, 20, 30)),
        ("Steps=10-30 (+10)", "steps", (10, 20, 30)),
        ("seed=1-3", "seed", (1, 2, 3)),
        ("cfg=1-2 [3]", "cfg", (1.0, 1.5, 2.0)),
        ("CFG Scale=7, 7.5", "cfg", (7.0, 7.5)),
        ("sampler=Euler,DPM++ 2M Karras", "sampler", ("Euler", "DPM++ 2M Karras")),
        ("Prompt S/R=red,blue,green", "prompt_sr", ("red", "blue", "green")),
        ("Var. seed=5-6", "subseed", (5, 6)),
        ("subseed_strength=0-0.5 [3]", "subseed_strength", (0.0, 0.25, 0.5)),
    ],
)
def test_axes(text, kind, values):
    axis = parse_axis(text)
    assert (axis.kind, axis.values) == (kind, values)


def test_lora_axis_and_names():
    axis = parse_axis("lora=ink:0,0.5,1")
    assert (axis.kind, axis.lora, axis.values) == ("lora", "ink", (0.0, 0.5, 1.0))
    assert axis.apply({"prompt": "x", "loras": {"other": 1.0}}, 0.5, None)["loras"] == {"other": 1.0, "ink": 0.5}
    assert axis_names([parse_axis("steps=1,2"), None, axis]) == "X Type: Steps, X Values: 1, 2, Z Type: LoRA ink, Z Values: 0.0, 0.5, 1.0"


@pytest.mark.parametrize(
    "text, message",
    [
        ("size=1,2", "KIND one of"),
        ("steps", "KIND one of"),
        ("steps=", "no values"),
        ("steps=ten", "'ten' is not a int"),
        ("steps=10-30 (+0)", "is not a int or a range"),
        ("cfg=1-2 [0]", "is not a float or a range"),
        ("prompt_sr=red", "needs the text to replace"),
        ("lora=0,1", "lora=NAME:W1"),
    ],
)
def test_bad_axes_are_one_line(text, message):
    with pytest.raises(ValueError, match=message):
        parse_axis(text)


def test_cells_in_order_and_prompt_search_replace():
    calls = []

    def generate(**call):
        calls.append(call)
        return [Image.new("RGB", (8, 8), (len(calls), 0, 0))]

    base = {"prompt": "a red circle", "negative_prompt": "red blur", "steps": 5}
    plot = xyz_plot(generate, base, parse_axis("steps=1,2"), parse_axis("prompt_sr=red,blue"), parse_axis("seed=7,8"))
    assert [(c["steps"], c["prompt"], c["negative_prompt"], c["seed"]) for c in calls] == [
        (1, "a red circle", "red blur", 7), (2, "a red circle", "red blur", 7),
        (1, "a blue circle", "blue blur", 7), (2, "a blue circle", "blue blur", 7),
        (1, "a red circle", "red blur", 8), (2, "a red circle", "red blur", 8),
        (1, "a blue circle", "blue blur", 8), (2, "a blue circle", "blue blur", 8),
    ]  # fmt: skip
    assert plot.labels[2] == "Steps: 1, Prompt S/R: blue, Seed: 7"
    assert plot.cells[1][0][1].getpixel((0, 0)) == (6, 0, 0)
    grid = np.asarray(plot.grid)
    assert plot.grid.width > 2 * 2 * 8 and plot.grid.height > 2 * 8  # the cells and room for the labels
    assert any((grid == [6, 0, 0]).all(axis=-1).ravel())  # every cell is pasted in
    with pytest.raises(ValueError, match="'green' is not in the prompt"):
        xyz_plot(generate, base, parse_axis("prompt_sr=green,blue"))
    with pytest.raises(ValueError, match="two axes vary the same setting"):
        xyz_plot(generate, base, parse_axis("steps=1,2"), parse_axis("steps=3"))
    with pytest.raises(ValueError, match="at most 256"):
        xyz_plot(generate, base, Axis("seed", tuple(range(20))), Axis("steps", tuple(range(1, 20))))


def test_each_cell_is_the_image_its_settings_make_alone():
    pipe = latentforge.load()
    call = {"prompt": "a small red circle on the left, white background", "seed": 3}
    plot = xyz_plot(pipe.generate, call, parse_axis("steps=4,8"), parse_axis("sampler=Euler,DDIM"))
    alone = pipe.generate(call["prompt"], seed=3, steps=8, sampler="DDIM")[0]
    assert np.array_equal(np.asarray(plot.cells[0][1][1]), np.asarray(alone))
    assert "Steps: 8, Sampler: DDIM" in plot.cells[0][1][1].info["parameters"]


def test_a_variation_strength_axis_makes_each_cells_variation():
    pipe = latentforge.load()
    call = {"prompt": "a red circle", "seed": 3, "steps": 4, "subseed": 9}
    plot = xyz_plot(pipe.generate, call, parse_axis("Var. strength=0,0.5"))
    assert np.array_equal(np.asarray(plot.cells[0][0][0]), np.asarray(pipe.generate("a red circle", seed=3, steps=4)[0]))
    alone = pipe.generate("a red circle", seed=3, steps=4, subseed=9, subseed_strength=0.5)[0]
    assert np.array_equal(np.asarray(plot.cells[0][0][1]), np.asarray(alone)) and plot.labels[1] == "Var. strength: 0.5"
