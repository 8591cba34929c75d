"""A1111's Eta: the fresh noise's share in the samplers that read one (Euler a, default 1; DDIM, default 0).
One Euler a step against the formula; eta 0 is an Euler step; the defaults change nothing; the infotext,
--from-png, the API and the one-line refusals."""

import json
import math

import numpy as np
import pytest
import requests
import torch

import latentforge
from latentforge.infotext import parse_infotext
from latentforge.reproduce import generate_args
from latentforge.samplers import get_sampler, sample_euler_ancestral
from latentforge.server import ServerThread, Settings, create_app
from test_server_surface import image_of

CALL = {"prompt": "a red circle", "seed": 2, "steps": 4}


@pytest.fixture(scope="module")
def shipped():
    return latentforge.load()


def same(a, b) -> bool:
    return np.asarray(a).tobytes() == np.asarray(b).tobytes()


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_one_euler_a_step_is_the_formula(eta):
    """sigma_up = min(s1, eta * s1 * sqrt(s0^2 - s1^2) / s0), sigma_down = sqrt(s1^2 - sigma_up^2) (k-diffusion's)."""
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x0 = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    s0, s1 = 3.0, 1.5
    out = sample_euler_ancestral(lambda *_: x0, x, torch.tensor([s0, s1, 0.0]), generator=torch.Generator().manual_seed(5), eta=eta)
    up = min(s1, eta * s1 * math.sqrt(s0**2 - s1**2) / s0)
    down = math.sqrt(s1**2 - up**2)
    z = torch.randn(x.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    after_first = x + (x - x0) / s0 * (down - s0) + z * up
    last = after_first + (after_first - x0) / s1 * (0 - s1)  # the last step, to sigma 0, adds no noise
    assert torch.allclose(out, last, atol=1e-12)


def test_the_defaults_change_nothing_and_eta_0_is_euler(shipped):
    for sampler, default in (("Euler a", 1.0), ("DDIM", 0.0)):
        plain = shipped.generate(**CALL, sampler=sampler)[0]
        assert same(shipped.generate(**CALL, sampler=sampler, eta=default)[0], plain), sampler
        assert "Eta" not in plain.info["parameters"]
    euler_a = np.asarray(shipped.generate(**CALL, sampler="Euler a", eta=0.0)[0], dtype=np.int16)
    assert np.abs(euler_a - np.asarray(shipped.generate(**CALL, sampler="Euler")[0], dtype=np.int16)).max() <= 1


def test_the_infotext_says_it_and_from_png_reads_it(shipped):
    for sampler, eta, key in (("Euler a", 0.5, "Eta"), ("DDIM", 1.0, "Eta DDIM")):
        made = shipped.generate(**CALL, sampler=sampler, eta=eta)[0]
        params = parse_infotext(made.info["parameters"])
        assert params[key] == f"{eta:g}"
        args, _ = generate_args(params)
        assert args["eta"] == eta and same(shipped.generate(**args)[0], made)
    # a sampler without an eta ignores it, as A1111's do (clients send eta 1 with every sampler)
    assert same(shipped.generate(**CALL, sampler="Euler", eta=0.3)[0], shipped.generate(**CALL, sampler="Euler")[0])


@pytest.mark.parametrize(
    "given, message",
    [
        ({"eta": 1.5}, "eta must be between 0 and 1, got 1.5"),
        ({"eta": "x"}, "eta must be between 0 and 1"),
        ({"sampler": "DPM++ 2M SDE", "eta": 0.5}, r"eta 0.5 is read by DDIM, Euler a; DPM\+\+ 2M SDE runs at eta 1"),
    ],
)
def test_an_eta_that_cannot_be_used_is_one_line(shipped, given, message):
    with pytest.raises(ValueError, match=message):
        shipped.generate(**(CALL | given))


def test_the_api_takes_eta(sd1_folder):
    pipe = latentforge.load(sd1_folder)
    want = pipe.generate("a red circle", seed=9, steps=3, sampler="DDIM", width=64, height=64, eta=1.0)[0]
    body = {"prompt": "a red circle", "seed": 9, "steps": 3, "sampler_name": "DDIM", "width": 64, "height": 64, "eta": 1.0}
    with ServerThread(create_app(Settings(models=[str(sd1_folder)]))) as url:
        response = requests.post(f"{url}/sdapi/v1/txt2img", json=body, timeout=120)
    assert "Eta DDIM: 1" in json.loads(response.json()["info"])["infotexts"][0]
    assert np.array_equal(image_of(response), np.asarray(want))
    assert get_sampler("DDIM").eta == 0.0
