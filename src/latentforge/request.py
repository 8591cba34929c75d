"""A generation request, checked: every user-facing error of `generate` is raised here, before any work."""

from __future__ import annotations

import dataclasses
import math
import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from PIL import Image, ImageFilter

from .hires import Hires, check_upscaler
from .images import RESIZE_MODES, image_to_tensor, mask_to_tensor, resize_for, resize_mode_name
from .inpaint import PasteBack, fill, inpaint_area_name, masked_content_name
from .samplers import check_eta, get_sampler
from .seeds import SeedOptions, rng_source
from .speed import Shortcuts

if TYPE_CHECKING:
    from .pipeline import Pipeline

MAX_STEPS = 1000
MAX_BATCH = 64
MAX_SEED = 2**32 - 1
# Prompt and negative prompt each: some 2,000 CLIP tokens, 25-60 of the 75-token chunks the text encoder runs
# one by one, where a long hand-written prompt has 2-6 (a 1 MB prompt took 223 s and 3.8 GB). The worst text
# of this length, one 8,192-letter word, takes the tokenizer's BPE (quadratic in a word's length) ~1.4 s.
# The server refuses longer ones with this constant too.
MAX_PROMPT_CHARS = 8_192
# Guidance scales any sampler can use: 0 (the negative prompt alone) to 100 (ComfyUI's bound; AUTOMATIC1111's
# slider stops at 30, and images burn out well before 100). Beyond, the guided prediction overflows
# (1e308 made an all-black image); below 0 it steers away from the prompt, which no sampler is made for.
MIN_CFG_SCALE, MAX_CFG_SCALE = 0.0, 100.0
# Image size: each side at most MAX_SIDE pixels on any device (AUTOMATIC1111's API bound; its UI stops at
# 2048), and at most MAX_PIXELS pixels in all on the device: a UNet step grows with the square of the pixel
# count in attention, and an SD 1.5 step at 2048 x 2048 already takes minutes on a CPU.
MAX_SIDE = 4096
MAX_PIXELS = {"cpu": 2048 * 2048}  # per device type; any other device (CUDA, MPS): MAX_PIXELS_ACCELERATOR
MAX_PIXELS_ACCELERATOR = 4096 * 4096


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
    refiner: Pipeline | None = None  # the model that takes over at refiner_switch_at (SDXL's refiner)
    refiner_switch_at: float = 0.8
    loras: dict = field(default_factory=dict)  # {file path or library name: (text-encoder weight, UNet weight)}
    hires: Hires | None = None  # the hires fix's second pass (txt2img only)
    speed: Shortcuts = field(default_factory=Shortcuts)  # work skipped for speed (speed.py), none by default
    seeds: SeedOptions = field(default_factory=SeedOptions)  # A1111's variation seed and seed resize (seeds.py)
    tiling: bool = False  # A1111's "Tiling": convolutions pad circularly, so the image tiles seamlessly
    masked_content: str = "original"  # inpainting: what the masked part starts from (inpaint.MASKED_CONTENT)
    paste_back: PasteBack | None = None  # inpainting: the original put back over the result (inpaint.py)
    inpaint_padding: int = 32  # only masked: pixels around the mask's box
    mask_blur: int = 0  # inpainting: the mask's Gaussian blur radius, in pixels
    noise_multiplier: float = 1.0  # img2img: A1111's "Noise multiplier for img2img", on the noise added to the image
    eta: float | None = None  # the ancestral noise's share for the samplers that read one (None: their default)


def _loras(value: object) -> dict:
    """generate()'s loras: {path or name: weight or (te, unet)} -> {key: (te, unet)}, weights finite numbers."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ValueError(f"loras must be a dict of {{file or name: weight}}, got {type(value).__name__}")
    checked = {}
    for key, weight in value.items():
        if not isinstance(key, (str, os.PathLike)):
            raise ValueError(f"loras: a key must be a file path or a LoRA's name, got {key!r}")
        pair = weight if isinstance(weight, tuple) and len(weight) == 2 else (weight, weight)
        for number in pair:
            if isinstance(number, bool) or not isinstance(number, (int, float)) or not math.isfinite(number):
                raise ValueError(f"loras[{os.fspath(key)!r}] must be a weight or (te weight, unet weight), got {weight!r}")
        checked[key] = (float(pair[0]), float(pair[1]))
    return checked


def _int(name: str, value, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be a whole number, got {value!r}")
    if not low <= value <= high:
        raise ValueError(f"{name} must be between {low} and {high}, got {value}")
    return value


def _number(name: str, value, low: float, high: float, note: str = "") -> float:
    """A real number in [low, high] (not a bool, not NaN); `note` follows the bounds in the message."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise ValueError(f"{name} must be between {low:g} and {high:g}{note}, got {value!r}")
    return float(value)


