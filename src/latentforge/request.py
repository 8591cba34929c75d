"""A generation request, checked: every user-facing error of `generate` is raised here, before any work."""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass

import torch
from PIL import Image

from .images import image_to_tensor, mask_to_tensor
from .samplers import get_sampler

MAX_PIXELS = 4096 * 4096  # beyond this a request is refused before anything is allocated
MAX_STEPS = 1000
MAX_BATCH = 64
MAX_SEED = 2**32 - 1


@dataclass(frozen=True)
class Request:
    prompt: str
    negative_prompt: str
    steps: int
    sampler: str
    cfg_scale: float
    seed: int
    width: int
    height: int
    batch_size: int
    strength: float
    clip_skip: int
    init_image: Image.Image | None
    image_tensor: torch.Tensor | None  # (1, 3, H, W) in [-1, 1]
    mask_tensor: torch.Tensor | None  # (1, 1, H, W), 1 = repaint


def _int(name: str, value, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be a whole number, got {value!r}")
    if not low <= value <= high:
        raise ValueError(f"{name} must be between {low} and {high}, got {value}")
    return value


def _size(name: str, value: int, multiple: int) -> int:
    value = _int(name, value, multiple, 65536)
    if value % multiple:
        raise ValueError(f"{name} must be a multiple of {multiple}, got {value}")
    return value


def _given(value, default):
    """The value, or the model's default when it was left out (None)."""
    return default if value is None else value


def check_request(pipe, args: dict) -> Request:
    """Validate `Pipeline.generate`'s arguments; return them completed (seed, size) and converted."""
    prompt, negative = args["prompt"], args["negative_prompt"]
    if not isinstance(prompt, str) or not isinstance(negative, str):
        raise ValueError("prompt and negative_prompt must be strings")
    defaults = pipe.config.defaults  # for the settings left out (None)
    steps = _int("steps", _given(args["steps"], defaults.steps), 1, MAX_STEPS)
    sampler = _given(args["sampler"], defaults.sampler)
    get_sampler(sampler)  # unknown names fail here, listing the known ones
    cfg = _given(args["cfg_scale"], defaults.cfg_scale)
    if isinstance(cfg, bool) or not isinstance(cfg, (int, float)) or not math.isfinite(cfg):
        raise ValueError(f"cfg_scale must be a finite number, got {cfg!r}")
    seed = args["seed"]
    seed = secrets.randbelow(MAX_SEED + 1) if seed is None else _int("seed", seed, 0, MAX_SEED)
    batch = _int("batch_size", args["batch_size"], 1, MAX_BATCH)
    clip_skip = _int("clip_skip", args["clip_skip"], 1, pipe.config.text_encoder.layers)

    init, mask = args["init_image"], args["mask"]
    if mask is not None and init is None:
        raise ValueError("a mask needs an init_image to inpaint")
    if init is not None and not isinstance(init, Image.Image):
        raise ValueError(f"init_image must be a PIL image, got {type(init).__name__}")
    if mask is not None and mask.size != init.size:
        raise ValueError(f"the mask is {mask.size[0]}x{mask.size[1]} but the image is {init.size[0]}x{init.size[1]}")
    native = pipe.config.native_size
    width = args["width"] or (init.size[0] if init is not None else native)
    height = args["height"] or (init.size[1] if init is not None else native)
    multiple = pipe.config.vae.downscale
    width, height = _size("width", width, multiple), _size("height", height, multiple)
    if width * height > MAX_PIXELS:
        raise ValueError(f"{width}x{height} is too large: at most {MAX_PIXELS} pixels (4096x4096)")

    strength = args["strength"]
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must be between 0 and 1, got {strength!r}")
    if init is not None and int(steps * strength) < 1:
        raise ValueError(
            f"strength {strength} with {steps} steps runs no denoising step (steps x strength < 1); "
            "raise the strength or the steps"
        )
    image_tensor = mask_tensor = None
    if init is not None:
        # an explicit width/height different from the image's asks for the image at that size
        init = init.convert("RGB").resize((width, height), Image.LANCZOS) if init.size != (width, height) else init
        image_tensor = image_to_tensor(init.convert("RGB"))
        if mask is not None:
            mask = mask.resize((width, height), Image.NEAREST) if mask.size != (width, height) else mask
            mask_tensor = mask_to_tensor(mask)
    return Request(
        prompt=prompt,
        negative_prompt=negative,
        steps=steps,
        sampler=sampler,
        cfg_scale=float(cfg),
        seed=seed,
        width=width,
        height=height,
        batch_size=batch,
        strength=float(strength),
        clip_skip=clip_skip,
        init_image=init,
        image_tensor=image_tensor,
        mask_tensor=mask_tensor,
    )
