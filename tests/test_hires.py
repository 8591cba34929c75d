"""The hires fix: the second pass equals an explicit img2img of the upscaled first image with the same seed
(image upscalers), or the img2img from the upscaled latents (latent modes); its infotext reads back to the
same settings; bad settings are one line."""

import dataclasses
import types

import numpy as np
import pytest
from PIL import Image

import latentforge
from latentforge.hires import LATENT_MODES, Hires, from_infotext, upscale_latents
from latentforge.infotext import parse_infotext
from latentforge.request import check_request
from latentforge.samplers import get_sampler, img2img_sigmas
from latentforge.schedules import NoiseSchedule
from latentforge.server.jobs import Job, Worker

PROMPT = "a small red circle on the left, white background"


@pytest.fixture(scope="module")
def pipe():
    return latentforge.load(dtype="float32", device="cpu")


def pixels(image):
    return np.asarray(image).astype(np.int16)


@pytest.mark.parametrize("upscaler, resample", [("Lanczos", Image.LANCZOS), ("None", Image.LANCZOS), ("Nearest", Image.NEAREST)])
def test_image_upscalers_equal_an_explicit_img2img(pipe, upscaler, resample):
    hires = Hires(scale=1.5, upscaler=upscaler, steps=6, denoising_strength=0.5)
    image = pipe.generate(PROMPT, seed=11, steps=5, sampler="Euler", hires=hires)[0]
    first = pipe.generate(PROMPT, seed=11, steps=5, sampler="Euler")[0]
    assert image.size == (96, 96) and first.size == (64, 64)
    want = pipe.generate(
        PROMPT, seed=11, steps=6, sampler="Euler", init_image=first.resize((96, 96), resample), strength=0.5
    )[0]
    assert np.array_equal(pixels(image), pixels(want))


@pytest.mark.parametrize("mode", sorted(LATENT_MODES))
def test_latent_modes_continue_from_the_upscaled_latents(pipe, mode):
    hires = Hires(scale=2, upscaler=mode, denoising_strength=0.6, sampler="DPM++ 2M", cfg_scale=5.0)
    image = pipe.generate(PROMPT, seed=5, steps=5, sampler="Euler", hires=hires)[0]
    # by hand: the first pass's latents, upscaled in latent space, then an img2img from them at 128 x 128
    request = check_request(
        pipe, prompt=PROMPT, negative_prompt="", steps=5, sampler="Euler", cfg_scale=None, seed=5, width=None,
        height=None, batch_size=1, init_image=None, strength=0.75, mask=None, clip_skip=1,
    )  # fmt: skip
    schedule = NoiseSchedule.from_config(pipe.config.scheduler or {})
    spec = get_sampler("Euler")
    conds = pipe.encode_prompt(PROMPT, "", 1, (64, 64))
    latents = pipe._sample(request, spec, schedule, spec.sigmas(schedule, 5), conds, 5, 0, None)
    larger = dataclasses.replace(request, width=128, height=128, sampler="DPM++ 2M", cfg_scale=5.0, strength=0.6)
    second = get_sampler("DPM++ 2M")
    sigmas = img2img_sigmas(second, schedule, 5, 0.6)
    init = upscale_latents(latents, mode, (16, 16))
    conds = pipe.encode_prompt(PROMPT, "", 1, (128, 128))
    want = pipe.decode(pipe._sample(larger, second, schedule, sigmas, conds, 5, 0, None, init_latents=init))[0]
    assert np.array_equal(pixels(image), pixels(want))
    assert not np.array_equal(pixels(image), pixels(pipe.generate(PROMPT, seed=5, steps=5, sampler="Euler", width=128, height=128)[0]))


def test_infotext_reads_back_to_the_same_settings(pipe):
    hires = Hires(scale=2, upscaler="Latent (bicubic antialiased)", steps=3, denoising_strength=0.55,
                  sampler="DDIM", prompt="a big red circle", cfg_scale=4.5)  # fmt: skip
    image = pipe.generate(PROMPT, seed=2, steps=4, hires=hires)[0]
    params = parse_infotext(image.info["parameters"])
    assert params["Size-1"] == "64" and params["Hires upscale"] == "2" and params["Denoising strength"] == "0.55"
    assert params["Hires upscaler"] == "Latent (bicubic antialiased)" and params["Hires steps"] == "3"
    assert from_infotext(params) == hires
    resized = Hires(resize=(96, 80), upscaler="Nearest")
    text = pipe.generate(PROMPT, seed=2, steps=4, hires=resized)[0]
    assert text.size == (96, 80)
    assert from_infotext(parse_infotext(text.info["parameters"])) == resized
    assert from_infotext(parse_infotext(pipe.generate(PROMPT, seed=2, steps=2)[0].info["parameters"])) is None


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: Hires(scale=0), "hr_scale must be between 1 and 8"),
        (lambda: Hires(scale=100), "hr_scale must be between 1 and 8"),
        (lambda: Hires(denoising_strength=0), "denoising_strength must be above 0"),
        (lambda: Hires(steps=-1), "hr_second_pass_steps must be"),
    ],
)
def test_bad_settings(make, message):
    with pytest.raises(ValueError, match=message):
        make()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(hires=Hires(upscaler="4x-Nope")), "unknown hires upscaler '4x-Nope'; known: Latent"),
        (dict(hires=Hires(steps=2, denoising_strength=0.4)), "runs no step of the hires pass"),
        (dict(hires=Hires(scale=8), width=512, height=512), "too large"),
        (dict(hires=Hires(), init_image=Image.new("RGB", (64, 64))), "hires fix is for txt2img"),
        (dict(hires="2x"), "hires must be a latentforge.hires.Hires"),
    ],
)
def test_bad_requests_are_one_line(pipe, kwargs, message):
    with pytest.raises(ValueError, match=message) as info:
        pipe.generate(PROMPT, steps=4, **kwargs)
    assert "\n" not in str(info.value)


