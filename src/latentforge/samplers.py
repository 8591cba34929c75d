"""Samplers: stateless functions that walk a denoiser down a sequence of noise levels.

In the spirit of k-diffusion, every sampler is

    fn(denoise, x, sigmas, *, generator=None, callback=None, **options) -> x

- ``x`` is in the "sigma" (variance-exploding) form, ``x = x0 + sigma * eps``, at ``sigmas[0]``; the
  result is in the same form at ``sigmas[-1]``.
- ``denoise(x, sigma) -> x0_hat`` with ``sigma`` a 0-d tensor taken from ``sigmas``. The pipeline
  scales the UNet input by 1/sqrt(sigma**2 + 1), gives the UNet the timestep
  ``spec.timestep(schedule, sigma)``, applies guidance and turns eps or v into x0.
- ``callback(i, x, x0_hat, sigma)`` after each step i = 0 .. len(sigmas) - 2: ``x`` is the new
  latent, at noise level ``sigma`` = sigmas[i + 1]; ``x0_hat`` is the step's last denoiser output
  (LCM: its boundary-condition estimate).
- Stochastic samplers draw with ``torch.randn(x.shape, generator=generator, device=generator's
  device)`` then move to x's device, in the order diffusers draws, so a seeded generator gives the
  same noise as diffusers' scheduler given the same generator.

Each sampler reproduces one diffusers scheduler run on the sigmas of :mod:`latentforge.schedules`
(see SPECS). Several of those run in the variance-preserving form; here their updates are written
in the sigma form (proofs in the docstrings), and where VP quantities are needed (DDPM, LCM, DDIM
with eta, PLMS with v) they come from the shared helpers :func:`vp_scales`, :func:`to_vp`, :func:`from_vp`.

Where diffusers is not reproduced (its behaviour there is inconsistent, and matching it would take
more than a sigma sequence):

- DDIM and PLMS step from timestep t to t - T // steps, which is the next timestep they evaluate only
  under "leading" spacing (SD's) and under "trailing" spacing when steps divides T. Otherwise diffusers
  evaluates the UNet at one timestep on a latent noised for another (under "linspace" badly: with 2
  steps it runs t = 0 on a latent at t = 499); here every step goes to the next sigma.
- img2img with LMS: diffusers keeps the step index of the full schedule, so its first steps weigh
  the available slopes with Lagrange polynomials through earlier noise levels it never evaluated
  (the weights no longer add up to the step). Here the tail is run as a fresh LMS.
- img2img with PLMS: diffusers slices PNDM's list [T0, T1, T1, T2, ...], so its warm-up pair no
  longer lines up (a latent at one level is stepped as if it were at another). Here the tail starts
  at the noise level diffusers adds (see ``img2img_sigmas``) and runs a fresh PLMS.
- DDPM draws its (1e-10-scaled) last noise also when the last timestep is 0; diffusers does not.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from numpy.polynomial import polynomial as P

from . import schedules
from .philox import normal
from .schedules import SD_DEFAULT, NoiseSchedule

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Callback = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], None]


# -- shared helpers ----------------------------------------------------------------------------------


def vp_scales(sigma: float) -> tuple[float, float]:
    """(alpha_t, sigma_t) of the variance-preserving form at noise level sigma:
    alpha_t = 1 / sqrt(1 + sigma**2) = sqrt(alphas_cumprod), sigma_t = sigma * alpha_t."""
    alpha = 1.0 / math.sqrt(1.0 + sigma * sigma)
    return alpha, sigma * alpha


def to_vp(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Sigma-form latent -> variance-preserving latent (what diffusers' DDIM/DPM/... carry)."""
    return x * vp_scales(sigma)[0]


