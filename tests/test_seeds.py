"""A1111's seed options (latentforge.seeds): the variation seed moves the starting noise toward another seed's by
spherical interpolation per (channel, column); seed resize starts from the noise of another size, centred.
Off, they change nothing; each image i uses subseed + i; the infotext and the API carry them."""

import json
import math

import numpy as np
import pytest
import requests
import torch
from PIL import Image

import latentforge
from latentforge.cli import main
from latentforge.infotext import parse_infotext
from latentforge.seeds import SeedOptions, initial_noise, slerp
from latentforge.server import ServerThread, Settings, create_app
from test_server_surface import image_of

SHAPE = (1, 4, 8, 8)


@pytest.fixture(scope="module")
def shipped():
    return latentforge.load()


def randn(seed, shape=SHAPE):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def noise(seed, options, index=0, shape=SHAPE):
    return initial_noise(shape, seed, torch.Generator().manual_seed(seed), options, index, 8)


def same(a, b) -> bool:
    return np.asarray(a).tobytes() == np.asarray(b).tobytes()


def test_off_they_change_nothing(shipped):
    plain = shipped.generate("a red circle", seed=3, steps=4)[0]
    size = (plain.width, plain.height)
    for options in ({"subseed": 5, "subseed_strength": 0.0}, {"seed_resize_from": size}):
        assert same(shipped.generate("a red circle", seed=3, steps=4, **options)[0], plain), options
    assert "Variation" not in shipped.generate("a red circle", seed=3, steps=4, subseed=5)[0].info["parameters"]
    assert torch.equal(noise(3, SeedOptions(5, 0.0, (64, 64))), randn(3))


def test_full_strength_is_the_variation_seeds_noise(shipped):
    assert torch.equal(noise(3, SeedOptions(5, 1.0), index=2), randn(7))
    # Euler draws no noise after the first: the image is the variation seed's own
    varied = shipped.generate("a red circle", seed=3, steps=4, sampler="Euler", subseed=5, subseed_strength=1.0)[0]
    assert same(varied, shipped.generate("a red circle", seed=5, steps=4, sampler="Euler")[0])


def test_the_interpolation_is_spherical_along_each_column():
    """Against the definition, one (channel, column) vector at a time in float64: the result is
    (sin((1 - t) w) a + sin(t w) b) / sin(w), w the angle between a and b; for unit columns it is at angle t w
    from a and (1 - t) w from b."""
    a, b, t = randn(1), randn(2), 0.3
    got = slerp(t, a, b).double()
    for c in range(4):
        for x in range(8):
            u, v = a[0, c, :, x].double().numpy(), b[0, c, :, x].double().numpy()
            w = math.acos(u @ v / np.linalg.norm(u) / np.linalg.norm(v))
            want = (math.sin((1 - t) * w) * u + math.sin(t * w) * v) / math.sin(w)
            np.testing.assert_allclose(got[0, c, :, x].numpy(), want, rtol=1e-4, atol=1e-5)
    unit_a, unit_b = a / a.norm(dim=2, keepdim=True), b / b.norm(dim=2, keepdim=True)
    r = slerp(t, unit_a, unit_b)
    angle = torch.acos((unit_a * unit_b).sum(2))
    assert torch.allclose(torch.acos((r * unit_a).sum(2).clamp(-1, 1)), t * angle, atol=1e-3)
    assert torch.allclose(torch.acos((r * unit_b).sum(2).clamp(-1, 1)), (1 - t) * angle, atol=1e-3)


def test_nearly_parallel_noises_are_mixed_linearly_as_the_webui_mixes_them():
    a = randn(1)
    b = a + 1e-3 * randn(2)
    assert torch.equal(slerp(0.3, a, b), a * 0.3 + b * 0.7)  # the webui weights the seed's noise by the strength
    assert torch.allclose(noise(4, SeedOptions(4, 0.3)), randn(4), atol=1e-6)  # the seed as its own variation seed