def _size(name: str, value: int, multiple: int) -> int:
    if not isinstance(value, bool) and isinstance(value, int) and value > MAX_SIDE:
        raise ValueError(f"{name} {value} is too large: at most {MAX_SIDE} pixels a side")
    value = _int(name, value, multiple, MAX_SIDE)
    if value % multiple:
        raise ValueError(f"{name} must be a multiple of {multiple}, got {value}")
    return value


def max_pixels(device: torch.device) -> int:
    """The most pixels (width x height) an image may have on this device."""
    return MAX_PIXELS.get(device.type, MAX_PIXELS_ACCELERATOR)


def _check_pixels(width: int, height: int, device: torch.device) -> None:
    limit = max_pixels(device)
    if width * height > limit:
        side = math.isqrt(limit)
        where = "on the CPU" if device.type == "cpu" else f"on {device.type}"
        raise ValueError(
            f"{width}x{height} is too large {where}: at most {limit:,} pixels ({side}x{side}) there; "
            "choose a smaller width or height"
        )


def _prompt(name: str, value: object) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{name} must be a string, got {type(value).__name__}")
    if len(value) > MAX_PROMPT_CHARS:
        raise ValueError(f"{name} is {len(value):,} characters long: at most {MAX_PROMPT_CHARS:,}; shorten it")
    return value


def _cfg_scale(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"cfg_scale must be a finite number, got {value!r}")
    if not MIN_CFG_SCALE <= value <= MAX_CFG_SCALE:
        raise ValueError(
            f"cfg_scale must be between {MIN_CFG_SCALE:g} and {MAX_CFG_SCALE:g}, got {value:g} "
            "(1 = no guidance)"
        )
    return float(value)


def _given(value, default):
    """The value, or the model's default when it was left out (None)."""
    return default if value is None else value


