"""The denoiser the samplers call: the UNet behind k-diffusion's interface, with classifier-free guidance.

Samplers see latents in sigma form (x = x0 + sigma * noise) and ask `denoise(x, sigma) -> x0`. This is
the one place that knows how the UNet was trained: its input scaling, its timesteps, and whether it
predicts the noise (epsilon) or v.

Guidance may change from step to step (A1111's prompt editing and alternation, `prompt_schedule`); the
samplers stay unaware of it: the denoiser tells the step of each call from its sigma.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .conditioning import Cond
from .prompt_schedule import PromptPlan
from .speed import Shortcuts, StepCache
from .unet import UNet

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class Guidance:
    """What the UNet is asked about: the prompt's conditioning, and the negative prompt's when guiding.

    With composable diffusion (A1111's ``AND``) `cond` holds one row per sub-prompt and `weights` their
    weights; the guided prediction is uncond + sum_k weight_k * cfg_scale * (cond_k - uncond)."""

    cond: Cond  # batch of 1, or of k sub-prompts
    uncond: Cond | None  # batch of 1, same shapes; None when cfg_scale == 1 (no unconditional pass)
    cfg_scale: float = 7.5
    # inpainting UNet: mask (1, 1, h, w) and masked-image latents (1, 4, h, w), appended to its input
    inpaint_extra: torch.Tensor | None = None
    weights: tuple[float, ...] = (1.0,)  # one per row of cond

    def __post_init__(self) -> None:
        if len(self.weights) != self.cond.context.shape[0]:
            raise ValueError(f"{len(self.weights)} weights for {self.cond.context.shape[0]} conditioning rows")
        if self.uncond is None and self.weights != (1.0,):
            raise ValueError("composing sub-prompts (AND, or a weight other than 1) needs the unconditional pass")


@dataclass(frozen=True)
class PromptConds:
    """A `PromptPlan` with its texts encoded: `cond` has a row per ``plan.texts``, `uncond` one per
    ``plan.negatives`` (None when not guiding)."""

    plan: PromptPlan
    cond: Cond
    uncond: Cond | None

    def guidance(self, cfg_scale: float, inpaint_extra: torch.Tensor | None = None) -> Guidance | Callable[[int], Guidance]:
        """One Guidance for every step when the plan never changes, else a function sampler step -> Guidance
        (one object per distinct combination, so the denoiser batches each once)."""
        if self.plan.fixed:
            return Guidance(self.cond, self.uncond, cfg_scale, inpaint_extra)
        made: dict[tuple, Guidance] = {}

        def at(step: int) -> Guidance:
            key = self.plan.at(step)
            if key not in made:
                parts, negative = key
                uncond = None if self.uncond is None else self.uncond.rows([negative])
                weights = tuple(weight for _, weight in parts)
                made[key] = Guidance(self.cond.rows([i for i, _ in parts]), uncond, cfg_scale, inpaint_extra, weights)
            return made[key]

        return at


def step_of(sigmas: torch.Tensor, sigma: torch.Tensor) -> int:
    """The sampler step a denoiser call at `sigma` belongs to: the last i with sigmas[i] >= sigma. A
    second-order sampler's second call of step i, at sigmas[i + 1], counts as step i + 1: what A1111's
    per-call counter gives over its schedule of twice the steps (for every `when` it makes even)."""
    return max(int((sigmas >= torch.as_tensor(sigma, dtype=sigmas.dtype)).sum()) - 1, 0)


def make_denoiser(
    unet: UNet,
    timestep: Callable[[torch.Tensor], torch.Tensor],
    prediction_type: str,
    guidance: Guidance | Callable[[int], Guidance],
    sigmas: torch.Tensor | None = None,
    shortcuts: Shortcuts | None = None,
) -> Denoiser:
    """A denoiser (x (1,4,h,w) in sigma form, sigma 0-d) -> predicted x0, guided by `guidance`.
    `timestep` turns a sigma into the UNet's timestep, the way the chosen sampler's schedule does.
    `guidance` may be a function of the sampler step (`PromptConds.guidance`); then `sigmas`, the whole
    run's (all parts of a refiner split), tell each call's step (`step_of`). `shortcuts` (speed.py) may leave
    the unconditional pass out of some steps (they need `sigmas` too) and reuse deep UNet features."""
    shortcuts = shortcuts or Shortcuts()
    # the step of a call is needed by guidance that changes per step, and by skipped unconditional passes
    needs_step = not isinstance(guidance, Guidance) or bool(shortcuts.s_min_uncond or shortcuts.skip_early_cfg)
    if needs_step and sigmas is None:
        raise ValueError("guidance that changes per step needs the run's sigmas to tell the step")
    batches: dict[int, tuple[Guidance, Cond]] = {}  # by id; the Guidance is kept so that its id stays its own
    cache = StepCache(shortcuts.deepcache_interval, shortcuts.deepcache_depth) if shortcuts.deepcache_interval > 1 else None

    def batched(g: Guidance) -> Cond:
        # all passes in one UNet batch; unconditional first, as diffusers orders them
        if id(g) not in batches:
            batches[id(g)] = (g, g.cond if g.uncond is None else Cond.cat([g.uncond, g.cond]))
        return batches[id(g)][1]

    def run(x_in: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        if cache is None:
            return unet(x_in, t, cond.context, cond.vector).float()
        return unet(x_in, t, cond.context, cond.vector, cache.next_call(len(x_in))).float()

    def denoise(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        step = step_of(sigmas, sigma) if needs_step else None
        g = guidance if isinstance(guidance, Guidance) else guidance(step)
        sigma = torch.as_tensor(sigma, dtype=torch.float32)
        c_in = 1.0 / torch.sqrt(sigma**2 + 1.0)
        t = timestep(sigma)
        x_in = (x * c_in).to(unet_dtype(unet))
        if g.inpaint_extra is not None:
            x_in = torch.cat([x_in, g.inpaint_extra.to(x_in.dtype)], dim=1)
        if g.uncond is None or (g.weights == (1.0,) and skips(step, float(sigma))):
            out = run(x_in, t, g.cond)  # the prompt alone: unguided, or a step whose unconditional pass is skipped
        elif g.weights == (1.0,):
            uncond, conditional = run(torch.cat([x_in, x_in]), t, batched(g)).chunk(2)
            out = uncond + g.cfg_scale * (conditional - uncond)
        else:
            uncond, *conditional = run(torch.cat([x_in] * (1 + len(g.weights))), t, batched(g))
            out = combine(uncond[None], [c[None] for c in conditional], g.weights, g.cfg_scale)
        return to_x0(out, x, sigma, prediction_type)

    def skips(step: int | None, sigma: float) -> bool:
        # a whole DeepCache call keeps the unconditional pass: with it skipped, its features would lack the
        # rows the next guided call reuses, and that call would have to run whole as well
        whole = cache is not None and cache.due()
        return step is not None and not whole and shortcuts.skips_uncond(step, len(sigmas) - 1, sigma)

    return denoise


def combine(uncond: torch.Tensor, conds: list[torch.Tensor], weights: tuple[float, ...], cfg_scale: float) -> torch.Tensor:
    """Composable diffusion's guided prediction, as A1111 sums it: uncond + sum_k (cond_k - uncond) * (w_k * cfg)."""
    out = uncond
    for cond, weight in zip(conds, weights):
        out = out + (cond - uncond) * (weight * cfg_scale)
    return out


def to_x0(model_out: torch.Tensor, x: torch.Tensor, sigma: torch.Tensor, prediction_type: str) -> torch.Tensor:
    """The UNet's prediction (noise or v) -> the predicted clean latents, for x in sigma form."""
    if prediction_type == "epsilon":
        return x - sigma * model_out
    # v = alpha * noise - sigma_vp * x0 in the variance-preserving form; in sigma form that gives
    # x0 = x / (sigma^2 + 1) - v * sigma / sqrt(sigma^2 + 1)
    return x / (sigma**2 + 1) - model_out * sigma / torch.sqrt(sigma**2 + 1)


def unet_dtype(unet: UNet) -> torch.dtype:
    return unet.out[2].weight.dtype
