"""Make the README's pictures from the shipped model at its default settings.

    python docs/readme_images.py [--model PATH]

docs/images/grid.png: one row per prompt (both caption forms the model was trained on), four seeds each.
docs/images/steps.png: one image's predicted clean latents decoded after every sampler step.
docs/images/explain-attention.png: the cross-attention section of `latentforge explain`'s page (needs matplotlib).
Images are 64 x 64, drawn at 2x with nearest-neighbour scaling so that their pixels stay visible.
"""

from __future__ import annotations

import argparse
import textwrap
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

OUT = Path(__file__).resolve().parent / "images"
PROMPTS = (
    "a small red circle on the left, white background",
    "a large blue square in the center, black background",
    "a small yellow triangle at the top, gray background",
    "a large green circle at the bottom, white background",
    "a small purple square on the right, black background",
    "a red circle to the left of a blue square, white background",
    "a yellow triangle above a purple circle, black background",
    "a blue triangle below a red square, gray background",
)
SEEDS = (0, 1, 2, 3)
STEP_PROMPT, STEP_SEED = "a large orange triangle on the right, gray background", 7
ZOOM = 2
TEXT_WIDTH = 330
EXPLAIN_PROMPT, EXPLAIN_SEED = "a small red circle on the left, white background", 0


def zoom(image: Image.Image) -> Image.Image:
    return image.resize((image.width * ZOOM, image.height * ZOOM), Image.NEAREST)


def grid(pipe) -> Image.Image:
    """Prompt text at the left of each row, then the image of each seed."""
    font = ImageFont.load_default(size=14)
    cell = pipe.config.native_size * ZOOM
    sheet = Image.new("RGB", (TEXT_WIDTH + len(SEEDS) * (cell + 4), len(PROMPTS) * (cell + 4)), "white")
    draw = ImageDraw.Draw(sheet)
    for row, prompt in enumerate(PROMPTS):
        y = row * (cell + 4)
        draw.multiline_text((6, y + 6), "\n".join(textwrap.wrap(prompt, 36)), fill="black", font=font)
        for col, seed in enumerate(SEEDS):
            image = pipe.generate(prompt, seed=seed)[0]
            sheet.paste(zoom(image), (TEXT_WIDTH + col * (cell + 4), y))
    return sheet


def steps_strip(pipe) -> Image.Image:
    """The predicted image after each step, then the final one."""
    from latentforge.images import image_strip

    frames = []
    final = pipe.generate(STEP_PROMPT, seed=STEP_SEED, callback=lambda s: frames.append(pipe.decode(s.denoised)[0]))[0]
    labels = [f"step {i + 1}" for i in range(len(frames))] + ["final"]
    return image_strip([zoom(f) for f in [*frames, final]], labels)


def explain_figure(pipe) -> Image.Image:
    """The first figure of the explain page's attention section (the maps at the first drawn step)."""
    import base64
    import io
    import re

    from latentforge.explain import explain, render

    page = render(explain(pipe, EXPLAIN_PROMPT, seed=EXPLAIN_SEED))
    section = page[page.index('<section id="attention">'):]
    data = re.search(r'src="data:image/png;base64,([^"]+)"', section).group(1)
    return Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="checkpoint (default: the shipped model)")
    args = parser.parse_args()
    import latentforge

    pipe = latentforge.load(args.model, dtype="float32", device="cpu")
    OUT.mkdir(exist_ok=True)
    grid(pipe).save(OUT / "grid.png", optimize=True)
    steps_strip(pipe).save(OUT / "steps.png", optimize=True)
    explain_figure(pipe).save(OUT / "explain-attention.png", optimize=True)
    print(f"wrote grid.png, steps.png and explain-attention.png in {OUT} ({pipe.config.defaults.describe()})")


if __name__ == "__main__":
    main()
