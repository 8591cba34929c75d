"""AUTOMATIC1111's requests turned into generate() calls, and the results into its responses."""

from __future__ import annotations

import base64
import binascii
import dataclasses
import functools
import html
import json
import re
import secrets
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from PIL import Image, ImageOps
from pydantic import BaseModel, ConfigDict, Field

from .. import __version__, images, infotext, pngfiles
from ..adapters.library import Library
from ..hires import Hires, check_upscaler
from ..request import MAX_BATCH, MAX_PROMPT_CHARS, MAX_SEED
from ..samplers import SPECS, get_sampler
from ..speed import Shortcuts, preset
from ..styles import Style, apply_styles
from ..upscalers import Upscaler, Upscalers, passes, target_size, upscale
from .jobs import Job, ModelEntry, Models, Result, png_base64

T = TypeVar("T")

# A1111 takes at most one init image per image of a batch; its clients send one. Each is decoded in
# full (up to max_image_pixels), so their number is bounded too: more are a 422, before any decoding.
MAX_INIT_IMAGES = 4


class FieldError(ValueError):
    """A request field with a value that cannot be used: HTTP 422 naming it."""

    def __init__(self, loc: str, message: str) -> None:
        super().__init__(message)
        self.loc = tuple(loc.split("."))


class Txt2Img(BaseModel):
    """AUTOMATIC1111's txt2img request: the fields used here; any other field is accepted and ignored.
    Fields left out (None) are the model's defaults (steps, sampler, guidance) and native size."""

    model_config = ConfigDict(extra="allow")

    prompt: str = Field("", max_length=MAX_PROMPT_CHARS)
    negative_prompt: str = Field("", max_length=MAX_PROMPT_CHARS)
    seed: int = Field(-1, ge=-1)  # -1: a random one
    subseed: int = Field(-1, ge=-1)  # the variation seed (-1: a random one), used when subseed_strength > 0
    subseed_strength: float = Field(0.0, ge=0.0, le=1.0)
    seed_resize_from_w: int = 0  # both above 0: start from the noise the seed makes at that size
    seed_resize_from_h: int = 0
    tiling: bool | None = None  # convolutions pad circularly: an image that tiles seamlessly
    sampler_name: str | None = None
    sampler_index: str | None = None  # the older name of sampler_name
    scheduler: str | None = None  # "automatic" or "karras" (A1111 1.9+ splits "DPM++ 2M Karras" in two)
    steps: int | None = None
    cfg_scale: float | None = None
    width: int | None = None
    height: int | None = None
    batch_size: int = Field(1, ge=1, le=MAX_BATCH)
    n_iter: int = Field(1, ge=1, le=MAX_BATCH)  # batches, one after another
    override_settings: dict[str, Any] = Field(default_factory=dict)  # sd_model_checkpoint, CLIP_stop_at_last_layers
    refiner_checkpoint: str | None = None  # a configured model's title or name (SDXL's refiner); "" or "None": none
    refiner_switch_at: float | None = None  # None: generate()'s default (0.8)
    styles: list[str] = Field(default_factory=list, max_length=64)  # prompt styles by name (--styles-file)
    # the hires fix (txt2img): A1111's fields; hr_sampler_name / hr_prompt / hr_negative_prompt left empty and
    # hr_cfg left out are the first pass's
    enable_hr: bool = False
    hr_scale: float = 2.0
    hr_upscaler: str | None = None  # None: "Latent"
    hr_second_pass_steps: int = 0
    hr_resize_x: int = 0
    hr_resize_y: int = 0
    hr_sampler_name: str | None = None
    hr_prompt: str = Field("", max_length=MAX_PROMPT_CHARS)
    hr_negative_prompt: str = Field("", max_length=MAX_PROMPT_CHARS)
    hr_cfg: float | None = None
    hr_scheduler: str | None = None  # A1111 1.9+: the hires sampler's schedule type ("karras")
    hr_checkpoint_name: str | None = None  # only "Use same checkpoint" (another model for the hires pass is not here)
    # what latentforge has none of: a request asking for it is refused rather than answered without it
    restore_faces: bool | None = None
    script_name: str | None = None
    alwayson_scripts: dict[str, Any] = Field(default_factory=dict)
    denoising_strength: float | None = None  # the hires pass's (None: 0.7)
    s_min_uncond: float | None = None  # A1111's NGMS for this request (None: the s_min_uncond option)
    eta: float | None = None  # the ancestral noise's share (Euler a, DDIM); None: the sampler's default
    send_images: bool = True