def check_request(
    pipe,
    *,
    prompt: str,
    negative_prompt: str,
    steps: int | None,
    sampler: str | None,
    cfg_scale: float | None,
    seed: int | None,
    width: int | None,
    height: int | None,
    batch_size: int,
    init_image: Image.Image | None,
    strength: float,
    mask: Image.Image | None,
    clip_skip: int,
    refiner: Pipeline | None = None,
    refiner_switch_at: float = 0.8,
    loras: Mapping | None = None,
    hires: Hires | None = None,
    speed: Shortcuts | None = None,
    subseed: int | None = None,
    subseed_strength: float = 0.0,
    seed_resize_from: tuple[int, int] | None = None,
    tiling: bool = False,
    eta_noise_seed_delta: int = 0,
    resize_mode: str | int = "Just resize",
    masked_content: str | int = "original",
    inpaint_area: str | bool = "whole picture",
    inpaint_padding: int = 32,
    overlay: bool = False,
    mask_blur: int = 0,
    noise_multiplier: float = 1.0,
    eta: float | None = None,
    rng: str = "CPU",
) -> Request:
    """Validate `Pipeline.generate`'s arguments for `pipe` (its model and device); return them completed
    (seed, size, the model's defaults for None) and converted. A value given that cannot be used is a
    ValueError saying which and what would do; None means "not given"."""
    prompt, negative = _prompt("prompt", prompt), _prompt("negative_prompt", negative_prompt)
    defaults = pipe.config.defaults  # for the settings left out (None)
    steps = _int("steps", _given(steps, defaults.steps), 1, MAX_STEPS)
    sampler = _given(sampler, defaults.sampler)
    check_eta(get_sampler(sampler), eta)  # unknown names fail here, listing the known ones
    cfg = _cfg_scale(_given(cfg_scale, defaults.cfg_scale))
    seed = secrets.randbelow(MAX_SEED + 1) if seed is None else _int("seed", seed, 0, MAX_SEED)
    batch = _int("batch_size", batch_size, 1, MAX_BATCH)
    clip_skip = _int("clip_skip", clip_skip, 1, pipe.config.max_clip_skip)
    if pipe.config.refiner and init_image is None:
        raise ValueError(
            "an SDXL refiner continues an image: give it an init image (img2img), or use it as the refiner of an "
            "SDXL base model"
        )
    if refiner is not None:
        _check_refiner(pipe, refiner, refiner_switch_at, mask)

    init = init_image
    if mask is not None and init is None:
        raise ValueError("a mask needs an init_image to inpaint")
    if init is not None and not isinstance(init, Image.Image):
        raise ValueError(f"init_image must be a PIL image, got {type(init).__name__}")
    if mask is not None and not isinstance(mask, Image.Image):
        raise ValueError(f"mask must be a PIL image, got {type(mask).__name__}")
    if mask is not None and mask.size != init.size:
        raise ValueError(f"the mask is {mask.size[0]}x{mask.size[1]} but the image is {init.size[0]}x{init.size[1]}")
    content, only_masked = _inpaint_options(masked_content, inpaint_area, inpaint_padding, overlay, mask)
    if _int("mask_blur", mask_blur, 0, 256) and mask is not None:  # A1111's: at the mask's own size, first
        mask = mask.convert("L").filter(ImageFilter.GaussianBlur(mask_blur))
    multiple = pipe.config.vae.downscale
    width, height = _generation_size(pipe, width, height, None if only_masked else init)
    _number("strength", strength, 0, 1)
    _number("noise_multiplier", noise_multiplier, 0, 2, " (1: as drawn)")
    if noise_multiplier != 1 and init is None:
        raise ValueError("noise_multiplier is for img2img (the noise added to an init image): give an init_image")
    if init is not None and int(steps * strength) < 1:
        raise ValueError(
            f"strength {strength} with {steps} steps runs no denoising step (steps x strength < 1); "
            "raise the strength or the steps"
        )
    if hires is not None:
        _check_hires(pipe, hires, width, height, steps, init)
        if hires.sampler is not None:
            check_eta(get_sampler(hires.sampler), eta)
    speed = _speed(pipe, speed, refiner)
    seeds = _seed_options(subseed, subseed_strength, seed_resize_from, multiple, eta_noise_seed_delta, rng)
    _check_tiling(tiling, [pipe, refiner])
    mode = resize_mode_name(resize_mode)  # a bad one is refused in txt2img too
    image_tensor = mask_tensor = paste = None
    if init is not None:
        if only_masked:  # the box around the mask, cut out and scaled to the generation size
            paste = PasteBack.cut(init, mask, inpaint_padding, (width, height))
            init, mask = paste.crops((width, height))
        else:
            init, mask = _resized(pipe, init, mask, (width, height), mode)
            paste = PasteBack.overlay(init, mask) if overlay and mask is not None else None
        if mask is not None and content != "original":  # A1111 fills for every masked content but the original
            init = fill(init, mask)
        image_tensor = image_to_tensor(init.convert("RGB"))
        mask_tensor = None if mask is None else mask_to_tensor(mask)
    return Request(
        prompt=prompt,
        negative_prompt=negative,
        steps=steps,
        sampler=sampler,
        cfg_scale=cfg,
        seed=seed,
        width=width,
        height=height,
        batch_size=batch,
        strength=float(strength),
        clip_skip=clip_skip,
        init_image=init,
        image_tensor=image_tensor,
        mask_tensor=mask_tensor,
        refiner=refiner,
        refiner_switch_at=float(refiner_switch_at),
        loras=_loras(loras),
        hires=hires,
        speed=speed,
        seeds=seeds,
        tiling=tiling,
        masked_content=content,
        paste_back=paste,
        inpaint_padding=inpaint_padding,
        mask_blur=mask_blur,
        noise_multiplier=float(noise_multiplier),
        eta=None if eta is None else float(eta),
    )


