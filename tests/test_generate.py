"""Images from Pipeline.generate equal diffusers' for the same tiny weights, seed and settings."""

import diffusers
import numpy as np
import pytest
import torch
from PIL import Image

import latentforge
from conftest import saved_folder
from latentforge.samplers import DIFFUSERS_SCHEDULERS

PROMPT, NEGATIVE = "a small red circle on the left, white background", "blurry"
# our sampler name -> diffusers scheduler class and options
SCHEDULERS = {name: (getattr(diffusers, cls), options) for name, (cls, options) in DIFFUSERS_SCHEDULERS.items()}
MAX_DIFF = 2  # out of 255


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    """kind -> (our pipeline, diffusers components), each loaded once."""
    cache = {}

    def get(kind):
        if kind not in cache:
            folder = saved_folder(kind, tmp_path_factory)
            cls = diffusers.StableDiffusionInpaintPipeline if kind == "inpaint" else diffusers.StableDiffusionPipeline
            ref = cls.from_pretrained(folder, safety_checker=None, local_files_only=True)
            ref.set_progress_bar_config(disable=True)
            cache[kind] = (latentforge.load(folder, dtype="float32", device="cpu"), ref)
        return cache[kind]

    return get


def with_scheduler(ref, sampler, pipeline_cls=None):
    cls, options = SCHEDULERS[sampler]
    components = dict(ref.components, scheduler=cls.from_config(ref.scheduler.config, **options))
    pipe = (pipeline_cls or type(ref))(**components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image).astype(np.int16)


def assert_same_image(ours: Image.Image, theirs: Image.Image):
    assert ours.size == theirs.size
    diff = np.abs(pixels(ours) - pixels(theirs)).max()
    assert diff <= MAX_DIFF, f"max pixel difference {diff} > {MAX_DIFF}"


@pytest.mark.parametrize("kind", ["sd1", "sd2", "sd2v"])
@pytest.mark.parametrize("sampler", sorted(SCHEDULERS))
def test_txt2img_matches_diffusers(loaded, kind, sampler):
    ours, ref = loaded(kind)
    steps, seed = 7, 1234
    image = ours.generate(PROMPT, negative_prompt=NEGATIVE, steps=steps, sampler=sampler, cfg_scale=7.5, seed=seed)[0]
    want = with_scheduler(ref, sampler)(
        PROMPT, negative_prompt=NEGATIVE, num_inference_steps=steps, guidance_scale=7.5,
        generator=torch.Generator().manual_seed(seed),
    ).images[0]  # fmt: skip
    assert_same_image(image, want)


def test_batch_images_equal_their_seed_alone(loaded):
    ours, ref = loaded("sd1")
    batch = ours.generate(PROMPT, steps=4, sampler="Euler", seed=50, batch_size=3)
    alone = ours.generate(PROMPT, steps=4, sampler="Euler", seed=52)[0]
    assert np.array_equal(pixels(batch[2]), pixels(alone))
    assert not np.array_equal(pixels(batch[0]), pixels(batch[1]))
    want = with_scheduler(ref, "Euler")(
        [PROMPT] * 3, num_inference_steps=4, guidance_scale=7.0,
        generator=[torch.Generator().manual_seed(50 + i) for i in range(3)],
    ).images  # fmt: skip
    for got, expected in zip(batch, want):
        assert_same_image(got, expected)


def test_guidance_scale_one_skips_the_unconditional_pass(loaded):
    ours, ref = loaded("sd1")
    calls = []
    hook = ours.unet.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    try:
        image = ours.generate(PROMPT, steps=3, sampler="DDIM", cfg_scale=1.0, seed=3)[0]
    finally:
        hook.remove()
    assert calls == [1, 1, 1]
    want = with_scheduler(ref, "DDIM")(
        PROMPT, num_inference_steps=3, guidance_scale=1.0, generator=torch.Generator().manual_seed(3)
    ).images[0]
    assert_same_image(image, want)


