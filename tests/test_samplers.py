"""Samplers and schedules against diffusers' schedulers, run side by side on a synthetic model.

The "UNet" is a fixed function of (scaled latent, timestep), built here: diffusers' scheduler loop
(set_timesteps, scale_model_input, step) calls it directly; our samplers call it through a denoiser
made the way the pipeline makes one (sigma-form latent scaled by 1/sqrt(1 + sigma^2), timestep from
``spec.timestep``, eps or v turned into x0). Final latents are compared in diffusers' form.
"""

from __future__ import annotations

import logging
import math
import types

import numpy as np
import pytest
import torch

from latentforge import samplers
from latentforge.samplers import SAMPLERS, SPECS, get_sampler, img2img_sigmas, lms_coefficient
from latentforge.schedules import (
    SD_DEFAULT,
    NoiseSchedule,
    ddim_sigmas,
    dpm_solver_sigmas,
    euler_sigmas,
    karras_sigmas,
    lcm_timesteps,
)

import diffusers
from diffusers.schedulers import scheduling_lms_discrete  # noqa: E402

logging.getLogger("diffusers").setLevel(logging.ERROR)  # from_config's notes on unused keys
# diffusers' np.array(tensor) calls under numpy 2
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")

# float32 on both sides; the updates are the same math in another arrangement, so the differences
# are rounding (observed up to 6e-6 on latents of size ~3)
TOL = dict(atol=2e-5, rtol=2e-5)
STEPS = (1, 2, 5, 20, 25)

# Stable Diffusion's scheduler config, as diffusers pipelines hand it to every scheduler class
SD_CONFIG = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    trained_betas=None, steps_offset=1, set_alpha_to_one=False, timestep_spacing="leading",
    clip_sample=False, skip_prk_steps=True,
)  # fmt: skip

if not hasattr(scheduling_lms_discrete, "integrate"):
    # diffusers' LMS integrates its coefficients with scipy.integrate.quad; scipy is not installed, so
    # the reference gets Gauss-Legendre quadrature instead (exact for these cubic polynomials, and a
    # different method from latentforge's closed-form antiderivative)
    _NODES, _WEIGHTS = np.polynomial.legendre.leggauss(8)

    def _quad(f, a, b, **_):
        a, b = float(a), float(b)
        points = (b - a) / 2 * _NODES + (a + b) / 2
        return sum(w * float(f(p)) for w, p in zip(_WEIGHTS, points)) * (b - a) / 2, 0.0

    scheduling_lms_discrete.integrate = types.SimpleNamespace(quad=_quad)

# A1111 name -> (diffusers class, config on top of SD's, whether step() takes the generator)
REFERENCE = {
    "DDIM": (diffusers.DDIMScheduler, {}, False),
    "PLMS": (diffusers.PNDMScheduler, {}, False),
    "DDPM": (diffusers.DDPMScheduler, {}, True),
    "Euler": (diffusers.EulerDiscreteScheduler, {}, False),
    "Euler a": (diffusers.EulerAncestralDiscreteScheduler, {}, True),
    "Heun": (diffusers.HeunDiscreteScheduler, {}, False),
    "LMS": (scheduling_lms_discrete.LMSDiscreteScheduler, {}, False),
    "DPM++ 2M": (diffusers.DPMSolverMultistepScheduler, {}, False),
    "DPM++ 2M Karras": (diffusers.DPMSolverMultistepScheduler, {"use_karras_sigmas": True}, False),
    "DPM++ 2M SDE": (diffusers.DPMSolverMultistepScheduler, {"algorithm_type": "sde-dpmsolver++"}, True),
    "UniPC": (diffusers.UniPCMultistepScheduler, {}, False),
    "LCM": (diffusers.LCMScheduler, {}, True),
}
DETERMINISTIC = ("DDIM", "PLMS", "Euler", "Heun", "LMS", "DPM++ 2M", "DPM++ 2M Karras", "UniPC")
STOCHASTIC = ("DDPM", "Euler a", "DPM++ 2M SDE", "LCM")


