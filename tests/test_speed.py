"""Skipping work (speed.py): which steps leave the unconditional pass out (A1111's rules for NGMS and Skip Early
CFG), DeepCache's reuse running only the top blocks and equal to the whole UNet on the same input, the options in
the infotext, the CLI and the server, and one-line refusals of bad values."""

import base64
import io
import json
import subprocess
import sys

import numpy as np
import pytest
import requests
import torch
from PIL import Image

import latentforge
from latentforge.guidance import Guidance, make_denoiser
from latentforge.infotext import parse_infotext
from latentforge.samplers import get_sampler
from latentforge.schedules import NoiseSchedule
from latentforge.server import ServerThread, Settings, create_app
from latentforge.speed import PRESETS, Shortcuts, StepCache, preset
from latentforge.unet import DeepFeatures

PROMPT = "a small red circle on the left, white background"


@pytest.fixture(scope="module")
def pipe():
    return latentforge.load(dtype="float32", device="cpu")


def batches_per_step(pipe, shortcuts, steps=10, sampler="Euler", cfg=5.0):
    """The UNet batch of each denoiser call of one run, and the run's sigmas."""
    spec = get_sampler(sampler)
    schedule = NoiseSchedule.from_config(pipe.config.scheduler or {})
    sigmas = spec.sigmas(schedule, steps)
    cond, uncond = pipe.encode_prompt(PROMPT, "")
    seen = []
    hook = pipe.unet.register_forward_pre_hook(lambda module, args: seen.append(len(args[0])))
    try:
        denoise = make_denoiser(
            pipe.unet, lambda s: spec.timestep(schedule, s), pipe.config.prediction_type, Guidance(cond, uncond, cfg),
            sigmas, shortcuts,
        )  # fmt: skip
        x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)) * spec.init_noise_sigma(schedule, sigmas)
        spec(denoise, x, sigmas, schedule=schedule, prediction_type=pipe.config.prediction_type)
    finally:
        hook.remove()
    return seen, sigmas


def test_ngms_skips_odd_steps_below_the_sigma(pipe):
    _, sigmas = batches_per_step(pipe, None)
    # below sigmas[5]: steps 6..9; A1111 skips the odd ones (7, 9), or all four with s_min_uncond_all
    threshold = float(sigmas[5])
    seen, _ = batches_per_step(pipe, Shortcuts(s_min_uncond=threshold))
    assert seen == [2, 2, 2, 2, 2, 2, 2, 1, 2, 1]
    seen, _ = batches_per_step(pipe, Shortcuts(s_min_uncond=threshold, s_min_uncond_all=True))
    assert seen == [2, 2, 2, 2, 2, 2, 1, 1, 1, 1]


def test_skip_early_cfg_skips_the_first_fraction(pipe):
    # step / steps <= 0.25: steps 0, 1 and 2 of 10 (2 / 10 = 0.2, 3 / 10 = 0.3)
    seen, _ = batches_per_step(pipe, Shortcuts(skip_early_cfg=0.25))
    assert seen == [1, 1, 1, 2, 2, 2, 2, 2, 2, 2]


def test_a_skipped_step_is_the_prompt_alone(pipe):
    """A step without the unconditional pass gives the conditional prediction: the same as guidance 1."""
    both = [pipe.generate(PROMPT, seed=4, steps=6, sampler="Euler", cfg_scale=cfg, speed=speed)[0] for cfg, speed in
            ((5.0, Shortcuts(skip_early_cfg=1.0)), (1.0, None))]  # fmt: skip
    assert np.array_equal(np.asarray(both[0]), np.asarray(both[1]))


def test_second_order_samplers_count_steps_as_a1111(pipe):
    """Heun's second call of step i is made at sigmas[i + 1] and counts as step i + 1 (guidance.step_of)."""
    _, sigmas = batches_per_step(pipe, None, steps=4, sampler="Heun")
    seen, _ = batches_per_step(pipe, Shortcuts(s_min_uncond=float(sigmas[0]) + 1, s_min_uncond_all=True), 4, "Heun")
    assert seen == [1] * 7  # 4 steps, the last one first order
    seen, _ = batches_per_step(pipe, Shortcuts(s_min_uncond=float(sigmas[0]) + 1), 4, "Heun")
    # calls: step 0 (0), its second at sigmas[1] (1), step 1 (1), its second (2), step 2 (2), (3), step 3 (3)
    assert seen == [2, 1, 1, 2, 2, 1, 1]