def init_picture(size=64):
    g = torch.Generator().manual_seed(7)
    x = torch.rand(size // 8, size // 8, 3, generator=g)
    return Image.fromarray((x.numpy() * 255).astype(np.uint8)).resize((size, size), Image.NEAREST)


@pytest.mark.parametrize("sampler", ["DDIM", "Euler", "Heun", "DPM++ 2M"])
@pytest.mark.parametrize("strength", [0.5, 1.0])
def test_img2img_matches_diffusers(loaded, sampler, strength):
    ours, ref = loaded("sd1")
    init = init_picture()
    image = ours.generate(PROMPT, steps=8, sampler=sampler, cfg_scale=7.5, seed=11, init_image=init, strength=strength)[0]
    want = with_scheduler(ref, sampler, diffusers.StableDiffusionImg2ImgPipeline)(
        PROMPT, image=init, strength=strength, num_inference_steps=8, guidance_scale=7.5,
        generator=torch.Generator().manual_seed(11),
    ).images[0]  # fmt: skip
    assert_same_image(image, want)


def half_mask(size=64):
    mask = np.zeros((size, size), np.uint8)
    mask[:, size // 2 :] = 255
    return Image.fromarray(mask, "L")


@pytest.mark.parametrize("sampler", ["DDIM", "Euler", "DPM++ 2M"])
@pytest.mark.parametrize("strength", [0.75, 1.0])
def test_inpainting_unet_matches_diffusers(loaded, sampler, strength):
    ours, ref = loaded("inpaint")
    init, mask = init_picture(), half_mask()
    kwargs = dict(steps=8, sampler=sampler, cfg_scale=7.5, seed=21, init_image=init, mask=mask, strength=strength)
    image = ours.generate(PROMPT, **kwargs)[0]
    want = with_scheduler(ref, sampler)(
        PROMPT, image=init, mask_image=mask, strength=strength, num_inference_steps=8, guidance_scale=7.5,
        generator=torch.Generator().manual_seed(21),
    ).images[0]  # fmt: skip
    assert_same_image(image, want)


def test_inpainting_with_an_ordinary_model_keeps_the_unmasked_latents(loaded):
    ours, _ = loaded("sd1")
    init, mask = init_picture(), half_mask()  # the right half is repainted
    steps = []
    ours.generate(PROMPT, steps=6, sampler="Euler", seed=5, init_image=init, mask=mask, strength=0.9, callback=steps.append)
    final = steps[-1].latents  # Euler ends at sigma 0: the last step's latents are the result
    # the image's own latents, drawn first from the same seed as the pipeline draws them
    kept = ours.encode_image(ours_tensor(init), torch.Generator().manual_seed(5))
    torch.testing.assert_close(final[..., :4], kept[..., :4], atol=1e-5, rtol=1e-5)
    assert (final[..., 4:] - kept[..., 4:]).abs().max() > 0.1  # the masked half was repainted


def ours_tensor(image):
    from latentforge.images import image_to_tensor

    return image_to_tensor(image)


@pytest.mark.parametrize("sampler", ["DDPM", "Euler a", "DPM++ 2M SDE", "LCM"])
def test_stochastic_samplers_repeat_with_the_seed(loaded, sampler):
    ours, _ = loaded("sd1")
    a, b, c = (ours.generate(PROMPT, steps=4, sampler=sampler, seed=s)[0] for s in (9, 9, 10))
    assert np.array_equal(pixels(a), pixels(b))
    assert not np.array_equal(pixels(a), pixels(c))


def test_callback_sees_every_step_and_the_emerging_image(loaded):
    ours, _ = loaded("sd1")
    seen = []
    ours.generate(PROMPT, steps=5, sampler="Euler", seed=1, callback=seen.append)
    assert [s.step for s in seen] == list(range(5)) and all(s.steps == 5 for s in seen)
    assert [s.sigma for s in seen] == sorted((s.sigma for s in seen), reverse=True)
    assert seen[0].latents.shape == seen[0].denoised.shape == (1, 4, 8, 8)
    assert len(ours.decode(seen[2].denoised)) == 1


def test_infotext_of_each_image(loaded):
    ours, _ = loaded("sd1")
    images = ours.generate(PROMPT, negative_prompt=NEGATIVE, steps=3, sampler="DPM++ 2M Karras", seed=77, batch_size=2)
    text = images[1].info["parameters"]
    assert text.startswith(PROMPT + "\nNegative prompt: " + NEGATIVE + "\n")
    assert "Steps: 3, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 78, Size: 64x64" in text


def test_random_seed_is_reported(loaded):
    ours, _ = loaded("sd1")
    image = ours.generate(PROMPT, steps=2, sampler="Euler")[0]
    seed = int(image.info["parameters"].split("Seed: ")[1].split(",")[0])
    again = ours.generate(PROMPT, steps=2, sampler="Euler", seed=seed)[0]
    assert np.array_equal(pixels(image), pixels(again))