def from_vp(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Variance-preserving latent -> sigma-form latent."""
    return x / vp_scales(sigma)[0]


def initial_sigma_scale(sigmas: torch.Tensor) -> float:
    """The usual factor for the initial latents, ``x = noise * initial_sigma_scale(sigmas)``:
    sqrt(1 + sigmas[0]**2), i.e. unit-variance noise in the VP form (diffusers' init_noise_sigma for
    every scheduler but the Euler family under "linspace"/"trailing" spacing: use
    ``SamplerSpec.init_noise_sigma``, which knows the exceptions)."""
    return math.sqrt(1.0 + float(sigmas[0]) ** 2)


def _levels(sigmas: torch.Tensor) -> list[float]:
    """The sigmas as Python floats (one device sync), for the step coefficients."""
    if sigmas.ndim != 1 or len(sigmas) < 1:
        raise ValueError(f"sigmas must be a 1-d tensor, got shape {tuple(sigmas.shape)}")
    return [float(s) for s in sigmas.tolist()]


def _noise(x: torch.Tensor, generator: torch.Generator | None, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Standard normal noise shaped like x, drawn on the generator's device, returned on x's."""
    device = generator.device if generator is not None else x.device
    z = normal(x.shape, generator, dtype=dtype or x.dtype, device=device)  # a torch or a Philox generator
    return z.to(device=x.device, dtype=x.dtype)


def _lambda(sigma: float) -> float:
    """Half log-SNR, log(alpha_t / sigma_t) = -log(sigma); +inf at sigma 0."""
    return -math.log(sigma) if sigma > 0 else math.inf


def _report(callback: Callback | None, i: int, x: torch.Tensor, x0: torch.Tensor, sigmas: torch.Tensor) -> None:
    if callback is not None:
        callback(i, x, x0, sigmas[i + 1])


# -- first-order and Heun --------------------------------------------------------------------------


def sample_euler(denoise: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *, generator=None, callback=None):
    """Euler's method on dx/dsigma = (x - x0) / sigma (EulerDiscreteScheduler)."""
    s = _levels(sigmas)
    for i in range(len(s) - 1):
        x0 = denoise(x, sigmas[i])
        x = x + (x - x0) / s[i] * (s[i + 1] - s[i])
        _report(callback, i, x, x0, sigmas)
    return x


def sample_euler_ancestral(
    denoise: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *, generator=None, callback=None, eta: float = 1.0
):
    """Euler step down to sigma_down, then fresh noise up to sigma_{i+1} (EulerAncestralDiscrete).
    Noise is drawn at every step, the last included (where it is multiplied by 0), as diffusers does.
    `eta` scales the noise's share (k-diffusion's and A1111's; 1 is diffusers', 0 an Euler step)."""
    s = _levels(sigmas)
    for i in range(len(s) - 1):
        x0 = denoise(x, sigmas[i])
        up = min(s[i + 1], eta * math.sqrt(s[i + 1] ** 2 * (s[i] ** 2 - s[i + 1] ** 2) / s[i] ** 2))
        down = math.sqrt(s[i + 1] ** 2 - up**2)
        x = x + (x - x0) / s[i] * (down - s[i])
        x = x + _noise(x, generator) * up
        _report(callback, i, x, x0, sigmas)
    return x


def sample_heun(denoise: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *, generator=None, callback=None):
    """Heun's method (HeunDiscreteScheduler): an Euler step, then the average of the slopes at both
    ends; the last step, to sigma 0, stays Euler. 2 * steps - 1 denoiser calls. diffusers expresses
    this with every sigma but the first and last doubled; ``sigmas`` here are not doubled."""
    s = _levels(sigmas)
    for i in range(len(s) - 1):
        x0 = denoise(x, sigmas[i])
        d = (x - x0) / s[i]
        dt = s[i + 1] - s[i]
        x_euler = x + d * dt
        if s[i + 1] == 0:
            x = x_euler
        else:
            x0 = denoise(x_euler, sigmas[i + 1])
            x = x + (d + (x_euler - x0) / s[i + 1]) / 2 * dt
        _report(callback, i, x, x0, sigmas)
    return x


def lms_coefficient(s: list[float], i: int, order: int, j: int) -> float:
    """Weight of the derivative taken at s[i - j] in the LMS step s[i] -> s[i + 1]: the integral over
    [s[i], s[i + 1]] of the Lagrange basis polynomial through s[i], ..., s[i - order + 1] that is 1
    at s[i - j]. Computed exactly (polynomial antiderivative) where diffusers calls scipy.quad."""
    nodes = [s[i - k] for k in range(order)]
    basis = np.array([1.0])
    for k, node in enumerate(nodes):
        if k != j:
            basis = P.polymul(basis, np.array([-node, 1.0]) / (nodes[j] - node))
    antiderivative = P.polyint(basis)
    return float(P.polyval(s[i + 1], antiderivative) - P.polyval(s[i], antiderivative))


def sample_lms(
    denoise: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *, generator=None, callback=None, order: int = 4
):
    """Linear multistep (LMSDiscreteScheduler, order 4): the slope is extrapolated by the Lagrange
    polynomial through the last `order` slopes (fewer at the start) and integrated over the step."""
    s = _levels(sigmas)
    slopes: list[torch.Tensor] = []
    for i in range(len(s) - 1):
        x0 = denoise(x, sigmas[i])
        slopes = [*slopes[-(order - 1) :], (x - x0) / s[i]] if order > 1 else [(x - x0) / s[i]]
        k = len(slopes)
        x = x + sum(lms_coefficient(s, i, k, j) * slopes[-1 - j] for j in range(k))
        _report(callback, i, x, x0, sigmas)
    return x


# -- DDIM, PNDM, DDPM ---------------------------------------------------------------------------------


def sample_ddim(
    denoise: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *, generator=None, callback=None, eta: float = 0.0
):
    """DDIMScheduler. In VP form DDIM sets x_prev = sqrt(a_prev) x0 + sqrt(1 - a_prev - std^2) eps
    + std z; dividing by sqrt(a_prev) gives the sigma form x0 + sqrt(sigma_prev^2 - std^2/a_prev) eps
    + std/sqrt(a_prev) z, which for eta = 0 (std = 0) is x0 + sigma_prev * eps: an Euler step.
    eta > 0 draws noise (stochastic), std = eta * sqrt((1-a_prev)/(1-a_t) (1 - a_t/a_prev))."""
    s = _levels(sigmas)
    for i in range(len(s) - 1):
        x0 = denoise(x, sigmas[i])
        eps = (x - x0) / s[i]
        if eta == 0:
            x = x0 + eps * s[i + 1]
        else:
            a_t, a_prev = vp_scales(s[i])[0] ** 2, vp_scales(s[i + 1])[0] ** 2
            std = eta * math.sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev))
            direction = math.sqrt(max(1 - a_prev - std**2, 0.0) / a_prev)
            x = x0 + eps * direction + _noise(x, generator) * (std / math.sqrt(a_prev))
        _report(callback, i, x, x0, sigmas)
    return x


