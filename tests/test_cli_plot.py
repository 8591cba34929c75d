"""The command line's hires fix, X/Y/Z plot and prompt styles, on the shipped model."""

import numpy as np
import pytest
from PIL import Image

import latentforge
from latentforge.cli import main
from latentforge.hires import Hires
from latentforge.infotext import parse_infotext
from latentforge.pngfiles import read_infotext

PROMPT = "a small red circle on the left, white background"


@pytest.fixture(scope="module")
def pipe():
    return latentforge.load()


def written(folder):
    return sorted(folder.glob("*.png"))


def test_hires_options(pipe, tmp_path):
    args = ["generate", PROMPT, "--seed", "4", "--steps", "4", "--hires-scale", "1.5", "--hires-upscaler", "Lanczos",
            "--hires-denoise", "0.5", "--out", str(tmp_path)]  # fmt: skip
    assert main(args) == 0
    (path,) = written(tmp_path)
    want = pipe.generate(PROMPT, seed=4, steps=4, hires=Hires(scale=1.5, upscaler="Lanczos", denoising_strength=0.5))[0]
    assert np.array_equal(np.asarray(Image.open(path).convert("RGB")), np.asarray(want))
    params = parse_infotext(read_infotext(path))
    assert (params["Hires upscale"], params["Hires upscaler"], params["Denoising strength"]) == ("1.5", "Lanczos", "0.5")


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--hires-steps", "3"], "--hires-steps needs --hires-scale or --hires-resize"),
        (["--hires-resize", "big"], "write WIDTHxHEIGHT"),
        (["--hires-scale", "1.5", "--hires-upscaler", "8x-None"], "unknown hires upscaler '8x-None'"),
        (["--y", "steps=1,2"], "--y and --z need an --x axis"),
        (["--x", "size=1,2"], "KIND one of"),
        (["--x", "steps=2,3", "--batch-size", "2"], "one image per cell"),
        (["--style", "framed"], "unknown style 'framed'; known: none"),
    ],
)
def test_bad_options_are_one_line(tmp_path, capsys, extra, message):
    assert main(["generate", PROMPT, "--steps", "2", "--out", str(tmp_path), *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert written(tmp_path) == []


def test_plot_writes_each_cell_and_the_labelled_grid(pipe, tmp_path):
    args = ["generate", PROMPT, "--seed", "8", "--x", "steps=2,3", "--y", "sampler=Euler,DDIM", "--out", str(tmp_path)]
    assert main(args) == 0
    files = written(tmp_path)
    assert len(files) == 5 and files[-1].name.endswith("-grid.png")
    cell = pipe.generate(PROMPT, seed=8, steps=3, sampler="DDIM")[0]
    assert np.array_equal(np.asarray(Image.open(files[3]).convert("RGB")), np.asarray(cell))
    grid = Image.open(files[-1])
    assert grid.width > 2 * 64 and grid.height > 2 * 64
    text = read_infotext(files[-1])
    assert "Script: X/Y/Z plot, X Type: Steps, X Values: 2, 3, Y Type: Sampler, Y Values: Euler, DDIM" in text


def test_styles_from_a_file(pipe, tmp_path):
    styles = tmp_path / "styles.csv"
    styles.write_text('name,prompt,negative_prompt\nframed,"{prompt}, white background",blurry\n')
    out = tmp_path / "out"
    assert main(["generate", "a small red circle on the left", "--style", "framed", "--styles-file", str(styles),
                 "--seed", "2", "--steps", "3", "--out", str(out)]) == 0  # fmt: skip
    (path,) = written(out)
    assert read_infotext(path).startswith(f"{PROMPT}\nNegative prompt: blurry\n")