@pytest.mark.parametrize("depth", [1, 2, 4])
def test_deepcache_reuse_equals_the_whole_unet_on_the_same_input(pipe, depth):
    unet = pipe.unet
    g = torch.Generator().manual_seed(1)
    x, context = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, unet.config.context_dim, generator=g)
    deep = DeepFeatures(depth)
    whole = unet(x, 500, context, deep=deep)
    assert deep.features is not None
    calls = []
    hook = unet.middle_block.register_forward_hook(lambda *args: calls.append(1))
    try:
        deep.reuse = True
        reused = unet(x, 500, context, deep=deep)
    finally:
        hook.remove()
    assert not calls  # the deep blocks did not run
    assert torch.equal(reused, whole)
    assert torch.equal(unet(x, 500, context), whole)  # and the stored call is the plain UNet


def reuses(cache, batches):
    """Whether each call reuses features; a whole call stores features whose rows name its batch row."""
    out = []
    for batch in batches:
        state = cache.next_call(batch)
        out.append(state.features.flatten().tolist() if state.reuse else None)
        if not state.reuse:
            state.features = torch.arange(batch, dtype=torch.float32)[:, None]  # what the whole call stores
    return out


def test_step_cache_refreshes_every_nth_call_and_slices_a_smaller_batch():
    # calls 0, 3, 6 whole; calls 4 and 5, their unconditional pass skipped, reuse the conditional row (the last)
    assert reuses(StepCache(interval=3, depth=1), (2, 2, 2, 2, 1, 1, 2)) == [None, [0, 1], [0, 1], None, [1], [1], None]
    # a larger batch than the stored one cannot reuse it: call 1 is whole too
    assert reuses(StepCache(interval=3, depth=1), (1, 2, 2, 1)) == [None, None, [0, 1], None]


def test_a_whole_deepcache_call_keeps_the_unconditional_pass(pipe):
    """With NGMS skipping odd steps and a whole call every 3rd, calls 3 and 9 (odd steps) keep their
    unconditional pass, so the guided calls after them reuse the features instead of running whole too."""
    deep = []
    hook = pipe.unet.middle_block.register_forward_hook(lambda *args: deep.append(len(args[1][0])))
    try:
        seen, _ = batches_per_step(pipe, Shortcuts(s_min_uncond=1e9, deepcache_interval=3))
    finally:
        hook.remove()
    assert seen == [2, 1, 2, 2, 2, 1, 2, 1, 2, 2]
    assert deep == [2, 2, 2, 2]  # calls 0, 3, 6 and 9 whole, each with both passes


def test_deepcache_in_a_run_runs_the_deep_blocks_every_nth_call(pipe):
    calls = []
    hook = pipe.unet.middle_block.register_forward_hook(lambda *args: calls.append(1))
    try:
        image = pipe.generate(PROMPT, seed=2, steps=7, sampler="Euler", speed=Shortcuts(deepcache_interval=3))[0]
    finally:
        hook.remove()
    assert len(calls) == 3  # calls 0, 3 and 6 of 7
    assert parse_infotext(image.info["parameters"])["DeepCache"] == "3/1"


def test_the_options_are_in_the_infotext(pipe):
    speed = Shortcuts(s_min_uncond=2.0, s_min_uncond_all=True, skip_early_cfg=0.1, deepcache_interval=2)
    fields = parse_infotext(pipe.generate(PROMPT, seed=1, steps=4, speed=speed)[0].info["parameters"])
    assert fields["NGMS"] == "2" and fields["NGMS all steps"] == "True" and fields["Skip Early CFG"] == "0.1"
    plain = parse_infotext(pipe.generate(PROMPT, seed=1, steps=4)[0].info["parameters"])
    assert not {"NGMS", "Skip Early CFG", "DeepCache", "Token merging ratio", "VAE Decoder"} & set(plain)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"s_min_uncond": -1.0}, "s_min_uncond must be a sigma >= 0"),
        ({"s_min_uncond": float("nan")}, "s_min_uncond must be a number"),
        ({"skip_early_cfg": 1.5}, "skip_early_cfg must be a fraction"),
        ({"token_merging": 1.0}, "token_merging must be a share of the tokens, 0 <= r < 1"),
        ({"deepcache_interval": 0}, "deepcache_interval must be a whole number 1..10"),
        ({"deepcache_interval": 2.5}, "deepcache_interval must be a whole number 1..10"),
        ({"deepcache_depth": 0}, "deepcache_depth must be a whole number >= 1"),
        ({"tiny_decoder": "yes"}, "tiny_decoder must be true, false or .auto."),
    ],
)
def test_bad_values_are_one_line(options, message):
    with pytest.raises(ValueError, match=message) as e:
        Shortcuts(**options)
    assert "\n" not in str(e.value)