# Adams-Bashforth weights of PNDM's pseudo linear multistep, newest output first
_PLMS_WEIGHTS = {
    1: (1.0,),
    2: (3 / 2, -1 / 2),
    3: (23 / 12, -16 / 12, 5 / 12),
    4: (55 / 24, -59 / 24, 37 / 24, -9 / 24),
}
PREDICTION_TYPES = ("epsilon", "v_prediction")


def _model_output(x: torch.Tensor, x0: torch.Tensor, sigma: float, prediction_type: str) -> torch.Tensor:
    """What the UNet predicted, recovered from the denoiser's x0: eps, or v = (alpha^2 x - x0) / sigma_vp
    (from x0 = alpha x_vp - sigma_vp v with x_vp = alpha x)."""
    if prediction_type == "epsilon":
        return (x - x0) / sigma
    alpha, sigma_vp = vp_scales(sigma)
    return (x * alpha**2 - x0) / sigma_vp


def _eps_from_output(output: torch.Tensor, x: torch.Tensor, sigma: float, prediction_type: str) -> torch.Tensor:
    """The noise implied by a (combined) model output at the latent x of noise level sigma
    (for v: eps = alpha v + sigma_vp x_vp, as diffusers converts it)."""
    if prediction_type == "epsilon":
        return output
    alpha, sigma_vp = vp_scales(sigma)
    return output * alpha + x * (sigma_vp * alpha)


def sample_plms(
    denoise: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    generator=None,
    callback=None,
    prediction_type: str = "epsilon",
):
    """PNDMScheduler with skip_prk_steps=True (A1111's "PLMS").

    PNDM's transfer x_prev = sqrt(a_p/a_t) x - (a_p - a_t) eps / (a_t sqrt(1-a_p) + sqrt(a_t (1-a_t) a_p))
    is DDIM's step written differently (multiply the eps weight's numerator and denominator by
    sqrt(a_t (1 - a_p)) - sqrt(a_p (1 - a_t))), so in sigma form it is x + (sigma_prev - sigma) eps.
    The first step is evaluated twice (diffusers' duplicated first timestep): at sigmas[0], a trial
    step to sigmas[1], an evaluation there, and the step redone from sigmas[0] with the average of
    the two outputs. After that the output is extrapolated from the last 2-4 evaluations (the first
    one counts as the previous, the trial's is dropped, as in diffusers). steps + 1 denoiser calls
    (1 for one step).

    diffusers extrapolates the raw model output, eps or v, and only then turns it into eps with the
    latent being stepped: ``prediction_type`` ("epsilon" or "v_prediction", the model's) makes this
    sampler do the same, which for v differs from extrapolating eps."""
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
    s = _levels(sigmas)
    history: list[torch.Tensor] = []
    for i in range(len(s) - 1):
        x0 = denoise(x, sigmas[i])
        history = [*history[-3:], _model_output(x, x0, s[i], prediction_type)]
        if i == 0 and len(s) > 2:
            trial = x + _eps_from_output(history[0], x, s[0], prediction_type) * (s[1] - s[0])
            x0 = denoise(trial, sigmas[1])
            output = (history[0] + _model_output(trial, x0, s[1], prediction_type)) / 2
        else:
            output = sum(w * o for w, o in zip(_PLMS_WEIGHTS[len(history)], reversed(history)))
        x = x + _eps_from_output(output, x, s[i], prediction_type) * (s[i + 1] - s[i])
        _report(callback, i, x, x0, sigmas)
    return x


