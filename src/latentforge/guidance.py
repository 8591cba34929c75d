"""The denoiser the samplers call: the UNet behind k-diffusion's interface, with classifier-free guidance.

Samplers see latents in sigma form (x = x0 + sigma * noise) and ask `denoise(x, sigma) -> x0`. This is
the one place that knows how the UNet was trained: its input scaling, its timesteps, and whether it
predicts the noise (epsilon) or v.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .conditioning import Cond
from .unet import UNet

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class Guidance:
    """What the UNet is asked about: the prompt's conditioning, and the negative prompt's when guiding."""

    cond: Cond  # batch of 1
    uncond: Cond | None  # same shapes; None when cfg_scale == 1 (no unconditional pass)
    cfg_scale: float = 7.5
    # inpainting UNet: mask (1, 1, h, w) and masked-image latents (1, 4, h, w), appended to its input
    inpaint_extra: torch.Tensor | None = None


def make_denoiser(
    unet: UNet, timestep: Callable[[torch.Tensor], torch.Tensor], prediction_type: str, guidance: Guidance
) -> Denoiser:
    """A denoiser (x (1,4,h,w) in sigma form, sigma 0-d) -> predicted x0, guided by `guidance`.
    `timestep` turns a sigma into the UNet's timestep, the way the chosen sampler's schedule does."""
    # both passes in one UNet batch; unconditional first, as diffusers orders them
    both = guidance.cond if guidance.uncond is None else Cond.cat([guidance.uncond, guidance.cond])

    def denoise(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        sigma = torch.as_tensor(sigma, dtype=torch.float32)
        c_in = 1.0 / torch.sqrt(sigma**2 + 1.0)
        t = timestep(sigma)
        x_in = (x * c_in).to(unet_dtype(unet))
        if guidance.inpaint_extra is not None:
            x_in = torch.cat([x_in, guidance.inpaint_extra.to(x_in.dtype)], dim=1)
        if guidance.uncond is None:
            out = unet(x_in, t, both.context, both.vector).float()
        else:
            uncond, conditional = unet(torch.cat([x_in, x_in]), t, both.context, both.vector).float().chunk(2)
            out = uncond + guidance.cfg_scale * (conditional - uncond)
        return to_x0(out, x, sigma, prediction_type)

    return denoise


def to_x0(model_out: torch.Tensor, x: torch.Tensor, sigma: torch.Tensor, prediction_type: str) -> torch.Tensor:
    """The UNet's prediction (noise or v) -> the predicted clean latents, for x in sigma form."""
    if prediction_type == "epsilon":
        return x - sigma * model_out
    # v = alpha * noise - sigma_vp * x0 in the variance-preserving form; in sigma form that gives
    # x0 = x / (sigma^2 + 1) - v * sigma / sqrt(sigma^2 + 1)
    return x / (sigma**2 + 1) - model_out * sigma / torch.sqrt(sigma**2 + 1)


def unet_dtype(unet: UNet) -> torch.dtype:
    return unet.out[2].weight.dtype