def reference_scheduler(name: str, **config):
    cls, extra, _ = REFERENCE[name]
    return cls.from_config({**SD_CONFIG, **extra, **config})


_ALPHAS = diffusers.DDPMScheduler.from_config(SD_CONFIG).alphas_cumprod.double()


def synthetic_unet(prediction_type: str = "epsilon", seed: int = 0):
    """A deterministic stand-in for the UNet: roughly what an ideal predictor for zero-mean data
    outputs (sqrt(1 - a_t) x for eps, sqrt(a_t) x for v), plus a nonlinear, timestep-dependent mix
    of the channels, so that both the latent and the timestep matter."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(4, 4, generator=g) / 2
    b = torch.randn(4, generator=g)[None, :, None, None]

    def unet(x: torch.Tensor, t) -> torch.Tensor:
        t = torch.as_tensor(t, dtype=torch.float32)
        low = t.double().floor().clamp(0, 998).long()
        a = (_ALPHAS[low] + (t.double() - low) * (_ALPHAS[low + 1] - _ALPHAS[low])).float()
        gain = a.sqrt() if prediction_type == "v_prediction" else (1 - a).sqrt()
        mix = torch.tanh(torch.einsum("oc,bchw->bohw", w.to(x.dtype), x) + b)
        return gain * x + 0.3 * mix * (1 + 0.3 * torch.cos(t / 200))

    return unet


def denoiser(unet, spec, schedule: NoiseSchedule, prediction_type: str = "epsilon", calls: list | None = None):
    """The pipeline's side of the contract: sigma-form x in, x0 out."""

    def denoise(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        assert sigma.ndim == 0
        if calls is not None:
            calls.append(float(sigma))
        s = float(sigma)
        out = unet(x / math.sqrt(s * s + 1), spec.timestep(schedule, sigma))
        if prediction_type == "epsilon":
            return x - s * out
        return x / (1 + s * s) - s / math.sqrt(1 + s * s) * out

    return denoise


def latents(seed: int) -> torch.Tensor:
    return torch.randn(2, 4, 6, 5, generator=torch.Generator().manual_seed(seed))


def run_reference(name, steps, noise, unet, seed=None, **config) -> tuple[torch.Tensor, int]:
    """diffusers' txt2img loop; returns the final latents and the number of UNet calls."""
    scheduler = reference_scheduler(name, **config)
    scheduler.set_timesteps(steps)
    kwargs = {"generator": torch.Generator().manual_seed(seed)} if REFERENCE[name][2] else {}
    x = noise * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        x = scheduler.step(unet(scheduler.scale_model_input(x, t), t), t, x, **kwargs).prev_sample
    return x, len(scheduler.timesteps)


def run_ours(name, steps, noise, unet, seed=None, schedule=SD_DEFAULT, prediction_type="epsilon", calls=None):
    spec = get_sampler(name)
    sigmas = spec.sigmas(schedule, steps)
    assert sigmas.dtype == torch.float32 and sigmas.shape == (steps + 1,)
    x = noise * spec.init_noise_sigma(schedule, sigmas)
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    denoise = denoiser(unet, spec, schedule, prediction_type, calls)
    x = spec(denoise, x, sigmas, schedule=schedule, prediction_type=prediction_type, generator=generator)
    return x / math.sqrt(1 + float(sigmas[-1]) ** 2)  # to the latents the VAE decodes


# -- the schedule -------------------------------------------------------------------------------------


@pytest.mark.parametrize("beta_schedule", ["scaled_linear", "linear", "squaredcos_cap_v2"])
def test_training_schedule_is_diffusers_bit_for_bit(beta_schedule):
    config = {**SD_CONFIG, "beta_schedule": beta_schedule}
    schedule = NoiseSchedule.from_config(config)
    reference = diffusers.EulerDiscreteScheduler.from_config(config)
    assert schedule.alphas_cumprod.dtype == torch.float32
    assert torch.equal(schedule.alphas_cumprod, reference.alphas_cumprod)
    assert torch.equal(schedule.sigmas.flip(0), reference.sigmas[:-1])


def test_sigma_to_t_and_back():
    s = SD_DEFAULT
    t = torch.arange(1000)
    # grid sigmas give their integer timestep exactly, by either interpolation
    assert torch.equal(s.sigma_to_t(s.sigmas), t.float())
    assert torch.equal(s.sigma_to_t(s.sigmas, "linear"), t.float())
    assert torch.equal(s.t_to_sigma(t), s.sigmas)
    # fractional timesteps: linear is t_to_sigma's inverse; log is diffusers' _sigma_to_t
    frac = torch.tensor([0.25, 17.5, 500.125, 998.75])
    torch.testing.assert_close(s.sigma_to_t(s.t_to_sigma(frac), "linear"), frac, atol=2e-3, rtol=0)
    reference = diffusers.EulerDiscreteScheduler.from_config(SD_CONFIG)
    log_sigmas = np.log(s.sigmas.numpy())
    probe = np.array([0.02, 0.03, 0.5, 1.0, 7.3, 14.0, 20.0])
    want = torch.tensor(np.array([reference._sigma_to_t(p, log_sigmas) for p in probe]), dtype=torch.float32)
    torch.testing.assert_close(s.sigma_to_t(torch.tensor(probe)), want, atol=2e-3, rtol=0)
    assert s.sigma_to_t(torch.tensor(0.0)) == 0 and s.sigma_to_t(torch.tensor(1e3)) == 999  # clamped


def test_karras_sigmas_are_diffusers():
    reference = diffusers.DPMSolverMultistepScheduler.from_config({**SD_CONFIG, "use_karras_sigmas": True})
    for n in (1, 2, 7, 30):
        want = reference._convert_to_karras(in_sigmas=SD_DEFAULT.sigmas.flip(0).numpy(), num_inference_steps=n)
        got = karras_sigmas(SD_DEFAULT.sigma_min, SD_DEFAULT.sigma_max, n)
        assert got.dtype == torch.float64 and np.array_equal(got.numpy(), want)
        assert got[0] == pytest.approx(14.6146, abs=1e-4)
        assert n == 1 or got[-1] == pytest.approx(0.0292, abs=1e-4)


def test_sd_default_and_from_config():
    extra_keys = dict(SD_CONFIG, _class_name="PNDMScheduler", prediction_type="v_prediction")
    assert NoiseSchedule.from_config(extra_keys) == SD_DEFAULT
    assert NoiseSchedule.from_config({}) == SD_DEFAULT
    trailing = NoiseSchedule.from_config({"timestep_spacing": "trailing", "steps_offset": 0.0})
    assert trailing.timestep_spacing == "trailing" and trailing.steps_offset == 0
    for config, field in [
        ({"beta_schedule": "sigmoid"}, "beta_schedule"),
        ({"timestep_spacing": "spread"}, "timestep_spacing"),
        ({"rescale_betas_zero_snr": "yes"}, "rescale_betas_zero_snr"),
        ({"clip_sample": True}, "clip_sample"),
        ({"thresholding": True}, "thresholding"),
        ({"trained_betas": [0.1, 0.2]}, "trained_betas"),
        ({"steps_offset": -1}, "steps_offset"),
    ]:
        with pytest.raises(ValueError, match=field):
            NoiseSchedule.from_config(config)
    # zero terminal SNR: diffusers' rescaled betas, and its sigma-based schedulers' last alphas_cumprod
    zero = NoiseSchedule.from_config({"rescale_betas_zero_snr": True})
    reference = diffusers.EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", rescale_betas_zero_snr=True
    )
    assert torch.equal(zero.betas, reference.betas) and torch.equal(zero.alphas_cumprod, reference.alphas_cumprod)
    trained = NoiseSchedule.from_config({"trained_betas": list(np.linspace(1e-4, 0.02, 1000))})
    reference = diffusers.DDIMScheduler(trained_betas=np.linspace(1e-4, 0.02, 1000))
    assert torch.equal(trained.alphas_cumprod, reference.alphas_cumprod)
    with pytest.raises(ValueError, match="steps"):
        euler_sigmas(SD_DEFAULT, 0)


