"""AUTOMATIC1111's X/Y/Z plot: one generation per combination of axis values, laid out as a labelled grid.

An axis is written `KIND=V1,V2,...` with KIND one of seed, steps, cfg, sampler, prompt_sr, lora, subseed,
subseed_strength (and their A1111 labels: "Seed", "Steps", "CFG Scale", "Sampler", "Prompt S/R", "Var. seed",
"Var. strength"). Numbers may be written as
A1111's ranges: `10-30 (+10)` (a step), `1-2 [5]` (a count), `1-3` (integers, step 1). Prompt S/R: the first
value is the text searched for in the prompts, each value (the first too) replaces it. `lora=NAME:0,0.5,1`
varies the weight of one LoRA (a name in the pipeline's library, or a path). X varies fastest; each
combination is one `Pipeline.generate` call, so each cell is the image those settings make alone.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from PIL import Image, ImageDraw, ImageFont

AXES = {"seed": "seed", "steps": "steps", "cfg": "cfg_scale", "sampler": "sampler", "prompt_sr": "prompt", "lora": "loras",
        "subseed": "subseed", "subseed_strength": "subseed_strength"}  # fmt: skip
LABELS = {"seed": "Seed", "steps": "Steps", "cfg": "CFG Scale", "sampler": "Sampler", "prompt_sr": "Prompt S/R", "lora": "LoRA",
          "subseed": "Var. seed", "subseed_strength": "Var. strength"}  # fmt: skip
ALIASES = {label.lower(): kind for kind, label in LABELS.items()} | {"cfg scale": "cfg", "prompt s/r": "prompt_sr"}
MAX_CELLS = 256  # images in one plot
_STEP = re.compile(r"^\s*(-?[\d.]+)\s*-\s*(-?[\d.]+)\s*\(\s*([+-]?[\d.]+)\s*\)\s*$")  # 10-30 (+10)
_COUNT = re.compile(r"^\s*(-?[\d.]+)\s*-\s*(-?[\d.]+)\s*\[\s*(\d+)\s*\]\s*$")  # 1-2 [5]
_SPAN = re.compile(r"^\s*(-?\d+)\s*-\s*(-?\d+)\s*$")  # 1-3


@dataclass(frozen=True)
class Axis:
    kind: str  # a key of AXES
    values: tuple  # what each cell gets
    lora: str | None = None  # the LoRA whose weight a "lora" axis varies

    def label(self, value: object) -> str:
        """A cell's label: "Steps: 20", "Prompt S/R: blue", "LoRA ink: 0.5"."""
        name = f"LoRA {self.lora}" if self.kind == "lora" else LABELS[self.kind]
        return f"{name}: {value}"

    def apply(self, call: dict[str, Any], value: object, search: str | None) -> dict[str, Any]:
        """The generate() arguments with this axis at `value` (Prompt S/R replaces `search` in both prompts)."""
        if self.kind == "prompt_sr":
            return call | {
                "prompt": call["prompt"].replace(search, str(value)),
                "negative_prompt": call.get("negative_prompt", "").replace(search, str(value)),
            }
        if self.kind == "lora":
            return call | {"loras": {**call.get("loras", {}), self.lora: float(value)}}
        return call | {AXES[self.kind]: value}


def parse_axis(text: str) -> Axis:
    """`KIND=V1,V2,...` -> Axis; a bad kind, value or range is one line naming it."""
    kind, sep, rest = text.partition("=")
    kind = ALIASES.get(kind.strip().lower(), kind.strip().lower())
    if not sep or kind not in AXES:
        raise ValueError(f"axis {text!r}: write KIND=V1,V2,... with KIND one of {', '.join(AXES)}")
    lora = None
    if kind == "lora":
        lora, colon, rest = rest.partition(":")
        if not colon or not lora.strip():
            raise ValueError(f"axis {text!r}: write lora=NAME:W1,W2,...")
        lora = lora.strip()
    parts = [part.strip() for part in rest.split(",") if part.strip()]
    if not parts:
        raise ValueError(f"axis {text!r} has no values")
    if kind in ("seed", "steps", "subseed"):
        values = [v for part in parts for v in _numbers(part, int, text)]
    elif kind in ("cfg", "lora", "subseed_strength"):
        values = [v for part in parts for v in _numbers(part, float, text)]
    else:
        values = parts
    if kind == "prompt_sr" and len(values) < 2:
        raise ValueError(f"axis {text!r}: Prompt S/R needs the text to replace and at least one replacement")
    return Axis(kind, tuple(values), lora)


