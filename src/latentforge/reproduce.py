"""An image's infotext back to `Pipeline.generate`'s arguments: A1111's "PNG Info -> Send to txt2img".

`generate_args(params)` takes what `infotext.parse_infotext` reads from a PNG and returns the arguments that
make the image again, with notes on what the text alone cannot bring back. Read: the prompts, Steps, Sampler
with Schedule type (A1111 1.9+ writes "DPM++ 2M" + "Karras", older files "DPM++ 2M Karras"), CFG scale, Seed,
Size, Clip skip, the seed options (Variation seed and its strength, Seed resize from, ENSD), Tiling, the
hires fix (`hires.from_infotext`) and inpainting's Mask blur, Masked content, Inpaint area and Masked area padding. A value that cannot be read is a one-line ValueError naming the key.

The random source comes along too ("RNG"; none written means A1111's default, "GPU", whose draws on an
NVIDIA card `philox.py` computes). Notes (not errors; the image is made, but may differ): an img2img or
inpainting image (its source image is not in the text); LoRAs and embeddings the prompt names (they come
from the folders given to the run). The model is the caller's to check (`Model hash`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from .hires import from_infotext as hires_from_infotext
from .samplers import SPECS



def generate_args(params: Mapping[str, str]) -> tuple[dict[str, Any], list[str]]:
    """(generate() keyword arguments, notes) for an infotext parsed by `infotext.parse_infotext`."""
    args: dict[str, Any] = {"prompt": params.get("Prompt", ""), "negative_prompt": params.get("Negative prompt", "")}
    readers: dict[str, tuple[str, Callable[[str], object]]] = {
        "Steps": ("steps", int), "CFG scale": ("cfg_scale", float), "Seed": ("seed", int),
        "Size-1": ("width", int), "Size-2": ("height", int), "Clip skip": ("clip_skip", int),
        "Variation seed": ("subseed", int), "Variation seed strength": ("subseed_strength", float),
        "ENSD": ("eta_noise_seed_delta", int), "Mask blur": ("mask_blur", int),
        "Masked area padding": ("inpaint_padding", int), "Noise multiplier": ("noise_multiplier", float),
        "Eta": ("eta", float), "Eta DDIM": ("eta", float),
    }  # fmt: skip
    for key, (name, cast) in readers.items():
        if key in params:
            args[name] = _read(params, key, cast)
    if "Sampler" in params:
        args["sampler"] = sampler_name(params["Sampler"], params.get("Schedule type"))
    if "Seed resize from-1" in params:
        args["seed_resize_from"] = (_read(params, "Seed resize from-1", int), _read(params, "Seed resize from-2", int))
    if "Tiling" in params:
        args["tiling"] = params["Tiling"].strip().lower() == "true"
    if "Masked content" in params:
        args["masked_content"] = params["Masked content"]
    if "Inpaint area" in params:
        args["inpaint_area"] = params["Inpaint area"].lower()
    try:
        hires = hires_from_infotext(params)
    except ValueError as e:
        raise ValueError(f"the infotext's hires fix cannot be read: {e}") from None
    notes = []
    if hires is not None:
        args["hires"] = hires
    elif "Denoising strength" in params:
        args["strength"] = _read(params, "Denoising strength", float)
        if "Mask blur" in params:
            notes.append("an inpainting image: give its init image and mask (--init-image, --mask) to make it again")
        else:
            notes.append("an img2img image: give its init image (--init-image) to make it again")
    # no RNG: A1111's default, "GPU" (latentforge's own images before it wrote the key were "CPU")
    args["rng"] = params.get("RNG", "CPU" if params.get("Version", "").startswith("latentforge") else "GPU")
    if "<lora:" in args["prompt"] or "<lyco:" in args["prompt"] or "TI hashes" in params:
        notes.append("its prompt uses LoRAs or embeddings: give their folders (--lora-dir, --embeddings-dir)")
    return args, notes


def sampler_name(sampler: str, schedule: str | None) -> str:
    """latentforge's sampler for an infotext's Sampler and Schedule type; one line when it has none such."""
    for spec in SPECS:
        if schedule in (None, "Automatic") and spec.a1111_name == sampler:
            return spec.a1111_name
        if spec.infotext_name == sampler and spec.schedule == schedule:
            return spec.a1111_name
    with_schedule = f" with schedule {schedule!r}" if schedule not in (None, "Automatic") else ""
    raise ValueError(
        f"the infotext's sampler {sampler!r}{with_schedule} is not one latentforge has; give --sampler "
        f"(known: {', '.join(spec.a1111_name for spec in SPECS)})"
    )


def _read(params: Mapping[str, str], key: str, cast: Callable[[str], object]) -> Any:
    try:
        return cast(params[key])
    except ValueError:
        kind = "a whole number" if cast is int else "a number"
        raise ValueError(f"the infotext's {key!r} is {params[key]!r}, not {kind}") from None