def test_requests_the_model_cannot_serve_are_refused(pipe):
    depth = len(pipe.unet.input_blocks)
    with pytest.raises(ValueError, match=f"deepcache_depth must be below this UNet's {depth} input blocks"):
        pipe.generate(PROMPT, speed=Shortcuts(deepcache_interval=2, deepcache_depth=depth))
    bare = latentforge.load(dtype="float32", device="cpu")
    bare.tiny_decoder = None
    with pytest.raises(ValueError, match="no tiny decoder is loaded for this model"):
        bare.generate(PROMPT, speed=Shortcuts(tiny_decoder=True))
    with pytest.raises(ValueError, match="unknown speed preset 'faster'; choose one of: default, fast, fastest"):
        preset("faster")


def test_cli_speed_options_reach_the_image(tmp_path):
    run = subprocess.run(
        [sys.executable, "-m", "latentforge.cli", "generate", PROMPT, "--seed", "3", "--steps", "4",
         "--speed", "fast", "--deepcache", "2", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    fields = parse_infotext(Image.open(run.stdout.split()[0]).info["parameters"])
    fast = PRESETS["fast"]
    assert fields["DeepCache"] == f"2/{fast.deepcache_depth}"  # the option given beats the preset's
    if fast.token_merging:
        assert float(fields["Token merging ratio"]) == fast.token_merging
    off = subprocess.run(
        [sys.executable, "-m", "latentforge.cli", "generate", PROMPT, "--seed", "3", "--steps", "2", "--speed", "fast",
         "--token-merging", "0", "--deepcache", "1", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    fields = parse_infotext(Image.open(off.stdout.split()[0]).info["parameters"])
    assert "Token merging ratio" not in fields and "DeepCache" not in fields  # 0 and 1 given: off, not the preset's
    bad = subprocess.run(
        [sys.executable, "-m", "latentforge.cli", "generate", PROMPT, "--skip-early-cfg", "2", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert bad.returncode != 0 and "skip_early_cfg must be a fraction" in bad.stderr and "Traceback" not in bad.stderr


@pytest.fixture(scope="module")
def url():
    with ServerThread(create_app(Settings(dtype="float32"))) as url:
        yield url


def txt2img(url, **fields):
    body = {"prompt": PROMPT, "seed": 5, "steps": 4, "sampler_name": "Euler"} | fields
    return requests.post(f"{url}/sdapi/v1/txt2img", json=body, timeout=120)


def test_server_options_and_override_settings(url, pipe):
    made = txt2img(url, override_settings={"deepcache_interval": 2, "skip_early_cond": 0.5}, s_min_uncond=1.5)
    assert made.status_code == 200, made.text
    info = json.loads(made.json()["info"])
    assert info["extra_generation_params"]["DeepCache"] == "2/1"
    assert info["extra_generation_params"]["NGMS"] == "1.5"
    image = np.asarray(Image.open(io.BytesIO(base64.b64decode(made.json()["images"][0]))).convert("RGB"))
    speed = Shortcuts(deepcache_interval=2, skip_early_cfg=0.5, s_min_uncond=1.5)
    alone = pipe.generate(PROMPT, seed=5, steps=4, sampler="Euler", speed=speed)[0]
    assert np.array_equal(image, np.asarray(alone))

    bad = requests.post(f"{url}/sdapi/v1/options", json={"token_merging_ratio": 2}, timeout=10)
    assert bad.status_code == 422 and bad.json()["detail"][0]["loc"] == ["body", "token_merging_ratio"]
    assert requests.get(f"{url}/sdapi/v1/options", timeout=10).json()["token_merging_ratio"] == 0.0  # unchanged
    assert requests.post(f"{url}/sdapi/v1/options", json={"skip_early_cond": 0.5}, timeout=10).status_code == 200
    try:
        info = json.loads(txt2img(url).json()["info"])
        assert info["extra_generation_params"]["Skip Early CFG"] == "0.5"
    finally:
        requests.post(f"{url}/sdapi/v1/options", json={"skip_early_cond": 0.0}, timeout=10)
    bad = txt2img(url, override_settings={"sd_vae_decode_method": "Tiny"})
    assert bad.status_code == 422
    assert bad.json()["detail"][0]["loc"] == ["body", "override_settings", "sd_vae_decode_method"]


def test_a_preset_sets_the_options_and_one_can_be_switched_off(url):
    """speed_preset sets every speed option to the preset's values (GET /options shows them); an option set after
    it, or beside it in override_settings, wins, so NGMS can be off in the fast preset; a client that posts back
    every option it read changes nothing."""
    fast = preset("fast")
    options = f"{url}/sdapi/v1/options"
    try:
        assert requests.post(options, json={"speed_preset": "fast"}, timeout=10).status_code == 200
        now = requests.get(options, timeout=10).json()
        assert now["speed_preset"] == "fast" and now["s_min_uncond"] == fast.s_min_uncond
        assert now["token_merging_ratio"] == fast.token_merging and now["skip_early_cond"] == fast.skip_early_cfg
        params = json.loads(txt2img(url).json()["info"])["extra_generation_params"]
        assert params["NGMS"] == f"{fast.s_min_uncond:g}" and params["Token merging ratio"] == f"{fast.token_merging:g}"
        assert requests.post(options, json=now, timeout=10).status_code == 200  # everything posted back as read
        assert requests.get(options, timeout=10).json() == now
        assert requests.post(options, json=now | {"s_min_uncond": 0.0}, timeout=10).status_code == 200
        params = json.loads(txt2img(url).json()["info"])["extra_generation_params"]
        assert "NGMS" not in params and params["Token merging ratio"] == f"{fast.token_merging:g}"
    finally:
        requests.post(options, json={"speed_preset": "default"}, timeout=10)
    assert requests.get(options, timeout=10).json()["token_merging_ratio"] == 0.0  # the default preset: all off
    made = txt2img(url, override_settings={"speed_preset": "fast", "s_min_uncond": 0})
    params = json.loads(made.json()["info"])["extra_generation_params"]
    assert "NGMS" not in params and params["Skip Early CFG"] == f"{fast.skip_early_cfg:g}"
    bad = txt2img(url, override_settings={"speed_preset": "quickest"})
    assert bad.status_code == 422 and bad.json()["detail"][0]["loc"] == ["body", "override_settings", "speed_preset"]


def test_token_merging_is_on_for_the_call_only(pipe):
    from latentforge.tome import full_resolution_transformers

    ratios = []
    block = full_resolution_transformers(pipe.unet)[0].transformer_blocks[0]
    hook = block.register_forward_pre_hook(lambda module, args: ratios.append(module.token_merge_ratio))
    try:
        image = pipe.generate(PROMPT, seed=1, steps=3, speed=Shortcuts(token_merging=0.5))[0]
    finally:
        hook.remove()
    assert ratios and set(ratios) == {0.5}
    assert block.token_merge_ratio == 0.0  # off again after the call
    assert parse_infotext(image.info["parameters"])["Token merging ratio"] == "0.5"


def test_the_server_finds_each_family_s_tiny_decoder(tmp_path):
    """A1111's VAE-approx names: taesd_decoder for SD 1.x/2.x, taesdxl_decoder for SDXL; none: None."""
    from types import SimpleNamespace

    from latentforge.server.app import tiny_decoder_in

    sd1 = latentforge.load(dtype="float32", device="cpu").config
    sdxl = SimpleNamespace(version="sdxl")  # all that the lookup reads of a model's config
    assert tiny_decoder_in(tmp_path, sd1) is None
    (tmp_path / "taesdxl_decoder.safetensors").write_bytes(b"")
    assert tiny_decoder_in(tmp_path, sd1) is None
    assert tiny_decoder_in(tmp_path, sdxl) == tmp_path / "taesdxl_decoder.safetensors"
    (tmp_path / "taesd_decoder.pth").write_bytes(b"")
    assert tiny_decoder_in(tmp_path, sd1) == tmp_path / "taesd_decoder.pth"