class Img2Img(Txt2Img):
    """AUTOMATIC1111's img2img request; with a mask, inpainting (white is repainted)."""

    init_images: list[str] = Field(min_length=1, max_length=MAX_INIT_IMAGES)  # base64, maybe with a data: prefix
    denoising_strength: float = 0.75
    mask: str | None = None
    resize_mode: int = Field(0, ge=0, le=3)  # an init image of another size: images.RESIZE_MODES, by number
    mask_blur: int = Field(4, ge=0, le=256)  # Gaussian blur of the mask, in pixels
    # inpainting, with A1111's API defaults (not its page's): the masked part filled from around it, painted
    # alone at the full size with no padding (inpaint.py)
    inpainting_fill: int = Field(0, ge=0, le=3)
    inpaint_full_res: bool = True
    inpaint_full_res_padding: int = Field(0, ge=0, le=4096)
    initial_noise_multiplier: float | None = Field(None, ge=0, le=2)  # None: 1 (A1111's option's default)
    inpainting_mask_invert: int = Field(0, ge=0, le=1)  # 1: black is repainted
    include_init_images: bool = False  # echo init_images and mask back in "parameters"


def decode_base64(text: str, loc: str) -> bytes:
    """Base64 with or without a "data:image/png;base64," prefix -> bytes."""
    if text.startswith("data:"):
        head, _, text = text.partition(",")
        if not head.endswith(";base64"):
            raise FieldError(loc, f"{loc}: a data: URL must be base64 (data:image/png;base64,...)")
    try:
        return base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError):
        raise FieldError(loc, f"{loc}: not valid base64") from None


def read_upload(data: bytes, loc: str, reader: Callable[[Path], T]) -> T:
    """Run a file reader of latentforge.images or .pngfiles on request bytes, held in a private temporary
    file (no request field ever names a path); its errors name the field instead of that file."""
    with tempfile.NamedTemporaryFile(prefix="latentforge-upload-") as file:
        file.write(data)
        file.flush()
        try:
            return reader(Path(file.name))
        except images.ImageError as e:
            raise FieldError(loc, f"{loc}: {e.cause}" + (f"; {e.fix}" if e.fix else "")) from None


def read_images(texts: dict[str, str], max_pixels: int) -> dict[str, Image.Image]:
    """A request's base64 images by field, as RGB: the declared size of every one is checked (from its
    header) before the first is decoded, so a request is refused before it costs any decoding memory."""
    uploads = {loc: decode_base64(text, loc) for loc, text in texts.items()}
    for loc, data in uploads.items():
        read_upload(data, loc, functools.partial(images.declared_size, max_pixels=max_pixels))
    load = functools.partial(images.load_image, max_pixels=max_pixels)
    return {loc: read_upload(data, loc, load) for loc, data in uploads.items()}


def prepare_mask(mask: Image.Image, size: tuple[int, int], invert: bool) -> Image.Image:
    """A1111's mask handling before the pipeline (which blurs it): grayscale at the image's size, inverted."""
    mask = mask.convert("L")
    if mask.size != size:
        mask = mask.resize(size, Image.LANCZOS)
    return ImageOps.invert(mask) if invert else mask


def resolve_sampler(req: Txt2Img) -> str | None:
    """sampler_name (or sampler_index) and scheduler -> a sampler name; None leaves the model's default."""
    name = req.sampler_name or req.sampler_index
    return sampler_with_schedule(name, req.scheduler, "sampler_name", "scheduler") if name else None