def test_image_i_of_a_batch_uses_subseed_plus_i(shipped):
    batch = shipped.generate("a red circle", seed=3, steps=4, batch_size=2, subseed=5, subseed_strength=0.4)
    alone = shipped.generate("a red circle", seed=4, steps=4, subseed=6, subseed_strength=0.4)[0]
    assert same(batch[1], alone) and not same(batch[0], batch[1])
    params = parse_infotext(batch[1].info["parameters"])
    assert params["Variation seed"] == "6" and params["Variation seed strength"] == "0.4"
    keys = list(params)
    assert keys.index("Model") < keys.index("Variation seed") < keys.index("Version")  # A1111's order


def test_seed_resize_centres_the_other_sizes_noise():
    # from a larger size: the centre of its noise
    assert torch.equal(noise(3, SeedOptions(resize_from=(96, 96))), randn(3, (1, 4, 12, 12))[:, :, 2:10, 2:10])
    # from a smaller one (48 x 32 pixels: 6 x 4 latents): pasted in the middle of this size's own noise
    got, own, small = noise(3, SeedOptions(resize_from=(48, 32))), randn(3), randn(3, (1, 4, 4, 6))
    assert torch.equal(got[:, :, 2:6, 1:7], small)
    outside = torch.ones(SHAPE, dtype=torch.bool)
    outside[:, :, 2:6, 1:7] = False
    assert torch.equal(got[outside], own[outside])
    # an odd difference (11 rows into 8): the webui crops 2 from the top and leaves its own last row
    got = noise(3, SeedOptions(resize_from=(64, 88)))
    assert torch.equal(got[:, :, :7], randn(3, (1, 4, 11, 8))[:, :, 2:9]) and torch.equal(got[:, :, 7], randn(3)[:, :, 7])
    # with a variation seed, drawn at the other size too
    varied = noise(3, SeedOptions(9, 0.5, (96, 96)))
    assert torch.equal(varied, slerp(0.5, randn(3, (1, 4, 12, 12)), randn(9, (1, 4, 12, 12)))[:, :, 2:10, 2:10])


def test_the_options_reach_the_image_and_its_infotext(shipped):
    image = shipped.generate("a red circle", seed=3, steps=4, seed_resize_from=(48, 72))[0]
    assert not same(image, shipped.generate("a red circle", seed=3, steps=4)[0])
    assert parse_infotext(image.info["parameters"])["Seed resize from-1"] == "48"


@pytest.mark.parametrize(
    "given, named",
    [
        ({"subseed_strength": 1.5}, "subseed_strength must be between 0 and 1"),
        ({"subseed_strength": True}, "subseed_strength"),
        ({"subseed_strength": "0.5"}, "subseed_strength"),
        ({"subseed": -5, "subseed_strength": 0.5}, "subseed must be between 0"),
        ({"subseed": 1.5}, "subseed must be a whole number"),
        ({"seed_resize_from": (50, 64)}, "seed_resize_from's width must be a multiple of 8"),
        ({"seed_resize_from": (64,)}, r"seed_resize_from must be \(width, height\)"),
        ({"seed_resize_from": "64x64"}, r"seed_resize_from must be \(width, height\)"),
    ],
)
def test_a_bad_option_is_one_line_naming_it(shipped, given, named):
    with pytest.raises(ValueError, match=named) as caught:
        shipped.generate("a red circle", seed=3, steps=4, **given)
    assert "\n" not in str(caught.value)


def test_the_api_takes_a1111s_fields(sd1_folder):
    pipe = latentforge.load(sd1_folder)
    base = {"prompt": "a red circle", "width": 64, "height": 64, "steps": 3, "sampler_name": "Euler", "seed": 9}
    with ServerThread(create_app(Settings(models=[str(sd1_folder)]))) as url:
        post = lambda body: requests.post(f"{url}/sdapi/v1/txt2img", json=base | body, timeout=120)  # noqa: E731
        response = post({"subseed": 20, "subseed_strength": 0.25, "seed_resize_from_w": 48, "seed_resize_from_h": 64,
                         "batch_size": 2})  # fmt: skip
        assert response.status_code == 200, response.text
        info = json.loads(response.json()["info"])
        assert (info["subseed"], info["all_subseeds"], info["subseed_strength"]) == (20, [20, 21], 0.25)
        want = pipe.generate("a red circle", seed=10, steps=3, sampler="Euler", width=64, height=64, subseed=21,
                             subseed_strength=0.25, seed_resize_from=(48, 64))[0]  # fmt: skip
        assert np.array_equal(image_of(response, 1), np.asarray(want))
        random = json.loads(post({"subseed": -1, "subseed_strength": 0.1}).json()["info"])
        assert 0 <= random["subseed"] <= 2**32 - 1 and f"Variation seed: {random['subseed']}," in random["infotexts"][0]
        off = json.loads(post({"seed_resize_from_w": 48, "seed_resize_from_h": 0}).json()["info"])
        assert "Seed resize from" not in off["infotexts"][0]  # A1111: off unless both are set
        for body, loc in (({"subseed_strength": 2}, "subseed_strength"),
                          ({"seed_resize_from_w": 48, "seed_resize_from_h": 60}, "seed_resize_from_h")):  # fmt: skip
            refused = post(body)
            assert refused.status_code == 422 and refused.json()["detail"][0]["loc"][-1] == loc, refused.text