def sample_ddpm(denoise: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *, generator=None, callback=None):
    """DDPMScheduler (variance "fixed_small"): ancestral sampling from the posterior q(x_prev | x_t, x0),
    computed in VP form. Noise is drawn at every step (at the last its std is the 1e-10 floor
    diffusers clamps the variance to; diffusers skips that draw when the last timestep is 0)."""
    s = _levels(sigmas)
    for i in range(len(s) - 1):
        x0 = denoise(x, sigmas[i])
        a_t, a_prev = vp_scales(s[i])[0] ** 2, vp_scales(s[i + 1])[0] ** 2
        beta = 1 - a_t / a_prev
        mean = (math.sqrt(a_prev) * beta / (1 - a_t)) * x0 + (
            math.sqrt(a_t / a_prev) * (1 - a_prev) / (1 - a_t)
        ) * to_vp(x, s[i])
        std = math.sqrt(max((1 - a_prev) / (1 - a_t) * beta, 1e-20))
        x = from_vp(mean + _noise(x, generator) * std, s[i + 1])
        _report(callback, i, x, x0, sigmas)
    return x


# -- DPM-Solver++ and UniPC ----------------------------------------------------------------------------


def _dpmpp_multistep(
    denoise: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    sde: bool,
    generator: torch.Generator | None,
    callback: Callback | None,
    solver_type: str = "midpoint",
    lower_order_final: bool = True,
) -> torch.Tensor:
    """DPM-Solver++(2M) and its SDE variant (DPMSolverMultistepScheduler, solver_order=2).

    With lambda = -log(sigma) and h = lambda_t - lambda_s, diffusers' VP update
    x_t = (sigma_t/sigma_s)_vp x_s - alpha_t (e^-h - 1) D divides by alpha_t into the sigma form
    x_t = r x_s + (1 - r) D with r = sigma_t / sigma_s = e^-h; the SDE one into
    x_t = r e^-h x_s + (1 - e^-2h) D + sigma_t sqrt(1 - e^-2h) z. D is x0, or with the previous x0
    (second order) x0 + D1/2 ("midpoint") where D1 = (x0 - x0_prev) h / h_prev. First order on the
    first step and on the last (final sigma 0; or lower_order_final with fewer than 15 steps)."""
    if solver_type not in ("midpoint", "heun"):
        raise ValueError(f"solver_type must be 'midpoint' or 'heun', got {solver_type!r}")
    s = _levels(sigmas)
    n = len(s) - 1
    previous: torch.Tensor | None = None
    for i in range(n):
        x0 = denoise(x, sigmas[i])
        z = _noise(x, generator, torch.float32) if sde else None  # diffusers draws float32, every step
        sigma_s, sigma_t = s[i], s[i + 1]
        last = i == n - 1 and (sigma_t == 0 or (lower_order_final and n < 15))
        h = _lambda(sigma_t) - _lambda(sigma_s)
        r = math.exp(-h)  # sigma_t / sigma_s
        # the weights of x_s and of D: (sigma_t/sigma_s) e^-h = e^-2h and 1 - e^-2h for the SDE
        decay, weight = (r * r, 1 - r * r) if sde else (r, 1 - r)
        d = x0
        if previous is not None and not last:
            d1 = (x0 - previous) * (h / (_lambda(sigma_s) - _lambda(s[i - 1])))
            if solver_type == "midpoint":
                d = x0 + d1 * 0.5
            else:  # heun: D1's weight is 1 - (1 - e^-h)/h (ODE), 1 - (1 - e^-2h)/(2h) (SDE)
                d = x0 + d1 * ((1 - weight / (2 * h if sde else h)) / weight)
        x = x * decay + d * weight
        if sde:
            x = x + z * (sigma_t * math.sqrt(max(1 - r * r, 0.0)))
        previous = x0
        _report(callback, i, x, x0, sigmas)
    return x


