"""The NV / GPU random source (latentforge.philox): Philox 4x32-10 against Random123's known-answer vectors,
the normals against CUDA's seed-0 draw as A1111 documents it, and the source on every surface (the infotext,
--from-png, the API). No GPU here: CUDA's own draw is the published one, not one made in this run."""

import json

import numpy as np
import pytest
import requests
import torch

import latentforge
from latentforge.infotext import parse_infotext
from latentforge.philox import PhiloxGenerator, philox_4x32
from latentforge.reproduce import generate_args
from latentforge.server import ServerThread, Settings, create_app
from test_server_surface import image_of

CALL = {"prompt": "a red circle", "seed": 3, "steps": 4, "sampler": "Euler a"}


@pytest.fixture(scope="module")
def shipped():
    return latentforge.load()


@pytest.mark.parametrize(
    "counter, key, want",
    [  # Random123's kat_vectors for philox4x32_10
        ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
        ((0xFFFFFFFF,) * 4, (0xFFFFFFFF, 0xFFFFFFFF), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
        ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
         (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
    ],
)
def test_philox_4x32_10_known_answers(counter, key, want):
    out = philox_4x32([np.array([c], np.uint64) for c in counter], key)
    assert tuple(int(word[0]) for word in out) == want


def test_seed_0_is_cudas_first_draw():
    # torch.manual_seed(0); torch.randn(3, 4, device="cuda"), as A1111's NV source documents it
    cuda = [[-0.92466259, -0.42534415, -2.6438457, 0.14518388],
            [-0.12086647, -0.57972564, -0.62285122, -0.32838709],
            [-1.07454231, -0.36314407, -1.67105067, 2.26550497]]  # fmt: skip
    got = PhiloxGenerator(0).randn((3, 4))
    # CUDA's Box-Muller runs in float32, this one in float64 rounded once: a float32 step or two apart
    assert got.dtype == torch.float32 and torch.allclose(got, torch.tensor(cuda), atol=5e-7, rtol=0)


def test_draws_advance_and_look_normal():
    g = PhiloxGenerator(1234)
    first, second = g.randn((4, 64, 64)), g.randn((4, 64, 64))
    assert not torch.equal(first, second) and torch.equal(first, PhiloxGenerator(1234).randn((4, 64, 64)))
    many = PhiloxGenerator(7).randn((200_000,))
    assert abs(float(many.mean())) < 0.01 and abs(float(many.std()) - 1) < 0.01
    assert torch.equal(PhiloxGenerator(2**64 + 5).randn((8,)), PhiloxGenerator(5).randn((8,)))  # a 64-bit key


def test_the_source_reaches_the_image_its_infotext_and_from_png(shipped):
    cpu = shipped.generate(**CALL)[0]
    nv = shipped.generate(**CALL, rng="nv")[0]
    gpu = shipped.generate(**CALL, rng="GPU")[0]
    assert nv.tobytes() == gpu.tobytes() and nv.tobytes() != cpu.tobytes()
    assert parse_infotext(nv.info["parameters"])["RNG"] == "NV" and parse_infotext(gpu.info["parameters"])["RNG"] == "GPU"
    for made in (cpu, nv, gpu):
        args, notes = generate_args(parse_infotext(made.info["parameters"]))
        assert shipped.generate(**args)[0].tobytes() == made.tobytes() and notes == []
    with pytest.raises(ValueError, match="rng must be one of CPU, NV, GPU"):
        shipped.generate(**CALL, rng="cuda")


def test_the_api_option_and_override(sd1_folder):
    pipe = latentforge.load(sd1_folder)
    want = pipe.generate("a red circle", seed=9, steps=3, sampler="Euler a", width=64, height=64, rng="NV")[0]
    body = {"prompt": "a red circle", "seed": 9, "steps": 3, "sampler_name": "Euler a", "width": 64, "height": 64}
    with ServerThread(create_app(Settings(models=[str(sd1_folder)]))) as url:
        post = lambda path, data: requests.post(f"{url}/sdapi/v1/{path}", json=data, timeout=120)  # noqa: E731
        once = post("txt2img", body | {"override_settings": {"randn_source": "NV"}})
        assert np.array_equal(image_of(once), np.asarray(want))
        assert "RNG: CPU" in json.loads(post("txt2img", body).json()["info"])["infotexts"][0]  # the server's default
        assert post("options", {"randn_source": "NV"}).status_code == 200
        assert np.array_equal(image_of(post("txt2img", body)), np.asarray(want))
        refused = post("options", {"randn_source": "TPU"})
        assert refused.status_code == 422 and refused.json()["detail"][0]["loc"][-1] == "randn_source"