def test_the_command_line_options(tmp_path, capsys):
    argv = ["generate", "a red circle", "--seed", "3", "--steps", "4", "--subseed", "5", "--subseed-strength", "0.3",
            "--seed-resize-from", "48x72", "--out", str(tmp_path)]  # fmt: skip
    assert main(argv) == 0
    written = capsys.readouterr().out.split()
    with Image.open(written[0]) as image:
        text = image.info["parameters"]
    assert "Variation seed: 5, Variation seed strength: 0.3, Seed resize from: 48x72" in text


def test_eta_noise_seed_delta_reseeds_a_stochastic_samplers_later_noise(shipped, monkeypatch):
    """A1111's ENSD: the starting noise is the seed's, the sampler's later draws come from seed + delta; a
    deterministic sampler is unchanged, and the infotext says ENSD only where it was used."""
    from latentforge import pipeline as pipeline_module

    given = []
    usual = pipeline_module.sampler_generator
    monkeypatch.setattr(pipeline_module, "sampler_generator", lambda *a: given.append(usual(*a).get_state()) or usual(*a))
    varied = shipped.generate("a red circle", seed=3, steps=4, sampler="Euler a", eta_noise_seed_delta=31337)[0]
    assert torch.equal(given[-1], torch.Generator().manual_seed(3 + 31337).get_state())
    assert not same(varied, shipped.generate("a red circle", seed=3, steps=4, sampler="Euler a")[0])
    assert parse_infotext(varied.info["parameters"])["ENSD"] == "31337"
    euler = shipped.generate("a red circle", seed=3, steps=4, sampler="Euler", eta_noise_seed_delta=31337)[0]
    assert same(euler, shipped.generate("a red circle", seed=3, steps=4, sampler="Euler")[0])
    assert "ENSD" not in euler.info["parameters"]
    with pytest.raises(ValueError, match="eta_noise_seed_delta must be between 0"):
        shipped.generate("a red circle", seed=3, eta_noise_seed_delta=-1)


def test_the_api_takes_the_ensd_option(sd1_folder):
    pipe = latentforge.load(sd1_folder)
    base = {"prompt": "a red circle", "width": 64, "height": 64, "steps": 3, "sampler_name": "Euler a", "seed": 9}
    want = pipe.generate("a red circle", seed=9, steps=3, sampler="Euler a", width=64, height=64, eta_noise_seed_delta=31337)[0]
    with ServerThread(create_app(Settings(models=[str(sd1_folder)]))) as url:
        post = lambda path, body: requests.post(f"{url}/sdapi/v1/{path}", json=body, timeout=120)  # noqa: E731
        once = post("txt2img", base | {"override_settings": {"eta_noise_seed_delta": 31337}})
        assert np.array_equal(image_of(once), np.asarray(want))
        assert post("options", {"eta_noise_seed_delta": 31337}).status_code == 200
        assert requests.get(f"{url}/sdapi/v1/options", timeout=30).json()["eta_noise_seed_delta"] == 31337
        assert np.array_equal(image_of(post("txt2img", base)), np.asarray(want))
        refused = post("options", {"eta_noise_seed_delta": "x"})
        assert refused.status_code == 422 and refused.json()["detail"][0]["loc"][-1] == "eta_noise_seed_delta"