def sample_dpmpp_2m(
    denoise: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *, generator=None, callback=None, **options
):
    """DPM-Solver++(2M): DPMSolverMultistepScheduler, algorithm_type "dpmsolver++", order 2,
    midpoint, lower_order_final (with Karras sigmas: "DPM++ 2M Karras")."""
    return _dpmpp_multistep(denoise, x, sigmas, sde=False, generator=generator, callback=callback, **options)


def sample_dpmpp_2m_sde(
    denoise: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *, generator=None, callback=None, **options
):
    """DPM-Solver++(2M) SDE: DPMSolverMultistepScheduler, algorithm_type "sde-dpmsolver++"."""
    return _dpmpp_multistep(denoise, x, sigmas, sde=True, generator=generator, callback=callback, **options)


def _unipc_update(
    x: torch.Tensor,
    x0: torch.Tensor,
    sigma_s: float,
    sigma_t: float,
    history: list[tuple[float, torch.Tensor]],
    order: int,
    *,
    corrector_x0: torch.Tensor | None = None,
    variant: str = "bh2",
) -> torch.Tensor:
    """One UniPC update (predict_x0) from sigma_s to sigma_t in sigma form: the predictor when
    ``corrector_x0`` is None, else the corrector that also uses the x0 evaluated at sigma_t.

    ``x0`` is the estimate at sigma_s; ``history`` the (sigma, x0) of earlier steps, newest last,
    of which the predictor uses order - 1 and the corrector order - 1. Divided by alpha_t, diffusers'
    VP update x_t = (sigma_t/sigma_s)_vp x - alpha_t h_phi_1 m0 - alpha_t B_h (sum rho_k D1_k) becomes
    x_t = r x - h_phi_1 m0 - B_h (...), with r = sigma_t / sigma_s and hh = -h."""
    h = _lambda(sigma_t) - _lambda(sigma_s)
    hh = -h
    h_phi_1 = math.expm1(hh)  # = r - 1
    b_h = hh if variant == "bh1" else math.expm1(hh)
    rks, d1s = [], []
    for sigma_k, x0_k in reversed(history[len(history) - (order - 1) :] if order > 1 else []):
        rk = (_lambda(sigma_k) - _lambda(sigma_s)) / h
        rks.append(rk)
        d1s.append((x0_k - x0) / rk)
    rks.append(1.0)
    # b_k = k! * h_phi_(k+1)(hh) / B_h with h_phi_k(hh) the phi functions' recursion
    b, h_phi_k, factorial = [], h_phi_1 / hh - 1 if hh != -math.inf else -1.0, 1
    for k in range(1, order + 1):
        b.append(h_phi_k * factorial / b_h)
        factorial *= k + 1
        h_phi_k = (h_phi_k / hh if hh != -math.inf else 0.0) - 1 / factorial
    R = np.array([[rk ** (k - 1) for rk in rks] for k in range(1, order + 1)])
    out = x * math.exp(hh) - x0 * h_phi_1
    if corrector_x0 is None:
        if d1s:
            rhos = [0.5] if order == 2 else np.linalg.solve(R[:-1, :-1], np.array(b[:-1])).tolist()
            out = out - sum(rho * d for rho, d in zip(rhos, d1s)) * b_h
        return out
    rhos = [0.5] if order == 1 else np.linalg.solve(R, np.array(b)).tolist()
    correction = (corrector_x0 - x0) * rhos[-1]
    if d1s:
        correction = correction + sum(rho * d for rho, d in zip(rhos[:-1], d1s))
    return out - correction * b_h