def undouble(values: torch.Tensor) -> torch.Tensor:
    return torch.cat([values[:1], values[1::2]])


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("name", list(REFERENCE))
def test_sigmas_and_timesteps_are_diffusers(name, spacing):
    """The sigmas each scheduler steps through and the UNet timesteps it feeds: ours map back onto
    diffusers' through spec.timestep (the pipeline's sigma -> t rule)."""
    offset = 1 if spacing == "leading" else 0
    schedule = NoiseSchedule(timestep_spacing=spacing, steps_offset=offset)
    spec = get_sampler(name)
    for n in (1, 3, 10, 25, 50):
        reference = reference_scheduler(name, timestep_spacing=spacing, steps_offset=offset)
        reference.set_timesteps(n)
        sigmas = spec.sigmas(schedule, n)
        want_t, want_sigmas = reference.timesteps, getattr(reference, "sigmas", None)
        if name == "Heun":  # diffusers doubles every sigma but the first and last
            want_t, want_sigmas = undouble(want_t), undouble(want_sigmas)
        if name == "PLMS" and n > 1:  # ... and PNDM the second timestep
            want_t = torch.cat([want_t[:1], want_t[2:]])
        torch.testing.assert_close(spec.timestep(schedule, sigmas[:-1]), want_t.float(), atol=2e-3, rtol=0)
        if want_sigmas is not None:  # the Karras-family and multistep schedulers keep sigmas
            torch.testing.assert_close(sigmas, want_sigmas, atol=0, rtol=1e-6)
        # DDIM and PNDM end at alphas_cumprod[0] (SD's set_alpha_to_one=False), the others at 0
        assert sigmas[-1] == (SD_DEFAULT.sigmas[0] if name in ("DDIM", "PLMS") else 0)
        # initial noise: diffusers' init_noise_sigma, times sqrt(1 + sigma0^2) for the VP schedulers
        vp = 1.0 if name in ("Euler", "Euler a", "Heun", "LMS") else math.sqrt(1 + float(sigmas[0]) ** 2)
        assert spec.init_noise_sigma(schedule, sigmas) == pytest.approx(float(reference.init_noise_sigma) * vp)