def test_an_upscaler_model_file_by_name(pipe, tmp_path):
    """An RRDBNet file in the pipeline's upscaler folder is a hires upscaler by its name: the second pass
    starts from the image that model makes (resized to the hires size), as an explicit img2img would."""
    import torch

    from latentforge.upscalers import RRDBConfig, RRDBNet, Upscalers, upscale
    from latentforge.weightfiles import write_safetensors

    torch.manual_seed(0)
    model = RRDBNet(RRDBConfig(channels=8, blocks=1, growth=4, upsamples=1))
    write_safetensors(model.state_dict(), tmp_path / "2x-Tiny.safetensors")
    pipe.upscalers = Upscalers.from_dirs([tmp_path])
    try:
        hires = Hires(scale=1.5, upscaler="2x-Tiny", steps=4, denoising_strength=0.5)
        image = pipe.generate(PROMPT, seed=3, steps=4, hires=hires)[0]
        first = pipe.generate(PROMPT, seed=3, steps=4)[0]
        start = upscale(first, pipe.upscalers.get("2x-Tiny"), size=(96, 96))
        want = pipe.generate(PROMPT, seed=3, steps=4, init_image=start, strength=0.5)[0]
        assert np.array_equal(pixels(image), pixels(want))
        assert parse_infotext(image.info["parameters"])["Hires upscaler"] == "2x-Tiny"
    finally:
        pipe.upscalers = Upscalers()


def test_a_second_pass_beyond_twice_the_native_size_is_decoded_in_tiles(pipe, monkeypatch):
    """Hires passes above 2x the native side decode tile by tile (bounded memory), smaller ones whole."""
    calls = []
    tiled = pipe.vae.decode_tiled

    def spy(z, *args):
        calls.append(tuple(z.shape[-2:]))
        return tiled(z, *args)

    monkeypatch.setattr(pipe.vae, "decode_tiled", spy)
    pipe.generate(PROMPT, seed=1, steps=2, hires=Hires(scale=2, denoising_strength=0.5))
    assert calls == []
    image = pipe.generate(PROMPT, seed=1, steps=2, hires=Hires(scale=2.5, denoising_strength=0.5))[0]
    assert calls == [(20, 20)] and image.size == (160, 160)


class Recording(Worker):
    """A worker that reads its own /progress answer at every step."""

    def _on_step(self, job, pipe, step):
        super()._on_step(job, pipe, step)
        self.seen.append(self.progress(with_image=False))


def test_the_hires_pass_continues_the_progress_as_a1111_counts_it(pipe):
    """Each image is two jobs (A1111's job_count with the hires fix): the bar rises once over both passes of
    both images instead of starting again at the hires pass."""
    steps = []
    hires = Hires(scale=1.5, upscaler="Lanczos", steps=4, denoising_strength=0.5)
    pipe.generate(PROMPT, seed=1, steps=2, hires=hires, callback=steps.append)
    assert [(s.pass_no, s.passes, s.step, s.steps) for s in steps] == [(0, 2, 0, 2), (0, 2, 1, 2)] + [
        (1, 2, i, 2) for i in range(2)  # 4 hires steps at denoising 0.5: 2 of them run (A1111's rule)
    ]
    plain = []
    pipe.generate(PROMPT, seed=1, steps=2, callback=plain.append)
    assert {(s.pass_no, s.passes) for s in plain} == {(0, 1)}

    models = types.SimpleNamespace(get=lambda name: pipe, entries={"shipped": None})
    worker = Recording(models)
    worker.seen = []
    job = Job("shipped", [dict(prompt=PROMPT, seed=seed, steps=2, hires=hires) for seed in (1, 2)])
    worker.current = job
    worker._generate(job)
    progress = [p["progress"] for p in worker.seen]
    assert progress == sorted(progress) and progress[-1] == 1.0
    assert [(p["state"]["job_no"], p["state"]["job_count"]) for p in worker.seen] == [
        (0, 4), (0, 4), (1, 4), (1, 4), (2, 4), (2, 4), (3, 4), (3, 4)
    ]
    assert worker.seen[2]["textinfo"] == "image 1/2, hires pass, step 1/2"