def sample_unipc(
    denoise: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    generator=None,
    callback=None,
    order: int = 2,
    corrector: bool = True,
    lower_order_final: bool = True,
    variant: str = "bh2",
):
    """UniPC (UniPCMultistepScheduler defaults: order 2, bh2, predict_x0, corrector on,
    lower_order_final). Each step first corrects the latent just evaluated (UniC, using the new x0),
    then predicts the next (UniP). Warm-up at lower order; the last step is first order and, with
    no evaluation after it, uncorrected. One denoiser call per step."""
    if variant not in ("bh1", "bh2"):
        raise ValueError(f"variant must be 'bh1' or 'bh2', got {variant!r}")
    if order not in (1, 2, 3):
        raise ValueError(f"order must be 1, 2 or 3, got {order}")
    s = _levels(sigmas)
    n = len(s) - 1
    history: list[tuple[float, torch.Tensor]] = []  # (sigma, x0) of the steps so far
    last_x, last_order = None, 0
    for i in range(n):
        x0 = denoise(x, sigmas[i])
        if corrector and last_x is not None:
            x = _unipc_update(
                last_x, history[-1][1], s[i - 1], s[i], history[:-1], last_order, corrector_x0=x0, variant=variant
            )
        this_order = min(order, n - i if lower_order_final else order, i + 1)
        if s[i + 1] == 0:
            this_order = 1  # the higher orders divide by lambda differences that are infinite here
        last_x, last_order = x, this_order
        x = _unipc_update(x, x0, s[i], s[i + 1], history, this_order, variant=variant)
        history = [*history[-(order - 1) :], (s[i], x0)] if order > 1 else [(s[i], x0)]
        _report(callback, i, x, x0, sigmas)
    return x


# -- LCM -----------------------------------------------------------------------------------------------


def sample_lcm(
    denoise: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    generator=None,
    callback=None,
    schedule: NoiseSchedule | None = None,
    timestep_scaling: float = 10.0,
):
    """LCMScheduler: at each step the consistency function's clean estimate
    c_out(t) x0 + c_skip(t) x_vp (c_skip = 0.25 / ((10 t)^2 + 0.25), c_out = 10 t / sqrt((10 t)^2 + 0.25),
    t the training timestep of the sigma under ``schedule``, default SD's), then fresh noise up to the
    next sigma; the last step returns the estimate itself."""
    schedule = schedule or SD_DEFAULT
    s = _levels(sigmas)
    n = len(s) - 1
    for i in range(n):
        x0 = denoise(x, sigmas[i])
        t = float(schedule.sigma_to_t(s[i]).round()) * timestep_scaling
        c_skip, c_out = 0.25 / (t * t + 0.25), t / math.sqrt(t * t + 0.25)
        x0 = x0 * c_out + to_vp(x, s[i]) * c_skip
        # VP: sqrt(a_prev) x0 + sqrt(1 - a_prev) z, i.e. x0 + sigma_prev z in sigma form
        x = x0 + _noise(x, generator) * s[i + 1] if i < n - 1 else x0
        _report(callback, i, x, x0, sigmas)
    return x


# -- the registry --------------------------------------------------------------------------------------


def _euler_family_init(schedule: NoiseSchedule, sigmas: torch.Tensor) -> float:
    # diffusers' Euler/Heun/LMS init_noise_sigma: sigma_max under "linspace"/"trailing" spacing
    if schedule.timestep_spacing in ("linspace", "trailing"):
        return float(sigmas.max())
    return math.sqrt(float(sigmas.max()) ** 2 + 1)


def _vp_init(schedule: NoiseSchedule, sigmas: torch.Tensor) -> float:
    return initial_sigma_scale(sigmas)


def _same_start(t_start: int) -> int:
    return t_start


def _pndm_start(t_start: int) -> int:
    # PNDM's timesteps are [T0, T1, T1, T2, ...]; diffusers' img2img slices that list at t_start,
    # which starts at T1 for t_start = 1 and at T(t_start - 1) after that
    return t_start - 1 if t_start >= 2 else t_start