def test_lcm_timesteps_are_diffusers():
    reference = diffusers.LCMScheduler.from_config(SD_CONFIG)
    for n in (1, 2, 4, 8, 50):
        reference.set_timesteps(n)
        assert torch.equal(lcm_timesteps(SD_DEFAULT, n), reference.timesteps)
    with pytest.raises(ValueError, match="original_steps"):
        lcm_timesteps(SD_DEFAULT, 51)


def test_schedule_timesteps_are_ddims():
    for spacing in ("leading", "trailing", "linspace"):
        schedule = NoiseSchedule(timestep_spacing=spacing)
        reference = diffusers.DDIMScheduler.from_config({**SD_CONFIG, "timestep_spacing": spacing})
        for n in (1, 7, 50):
            reference.set_timesteps(n)
            assert torch.equal(schedule.timesteps(n), reference.timesteps)


# -- txt2img against diffusers ------------------------------------------------------------------------


@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("name", DETERMINISTIC)
def test_deterministic_samplers_match_diffusers(name, steps):
    unet = synthetic_unet()
    noise = latents(1)
    want, unet_calls = run_reference(name, steps, noise, unet)
    calls = []
    got = run_ours(name, steps, noise, unet, calls=calls)
    torch.testing.assert_close(got, want, **TOL)
    assert len(calls) == unet_calls  # Heun: 2 steps - 1, PLMS: steps + 1 (one for one step)


@pytest.mark.parametrize("steps", (1, 2, 5, 25))
@pytest.mark.parametrize("name", ("DDIM", "PLMS", "Euler", "Heun", "DPM++ 2M", "UniPC", "DPM++ 2M Karras"))
def test_v_prediction_matches_diffusers(name, steps):
    unet = synthetic_unet("v_prediction")
    noise = latents(2)
    want, _ = run_reference(name, steps, noise, unet, prediction_type="v_prediction")
    got = run_ours(name, steps, noise, unet, prediction_type="v_prediction")
    torch.testing.assert_close(got, want, **TOL)