def sampler_with_schedule(name: str, scheduler: str | None, name_loc: str, scheduler_loc: str) -> str:
    """A sampler and A1111 1.9+'s separate schedule type ("DPM++ 2M" + "karras") -> our sampler's name."""
    try:
        spec = get_sampler(name)
    except ValueError as e:
        raise FieldError(name_loc, str(e)) from None
    scheduler = (scheduler or "automatic").strip().lower()
    if scheduler == "automatic":
        return spec.a1111_name
    family = [s for s in SPECS if s.infotext_name == spec.infotext_name]
    for candidate in family:
        if candidate.schedule.lower() == scheduler:
            return candidate.a1111_name
    known = ", ".join(s.schedule for s in family)
    raise FieldError(
        scheduler_loc, f"{scheduler_loc} {scheduler!r} is not available for {spec.infotext_name}; known: {known}"
    )


def find_model(models: Models, name: object, loc: str) -> ModelEntry:
    """The configured model called `name` (its title or name); else a FieldError listing them."""
    entry = models.find(name)
    if entry is None:
        known = ", ".join(entry.title for entry in models.entries.values())
        raise FieldError(loc, f"{loc}: unknown model {name!r}; known: {known}")
    return entry


NO_REFINER = (None, "", "None", "none")  # refiner_checkpoint values that ask for no refiner, as in A1111
MODEL_VAE = ("Automatic", "None")  # sd_vae values that keep each model's own VAE


def vae_option(library: Library, value: object, loc: str) -> str:
    """An sd_vae value: "Automatic" or "None" (the model's own VAE; latentforge does not look for a VAE file
    named after the checkpoint, as A1111's "Automatic" does), or the name of a file in the VAE folders."""
    if value in MODEL_VAE:
        return str(value)
    if not isinstance(value, str):
        raise FieldError(loc, f"{loc} must be a VAE's name, 'Automatic' or 'None'; got {value!r}")
    try:
        library.vaes.find(value)
    except ValueError as e:
        raise FieldError(loc, f"{loc}: {e}") from None
    return value


HIRES_STRENGTH = 0.7  # the hires pass's denoising strength when a request leaves it out (webuiapi's default)
SAME_SAMPLER = (None, "", "Use same sampler")  # hr_sampler_name values that keep the first pass's sampler
SAME_SCHEDULER = (None, "", "Use same scheduler")  # hr_scheduler values likewise
SAME_CHECKPOINT = (None, "", "Use same checkpoint")  # hr_checkpoint_name values that keep the model


def hires_fix(req: Txt2Img, upscalers: Upscalers) -> Hires:
    """A txt2img request's hires fix settings; a bad value is a FieldError naming its field."""
    upscaler = req.hr_upscaler or "Latent"
    try:
        check_upscaler(upscaler, upscalers)
    except ValueError as e:
        raise FieldError("hr_upscaler", str(e)) from None
    sampler = None
    if req.hr_sampler_name not in SAME_SAMPLER:
        sampler = sampler_with_schedule(req.hr_sampler_name, req.hr_scheduler, "hr_sampler_name", "hr_scheduler")
    elif req.hr_scheduler not in SAME_SCHEDULER:
        raise FieldError("hr_scheduler", "hr_scheduler needs hr_sampler_name (the first pass's sampler keeps its own)")
    resize = (req.hr_resize_x, req.hr_resize_y) if req.hr_resize_x or req.hr_resize_y else None
    strength = HIRES_STRENGTH if req.denoising_strength is None else req.denoising_strength
    try:
        return Hires(
            scale=req.hr_scale, resize=resize, upscaler=upscaler, steps=req.hr_second_pass_steps,
            denoising_strength=strength, sampler=sampler, prompt=req.hr_prompt or None,
            negative_prompt=req.hr_negative_prompt or None, cfg_scale=req.hr_cfg,
        )  # fmt: skip
    except ValueError as e:  # each message starts with the request field it is about
        field = str(e).split()[0]
        raise FieldError(field if field in Txt2Img.model_fields else "enable_hr", str(e)) from None