@dataclass(frozen=True)
class SamplerSpec:
    """A sampler and everything the pipeline needs to run it as diffusers would.

    - ``sigmas(schedule, steps)``: the sigma sequence (steps + 1 values, ending with the final sigma)
    - ``init_noise_sigma(schedule, sigmas)``: txt2img starts from noise * this (sqrt(1 + sigma0^2),
      but sigma0 for the Euler family under "linspace"/"trailing" spacing, like diffusers)
    - ``timestep(schedule, sigma)``: the UNet timestep for a sigma, as diffusers feeds it:
      log-sigma interpolation, linear for the Euler family (whose "linspace" timesteps are
      fractional), rounded for DPM-Solver with Karras sigmas
    - calling the spec runs ``fn``, handing it what it takes of ``schedule`` (LCM) and the model's
      ``prediction_type`` (PLMS): ``spec(denoise, x, sigmas, schedule=..., prediction_type=...)``."""

    name: str  # short name, e.g. "euler_a"
    a1111_name: str  # AUTOMATIC1111's display name, e.g. "Euler a"
    fn: Callable[..., torch.Tensor]
    schedule: str  # "Automatic" (the model's spacing) or "Karras"
    stochastic: bool
    sigmas: Callable[[NoiseSchedule, int], torch.Tensor]
    diffusers: str = ""  # the diffusers scheduler (and settings) it reproduces
    timestep_interpolation: str = "log"  # "log" or "linear", see NoiseSchedule.sigma_to_t
    round_timesteps: bool = False
    init_noise: Callable[[NoiseSchedule, torch.Tensor], float] = _vp_init
    img2img_start: Callable[[int], int] = _same_start  # t_start -> index of the first sigma kept
    context: tuple[str, ...] = ()  # what else fn takes from the pipeline: "schedule", "prediction_type"
    eta: float | None = None  # the default of the eta that fn takes (A1111's: 1 ancestral, 0 DDIM); None: takes none
    eta_key: str = "Eta"  # the infotext key A1111 writes a non-default eta under

    @property
    def infotext_name(self) -> str:
        """The sampler as AUTOMATIC1111 (1.9+) writes it beside "Schedule type": "DPM++ 2M", not "... Karras"."""
        return self.a1111_name.removesuffix(" " + self.schedule)

    def init_noise_sigma(self, schedule: NoiseSchedule, sigmas: torch.Tensor) -> float:
        return self.init_noise(schedule, sigmas)

    def timestep(self, schedule: NoiseSchedule, sigma: torch.Tensor | float) -> torch.Tensor:
        t = schedule.sigma_to_t(sigma, self.timestep_interpolation)
        if self.round_timesteps and schedule.beta_schedule != "squaredcos_cap_v2":
            t = t.round()
        return t

    def __call__(
        self,
        denoise: Denoiser,
        x: torch.Tensor,
        sigmas: torch.Tensor,
        *,
        schedule: NoiseSchedule | None = None,
        prediction_type: str = "epsilon",
        generator: torch.Generator | None = None,
        callback: Callback | None = None,
        **options,
    ) -> torch.Tensor:
        if "schedule" in self.context:
            options["schedule"] = schedule
        if "prediction_type" in self.context:
            options["prediction_type"] = prediction_type
        return self.fn(denoise, x, sigmas, generator=generator, callback=callback, **options)


def _karras_dpm(schedule: NoiseSchedule, steps: int) -> torch.Tensor:
    return schedules.dpm_solver_sigmas(schedule, steps, karras=True)


SPECS: tuple[SamplerSpec, ...] = (
    SamplerSpec(
        "ddim", "DDIM", sample_ddim, "Automatic", False, schedules.ddim_sigmas, "DDIMScheduler, eta 0", eta=0.0,
        eta_key="Eta DDIM",
    ),
    SamplerSpec(
        "plms", "PLMS", sample_plms, "Automatic", False, schedules.ddim_sigmas,
        "PNDMScheduler, skip_prk_steps=True", img2img_start=_pndm_start, context=("prediction_type",),
    ),
    SamplerSpec("ddpm", "DDPM", sample_ddpm, "Automatic", True, schedules.ddpm_sigmas, "DDPMScheduler"),
    SamplerSpec(
        "euler", "Euler", sample_euler, "Automatic", False, schedules.euler_sigmas,
        "EulerDiscreteScheduler", timestep_interpolation="linear", init_noise=_euler_family_init,
    ),
    SamplerSpec(
        "euler_a", "Euler a", sample_euler_ancestral, "Automatic", True, schedules.euler_sigmas,
        "EulerAncestralDiscreteScheduler", timestep_interpolation="linear", init_noise=_euler_family_init, eta=1.0,
    ),
    SamplerSpec(
        "heun", "Heun", sample_heun, "Automatic", False, schedules.euler_sigmas,
        "HeunDiscreteScheduler", timestep_interpolation="linear", init_noise=_euler_family_init,
    ),
    SamplerSpec(
        "lms", "LMS", sample_lms, "Automatic", False, schedules.euler_sigmas,
        "LMSDiscreteScheduler, order 4", timestep_interpolation="linear", init_noise=_euler_family_init,
    ),
    SamplerSpec(
        "dpmpp_2m", "DPM++ 2M", sample_dpmpp_2m, "Automatic", False, schedules.dpm_solver_sigmas,
        "DPMSolverMultistepScheduler, dpmsolver++, order 2, midpoint, lower_order_final",
    ),
    SamplerSpec(
        "dpmpp_2m_karras", "DPM++ 2M Karras", sample_dpmpp_2m, "Karras", False, _karras_dpm,
        "DPMSolverMultistepScheduler, dpmsolver++, order 2, use_karras_sigmas=True", round_timesteps=True,
    ),
    SamplerSpec(
        "dpmpp_2m_sde", "DPM++ 2M SDE", sample_dpmpp_2m_sde, "Automatic", True, schedules.dpm_solver_sigmas,
        "DPMSolverMultistepScheduler, sde-dpmsolver++, order 2, midpoint",
    ),
    SamplerSpec(
        "unipc", "UniPC", sample_unipc, "Automatic", False, schedules.dpm_solver_sigmas,
        "UniPCMultistepScheduler, order 2, bh2, predict_x0, corrector on",
    ),
    SamplerSpec(
        "lcm", "LCM", sample_lcm, "Automatic", True, schedules.lcm_sigmas, "LCMScheduler", context=("schedule",)
    ),
)  # fmt: skip