@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("spacing", ["trailing", "linspace"])
@pytest.mark.parametrize("name", ("Euler", "Heun", "LMS", "DPM++ 2M", "UniPC"))
def test_other_spacings_match_diffusers(name, spacing, steps):
    """Euler-family "linspace" timesteps are fractional, and diffusers then starts from sigma_max
    noise (not sqrt(1 + sigma_max^2)); both are the spec's business."""
    schedule = NoiseSchedule(timestep_spacing=spacing, steps_offset=0)
    unet = synthetic_unet()
    noise = latents(3)
    want, _ = run_reference(name, steps, noise, unet, timestep_spacing=spacing, steps_offset=0)
    got = run_ours(name, steps, noise, unet, schedule=schedule)
    torch.testing.assert_close(got, want, **TOL)


@pytest.mark.parametrize("steps", (2, 5, 20, 25))
@pytest.mark.parametrize("name", ("DDIM", "PLMS"))
def test_ddim_trailing_matches_diffusers_when_steps_divide_1000(name, steps):
    # diffusers' DDIM/PNDM step to t - 1000 // steps, which is the next timestep under "trailing"
    # spacing only when steps divides 1000 (see the module notes of samplers.py)
    schedule = NoiseSchedule(timestep_spacing="trailing", steps_offset=0)
    unet = synthetic_unet()
    want, _ = run_reference(name, steps, latents(4), unet, timestep_spacing="trailing", steps_offset=0)
    torch.testing.assert_close(run_ours(name, steps, latents(4), unet, schedule=schedule), want, **TOL)


# diffusers config -> the same setting as a sampler option; last: end at sigma_min instead of 0
OPTIONS = {
    "unipc_order_3": ("UniPC", dict(solver_order=3), dict(order=3), False),
    "unipc_bh1": ("UniPC", dict(solver_type="bh1", final_sigmas_type="sigma_min"), dict(variant="bh1"), True),
    "unipc_no_corrector": ("UniPC", dict(disable_corrector=list(range(25))), dict(corrector=False), False),
    "dpmpp_2m_heun": ("DPM++ 2M", dict(solver_type="heun"), dict(solver_type="heun"), False),
    "dpmpp_2m_sde_heun": ("DPM++ 2M SDE", dict(solver_type="heun"), dict(solver_type="heun"), False),
    "dpmpp_2m_to_sigma_min": ("DPM++ 2M", dict(final_sigmas_type="sigma_min"), {}, True),
}


@pytest.mark.parametrize("steps", (2, 5, 20))
@pytest.mark.parametrize("case", sorted(OPTIONS))
def test_sampler_options_match_diffusers(case, steps):
    name, config, options, to_sigma_min = OPTIONS[case]
    unet = synthetic_unet()
    noise = latents(13)
    want, _ = run_reference(name, steps, noise, unet, seed=4, **config)
    spec = get_sampler(name)
    sigmas = spec.sigmas(SD_DEFAULT, steps)
    if to_sigma_min:
        sigmas[-1] = SD_DEFAULT.sigmas[0]
    x = noise * spec.init_noise_sigma(SD_DEFAULT, sigmas)
    generator = torch.Generator().manual_seed(4)
    got = spec.fn(denoiser(unet, spec, SD_DEFAULT), x, sigmas, generator=generator, **options)
    torch.testing.assert_close(got / math.sqrt(1 + float(sigmas[-1]) ** 2), want, **TOL)


# -- stochastic samplers --------------------------------------------------------------------------------


@pytest.mark.parametrize("steps", (1, 2, 5, 20))
@pytest.mark.parametrize("name", STOCHASTIC)
def test_stochastic_samplers_match_diffusers_with_the_same_generator(name, steps):
    unet = synthetic_unet()
    noise = latents(5)
    want, _ = run_reference(name, steps, noise, unet, seed=7)
    torch.testing.assert_close(run_ours(name, steps, noise, unet, seed=7), want, **TOL)