# the speed options (speed.Shortcuts) as options and override_settings name them: A1111's, and ours where it has none
SPEED_OPTIONS = {
    "s_min_uncond": "s_min_uncond", "s_min_uncond_all": "s_min_uncond_all", "skip_early_cond": "skip_early_cfg",
    "token_merging_ratio": "token_merging", "deepcache_interval": "deepcache_interval",
    "deepcache_depth": "deepcache_depth", "sd_vae_decode_method": "tiny_decoder",
}  # fmt: skip
DECODE_METHODS = {"Full": False, "TAESD": True}  # sd_vae_decode_method values


def option_values(shortcuts: Shortcuts) -> dict[str, Any]:
    """The speed options (SPEED_OPTIONS) that hold these shortcuts, as the options name their values."""
    values = {option: getattr(shortcuts, field) for option, field in SPEED_OPTIONS.items()}
    values["sd_vae_decode_method"] = "TAESD" if values["sd_vae_decode_method"] is True else "Full"
    return values


SPEED_DEFAULTS = {"speed_preset": "default"} | option_values(Shortcuts())


def speed_options(values: dict[str, Any], loc: str = "") -> Shortcuts:
    """The speed options (SPEED_OPTIONS) these option values hold, as Shortcuts (an option not in `values` is
    off; `speed_preset` is not read here: setting it sets the options, see `set_speed`); a bad value is a
    FieldError at `loc` + its name."""
    changes = {}
    for option, field in SPEED_OPTIONS.items():
        if option not in values:
            continue
        value = values[option]
        if option == "sd_vae_decode_method":
            if value not in DECODE_METHODS:
                raise FieldError(f"{loc}{option}", f"{option} must be one of {', '.join(DECODE_METHODS)}, got {value!r}")
            value = DECODE_METHODS[value]
        changes[field] = value
    try:
        return dataclasses.replace(Shortcuts(), **changes)
    except (ValueError, TypeError) as e:
        name = next((o for o, f in SPEED_OPTIONS.items() if str(e).split()[0] == f), "speed_preset")
        raise FieldError(f"{loc}{name}", str(e)) from None


def set_speed(current: dict[str, Any], changes: dict[str, Any], loc: str = "", only_edits: bool = False) -> dict[str, Any]:
    """The speed options (SPEED_DEFAULTS' keys) after `changes`: a `speed_preset` among them first sets every
    option to that preset's values, then the options in `changes` are set, so one can switch a preset's option
    off. With `only_edits` (POST /options) only values that differ from the current ones count, so a client
    that posts back every option it read changes only what it edited. Checked: a FieldError at `loc` + name."""
    if only_edits:
        changes = {key: value for key, value in changes.items() if key not in current or current[key] != value}
    values = dict(current)
    if "speed_preset" in changes:
        name = changes["speed_preset"]
        try:
            shortcuts = preset(name)
        except (ValueError, TypeError) as e:
            raise FieldError(f"{loc}speed_preset", str(e)) from None
        values |= {"speed_preset": name} | option_values(shortcuts)
    values |= {key: changes[key] for key in SPEED_OPTIONS if key in changes}
    speed_options(values, loc)
    return values


def refuse_missing_parts(req: Txt2Img) -> None:
    """A field that asks for a part latentforge lacks is a FieldError saying so, not an image made without it."""
    if req.restore_faces:
        raise FieldError("restore_faces", "latentforge has no face restorer (GFPGAN, CodeFormer): send restore_faces false")
    if req.script_name:
        raise FieldError(
            "script_name", f"latentforge runs no scripts ({req.script_name!r}); its X/Y/Z plot is `latentforge "
            "generate --x ... --y ...`: send script_name null"
        )  # fmt: skip
    if req.alwayson_scripts:
        names = ", ".join(repr(name) for name in req.alwayson_scripts)
        raise FieldError("alwayson_scripts", f"latentforge has no extensions or scripts ({names}): send {{}}")
    if req.enable_hr and req.hr_checkpoint_name not in SAME_CHECKPOINT:
        raise FieldError(
            "hr_checkpoint_name", "the hires pass runs on the same model here: send 'Use same checkpoint' (a refiner "
            "can take over its last steps: refiner_checkpoint)"
        )  # fmt: skip


