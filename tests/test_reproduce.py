"""An infotext back to generate()'s arguments (latentforge.reproduce; `generate --from-png`, A1111's "Send to
txt2img"): an image made here is made again pixel for pixel from its own text; A1111's spellings are read;
what the text cannot bring back is a note, what cannot be read is one line naming the key."""

import re

import numpy as np
import pytest
from PIL import Image

import latentforge
from latentforge.cli import main
from latentforge.hires import Hires
from latentforge.infotext import parse_infotext
from latentforge.reproduce import generate_args

A1111 = "a cat\nNegative prompt: blurry\nSteps: 20, Sampler: {}, CFG scale: 7, Seed: 1, Size: 512x512, Model hash: abc"


@pytest.fixture(scope="module")
def shipped():
    return latentforge.load()


def again(pipe, image):
    """The image made again from its own infotext."""
    args, notes = generate_args(parse_infotext(image.info["parameters"]))
    assert notes == []  # an image made here says everything its making needs
    return pipe.generate(**args)[0]


@pytest.mark.parametrize(
    "options",
    [
        {"sampler": "DPM++ 2M Karras", "cfg_scale": 3.5, "clip_skip": 2, "width": 96, "height": 64},
        {"sampler": "Euler a", "eta_noise_seed_delta": 31337, "subseed": 11, "subseed_strength": 0.35},
        {"sampler": "DDIM", "seed_resize_from": (48, 80), "tiling": True, "negative_prompt": "a blue square"},
        {"sampler": "Euler", "hires": Hires(scale=1.5, upscaler="Latent (bicubic)", steps=3, denoising_strength=0.6)},
    ],
)
def test_an_image_made_here_is_made_again_from_its_text(shipped, options):
    image = shipped.generate("a red circle, (white background:1.2)", seed=7, steps=4, **options)[0]
    assert np.array_equal(np.asarray(again(shipped, image)), np.asarray(image))


@pytest.mark.parametrize(
    "sampler, want",
    [
        ("Euler a", "Euler a"),
        ("DPM++ 2M Karras", "DPM++ 2M Karras"),  # before A1111 1.9
        ("DPM++ 2M, Schedule type: Karras", "DPM++ 2M Karras"),
        ("DPM++ 2M, Schedule type: Automatic", "DPM++ 2M"),
    ],
)
def test_a1111s_sampler_spellings(sampler, want):
    args, _ = generate_args(parse_infotext(A1111.format(sampler)))
    assert args["sampler"] == want
    assert (args["prompt"], args["negative_prompt"], args["steps"], args["width"]) == ("a cat", "blurry", 20, 512)


@pytest.mark.parametrize(
    "sampler, message",
    [
        ("DPM++ SDE", "the infotext's sampler 'DPM++ SDE' is not one latentforge has; give --sampler"),
        ("DPM++ 2M, Schedule type: Exponential", "sampler 'DPM++ 2M' with schedule 'Exponential' is not one"),
    ],
)
def test_a_sampler_latentforge_lacks_is_one_line(sampler, message):
    with pytest.raises(ValueError, match=re.escape(message)) as caught:
        generate_args(parse_infotext(A1111.format(sampler)))
    assert "\n" not in str(caught.value)


def test_the_random_source_comes_along_and_what_the_text_cannot_bring_back_is_noted():
    args, notes = generate_args(parse_infotext(A1111.format("Euler")))
    assert args["rng"] == "GPU" and notes == []  # A1111's default when it writes no RNG
    args, notes = generate_args(parse_infotext(A1111.format("Euler") + ", Denoising strength: 0.4, RNG: CPU"))
    assert args["rng"] == "CPU" and args["strength"] == 0.4 and len(notes) == 1 and "--init-image" in notes[0]
    text = A1111.format("Euler").replace("a cat", "a cat <lora:ink:0.8>") + ", RNG: NV"
    args, notes = generate_args(parse_infotext(text))
    assert args["rng"] == "NV" and len(notes) == 1 and "--lora-dir" in notes[0]
    # latentforge's own images before it wrote RNG were drawn on the CPU
    assert generate_args(parse_infotext(A1111.format("Euler") + ", Version: latentforge 0.1.0"))[0]["rng"] == "CPU"


@pytest.mark.parametrize(
    "change, message",
    [
        (("Steps: 20", "Steps: many"), "the infotext's 'Steps' is 'many', not a whole number"),
        (("CFG scale: 7", "CFG scale: high"), "the infotext's 'CFG scale' is 'high', not a number"),
        (("Seed: 1", "Seed: 1, Hires upscale: big"), "the infotext's hires fix cannot be read"),
    ],
)
def test_a_value_that_cannot_be_read_is_one_line(change, message):
    with pytest.raises(ValueError, match=message):
        generate_args(parse_infotext(A1111.format("Euler").replace(*change)))


def test_generate_from_png(shipped, sd1_folder, tmp_path, capsys):
    argv = ["generate", "a red circle", "--seed", "5", "--steps", "3", "--sampler", "Euler a", "--subseed", "2",
            "--subseed-strength", "0.5", "--tiling", "--out", str(tmp_path)]  # fmt: skip
    assert main(argv) == 0
    first = capsys.readouterr().out.split()[0]
    assert main(["generate", "--from-png", first, "--out", str(tmp_path)]) == 0
    out, err = capsys.readouterr()
    with Image.open(first) as a, Image.open(out.split()[0]) as b:
        assert a.tobytes() == b.tobytes() and a.info["parameters"] == b.info["parameters"] and "note" not in err
    # what is given on the command line wins
    assert main(["generate", "a blue square", "--from-png", first, "--steps", "2", "--out", str(tmp_path)]) == 0
    with Image.open(capsys.readouterr().out.split()[0]) as c:
        made = parse_infotext(c.info["parameters"])
    assert (made["Prompt"], made["Steps"], made["Seed"], made["Tiling"]) == ("a blue square", "2", "5", "True")
    # another model: made, with a note saying so
    assert main(["generate", "--from-png", first, "--model", str(sd1_folder), "--out", str(tmp_path)]) == 0
    err = capsys.readouterr().err
    assert f"note: {first}: it was made with model hash {shipped.model_hash}" in err
    # no parameters in the file, and no prompt at all: one line each
    Image.new("RGB", (8, 8)).save(tmp_path / "plain.png")
    assert main(["generate", "--from-png", str(tmp_path / "plain.png"), "--out", str(tmp_path)]) == 2
    assert "plain.png: no generation parameters in it" in capsys.readouterr().err
    assert main(["generate", "--out", str(tmp_path)]) == 2
    assert "give a prompt (or --from-png FILE" in capsys.readouterr().err
