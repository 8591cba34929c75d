"""A1111's img2img options. Resize modes (images.resize_for, generate(resize_mode=)): an init image of another
size is stretched, scaled to cover and centre-cropped, scaled to fit with its edges stretched into the bands
left over, or encoded at its own size with its latents upscaled; by name or by A1111's numbers, on every
surface. The noise multiplier scales the noise added to the image."""

import base64
import io

import numpy as np
import pytest
import requests
import torch
from PIL import Image

import latentforge
from latentforge.cli import main
from latentforge.images import RESIZE_MODES, resize_for
from latentforge.samplers import SamplerSpec
from latentforge.server import ServerThread, Settings, create_app

WIDE = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 100, 3), dtype=np.uint8))  # 100 x 40
TALL = WIDE.transpose(Image.Transpose.TRANSPOSE)  # 40 x 100


@pytest.fixture(scope="module")
def shipped():
    return latentforge.load()


def test_crop_and_resize_covers_and_crops_the_middle():
    # 100 x 40 into 64 x 64: scaled by height to 160 x 64, the middle 64 columns kept
    want = WIDE.resize((160, 64), Image.LANCZOS).crop((48, 0, 112, 64))
    assert np.array_equal(np.asarray(resize_for(WIDE, (64, 64), "Crop and resize")), np.asarray(want))
    want = TALL.resize((64, 160), Image.LANCZOS).crop((0, 48, 64, 112))
    assert np.array_equal(np.asarray(resize_for(TALL, (64, 64), "Crop and resize")), np.asarray(want))


def test_resize_and_fill_fits_and_stretches_the_edges_into_the_bands():
    # 100 x 40 into 64 x 64: scaled by width to 64 x 25, at rows 20-44; the bands above and below repeat one row
    out = np.asarray(resize_for(WIDE, (64, 64), "Resize and fill"), dtype=np.int16)
    resized = WIDE.resize((64, 25), Image.LANCZOS)
    assert np.array_equal(out[20:45], np.asarray(resized))
    # the bands: the zero-height box at the top (bottom) edge stretched to 20 rows, as A1111 asks Pillow for them
    for band, box in ((out[:20], (0, 0, 64, 0)), (out[45:], (0, 25, 64, 25))):
        edge = np.asarray(resized.resize((64, 20), Image.LANCZOS, box=box), dtype=np.int16)
        assert (band == band[0]).all() and np.array_equal(band, edge[: len(band)])
    out = np.asarray(resize_for(TALL, (64, 64), "Resize and fill"), dtype=np.int16)
    assert (out[:, :20] == out[:, :1]).all() and (out[:, 45:] == out[:, 45:46]).all()


def test_just_resize_stretches_and_the_same_size_is_left_alone():
    assert np.array_equal(np.asarray(resize_for(WIDE, (64, 64), "Just resize")), np.asarray(WIDE.resize((64, 64), Image.LANCZOS)))
    assert all(resize_for(WIDE, WIDE.size, mode) is WIDE for mode in RESIZE_MODES[:3])


@pytest.mark.parametrize("mode", [1, 2, "crop and resize", "Resize and fill"])
def test_img2img_takes_the_image_as_the_mode_resizes_it(shipped, mode):
    name = RESIZE_MODES[mode] if isinstance(mode, int) else next(m for m in RESIZE_MODES if m.lower() == mode.lower())
    call = {"prompt": "a red circle", "seed": 4, "steps": 4, "strength": 0.6}
    made = shipped.generate(**call, init_image=WIDE, width=64, height=64, resize_mode=mode)[0]
    want = shipped.generate(**call, init_image=resize_for(WIDE, (64, 64), name))[0]
    assert np.array_equal(np.asarray(made), np.asarray(want))