def make_job(
    req: Txt2Img, models: Models, clip_skip: int, max_pixels: int, vae: str = "Automatic",
    styles: dict[str, Style] | None = None, upscalers: Upscalers | None = None, speed: dict[str, Any] | None = None,
    ensd: int = 0, rng: str = "CPU",
) -> tuple[Job, list[int], list[int]]:  # fmt: skip
    """The job for a txt2img / img2img request, its seeds and variation seeds (image i: seed + i, subseed + i);
    `vae` is the sd_vae
    option, which the request's override_settings may change for itself; `styles` those the request may
    name; `upscalers` those the hires fix may use; `speed` the speed options (SPEED_OPTIONS), which the request's
    override_settings and s_min_uncond may change for itself; `ensd` the eta_noise_seed_delta option (the same)."""
    refuse_missing_parts(req)
    count = req.batch_size * req.n_iter
    if count > MAX_BATCH:
        raise FieldError("n_iter", f"batch_size x n_iter must be at most {MAX_BATCH}, got {count}")
    settings = req.override_settings
    model = models.current
    if "sd_model_checkpoint" in settings:
        model = find_model(models, settings["sd_model_checkpoint"], "override_settings.sd_model_checkpoint").name
    seed = req.seed if req.seed != -1 else secrets.randbelow(MAX_SEED + 2 - count)
    seeds = [seed + i for i in range(count)]
    subseed = req.subseed if req.subseed != -1 else secrets.randbelow(MAX_SEED + 2 - count)
    subseeds = [subseed + i for i in range(count)]
    for field, values in (("seed", seeds), ("subseed", subseeds)):
        if values[-1] > MAX_SEED:  # refused now, not after the first images are made
            raise FieldError(field, f"{field} + images - 1 must be at most {MAX_SEED}, got {values[-1]}")
    vae = vae_option(models.library, settings.get("sd_vae", vae), "override_settings.sd_vae")
    refiner = None
    if req.refiner_checkpoint not in NO_REFINER:
        refiner = find_model(models, req.refiner_checkpoint, "refiner_checkpoint").name
    try:
        prompt, negative = apply_styles(req.prompt, req.negative_prompt, styles or {}, req.styles)
    except ValueError as e:
        raise FieldError("styles", str(e)) from None
    common = {
        "prompt": prompt, "negative_prompt": negative, "steps": req.steps,
        "sampler": resolve_sampler(req), "cfg_scale": req.cfg_scale, "width": req.width, "height": req.height,
        "clip_skip": settings.get("CLIP_stop_at_last_layers", clip_skip),
    }  # fmt: skip
    if refiner is not None and req.refiner_switch_at is not None:
        common["refiner_switch_at"] = req.refiner_switch_at
    asked = set_speed(speed or SPEED_DEFAULTS, settings, "override_settings.")
    if req.s_min_uncond is not None:
        asked["s_min_uncond"] = req.s_min_uncond
    common["speed"] = speed_options(asked, "override_settings.")
    if req.enable_hr and not isinstance(req, Img2Img):  # A1111 ignores enable_hr in img2img too
        common["hires"] = hires_fix(req, upscalers or Upscalers())
    common["subseed_strength"] = req.subseed_strength
    common["tiling"] = bool(req.tiling)
    common["eta"] = req.eta
    common["eta_noise_seed_delta"] = settings.get("eta_noise_seed_delta", ensd)
    common["rng"] = settings.get("randn_source", rng)
    if req.seed_resize_from_w > 0 and req.seed_resize_from_h > 0:  # A1111: off unless both are set
        common["seed_resize_from"] = (req.seed_resize_from_w, req.seed_resize_from_h)
    calls = [common | {"seed": s, "subseed": sub} for s, sub in zip(seeds, subseeds)]
    if isinstance(req, Img2Img):
        texts = {f"init_images.{i}": text for i, text in enumerate(req.init_images)}
        read = read_images(texts | ({"mask": req.mask} if req.mask is not None else {}), max_pixels)
        inits, mask = [read[loc] for loc in texts], read.get("mask")
        masks: dict[tuple[int, int], Image.Image] = {}  # the mask made ready for each init image size
        for i, call in enumerate(calls):  # as in A1111, image i starts from init_images[i % count]
            init = inits[i % len(inits)]
            call |= {"init_image": init, "strength": req.denoising_strength, "resize_mode": req.resize_mode,
                     "noise_multiplier": 1.0 if req.initial_noise_multiplier is None else req.initial_noise_multiplier}
            if mask is not None:
                if init.size not in masks:
                    masks[init.size] = prepare_mask(mask, init.size, bool(req.inpainting_mask_invert))
                call |= {"mask": masks[init.size], "mask_blur": req.mask_blur, "masked_content": req.inpainting_fill,
                         "inpaint_area": req.inpaint_full_res, "inpaint_padding": req.inpaint_full_res_padding,
                         "overlay": True}  # fmt: skip
    return Job(model, calls, refiner, None if vae in MODEL_VAE else models.library.vaes.find(vae)), seeds, subseeds