def _check_tiling(tiling: object, pipes: list) -> None:
    """Tiling is True or False; a VAE decoding in tiles would wrap each tile on itself, so not with it."""
    if _bool("tiling", tiling) and any(pipe is not None and pipe.vae_tiling for pipe in pipes):
        raise ValueError(
            "tiling (an image that tiles seamlessly) cannot be made with VAE tiling, whose tiles would each wrap "
            "around on themselves: turn vae_tiling (--vae-tiling) off"
        )


def _generation_size(pipe, width: object, height: object, init: Image.Image | None) -> tuple[int, int]:
    """The size asked for; a side left out is the init image's (when given), else the model's native one."""
    multiple, sides = pipe.config.vae.downscale, []
    for i, (name, given) in enumerate((("width", width), ("height", height))):
        if given is not None:
            sides.append(_size(name, given, multiple))
        elif init is not None:
            try:
                sides.append(_size(f"the init image's {name}", init.size[i], multiple))
            except ValueError as e:
                raise ValueError(f"{e}; give a width and height to resize it to") from None
        else:
            sides.append(_size(name, pipe.config.native_size, multiple))
    _check_pixels(*sides, pipe.device)
    return sides[0], sides[1]


def _resized(pipe, init: Image.Image, mask, size: tuple[int, int], mode: str):
    """The init image and mask at the generation size by the resize mode (the latent upscale keeps the image's
    own size: Pipeline._sample upscales its latents)."""
    _check_latent_upscale(pipe, mode, init, mask)
    if mode != RESIZE_MODES[3]:
        init = resize_for(init.convert("RGB"), size, mode)
    return init, None if mask is None else resize_for(mask, size, mode, Image.NEAREST)


