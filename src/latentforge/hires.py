"""AUTOMATIC1111's hires fix: a txt2img image made at the model's size, upscaled, and refined by a second,
img2img pass at the larger size with the same seed.

The upscale is either of the latents (A1111's "Latent" modes: torch interpolation of the first pass's
latents, no decode) or of the decoded image ("None", "Lanczos", "Nearest", or an upscaler model by name),
which is then encoded again. The second pass runs `int(steps * denoising_strength)` steps, as every
img2img here does (`steps` = `hr_second_pass_steps`, or the first pass's steps when 0).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from PIL import Image

from .samplers import get_sampler
from .upscalers import BUILT_IN, LATENT_UPSCALE_MODES as LATENT_MODES, Upscalers, upscale

MAX_SCALE = 8.0


@dataclass(frozen=True)
class Hires:
    """The second pass's settings (A1111's request fields in brackets); None means "as the first pass"."""

    scale: float = 2.0  # hr_scale: the first pass's size times this
    resize: tuple[int, int] | None = None  # (hr_resize_x, hr_resize_y): this size instead of the scale
    upscaler: str = "Latent"  # hr_upscaler
    steps: int = 0  # hr_second_pass_steps; 0: the first pass's steps
    denoising_strength: float = 0.7
    sampler: str | None = None  # hr_sampler_name
    prompt: str | None = None  # hr_prompt
    negative_prompt: str | None = None  # hr_negative_prompt
    cfg_scale: float | None = None  # hr_cfg

    def __post_init__(self) -> None:
        if isinstance(self.scale, bool) or not isinstance(self.scale, (int, float)) or not 1 <= self.scale <= MAX_SCALE:
            raise ValueError(f"hr_scale must be between 1 and {MAX_SCALE:g}, got {self.scale!r}")
        if self.resize is not None:
            if len(self.resize) != 2 or any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in self.resize):
                raise ValueError(f"hr_resize_x / hr_resize_y must be whole numbers of pixels, got {self.resize!r}")
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 0:
            raise ValueError(f"hr_second_pass_steps must be a whole number >= 0 (0: the first pass's), got {self.steps!r}")
        strength = self.denoising_strength
        if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0 < strength <= 1:
            raise ValueError(f"denoising_strength must be above 0 and at most 1 for the hires fix, got {strength!r}")

    @property
    def latent(self) -> bool:
        return self.upscaler in LATENT_MODES

    def size(self, width: int, height: int, multiple: int = 8) -> tuple[int, int]:
        """The second pass's (width, height): the resize (one side 0: kept in proportion), else the scaled
        size; rounded down to the VAE's multiple (A1111 truncates to whole pixels)."""
        if self.resize is not None and any(self.resize):
            w, h = self.resize
            w = w or round(width * h / height)
            h = h or round(height * w / width)
        else:
            w, h = int(width * self.scale), int(height * self.scale)
        return max(multiple, w // multiple * multiple), max(multiple, h // multiple * multiple)

    def infotext(self, steps: int, sampler: str, cfg_scale: float, prompt: str, negative: str) -> dict[str, object]:
        """A1111's infotext entries of the hires fix after its "Denoising strength" (its spelling and order),
        given the first pass's settings."""
        entries: dict[str, object] = {}
        if self.resize is not None and any(self.resize):
            entries["Hires resize"] = f"{self.resize[0]}x{self.resize[1]}"
        else:
            entries["Hires upscale"] = self.scale
        if self.steps:
            entries["Hires steps"] = self.steps
        entries["Hires upscaler"] = self.upscaler
        if self.sampler and get_sampler(self.sampler).a1111_name != sampler:
            entries["Hires sampler"] = get_sampler(self.sampler).a1111_name
        if self.prompt is not None and self.prompt != prompt:
            entries["Hires prompt"] = self.prompt
        if self.negative_prompt is not None and self.negative_prompt != negative:
            entries["Hires negative prompt"] = self.negative_prompt
        if self.cfg_scale is not None and self.cfg_scale != cfg_scale:
            entries["Hires CFG Scale"] = self.cfg_scale
        return entries


def from_infotext(params: Mapping[str, str]) -> Hires | None:
    """The hires fix an infotext (parse_infotext's dict) describes, or None if it has none."""
    if "Hires upscale" not in params and "Hires resize" not in params and "Hires upscaler" not in params:
        return None
    values: dict[str, object] = {}
    if "Hires upscale" in params:
        values["scale"] = float(params["Hires upscale"])
    if "Hires resize-1" in params:
        values["resize"] = (int(params["Hires resize-1"]), int(params["Hires resize-2"]))
    readers: dict[str, tuple[str, Callable[[str], object]]] = {
        "Hires steps": ("steps", int), "Hires upscaler": ("upscaler", str), "Denoising strength": ("denoising_strength", float),
        "Hires sampler": ("sampler", str), "Hires prompt": ("prompt", str), "Hires negative prompt": ("negative_prompt", str),
        "Hires CFG Scale": ("cfg_scale", float),
    }  # fmt: skip
    for key, (name, cast) in readers.items():
        if key in params:
            values[name] = cast(params[key])
    return Hires(**values)


def upscale_latents(latents: torch.Tensor, mode: str, size: tuple[int, int]) -> torch.Tensor:
    """(B, C, h, w) latents -> (B, C, H, W) by one of A1111's latent modes (`size` = (H, W))."""
    method, antialias = LATENT_MODES[mode]
    kwargs = {"align_corners": False} if method in ("bilinear", "bicubic") else {}
    return F.interpolate(latents.float(), size=size, mode=method, antialias=antialias, **kwargs).to(latents.dtype)


def check_upscaler(name: object, upscalers: Upscalers | None = None) -> None:
    """A hires upscaler's name must be a latent mode, a built-in image upscaler or a model file's name in
    `upscalers`; one line listing them."""
    known = [*LATENT_MODES, *(upscalers.names() if upscalers is not None else BUILT_IN)]
    if name not in known:
        raise ValueError(f"unknown hires upscaler {name!r}; known: {', '.join(known)}")


def upscale_image(image: Image.Image, upscaler: str, size: tuple[int, int], upscalers: Upscalers) -> Image.Image:
    """The first pass's image at `size` (width, height) by a built-in upscaler or a model file of
    `upscalers` (see upscalers.upscale)."""
    return upscale(image, upscalers.get(upscaler), size=size)