# generate()'s arguments as its error messages name them -> the A1111 request field
GENERATE_FIELDS = {
    "prompt": "prompt", "negative_prompt": "negative_prompt", "steps": "steps", "sampler": "sampler_name",
    "cfg_scale": "cfg_scale", "seed": "seed", "width": "width", "height": "height", "batch_size": "batch_size",
    "subseed": "subseed", "seed_resize_from's width": "seed_resize_from_w",
    "eta_noise_seed_delta": "override_settings.eta_noise_seed_delta",
    "seed_resize_from's height": "seed_resize_from_h",
    "init_image": "init_images", "strength": "denoising_strength", "mask": "mask", "mask_blur": "mask_blur",
    "masked_content": "inpainting_fill", "eta": "eta", "rng": "override_settings.randn_source", "inpaint_area": "inpaint_full_res", "inpaint_padding": "inpaint_full_res_padding",
    "clip_skip": "override_settings.CLIP_stop_at_last_layers", "refiner_switch_at": "refiner_switch_at",
    "hires": "enable_hr", "hr_second_pass_steps": "hr_second_pass_steps",
    "tiny_decoder": "override_settings.sd_vae_decode_method", "deepcache_depth": "override_settings.deepcache_depth",
}  # fmt: skip
_FIELD_WORD = re.compile(r"\b(" + "|".join(GENERATE_FIELDS) + r")\b")


def error_loc(error: ValueError) -> tuple[str, ...]:
    """Where a ValueError points in the request: FieldError's field, else the field generate()'s message names."""
    if isinstance(error, FieldError):
        return ("body", *error.loc)
    match = _FIELD_WORD.search(str(error))
    return ("body", *GENERATE_FIELDS[match.group(1)].split(".")) if match else ("body",)


def extra_params(made: dict[str, str]) -> dict[str, Any]:
    """A1111's extra_generation_params (the refiner's, the LoRAs' hashes), from the infotext of what was made."""
    extra: dict[str, Any] = {}
    if "Refiner" in made:
        extra |= {"Refiner": made["Refiner"], "Refiner switch at": float(made["Refiner switch at"])}
    for key in ("Hires upscale", "Hires resize", "Hires steps", "Hires upscaler", "Hires sampler", "Hires prompt",
                "Hires negative prompt", "Hires CFG Scale", "Lora hashes", "TI hashes", "Skip Early CFG", "NGMS",
                "NGMS all steps", "DeepCache", "Token merging ratio", "VAE Decoder"):  # fmt: skip
        if key in made:
            extra[key] = made[key]
    if "Hires resize-1" in made:  # the infotext reader splits a "WxH" value in two
        extra["Hires resize"] = f"{made['Hires resize-1']}x{made['Hires resize-2']}"
    return extra