def _numbers(part: str, cast: type, text: str) -> list:
    """One value or an A1111 range of them."""
    try:
        if match := _STEP.match(part):
            start, stop, step = (float(g) for g in match.groups())
            if step == 0 or (stop - start) / step < 0:
                raise ValueError
            count = int(round((stop - start) / step)) + 1
            return [cast(start + i * step) for i in range(min(count, MAX_CELLS + 1))]
        if match := _COUNT.match(part):
            start, stop, count = float(match[1]), float(match[2]), int(match[3])
            if count < 1:
                raise ValueError
            values = [start + (stop - start) * i / max(count - 1, 1) for i in range(min(count, MAX_CELLS + 1))]
            return [cast(round(v)) if cast is int else cast(v) for v in values]
        if cast is int and (match := _SPAN.match(part)):
            start, stop = int(match[1]), int(match[2])
            return list(range(start, stop + (1 if stop >= start else -1), 1 if stop >= start else -1))[: MAX_CELLS + 1]
        return [cast(part)]
    except ValueError:
        raise ValueError(f"axis {text!r}: {part!r} is not a {cast.__name__} or a range such as 10-30 (+10)") from None


@dataclass
class Plot:
    """The images of a plot and its grid: cells[z][y][x], and the grid with labelled rows and columns."""

    cells: list[list[list[Image.Image]]]
    grid: Image.Image
    labels: list[str]  # each cell's axis labels, in the order the cells were made (x fastest)


def xyz_plot(
    generate: Callable[..., list[Image.Image]], call: dict[str, Any], x: Axis, y: Axis | None = None, z: Axis | None = None
) -> Plot:
    """Run `generate(**call)` once per combination (call changed by each axis), x fastest; return the cells
    and the grid (one block per z value, side by side)."""
    axes = [axis for axis in (x, y, z) if axis is not None]
    if len({axis.kind if axis.kind != "lora" else ("lora", axis.lora) for axis in axes}) < len(axes):
        raise ValueError("two axes vary the same setting; give each axis its own")
    count = len(x.values) * len(y.values if y else [None]) * len(z.values if z else [None])
    if count > MAX_CELLS:
        raise ValueError(f"the plot has {count} cells: at most {MAX_CELLS}; use fewer values")
    for axis in axes:
        if axis.kind == "prompt_sr" and axis.values[0] not in call["prompt"] + call.get("negative_prompt", ""):
            raise ValueError(f"Prompt S/R: {axis.values[0]!r} is not in the prompt or the negative prompt")
    cells, labels = [], []
    for z_value in z.values if z else [None]:
        block = []
        for y_value in y.values if y else [None]:
            row = []
            for x_value in x.values:
                cell = dict(call)
                chosen = [(axis, value) for axis, value in ((z, z_value), (y, y_value), (x, x_value)) if axis is not None]
                for axis, value in chosen:
                    cell = axis.apply(cell, value, axis.values[0] if axis.kind == "prompt_sr" else None)
                row.append(generate(**cell)[0])
                labels.append(", ".join(axis.label(value) for axis, value in reversed(chosen)))
            block.append(row)
        cells.append(block)
    return Plot(cells, _grid(cells, x, y, z), labels)


def _grid(cells: list[list[list[Image.Image]]], x: Axis, y: Axis | None, z: Axis | None) -> Image.Image:
    """Each z block: column labels above, row labels at the left; blocks side by side under their z label."""
    width, height = cells[0][0][0].size
    font = ImageFont.load_default(size=max(10, min(20, height // 10)))
    line = font.getbbox("Ag")[3] + 8
    left = max((int(font.getlength(str(v))) for v in y.values), default=0) + 12 if y else 0
    top = line * (2 if z else 1)
    block_w = left + width * len(x.values)
    grid = Image.new("RGB", (block_w * len(cells), top + height * len(cells[0])), "white")
    draw = ImageDraw.Draw(grid)
    for b, block in enumerate(cells):
        x0 = b * block_w
        if z:
            draw.text((x0 + left + 4, 4), z.label(z.values[b]), fill="black", font=font)
        for i, value in enumerate(x.values):
            draw.text((x0 + left + i * width + 4, top - line + 4), str(value), fill="black", font=font)
        for j, row in enumerate(block):
            if y:
                draw.text((x0 + 4, top + j * height + height // 2 - line // 2), str(y.values[j]), fill="black", font=font)
            for i, image in enumerate(row):
                grid.paste(image.convert("RGB"), (x0 + left + i * width, top + j * height))
    return grid


def axis_names(axes: Sequence[Axis | None]) -> str:
    """A1111's infotext names of the axes: "X Type: Steps, X Values: 10, 20"."""
    parts = []
    for letter, axis in zip("XYZ", axes, strict=False):
        if axis is not None:
            name = f"LoRA {axis.lora}" if axis.kind == "lora" else LABELS[axis.kind]
            parts.append(f"{letter} Type: {name}, {letter} Values: {', '.join(str(v) for v in axis.values)}")
    return ", ".join(parts)
