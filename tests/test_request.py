"""Generation requests (latentforge.request.check_request): a value given that cannot be used is a one-line
ValueError raised before any model runs; None means "not given"; the bounds depend on the device."""

import inspect
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

import latentforge
from latentforge.pipeline import Pipeline
from latentforge.request import (
    MAX_CFG_SCALE,
    MAX_PROMPT_CHARS,
    MAX_SIDE,
    check_request,
    max_pixels,
)


@pytest.fixture(scope="module")
def shipped():
    """The shipped model (64 x 64 native), with a record of every UNet and VAE call."""
    pipe = latentforge.load(device="cpu")
    pipe.calls = []
    for name in ("unet", "vae"):
        getattr(pipe, name).register_forward_pre_hook(lambda *a, name=name: pipe.calls.append(name))
    return pipe


def request(pipe, **given):
    """check_request with generate's defaults for everything not given."""
    args = dict(prompt="a red circle", negative_prompt="", steps=None, sampler=None, cfg_scale=None, seed=None,
                width=None, height=None, batch_size=1, init_image=None, strength=0.75, mask=None, clip_skip=1)  # fmt: skip
    return check_request(pipe, **(args | given))


def test_check_request_takes_every_argument_of_generate_by_name():
    """generate hands each of its arguments to check_request by name: a parameter renamed in one and not the
    other fails here, not in a user's generation."""
    generate = inspect.signature(Pipeline.generate).parameters
    checked = inspect.signature(check_request).parameters
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for name, p in checked.items() if name != "pipe")
    assert set(generate) - {"self", "callback"} == set(checked) - {"pipe"}


BAD = {
    "cfg huge": (dict(cfg_scale=1e308), f"cfg_scale must be between 0 and {MAX_CFG_SCALE:g}, got 1e+308"),
    "cfg above": (dict(cfg_scale=100.5), "cfg_scale must be between 0 and 100, got 100.5"),
    "cfg negative": (dict(cfg_scale=-1.0), "cfg_scale must be between 0 and 100, got -1"),
    "cfg nan": (dict(cfg_scale=float("nan")), "cfg_scale must be a finite number"),
    "cfg text": (dict(cfg_scale="7"), "cfg_scale must be a finite number, got '7'"),
    "width 0": (dict(width=0), "width must be between 8 and 4096, got 0"),
    "height 0": (dict(height=0), "height must be between 8 and 4096, got 0"),
    "width negative": (dict(width=-64), "width must be between 8 and 4096, got -64"),
    "side too long": (dict(width=65536, height=64), "width 65536 is too large: at most 4096 pixels a side"),
    "too many pixels": (
        dict(width=4096, height=2048),
        "4096x2048 is too large on the CPU: at most 4,194,304 pixels (2048x2048) there; choose a smaller width or height",
    ),
    "prompt too long": (dict(prompt="a" * (MAX_PROMPT_CHARS + 1)), "prompt is 8,193 characters long: at most 8,192"),
    "negative too long": (
        dict(negative_prompt="b" * (MAX_PROMPT_CHARS + 1)),
        "negative_prompt is 8,193 characters long: at most 8,192",
    ),
    "prompt not text": (dict(prompt=None), "prompt must be a string, got NoneType"),
    "mask not an image": (
        dict(init_image=Image.new("RGB", (64, 64)), mask="mask.png"),
        "mask must be a PIL image, got str",
    ),
    "init image size": (
        dict(init_image=Image.new("RGB", (100, 64))),
        "the init image's width must be a multiple of 8, got 100; give a width and height to resize it to",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_unusable_values_are_refused_before_any_work(shipped, case):
    given, message = BAD[case]
    shipped.calls.clear()
    with pytest.raises(ValueError) as caught:
        shipped.generate(**({"prompt": "a red circle", "steps": 2} | given))
    assert message in str(caught.value) and "\n" not in str(caught.value)
    assert shipped.calls == []  # neither the UNet nor the VAE ran


def test_left_out_sizes_are_the_native_or_the_init_images(shipped):
    assert (request(shipped).width, request(shipped).height) == (64, 64)
    init = Image.new("RGB", (96, 48))
    r = request(shipped, init_image=init)
    assert (r.width, r.height) == (96, 48)
    r = request(shipped, init_image=init, width=64)  # given: the image is resized to it
    assert (r.width, r.height) == (64, 48) and r.image_tensor.shape == (1, 3, 48, 64)


def test_the_bounds_themselves_are_accepted(shipped):
    assert request(shipped, prompt="a" * MAX_PROMPT_CHARS, negative_prompt="b" * MAX_PROMPT_CHARS).prompt
    assert request(shipped, cfg_scale=0).cfg_scale == 0.0  # the negative prompt alone
    assert request(shipped, cfg_scale=MAX_CFG_SCALE).cfg_scale == MAX_CFG_SCALE
    assert (request(shipped, width=2048, height=2048).width, request(shipped, width=MAX_SIDE, height=1024).width) == (
        2048, MAX_SIDE)  # fmt: skip


def test_pixel_bound_depends_on_the_device(shipped):
    """The CPU takes at most 2048 x 2048 pixels, an accelerator 4096 x 4096; each side at most 4096 on both."""
    cuda = SimpleNamespace(config=shipped.config, device=torch.device("cuda"))
    assert max_pixels(torch.device("cpu")) == 2048 * 2048 and max_pixels(torch.device("cuda")) == 4096 * 4096
    r = request(cuda, width=4096, height=4096)
    assert (r.width, r.height) == (4096, 4096)
    with pytest.raises(ValueError, match="4096x2048 is too large on the CPU"):
        request(shipped, width=4096, height=2048)
    with pytest.raises(ValueError, match="height 8192 is too large: at most 4096 pixels a side"):
        request(cuda, width=1024, height=8192)


def test_guidance_at_the_bound_makes_an_image(shipped):
    """The largest accepted guidance still gives a picture, not one flat colour (1e308 gave all black)."""
    image = np.asarray(shipped.generate("a red circle", steps=2, seed=1, cfg_scale=MAX_CFG_SCALE)[0])
    assert image.shape == (64, 64, 3) and len(np.unique(image.reshape(-1, 3), axis=0)) > 100