def answer(req: Txt2Img, result: Result, seeds: list[int], subseeds: list[int], clip_skip: int) -> dict[str, Any]:
    """A1111's response: base64 PNGs with their infotexts, the request, and the info JSON."""
    texts = [image.info.get(pngfiles.PNG_TEXT_KEY, "") for image in result.images]
    made = infotext.parse_infotext(texts[0]) if texts else {}  # what was used, defaults filled in

    def used(key: str, cast: type, asked: Any) -> Any:
        return cast(made[key]) if key in made else asked

    info = {
        "prompt": req.prompt, "all_prompts": [req.prompt] * len(seeds),
        "negative_prompt": req.negative_prompt, "all_negative_prompts": [req.negative_prompt] * len(seeds),
        "seed": seeds[0], "all_seeds": seeds, "subseed": subseeds[0], "all_subseeds": subseeds,
        "subseed_strength": req.subseed_strength,
        "width": used("Size-1", int, req.width), "height": used("Size-2", int, req.height),
        "sampler_name": used("Sampler", str, req.sampler_name), "scheduler": used("Schedule type", str, req.scheduler),
        "cfg_scale": used("CFG scale", float, req.cfg_scale), "steps": used("Steps", int, req.steps),
        "batch_size": req.batch_size, "restore_faces": False, "face_restoration_model": None,
        "sd_model_name": result.model.name, "sd_model_hash": result.model.hash, "sd_vae_name": made.get("VAE"),
        "sd_vae_hash": made.get("VAE hash"), "seed_resize_from_w": req.seed_resize_from_w,
        "seed_resize_from_h": req.seed_resize_from_h,
        "denoising_strength": used("Denoising strength", float, None), "extra_generation_params": extra_params(made),
        "index_of_first_image": 0, "infotexts": texts, "styles": [], "job_timestamp": time.strftime("%Y%m%d%H%M%S"),
        "clip_skip": used("Clip skip", int, clip_skip),
        "is_using_inpainting_conditioning": result.inpainting and isinstance(req, Img2Img),
        "version": f"latentforge {__version__}",
    }  # fmt: skip
    parameters = req.model_dump()
    if isinstance(req, Img2Img) and not req.include_init_images:
        parameters |= {"init_images": None, "mask": None}
    return {
        "images": [png_base64(image) for image in result.images] if req.send_images else [],
        "parameters": parameters,
        "info": json.dumps(info),
    }


# --------------------------------------------------------------------------- extras (upscaling)


class Extras(BaseModel):
    """AUTOMATIC1111's extras request, its upscaling part; face restoration fields are accepted and ignored
    (there are no face restorers)."""

    model_config = ConfigDict(extra="allow")

    resize_mode: int = Field(0, ge=0, le=1)  # 0: by upscaling_resize; 1: to upscaling_resize_w x _h
    show_extras_results: bool = True
    gfpgan_visibility: float = 0
    codeformer_visibility: float = 0
    codeformer_weight: float = 0
    upscaling_resize: float = Field(2, gt=0, le=8)
    upscaling_resize_w: int = Field(512, ge=1)
    upscaling_resize_h: int = Field(512, ge=1)
    upscaling_crop: bool = True  # resize_mode 1: crop the upscaled image to exactly w x h (centred)
    upscaler_1: str = "None"
    upscaler_2: str = "None"
    extras_upscaler_2_visibility: float = Field(0, ge=0, le=1)  # blend of upscaler_2's result over upscaler_1's
    upscale_first: bool = False


class ExtrasSingleImage(Extras):
    image: str  # base64, maybe with a data: prefix


class FileData(BaseModel):
    data: str
    name: str = ""


class ExtrasBatchImages(Extras):
    imageList: list[FileData] = Field(min_length=1, max_length=MAX_BATCH)  # A1111's field name


def _upscaler(upscalers: Upscalers, name: str, loc: str) -> Upscaler | None:
    """A request's upscaler name -> the upscaler ("None": none); unknown names, paths and files that are no
    RRDBNet are a FieldError naming the field."""
    if name == "None":
        return None
    try:
        return upscalers.get(name)
    except ValueError as e:
        raise FieldError(loc, f"{loc}: {e}") from None