def _bool(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return value


def _inpaint_options(content: object, area: object, padding: object, overlay: object, mask) -> tuple[str, bool]:
    """(masked content, whether only the masked part is painted); other than the defaults only with a mask."""
    content, area = masked_content_name(content), inpaint_area_name(area)
    _int("inpaint_padding", padding, 0, MAX_SIDE)
    _bool("overlay", overlay)
    if mask is None and (content != "original" or area != "whole picture"):
        raise ValueError("masked_content and inpaint_area are for inpainting: give a mask (and an init_image)")
    return content, area == "only masked"


def _check_latent_upscale(pipe, mode: str, init: Image.Image, mask: Image.Image | None) -> None:
    """The latent upscale encodes the image at its own size, which must suit the VAE, and has no mask or
    inpainting model to resize along."""
    if mode != RESIZE_MODES[3]:
        return
    if mask is not None or pipe.config.inpainting:
        raise ValueError(f"resize_mode {mode!r} is for img2img without a mask or an inpainting model; use another")
    for i, name in enumerate(("width", "height")):
        _size(f"with {mode!r}, the init image's {name}", init.size[i], pipe.config.vae.downscale)
    _check_pixels(*init.size, pipe.device)  # the VAE encodes it at that size


def _seed_options(
    subseed: object, strength: object, resize_from: object, multiple: int, delta: object, rng: object
) -> SeedOptions:
    """A1111's variation seed (None: a random one) and strength, the size to resize the seed from, the eta
    noise seed delta and the random source."""
    _number("subseed_strength", strength, 0, 1, " (0: no variation)")
    subseed = secrets.randbelow(MAX_SEED + 1) if subseed is None else _int("subseed", subseed, 0, MAX_SEED)
    if resize_from is not None:
        if not isinstance(resize_from, (tuple, list)) or len(resize_from) != 2:
            raise ValueError(f"seed_resize_from must be (width, height) in pixels, got {resize_from!r}")
        resize_from = (
            _size("seed_resize_from's width", resize_from[0], multiple),
            _size("seed_resize_from's height", resize_from[1], multiple),
        )
    delta = _int("eta_noise_seed_delta", delta, 0, MAX_SEED)
    return SeedOptions(subseed, float(strength), resize_from, delta, rng_source(rng))


def _speed(pipe, speed: object, refiner=None) -> Shortcuts:
    """The speed options (None: none); DeepCache's depth must leave the UNet deep blocks to skip, and the model
    that decodes (the refiner, when there is one) must have a tiny decoder to decode with it ("auto": used when
    it has)."""
    if speed is None:
        return Shortcuts()
    if not isinstance(speed, Shortcuts):
        raise ValueError(f"speed must be a latentforge.speed.Shortcuts, got {type(speed).__name__}")
    blocks = len(pipe.unet.input_blocks)
    if speed.deepcache_interval > 1 and speed.deepcache_depth >= blocks:
        raise ValueError(f"deepcache_depth must be below this UNet's {blocks} input blocks, got {speed.deepcache_depth}")
    decoder = refiner or pipe
    if speed.tiny_decoder == "auto":
        speed = dataclasses.replace(speed, tiny_decoder=decoder.tiny_decoder is not None)
    if speed.tiny_decoder and decoder.tiny_decoder is None:
        raise ValueError("tiny_decoder: no tiny decoder is loaded for this model; load one (--tiny-decoder FILE, "
                         "a taesd_decoder file for SD 1.x/2.x, taesdxl_decoder for SDXL)")
    return speed


def _check_hires(pipe, hires: object, width: int, height: int, steps: int, init: object) -> None:
    """The hires fix is a txt2img second pass that fits the limits, runs at least one step, and has an
    upscaler that exists."""
    if not isinstance(hires, Hires):
        raise ValueError(f"hires must be a latentforge.hires.Hires, got {type(hires).__name__}")
    if init is not None:
        raise ValueError("the hires fix is for txt2img; for img2img give the larger size and the image directly")
    larger = hires.size(width, height, pipe.config.vae.downscale)
    for name, side in zip(("hires width", "hires height"), larger, strict=True):
        if side > MAX_SIDE:
            raise ValueError(f"{name} {side} is too large: at most {MAX_SIDE} pixels a side; lower hr_scale")
    _check_pixels(*larger, pipe.device)
    hr_steps = hires.steps or steps
    _int("hr_second_pass_steps", hr_steps, 1, MAX_STEPS)
    if int(hr_steps * hires.denoising_strength) < 1:
        raise ValueError(
            f"hr_second_pass_steps {hr_steps} x denoising_strength {hires.denoising_strength} runs no step of the "
            "hires pass; raise either"
        )
    if hires.sampler is not None:
        get_sampler(hires.sampler)
    if hires.cfg_scale is not None:
        _cfg_scale(hires.cfg_scale)
    for name, text in (("hr_prompt", hires.prompt), ("hr_negative_prompt", hires.negative_prompt)):
        if text is not None:
            _prompt(name, text)
    check_upscaler(hires.upscaler, pipe.upscalers)


def _check_refiner(pipe, refiner, switch_at: object, mask: object) -> None:
    """A refiner must work in the same latent space as the model it continues (same VAE scale and channels,
    a plain 4-channel UNet), and takes over at a fraction of the schedule strictly between 0 and 1."""
    from .pipeline import Pipeline  # the pipeline imports this module

    if not isinstance(refiner, Pipeline):
        raise ValueError(f"refiner must be a loaded model (latentforge.load), got {type(refiner).__name__}")
    ours, theirs = pipe.config, refiner.config
    if (ours.vae.latent_channels, ours.vae.scaling_factor) != (theirs.vae.latent_channels, theirs.vae.scaling_factor):
        raise ValueError(
            f"the refiner{' ' + refiner.name if refiner.name else ''} ({theirs.describe()}) works in another latent "
            f"space than this {ours.describe()} model (VAE scale {theirs.vae.scaling_factor:g} vs "
            f"{ours.vae.scaling_factor:g}); "
            "use a refiner of the same family (SDXL's for an SDXL model)"
        )
    if theirs.inpainting:
        raise ValueError("an inpainting model cannot be a refiner: it needs a mask and an image of its own")
    if mask is not None and ours.inpainting:
        raise ValueError(
            "an inpainting model with a refiner is not supported yet; inpaint with the inpainting model alone, or "
            "with the base model and the refiner"
        )
    if isinstance(switch_at, bool) or not isinstance(switch_at, (int, float)) or not 0 < switch_at < 1:
        raise ValueError(f"refiner_switch_at must be a fraction between 0 and 1 (exclusive), got {switch_at!r}")