@pytest.mark.parametrize("steps", (2, 4, 8))
def test_lcm_boundary_condition_matches_diffusers(steps):
    # at SD's timestep_scaling of 10 c_skip is below 1e-5 for every LCM timestep; at 0.005 it is not
    unet = synthetic_unet()
    noise = latents(12)
    want, _ = run_reference("LCM", steps, noise, unet, seed=2, timestep_scaling=0.005)
    spec = get_sampler("LCM")
    sigmas = spec.sigmas(SD_DEFAULT, steps)
    got = samplers.sample_lcm(
        denoiser(unet, spec, SD_DEFAULT), noise * spec.init_noise_sigma(SD_DEFAULT, sigmas), sigmas,
        generator=torch.Generator().manual_seed(2), schedule=SD_DEFAULT, timestep_scaling=0.005,
    )  # fmt: skip
    torch.testing.assert_close(got, want, **TOL)
    plain = samplers.sample_lcm(
        denoiser(unet, spec, SD_DEFAULT), noise * spec.init_noise_sigma(SD_DEFAULT, sigmas), sigmas,
        generator=torch.Generator().manual_seed(2),
    )  # fmt: skip
    assert (plain - got).abs().max() > 1e-2


@pytest.mark.parametrize("name", STOCHASTIC)
def test_stochastic_samplers_are_reproducible(name):
    unet = synthetic_unet()
    noise = latents(6)
    first = run_ours(name, 4, noise, unet, seed=11)
    assert torch.equal(first, run_ours(name, 4, noise, unet, seed=11))
    assert (first - run_ours(name, 4, noise, unet, seed=12)).abs().max() > 1e-3
    assert get_sampler(name).stochastic