def test_latent_upscale_encodes_the_image_at_its_own_size(shipped):
    small = WIDE.resize((48, 32))
    call = {"prompt": "a red circle", "seed": 4, "steps": 4, "strength": 0.6, "width": 96, "height": 64}
    latent = shipped.generate(**call, init_image=small, resize_mode=3)[0]
    assert latent.size == (96, 64)
    assert not np.array_equal(np.asarray(latent), np.asarray(shipped.generate(**call, init_image=small)[0]))
    with pytest.raises(ValueError, match="the init image's width must be a multiple of 8, got 50"):
        shipped.generate(**call, init_image=WIDE.resize((50, 32)), resize_mode=3)
    with pytest.raises(ValueError, match="is for img2img without a mask"):
        shipped.generate(**call, init_image=small, mask=Image.new("L", small.size, 255), resize_mode=3)


@pytest.mark.parametrize("mode", [4, -1, "stretch", True])
def test_an_unknown_mode_is_one_line_listing_them(shipped, mode):
    with pytest.raises(ValueError, match=r"resize_mode must be one of 0: 'Just resize', 1: 'Crop and resize'"):
        shipped.generate("a red circle", steps=4, init_image=WIDE, width=64, height=64, resize_mode=mode)


def test_the_api_and_the_command_line(sd1_folder, tmp_path, capsys):
    pipe = latentforge.load(sd1_folder)
    want = pipe.generate("a red circle", seed=2, steps=3, init_image=WIDE, width=64, height=64, resize_mode=1)[0]
    buffer = io.BytesIO()
    WIDE.save(buffer, format="PNG")
    body = {"prompt": "a red circle", "seed": 2, "steps": 3, "width": 64, "height": 64, "resize_mode": 1,
            "init_images": [base64.b64encode(buffer.getvalue()).decode()]}  # fmt: skip
    with ServerThread(create_app(Settings(models=[str(sd1_folder)]))) as url:
        response = requests.post(f"{url}/sdapi/v1/img2img", json=body, timeout=120)
        refused = requests.post(f"{url}/sdapi/v1/img2img", json=body | {"resize_mode": 5}, timeout=60)
    image = Image.open(io.BytesIO(base64.b64decode(response.json()["images"][0])))
    assert np.array_equal(np.asarray(image.convert("RGB")), np.asarray(want))
    assert refused.status_code == 422 and refused.json()["detail"][0]["loc"][-1] == "resize_mode"
    WIDE.save(tmp_path / "wide.png")
    for mode in ("1", "Crop and resize"):
        argv = ["generate", "a red circle", "--model", str(sd1_folder), "--seed", "2", "--steps", "3", "--init-image",
                str(tmp_path / "wide.png"), "--width", "64", "--height", "64", "--resize-mode", mode, "--out", str(tmp_path)]  # fmt: skip
        assert main(argv) == 0
        with Image.open(capsys.readouterr().out.split()[0]) as written:
            assert np.array_equal(np.asarray(written.convert("RGB")), np.asarray(want))


def test_the_noise_multiplier_scales_the_noise_added_to_the_image(shipped, monkeypatch):
    """A1111's "Noise multiplier for img2img": the sampler starts from image + multiplier x noise x first sigma,
    so the starts at 0, 0.5 and 1 lie on one line, 0.5 halfway."""
    starts = []
    usual = SamplerSpec.__call__
    monkeypatch.setattr(SamplerSpec, "__call__", lambda self, d, x, *a, **k: starts.append(x.float()) or usual(self, d, x, *a, **k))
    call = {"prompt": "a red circle", "seed": 4, "steps": 4, "strength": 0.6, "init_image": WIDE.resize((64, 64))}
    made = [shipped.generate(**call, noise_multiplier=m)[0] for m in (0.0, 0.5, 1.0)]
    image, half, full = starts
    assert torch.allclose(half - image, (full - image) / 2, atol=1e-5) and (full - image).abs().mean() > 0.1
    assert "Noise multiplier: 0.5" in made[1].info["parameters"] and "Noise multiplier" not in made[2].info["parameters"]
    with pytest.raises(ValueError, match="noise_multiplier is for img2img"):
        shipped.generate("a red circle", steps=4, noise_multiplier=0.5)
    with pytest.raises(ValueError, match="noise_multiplier must be between 0 and 2"):
        shipped.generate(**call, noise_multiplier=3)
