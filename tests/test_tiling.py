"""A1111's "Tiling": every convolution pads by wrapping around, so the image tiles seamlessly. With it the whole
generation commutes with a circular shift: the image of rolled starting noise is the rolled image (a shift
that every downsampling level divides). Off, nothing changes; the padding modes are put back after."""

import json

import numpy as np
import pytest
import requests
import torch
from PIL import Image

import latentforge
from latentforge import pipeline as pipeline_module
from latentforge.cli import main
from latentforge.convolution import circular_padding
from latentforge.infotext import parse_infotext
from latentforge.server import ServerThread, Settings, create_app

CALL = {"prompt": "a red circle", "seed": 3, "steps": 3, "sampler": "Euler", "width": 128, "height": 128}


@pytest.fixture(scope="module")
def sd1(sd1_folder):
    return latentforge.load(sd1_folder, dtype="float32")


def modes(pipe) -> list[str]:
    return [m.padding_mode for model in (pipe.unet, pipe.vae) for m in model.modules() if isinstance(m, torch.nn.Conv2d)]


def rolled_noise(monkeypatch, shift: int) -> None:
    """Make every image start from its usual noise rolled by `shift` latents to the right."""
    usual = pipeline_module.initial_noise
    monkeypatch.setattr(pipeline_module, "initial_noise", lambda *a: torch.roll(usual(*a), shift, dims=-1))


def test_the_decoder_commutes_with_a_circular_shift(sd1):
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), circular_padding([sd1.vae]):
        shifted = sd1.vae.decode(torch.roll(z, 3, dims=-1))
        want = torch.roll(sd1.vae.decode(z), 3 * 8, dims=-1)
    assert torch.allclose(shifted, want, atol=1e-5)
    with torch.no_grad():  # zero padding does not: the edges differ
        assert not torch.allclose(sd1.vae.decode(torch.roll(z, 3, dims=-1)), torch.roll(sd1.vae.decode(z), 24, dims=-1), atol=1e-3)


def test_the_whole_generation_commutes_with_a_circular_shift(sd1, monkeypatch):
    tiled = np.asarray(sd1.generate(**CALL, tiling=True)[0], dtype=np.int16)
    plain = np.asarray(sd1.generate(**CALL)[0], dtype=np.int16)
    rolled_noise(monkeypatch, 8)  # 8 latents = 64 pixels: each of the UNet's levels halves it evenly
    shifted = np.asarray(sd1.generate(**CALL, tiling=True)[0], dtype=np.int16)
    assert np.abs(shifted - np.roll(tiled, 64, axis=1)).max() <= 1  # float32 rounding, then uint8
    assert np.abs(np.asarray(sd1.generate(**CALL)[0], dtype=np.int16) - np.roll(plain, 64, axis=1)).max() > 8
    assert not np.array_equal(tiled, plain)


def test_off_it_changes_nothing_and_the_modes_are_put_back(sd1):
    before = modes(sd1)
    plain = sd1.generate(**CALL)[0]
    sd1.generate(**CALL, tiling=True)
    assert modes(sd1) == before and set(before) == {"zeros"}
    assert np.array_equal(np.asarray(sd1.generate(**CALL)[0]), np.asarray(plain))
    with pytest.raises(ValueError, match="steps must be"):  # a refused request leaves them too
        sd1.generate(**(CALL | {"steps": 0}), tiling=True)
    assert modes(sd1) == before


def test_the_infotext_the_api_and_the_command_line(sd1_folder, sd1, tmp_path, capsys):
    image = sd1.generate(**CALL, tiling=True)[0]
    assert parse_infotext(image.info["parameters"])["Tiling"] == "True"
    assert "Tiling" not in sd1.generate(**CALL)[0].info["parameters"]
    body = {"prompt": "a red circle", "seed": 3, "steps": 3, "sampler_name": "Euler", "width": 128, "height": 128,
            "tiling": True}  # fmt: skip
    with ServerThread(create_app(Settings(models=[str(sd1_folder)], dtype="float32"))) as url:
        response = requests.post(f"{url}/sdapi/v1/txt2img", json=body, timeout=120)
    assert "Tiling: True" in json.loads(response.json()["info"])["infotexts"][0]
    argv = ["generate", "a red circle", "--model", str(sd1_folder), "--dtype", "float32", "--seed", "3", "--steps",
            "3", "--sampler", "Euler", "--width", "128", "--height", "128", "--tiling", "--out", str(tmp_path)]  # fmt: skip
    assert main(argv) == 0
    with Image.open(capsys.readouterr().out.split()[0]) as written:
        assert np.array_equal(np.asarray(written.convert("RGB")), np.asarray(image))


def test_refused_with_vae_tiling_and_when_not_a_bool(sd1):
    sd1.vae_tiling = True
    try:
        with pytest.raises(ValueError, match="cannot be made with VAE tiling") as caught:
            sd1.generate(**CALL, tiling=True)
        assert "\n" not in str(caught.value)
    finally:
        sd1.vae_tiling = False
    with pytest.raises(ValueError, match="tiling must be True or False, got 'yes'"):
        sd1.generate(**CALL, tiling="yes")
