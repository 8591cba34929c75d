"""A1111's inpainting options (latentforge.inpaint, generate(masked_content=, inpaint_area=, overlay=,
mask_blur=)): the fill paints the hole from its surroundings; latent noise / nothing replace the masked latents;
"only masked" paints the mask's box (grown to the generation's aspect ratio) at full size and pastes it back;
the overlay puts the unmasked pixels back; each is in the infotext and read back by --from-png."""

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFilter

import latentforge
from latentforge import pipeline as pipeline_module
from latentforge.cli import main
from latentforge.images import RESIZE_MODES, resize_for
from latentforge.infotext import parse_infotext
from latentforge.inpaint import PasteBack, fill, grow_to_ratio
from latentforge.reproduce import generate_args
from latentforge.seeds import SeedOptions, initial_noise

PHOTO = Image.fromarray(np.random.default_rng(0).integers(0, 255, (96, 128, 3), dtype=np.uint8))  # 128 x 96
HOLE = Image.new("L", (128, 96))
ImageDraw.Draw(HOLE).rectangle((60, 40, 79, 55), fill=255)  # 20 x 16 at (60, 40)
CALL = {"prompt": "a red circle", "seed": 1, "steps": 4, "strength": 0.8}


@pytest.fixture(scope="module")
def shipped():
    return latentforge.load()


def pixels(image):
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def test_fill_paints_the_hole_from_around_it_and_keeps_the_rest():
    halves = Image.new("RGB", (64, 32), (255, 0, 0))
    halves.paste((0, 0, 255), (32, 0, 64, 32))
    hole = Image.new("L", (64, 32))
    hole.paste(255, (16, 0, 48, 32))
    out = pixels(fill(halves, hole))
    keep = np.asarray(hole) == 0
    assert np.abs(out[keep] - pixels(halves)[keep]).max() <= 1
    left, right = out[16, 18], out[16, 45]  # inside the hole, near each side
    assert left[0] > left[2] and right[2] > right[0]  # red comes in from the left, blue from the right


@pytest.mark.parametrize(
    "box, size, bounds, want",
    [
        ((10, 10, 30, 20), (64, 64), (100, 100), (10, 5, 30, 25)),  # taller, by 5 each side
        ((0, 0, 40, 10), (64, 64), (100, 100), (0, 0, 40, 40)),  # shifted down at the top edge
        ((0, 0, 100, 10), (64, 64), (100, 50), (0, 0, 100, 50)),  # cut: the image is too short
        ((10, 10, 20, 40), (128, 64), (100, 100), (0, 10, 60, 40)),  # wider: 10 x 30 -> 60 x 30, from 0
    ],
)
def test_the_box_grows_to_the_generations_aspect_ratio(box, size, bounds, want):
    assert grow_to_ratio(box, size, bounds) == want


def test_the_box_is_the_masks_with_padding_and_an_empty_mask_is_one_line():
    cut = PasteBack.cut(PHOTO, HOLE, 8, (64, 64))
    assert cut.box == (52, 32 - 2, 88, 64 + 2)  # 36 x 32 padded, grown to 36 x 36
    with pytest.raises(ValueError, match="the mask is all black"):
        PasteBack.cut(PHOTO, Image.new("L", PHOTO.size), 8, (64, 64))


def test_only_masked_is_the_box_painted_alone_and_pasted_back(shipped):
    made = shipped.generate(**CALL, init_image=PHOTO, mask=HOLE, inpaint_area="only masked", inpaint_padding=8)[0]
    # the same by hand: the box cut out, scaled to the native 64 x 64, inpainted, scaled back, pasted through the mask
    box = (52, 30, 88, 66)
    crop, crop_mask = (resize_for(im.crop(box), (64, 64), RESIZE_MODES[2]) for im in (PHOTO, HOLE))
    alone = shipped.generate(**CALL, init_image=crop, mask=crop_mask)[0]
    whole = PHOTO.copy()
    whole.paste(resize_for(alone, (36, 36), RESIZE_MODES[1]), box[:2])
    assert np.array_equal(pixels(made), pixels(Image.composite(whole, PHOTO, HOLE)))
    assert made.size == PHOTO.size and np.array_equal(pixels(made)[np.asarray(HOLE) == 0], pixels(PHOTO)[np.asarray(HOLE) == 0])
    params = parse_infotext(made.info["parameters"])
    assert (params["Size-1"], params["Inpaint area"], params["Masked area padding"]) == ("64", "Only masked", "8")