# sampler -> the diffusers scheduler class and the config options that make it run this sampler (for
# the deterministic ones whose whole pipeline output is tested equal); a diffusers folder written for a
# model whose default sampler is here gets that scheduler
DIFFUSERS_SCHEDULERS: dict[str, tuple[str, dict]] = {
    "DDIM": ("DDIMScheduler", {}),
    "PLMS": ("PNDMScheduler", {"skip_prk_steps": True}),
    "Euler": ("EulerDiscreteScheduler", {}),
    "Heun": ("HeunDiscreteScheduler", {}),
    "LMS": ("LMSDiscreteScheduler", {}),
    "DPM++ 2M": ("DPMSolverMultistepScheduler", {}),
    "DPM++ 2M Karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "UniPC": ("UniPCMultistepScheduler", {}),
}

# both names of every sampler -> its spec; get_sampler() looks them up case-insensitively
SAMPLERS: dict[str, SamplerSpec] = {key: spec for spec in SPECS for key in (spec.a1111_name, spec.name)}
_BY_FOLDED_NAME = {key.lower(): spec for key, spec in SAMPLERS.items()}


def eta_options(spec: SamplerSpec, eta: float | None) -> dict[str, float]:
    """The sampler's keyword for an eta asked for (None: its default); none for a sampler without one."""
    return {} if spec.eta is None else {"eta": spec.eta if eta is None else eta}


def check_eta(spec: SamplerSpec, eta: object) -> None:
    """An eta is a number in [0, 1]; a stochastic sampler that reads none runs at 1, so it takes no other."""
    if eta is None:
        return
    if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta must be between 0 and 1, got {eta!r}")
    if spec.eta is None and spec.stochastic and eta != 1:
        readers = ", ".join(s.a1111_name for s in SPECS if s.eta is not None)
        raise ValueError(f"eta {eta} is read by {readers}; {spec.a1111_name} runs at eta 1: use one of those, or eta 1")


def get_sampler(name: str) -> SamplerSpec:
    """The sampler called `name`: A1111's name ("DPM++ 2M Karras") or the short one
    ("dpmpp_2m_karras"), in any case."""
    spec = _BY_FOLDED_NAME.get(str(name).strip().lower())
    if spec is None:
        raise ValueError(f"unknown sampler {name!r}; known: {', '.join(SAMPLERS)}")
    return spec


def img2img_sigmas(spec: SamplerSpec, schedule: NoiseSchedule, steps: int, strength: float) -> torch.Tensor:
    """The tail of ``spec.sigmas(schedule, steps)`` that diffusers' StableDiffusionImg2ImgPipeline
    runs at this strength: init_timestep = min(int(steps * strength), steps), t_start = steps -
    init_timestep, timesteps[t_start * order:]. On these sigmas (un-doubled, so Heun's order 2 maps
    back to t_start), the start latents are ``init_latents + noise * sigmas[0]`` in sigma form, which
    is what every scheduler's add_noise gives (divided by sqrt(1 + sigmas[0]**2) for the VP ones)."""
    if not 0 <= strength <= 1:
        raise ValueError(f"strength must be in [0, 1], got {strength}")
    init_timestep = min(int(steps * strength), steps)
    if init_timestep < 1:
        raise ValueError(f"strength {strength} leaves none of the {steps} steps: int(steps * strength) is 0")
    t_start = max(steps - init_timestep, 0)
    return spec.sigmas(schedule, steps)[spec.img2img_start(t_start) :]