def test_eta_makes_ddim_stochastic_like_diffusers():
    unet = synthetic_unet()
    noise = latents(8)
    reference = reference_scheduler("DDIM")
    reference.set_timesteps(6)
    g = torch.Generator().manual_seed(3)
    want = noise.clone()
    for t in reference.timesteps:
        want = reference.step(unet(want, t), t, want, eta=0.7, generator=g).prev_sample
    sigmas = ddim_sigmas(SD_DEFAULT, 6)
    denoise = denoiser(unet, get_sampler("ddim"), SD_DEFAULT)
    x = noise * samplers.initial_sigma_scale(sigmas)
    got = samplers.sample_ddim(denoise, x, sigmas, eta=0.7, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(got / math.sqrt(1 + float(sigmas[-1]) ** 2), want, **TOL)


# -- img2img ---------------------------------------------------------------------------------------------


def t_start_of(steps: int, strength: float) -> int:
    return max(steps - min(int(steps * strength), steps), 0)


def run_reference_img2img(name, steps, strength, init, noise, unet):
    """diffusers' StableDiffusionImg2ImgPipeline loop: get_timesteps, add_noise, the tail."""
    scheduler = reference_scheduler(name)
    scheduler.set_timesteps(steps)
    t_start = t_start_of(steps, strength)
    timesteps = scheduler.timesteps[t_start * scheduler.order :]
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(t_start * scheduler.order)
    x = scheduler.add_noise(init, noise, timesteps[:1])
    start = x
    for t in timesteps:
        x = scheduler.step(unet(scheduler.scale_model_input(x, t), t), t, x).prev_sample
    return x, start, timesteps


@pytest.mark.parametrize("steps", (5, 20, 25))
@pytest.mark.parametrize("strength", (0.3, 0.75, 1.0))
@pytest.mark.parametrize("name", ("DDIM", "Euler", "Heun", "DPM++ 2M"))
def test_img2img_matches_diffusers(name, strength, steps):
    unet = synthetic_unet()
    init, noise = latents(9) * 0.8, latents(10)
    want, want_start, timesteps = run_reference_img2img(name, steps, strength, init, noise, unet)
    spec = get_sampler(name)
    sigmas = img2img_sigmas(spec, SD_DEFAULT, steps, strength)
    if name == "Heun":  # the tail of [t0, t1, t1, t2, t2, ...] from 2 * t_start
        timesteps = undouble(timesteps) if t_start_of(steps, strength) == 0 else timesteps[::2]
    torch.testing.assert_close(spec.timestep(SD_DEFAULT, sigmas[:-1]), timesteps.float(), atol=2e-3, rtol=0)
    x = init + noise * sigmas[0]  # the pipeline's start latents, sigma form
    vp = 1 / math.sqrt(1 + float(sigmas[0]) ** 2) if name in ("DDIM", "DPM++ 2M") else 1.0
    torch.testing.assert_close(x * vp, want_start, **TOL)  # = scheduler.add_noise
    got = spec(denoiser(unet, spec, SD_DEFAULT), x, sigmas)
    torch.testing.assert_close(got / math.sqrt(1 + float(sigmas[-1]) ** 2), want, **TOL)


def test_img2img_sigmas_rules():
    heun, plms = get_sampler("Heun"), get_sampler("PLMS")
    full = heun.sigmas(SD_DEFAULT, 20)
    assert torch.equal(img2img_sigmas(heun, SD_DEFAULT, 20, 0.75), full[5:])  # not 2 * t_start
    assert torch.equal(img2img_sigmas(heun, SD_DEFAULT, 20, 1.0), full)
    assert torch.equal(img2img_sigmas(heun, SD_DEFAULT, 25, 0.3), heun.sigmas(SD_DEFAULT, 25)[18:])
    # PNDM's timesteps [T0, T1, T1, T2, ...] sliced at t_start: the noise diffusers adds is T(t_start - 1)'s
    full = plms.sigmas(SD_DEFAULT, 20)
    reference = reference_scheduler("PLMS")
    reference.set_timesteps(20)
    for strength in (0.3, 0.75, 0.95, 1.0):
        t_start = 20 - int(20 * strength)
        start = reference.timesteps[t_start]
        sigmas = img2img_sigmas(plms, SD_DEFAULT, 20, strength)
        assert sigmas[0] == SD_DEFAULT.sigmas[start] and torch.equal(sigmas, full[len(full) - len(sigmas) :])
    for strength in (0.0, 0.04, 1.5, -0.1):
        with pytest.raises(ValueError, match="strength"):
            img2img_sigmas(heun, SD_DEFAULT, 20, strength)


# -- the registry ----------------------------------------------------------------------------------------


def test_get_sampler_names():
    assert get_sampler("DPM++ 2M Karras") is get_sampler("dpmpp_2m_karras") is get_sampler("dpm++ 2m KARRAS")
    assert get_sampler("Euler a").name == "euler_a" and get_sampler("EULER_A").a1111_name == "Euler a"
    assert get_sampler("  unipc ") is get_sampler("UniPC")
    for spec in SPECS:
        assert get_sampler(spec.a1111_name) is get_sampler(spec.name.upper()) is spec
        assert SAMPLERS[spec.a1111_name] is SAMPLERS[spec.name] is spec
    assert {spec.a1111_name for spec in SPECS} == set(REFERENCE)
    assert get_sampler("dpmpp_2m_karras").schedule == "Karras" and get_sampler("ddim").schedule == "Automatic"
    assert {spec.a1111_name for spec in SPECS if spec.stochastic} == set(STOCHASTIC)
    with pytest.raises(ValueError, match=r"unknown sampler 'Euler b'.*DPM\+\+ 2M Karras.*dpmpp_2m_karras"):
        get_sampler("Euler b")
    with pytest.raises(AttributeError):
        get_sampler("ddim").name = "other"  # frozen


@pytest.mark.parametrize("spec", SPECS, ids=lambda spec: spec.name)
def test_every_sampler_runs_and_reports_each_step(spec):
    unet = synthetic_unet()
    for steps in (1, 2, 3, 4):
        sigmas = spec.sigmas(SD_DEFAULT, steps)
        x = latents(steps) * spec.init_noise_sigma(SD_DEFAULT, sigmas)
        seen = []

        def callback(i, x_i, x0, sigma):
            assert x_i.shape == x0.shape == x.shape and sigma.ndim == 0
            seen.append((i, float(sigma)))

        out = spec(
            denoiser(unet, spec, SD_DEFAULT), x, sigmas, schedule=SD_DEFAULT,
            generator=torch.Generator().manual_seed(0), callback=callback,
        )  # fmt: skip
        assert out.shape == x.shape and out.dtype == x.dtype and torch.isfinite(out).all()
        assert seen == [(i, float(sigmas[i + 1])) for i in range(steps)]
        assert not torch.equal(out, x)


def test_lms_coefficients_integrate_lagrange_polynomials():
    s = [14.6, 9.5, 6.1, 3.9, 2.4, 1.3]
    for i in range(len(s) - 1):
        order = min(i + 1, 4)
        weights = [lms_coefficient(s, i, order, j) for j in range(order)]
        assert sum(weights) == pytest.approx(s[i + 1] - s[i], rel=1e-12)  # a constant slope is exact
        # a slope linear in sigma is integrated exactly from order 2 on
        if order >= 2:
            slope = [2 * s[i - j] + 1 for j in range(order)]
            exact = (s[i + 1] ** 2 + s[i + 1]) - (s[i] ** 2 + s[i])
            assert sum(w * d for w, d in zip(weights, slope)) == pytest.approx(exact, rel=1e-12)


@pytest.mark.parametrize("spec", SPECS, ids=lambda spec: spec.name)
def test_samplers_make_no_device_assumptions(spec):
    # latents on the meta device, sigmas and generator on the CPU: every tensor a sampler makes must
    # follow x (noise is drawn on the generator's device, then moved)
    x = torch.empty(1, 4, 3, 3, device="meta")
    generator = torch.Generator().manual_seed(0)
    state = generator.get_state()
    out = spec(lambda x, sigma: x * 0.5, x, spec.sigmas(SD_DEFAULT, 3), schedule=SD_DEFAULT, generator=generator)
    assert out.device.type == "meta" and out.shape == x.shape
    assert torch.equal(generator.get_state(), state) != spec.stochastic  # drawn from it iff stochastic


def test_samplers_keep_the_dtype_and_use_the_global_rng_without_generator():
    spec = get_sampler("Euler a")
    sigmas = spec.sigmas(SD_DEFAULT, 3)
    x = latents(0).double()
    denoise = denoiser(synthetic_unet(), spec, SD_DEFAULT)
    out = spec(denoise, x, sigmas, generator=torch.Generator().manual_seed(0))
    assert out.dtype == torch.float64
    torch.manual_seed(0)
    unseeded = spec(denoise, x, sigmas)
    torch.manual_seed(0)
    assert torch.equal(unseeded, spec(denoise, x, sigmas))  # no generator: the global one, no state of ours


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_karras_sigmas_of_both_families(spacing):
    schedule = NoiseSchedule(timestep_spacing=spacing)
    # DPM-Solver: between the training extremes, whatever the spacing
    sigmas = dpm_solver_sigmas(schedule, 10, karras=True)
    assert sigmas[0] == pytest.approx(SD_DEFAULT.sigma_max) and sigmas[-2] == pytest.approx(SD_DEFAULT.sigma_min)
    # Euler family: between the ends of the spaced sigmas, timesteps unrounded
    reference = diffusers.EulerDiscreteScheduler.from_config(
        {**SD_CONFIG, "timestep_spacing": spacing, "use_karras_sigmas": True}
    )
    for n in (1, 4, 25):
        reference.set_timesteps(n)
        sigmas = euler_sigmas(schedule, n, karras=True)
        assert torch.equal(sigmas, reference.sigmas)
        torch.testing.assert_close(schedule.sigma_to_t(sigmas[:-1]), reference.timesteps, atol=2e-3, rtol=0)