def _extras_plan(req: Extras, size: tuple[int, int]) -> tuple[tuple[int, int], tuple[int, int] | None]:
    """The size to upscale to, and the size to crop that to (resize_mode 1 with upscaling_crop), as A1111."""
    if req.resize_mode == 1:
        want = (req.upscaling_resize_w, req.upscaling_resize_h)
        scale = max(want[0] / size[0], want[1] / size[1])
        return target_size(size, scale), want if req.upscaling_crop else None
    return target_size(size, req.upscaling_resize), None


def _check_pixels(loc: str, what: str, size: tuple[int, int], max_pixels: int) -> None:
    if size[0] * size[1] > max_pixels:
        raise FieldError(loc, f"{what} would be {size[0]}x{size[1]}, over the server's limit of {max_pixels} pixels; "
                              "ask for a smaller scale or size")  # fmt: skip


def _crop_centre(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    left, top = image.width // 2 - size[0] // 2, image.height // 2 - size[1] // 2
    cropped = image.crop((left, top, left + size[0], top + size[1]))
    cropped.info = dict(image.info)
    return cropped


def run_extras(
    req: Extras, texts: dict[str, str], upscalers: Upscalers, max_pixels: int
) -> tuple[list[Image.Image], str]:
    """An extras request's images upscaled as A1111's postprocessing does (upscaler_1, then upscaler_2's result
    blended over it by extras_upscaler_2_visibility; upscaler_1 "None": the images as they came), and the
    infotext of what was done. Every image's size and every output size is checked before any work; the
    images are decoded one at a time."""
    uploads = {loc: decode_base64(text, loc) for loc, text in texts.items()}
    sizes = {loc: read_upload(data, loc, functools.partial(images.declared_size, max_pixels=max_pixels))
             for loc, data in uploads.items()}  # fmt: skip
    with upscalers.lock:
        first = _upscaler(upscalers, req.upscaler_1, "upscaler_1")
        second = _upscaler(upscalers, req.upscaler_2, "upscaler_2") if first is not None else None
        if second is not None and req.extras_upscaler_2_visibility == 0:
            second = None
        loc_of_scale = "upscaling_resize" if req.resize_mode == 0 else "upscaling_resize_w"
        for loc, size in sizes.items():
            if first is None:
                continue
            target, _ = _extras_plan(req, size)
            _check_pixels(loc_of_scale, f"{loc} upscaled", target, max_pixels)
            for name, upscaler in ((req.upscaler_1, first), (req.upscaler_2, second)):
                for step in passes(upscaler, size, target) if upscaler is not None else []:
                    _check_pixels(loc_of_scale, f"{loc} after {name}", step, max_pixels)
        done = []
        for loc, data in uploads.items():
            image = read_upload(data, loc, functools.partial(images.load_image, max_pixels=max_pixels))
            if first is not None:
                target, crop = _extras_plan(req, image.size)
                result = upscale(image, first, size=target)
                if second is not None:
                    blended = Image.blend(result, upscale(image, second, size=target), req.extras_upscaler_2_visibility)
                    blended.info, result = dict(result.info), blended
                image = _crop_centre(result, crop) if crop is not None else result
            done.append(image)
    return done, _extras_infotext(req, first is not None, second is not None)


def _extras_infotext(req: Extras, upscaled: bool, blended: bool) -> str:
    """A1111's postprocessing infotext ("Postprocess upscale by: 2, Postprocess upscaler: ...")."""
    if not upscaled:
        return ""
    if req.resize_mode == 1:
        items = {"Postprocess upscale to": f"{req.upscaling_resize_w}x{req.upscaling_resize_h}"}
        if req.upscaling_crop:
            items["Postprocess crop to"] = items["Postprocess upscale to"]
    else:
        items = {"Postprocess upscale by": f"{req.upscaling_resize:g}"}
    items["Postprocess upscaler"] = req.upscaler_1
    if blended:
        items["Postprocess upscaler 2"] = req.upscaler_2
    return ", ".join(f"{key}: {infotext.quote(value)}" for key, value in items.items())


def html_info(text: str) -> str:
    """A1111's plaintext_to_html: the infotext in a paragraph, lines joined by <br>."""
    return "<p>" + "<br>\n".join(html.escape(line) for line in text.split("\n")) + "</p>"