@pytest.mark.parametrize("content", ["latent noise", "latent nothing", 3])
def test_latent_noise_and_nothing_replace_the_masked_latents(shipped, monkeypatch, content):
    """The latents the sampler keeps outside the mask (and starts from inside it): the image's own outside,
    inside the seed's starting noise ("latent noise") or zeros ("latent nothing", A1111's 3)."""
    kept = []
    usual = pipeline_module.keep_unmasked
    monkeypatch.setattr(pipeline_module, "keep_unmasked", lambda d, m, k: kept.append((m, k)) or usual(d, m, k))
    image, hole = PHOTO.crop((32, 16, 96, 80)), HOLE.crop((32, 16, 96, 80))
    shipped.generate(**CALL, init_image=image, mask=hole, masked_content="fill")
    shipped.generate(**CALL, init_image=image, mask=hole, masked_content=content)
    (mask, filled), (_, replaced) = kept
    inside = mask.bool().expand_as(replaced)
    assert inside.any() and (~inside).any()
    assert torch.equal(replaced[~inside], filled[~inside])  # both encode the filled image outside
    if content == "latent noise":
        g = torch.Generator().manual_seed(1)
        torch.randn((1, 4, 8, 8), generator=g)  # the image's posterior sample is drawn first (img2img)
        noise = initial_noise((1, 4, 8, 8), 1, g, SeedOptions(), 0, 8)  # then the noise the run starts from
        assert torch.allclose(replaced[inside].float(), noise[inside].float())
    else:
        assert (replaced[inside] == 0).all()


def test_the_overlay_and_the_mask_blur(shipped):
    image, hole = PHOTO.crop((32, 16, 96, 80)), HOLE.crop((32, 16, 96, 80))
    plain = shipped.generate(**CALL, init_image=image, mask=hole)[0]
    overlaid = shipped.generate(**CALL, init_image=image, mask=hole, overlay=True)[0]
    outside = np.asarray(hole) == 0
    assert np.array_equal(pixels(overlaid)[outside], pixels(image)[outside])  # put back exactly
    assert not np.array_equal(pixels(plain)[outside], pixels(image)[outside])  # the VAE's round trip otherwise
    assert np.array_equal(pixels(overlaid)[~outside], pixels(plain)[~outside])
    blurred = shipped.generate(**CALL, init_image=image, mask=hole, mask_blur=4)[0]
    by_hand = shipped.generate(**CALL, init_image=image, mask=hole.filter(ImageFilter.GaussianBlur(4)))[0]
    assert np.array_equal(pixels(blurred), pixels(by_hand))
    assert parse_infotext(blurred.info["parameters"])["Mask blur"] == "4"


@pytest.mark.parametrize(
    "given, message",
    [
        ({"masked_content": "fill"}, "masked_content and inpaint_area are for inpainting: give a mask"),
        ({"inpaint_area": "only masked"}, "give a mask"),
        ({"init_image": PHOTO, "mask": HOLE, "masked_content": "noise"}, "masked_content must be one of 0: 'fill'"),
        ({"init_image": PHOTO, "mask": HOLE, "inpaint_area": "masked"}, "inpaint_area must be one of 'whole picture'"),
        ({"init_image": PHOTO, "mask": HOLE, "overlay": "yes"}, "overlay must be True or False"),
        ({"init_image": PHOTO, "mask": HOLE, "mask_blur": -1}, "mask_blur must be between 0 and 256"),
    ],
)
def test_bad_options_are_one_line(shipped, given, message):
    with pytest.raises(ValueError, match=message):
        shipped.generate(**(CALL | given))


def test_the_infotext_is_read_back_and_the_command_line(shipped, tmp_path, capsys):
    made = shipped.generate(**CALL, init_image=PHOTO, mask=HOLE, masked_content="fill", inpaint_area="only masked",
                            inpaint_padding=8, mask_blur=2, overlay=True)[0]  # fmt: skip
    args, notes = generate_args(parse_infotext(made.info["parameters"]))
    assert {k: args[k] for k in ("masked_content", "inpaint_area", "inpaint_padding", "mask_blur")} == {
        "masked_content": "fill", "inpaint_area": "only masked", "inpaint_padding": 8, "mask_blur": 2
    }  # fmt: skip
    assert any("--mask" in note for note in notes)
    again = shipped.generate(**(args | {"init_image": PHOTO, "mask": HOLE, "overlay": True}))[0]
    assert np.array_equal(pixels(again), pixels(made))
    PHOTO.save(tmp_path / "photo.png")
    HOLE.save(tmp_path / "hole.png")
    argv = ["generate", "a red circle", "--seed", "1", "--steps", "4", "--strength", "0.8", "--init-image",
            str(tmp_path / "photo.png"), "--mask", str(tmp_path / "hole.png"), "--masked-content", "fill",
            "--inpaint-area", "only masked", "--inpaint-padding", "8", "--mask-blur", "2", "--out", str(tmp_path)]  # fmt: skip
    assert main(argv) == 0
    with Image.open(capsys.readouterr().out.split()[0]) as written:
        assert np.array_equal(pixels(written), pixels(made))
