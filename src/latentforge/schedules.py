"""Noise schedules: the training noise levels of a model, and the sigma sequences the samplers walk.

Everything here is in the "sigma" (variance-exploding) form the samplers use: a latent at noise level
sigma is ``x = x0 + sigma * eps``; the variance-preserving latent diffusers' DDIM/DPM-Solver/...
schedulers carry is the same thing divided by ``sqrt(1 + sigma**2)``, and the training step t has
``sigma_t = sqrt((1 - alphas_cumprod[t]) / alphas_cumprod[t])``.

The sigma sequences reproduce, number for number, the ones diffusers' schedulers build in
``set_timesteps`` (same float32 alphas, same numpy index arithmetic), each ending with its final
sigma: 0, or sigma at alphas_cumprod[0] for DDIM/PNDM when ``set_alpha_to_one`` is False. Which
function serves which diffusers scheduler:

====================  ==========================================================================
``euler_sigmas``      EulerDiscrete, EulerAncestralDiscrete, HeunDiscrete (undoubled), LMSDiscrete
``ddim_sigmas``       DDIM, PNDM (final sigma: alphas_cumprod[0] unless set_alpha_to_one)
``ddpm_sigmas``       DDPM (final sigma 0)
``dpm_solver_sigmas`` DPMSolverMultistep, UniPCMultistep (steps + 1 spacing; Karras variant)
``lcm_sigmas``        LCM (subset of the 50-step distillation schedule)
====================  ==========================================================================
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from functools import cached_property

import numpy as np
import torch

BETA_SCHEDULES = ("scaled_linear", "linear", "squaredcos_cap_v2")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")
# diffusers config keys that change the noise or the prediction in ways latentforge does not
# implement, with the only value accepted for each
UNSUPPORTED_CONFIG = {"clip_sample": False, "thresholding": False}
# the last training step's signal level of a zero-terminal-SNR schedule, as diffusers' sigma-based schedulers
# set it (exactly 0 would make that sigma infinite)
ZERO_SNR_ALPHA_CUMPROD = 2.0**-24


@dataclass(frozen=True)
class NoiseSchedule:
    """A model's training noise schedule, as a diffusers ``scheduler_config.json`` describes it.

    Defaults are Stable Diffusion's published config (the one SD_DEFAULT is). Numbers follow
    diffusers' dtype choices: betas and alphas_cumprod are float32 tensors computed with the same
    torch operations, so they agree bit for bit. The tensor properties are computed once and shared:
    treat them as read-only."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"
    trained_betas: tuple[float, ...] | None = None  # overrides beta_start/end/schedule when given
    timestep_spacing: str = "leading"  # how `steps` timesteps are picked out of the training ones
    steps_offset: int = 1  # added to "leading" timesteps (SD: 1, so they end at t=1)
    set_alpha_to_one: bool = False  # DDIM/PNDM end at alphas_cumprod[0] (False) or at sigma 0 (True)
    # zero terminal SNR (Lin et al. 2023): betas rescaled so that the last step is pure noise
    rescale_betas_zero_snr: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.num_train_timesteps, bool) or not isinstance(self.num_train_timesteps, int):
            raise ValueError(f"num_train_timesteps must be an int, got {self.num_train_timesteps!r}")
        if self.num_train_timesteps < 2:
            raise ValueError(f"num_train_timesteps must be at least 2, got {self.num_train_timesteps}")
        for name in ("beta_start", "beta_end"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
                raise ValueError(f"{name} must be a number between 0 and 1, got {value!r}")
        for name in ("set_alpha_to_one", "rescale_betas_zero_snr"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if self.trained_betas is not None:
            betas = self.trained_betas
            if not isinstance(betas, (list, tuple)) or not all(
                isinstance(b, (int, float)) and not isinstance(b, bool) and 0 < b < 1 for b in betas
            ):
                raise ValueError("trained_betas must be a list of numbers between 0 and 1")
            object.__setattr__(self, "trained_betas", tuple(float(b) for b in betas))
            if len(self.trained_betas) != self.num_train_timesteps:
                raise ValueError(
                    f"trained_betas has {len(self.trained_betas)} values but num_train_timesteps is "
                    f"{self.num_train_timesteps}"
                )
        elif self.beta_schedule not in BETA_SCHEDULES:
            raise ValueError(f"beta_schedule must be one of {BETA_SCHEDULES}, got {self.beta_schedule!r}")
        if self.timestep_spacing not in TIMESTEP_SPACINGS:
            raise ValueError(f"timestep_spacing must be one of {TIMESTEP_SPACINGS}, got {self.timestep_spacing!r}")
        if isinstance(self.steps_offset, bool) or not isinstance(self.steps_offset, int) or self.steps_offset < 0:
            raise ValueError(f"steps_offset must be a non-negative int, got {self.steps_offset!r}")

    @classmethod
    def from_config(cls, config: dict) -> NoiseSchedule:
        """From a diffusers scheduler config dict (any scheduler class's). Keys that do not describe
        the noise schedule (``_class_name``, ``prediction_type``, ``skip_prk_steps``, ...) are
        ignored; missing ones take Stable Diffusion's values; a value latentforge does not
        implement is a ValueError naming the field."""
        for key, accepted in UNSUPPORTED_CONFIG.items():
            if config.get(key, accepted) not in (accepted, None):
                raise ValueError(f"scheduler config: {key}={config[key]!r} is not supported (only {accepted})")
        names = {f.name for f in fields(cls)}
        values = {k: v for k, v in config.items() if k in names and v is not None}
        for key in ("num_train_timesteps", "steps_offset"):  # JSON may give 1000.0
            if isinstance(values.get(key), float) and values[key].is_integer():
                values[key] = int(values[key])
        return cls(**values)

    # -- training schedule ------------------------------------------------------------------------

    @cached_property
    def betas(self) -> torch.Tensor:
        """(T,) float32, as diffusers builds them (rescaled to zero terminal SNR when asked)."""
        betas = self._base_betas()
        return _zero_terminal_snr(betas) if self.rescale_betas_zero_snr else betas

    def _base_betas(self) -> torch.Tensor:
        n = self.num_train_timesteps
        if self.trained_betas is not None:
            return torch.tensor(self.trained_betas, dtype=torch.float32)
        if self.beta_schedule == "linear":
            return torch.linspace(self.beta_start, self.beta_end, n, dtype=torch.float32)
        if self.beta_schedule == "scaled_linear":
            return torch.linspace(self.beta_start**0.5, self.beta_end**0.5, n, dtype=torch.float32) ** 2
        # squaredcos_cap_v2: Nichol & Dhariwal's cosine alpha-bar, each beta capped at 0.999
        betas = [min(1 - _cosine_alpha_bar((i + 1) / n) / _cosine_alpha_bar(i / n), 0.999) for i in range(n)]
        return torch.tensor(betas, dtype=torch.float32)

    @cached_property
    def alphas_cumprod(self) -> torch.Tensor:
        """(T,) float32 cumulative product of 1 - beta: the signal variance at each training step (a
        zero-terminal-SNR schedule's last one is ZERO_SNR_ALPHA_CUMPROD, so that every sigma is finite)."""
        alphas_cumprod = torch.cumprod(1.0 - self.betas, dim=0)
        if self.rescale_betas_zero_snr:
            alphas_cumprod[-1] = ZERO_SNR_ALPHA_CUMPROD
        return alphas_cumprod

    @cached_property
    def sigmas(self) -> torch.Tensor:
        """(T,) float32 training sigmas, index t (ascending): sqrt((1 - alphas_cumprod) / alphas_cumprod)."""
        return ((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5

    @cached_property
    def _sigma_table(self) -> torch.Tensor:
        return self.sigmas.to(torch.float64)

    @cached_property
    def _log_sigma_table(self) -> torch.Tensor:
        # float64 logs of the float32 sigmas, so that a sigma taken from the table maps back to its
        # exact integer t (diffusers takes float32 logs; the difference is below float32's t precision)
        return self._sigma_table.log()

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[-1])

    # -- timesteps --------------------------------------------------------------------------------

    def timesteps(self, n: int, *, rounded: bool = True) -> torch.Tensor:
        """The n training timesteps (descending) that DDIM, PNDM, DDPM and the Euler family pick for
        n steps under this schedule's ``timestep_spacing``: int64, or float32 when ``rounded`` is
        False (the Euler family keeps "linspace" timesteps fractional)."""
        t = _spaced_timesteps(self, n, rounded=rounded)
        return torch.from_numpy(t.astype(np.int64) if rounded else t.astype(np.float32))

    def sigma_to_t(self, sigma: torch.Tensor | float, interpolation: str = "log") -> torch.Tensor:
        """The (fractional) training timestep of a noise level, float32, same shape and device.

        "log" interpolates log sigma between the two neighbouring training sigmas (diffusers'
        ``_sigma_to_t``, used with Karras sigmas); "linear" interpolates sigma itself, the exact
        inverse of :meth:`t_to_sigma` (how the Euler family turns fractional timesteps into sigmas).
        Both give the integer t back for a sigma of the training table; sigmas outside the table
        clamp to 0 and T - 1."""
        device, value = _cpu_float64(sigma)
        if interpolation == "log":
            table = self._log_sigma_table
            value = value.clamp(min=1e-10).log()
        elif interpolation == "linear":
            table = self._sigma_table
        else:
            raise ValueError(f"interpolation must be 'log' or 'linear', got {interpolation!r}")
        low = torch.searchsorted(table, value.reshape(-1), right=True).reshape(value.shape) - 1
        low = low.clamp(0, len(table) - 2)
        lo, hi = table[low], table[low + 1]
        w = ((lo - value) / (lo - hi)).clamp(0, 1)
        return ((1 - w) * low + w * (low + 1)).to(device=device, dtype=torch.float32)

    def t_to_sigma(self, t: torch.Tensor | float) -> torch.Tensor:
        """Sigma at a (fractional) timestep by linear interpolation of the training sigmas (numpy's
        ``interp``, as diffusers does), float32."""
        device, t = _cpu_float64(t)
        table = self._sigma_table
        low = t.floor().clamp(0, len(table) - 2).long()
        w = (t - low).clamp(0, 1)
        return (table[low] + w * (table[low + 1] - table[low])).to(device=device, dtype=torch.float32)


def _cosine_alpha_bar(t: float) -> float:
    return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2


def _cpu_float64(value: torch.Tensor | float) -> tuple[torch.device, torch.Tensor]:
    """(the value's device, the value as float64 on the CPU): the table look-ups run in float64,
    which not every accelerator has, on a few numbers."""
    if isinstance(value, torch.Tensor):
        return value.device, value.detach().to(device="cpu", dtype=torch.float64)
    return torch.device("cpu"), torch.as_tensor(value, dtype=torch.float64)


SD_DEFAULT = NoiseSchedule()  # Stable Diffusion 1.x/2.x: scaled_linear 0.00085-0.012, leading, offset 1


# -- timestep picking (numpy, as diffusers does it, so that every rounding agrees) ---------------------


def _check_steps(schedule: NoiseSchedule, n: int) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= schedule.num_train_timesteps:
        raise ValueError(f"steps must be an int from 1 to {schedule.num_train_timesteps}, got {n!r}")


def _spaced_timesteps(schedule: NoiseSchedule, n: int, *, rounded: bool) -> np.ndarray:
    """n timesteps, descending, as DDIM/PNDM/DDPM (rounded) and Euler/Heun/LMS (not) pick them."""
    _check_steps(schedule, n)
    T = schedule.num_train_timesteps
    if schedule.timestep_spacing == "linspace":
        if rounded:
            return np.linspace(0, T - 1, n).round()[::-1].astype(np.int64)
        return np.linspace(0, T - 1, n, dtype=np.float32)[::-1].astype(np.float64)
    if schedule.timestep_spacing == "leading":
        return (np.arange(0, n) * (T // n)).round()[::-1].astype(np.int64) + schedule.steps_offset
    return np.round(np.arange(T, 0, -T / n)).astype(np.int64) - 1  # trailing


def _multistep_timesteps(schedule: NoiseSchedule, n: int) -> np.ndarray:
    """n timesteps as DPMSolverMultistep and UniPCMultistep pick them: "linspace" and "leading" divide
    the range into n + 1 parts and drop the last."""
    _check_steps(schedule, n)
    T = schedule.num_train_timesteps
    if schedule.timestep_spacing == "linspace":
        return np.linspace(0, T - 1, n + 1).round()[::-1][:-1].astype(np.int64)
    if schedule.timestep_spacing == "leading":
        step = T // (n + 1)
        return (np.arange(0, n + 1) * step).round()[::-1][:-1].astype(np.int64) + schedule.steps_offset
    return np.arange(T, 0, -T / n).round().astype(np.int64) - 1  # trailing


def _sigmas_at(schedule: NoiseSchedule, timesteps: np.ndarray) -> np.ndarray:
    """float64 sigmas at (fractional) timesteps, by numpy's linear interpolation like diffusers."""
    table = schedule.sigmas.numpy()
    return np.interp(timesteps, np.arange(len(table)), table)


def _with_final(sigmas: np.ndarray, final: float) -> torch.Tensor:
    return torch.from_numpy(np.concatenate([sigmas, [final]]).astype(np.float32))


# -- sigma sequences --------------------------------------------------------------------------------


def karras_sigmas(sigma_min: float, sigma_max: float, n: int, rho: float = 7.0) -> torch.Tensor:
    """Karras et al. (2022) noise levels: n values from sigma_max down to sigma_min, evenly spaced in
    sigma ** (1 / rho). float64, no final zero (diffusers' ``_convert_to_karras``)."""
    ramp = np.linspace(0, 1, n)
    min_inv_rho = sigma_min ** (1 / rho)
    max_inv_rho = sigma_max ** (1 / rho)
    return torch.from_numpy((max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho)


def euler_sigmas(schedule: NoiseSchedule, n: int, *, karras: bool = False) -> torch.Tensor:
    """(n + 1,) float32: EulerDiscrete / EulerAncestral / Heun / LMS sigmas, ending with 0.

    Timesteps stay fractional under "linspace" spacing, with sigma linearly interpolated between
    training sigmas. ``karras`` (diffusers' ``use_karras_sigmas``) spaces n sigmas between the first
    and last of those spaced sigmas (not the training extremes, unlike DPM-Solver)."""
    sigmas = _sigmas_at(schedule, _spaced_timesteps(schedule, n, rounded=False))
    if karras:
        sigmas = karras_sigmas(float(sigmas[-1]), float(sigmas[0]), n).numpy()
    return _with_final(sigmas, 0.0)


def ddim_sigmas(schedule: NoiseSchedule, n: int) -> torch.Tensor:
    """(n + 1,) float32: DDIM and PNDM sigmas. The last step goes to alphas_cumprod[0] (sigma of
    t=0, about 0.029 for SD), or to sigma 0 when ``set_alpha_to_one``; the pipeline divides the
    result by sqrt(1 + sigmas[-1]**2) to get the latents the VAE decodes."""
    sigmas = _sigmas_at(schedule, _spaced_timesteps(schedule, n, rounded=True))
    return _with_final(sigmas, 0.0 if schedule.set_alpha_to_one else float(schedule.sigmas[0]))


def ddpm_sigmas(schedule: NoiseSchedule, n: int) -> torch.Tensor:
    """(n + 1,) float32: DDPM sigmas, DDIM's timesteps but ending at sigma 0."""
    return _with_final(_sigmas_at(schedule, _spaced_timesteps(schedule, n, rounded=True)), 0.0)


def dpm_solver_sigmas(schedule: NoiseSchedule, n: int, *, karras: bool = False) -> torch.Tensor:
    """(n + 1,) float32: DPMSolverMultistep / UniPCMultistep sigmas, ending with 0.

    ``karras`` spaces n sigmas between the smallest and largest training sigma, whatever the
    spacing; diffusers then feeds the UNet round(sigma_to_t(sigma)) (unrounded for the
    squaredcos_cap_v2 schedule) while stepping with the unrounded Karras sigma."""
    if karras:
        _check_steps(schedule, n)
        sigmas = karras_sigmas(schedule.sigma_min, schedule.sigma_max, n).numpy()
    else:
        sigmas = _sigmas_at(schedule, _multistep_timesteps(schedule, n))
    return _with_final(sigmas, 0.0)


def lcm_timesteps(schedule: NoiseSchedule, n: int, original_steps: int = 50) -> torch.Tensor:
    """The n timesteps (descending, int64) LCMScheduler takes from the ``original_steps``-step
    schedule the model was distilled on; spacing and offset do not apply."""
    _check_steps(schedule, n)
    T = schedule.num_train_timesteps
    if not 1 <= original_steps <= T:
        raise ValueError(f"original_steps must be from 1 to {T}, got {original_steps}")
    if n > original_steps:
        raise ValueError(f"LCM takes at most original_steps={original_steps} steps, got {n}")
    origin = (np.arange(1, original_steps + 1) * (T // original_steps) - 1)[::-1]
    picks = np.floor(np.linspace(0, len(origin), num=n, endpoint=False)).astype(np.int64)
    return torch.from_numpy(origin[picks].copy())


def lcm_sigmas(schedule: NoiseSchedule, n: int, original_steps: int = 50) -> torch.Tensor:
    """(n + 1,) float32: LCM sigmas, ending with 0 (LCM's last step returns its clean estimate)."""
    return _with_final(_sigmas_at(schedule, lcm_timesteps(schedule, n, original_steps).numpy()), 0.0)


def _zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Betas rescaled so that the last step's signal is exactly zero and the first keeps its level: the
    square roots of alphas_cumprod shifted and stretched linearly (Lin et al. 2023, algorithm 1)."""
    root = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = root[0].clone(), root[-1].clone()
    root = (root - last) * (first / (first - last))
    alphas_cumprod = root**2
    alphas = torch.cat([alphas_cumprod[:1], alphas_cumprod[1:] / alphas_cumprod[:-1]])
    return 1.0 - alphas
