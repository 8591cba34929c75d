"""AUTOMATIC1111's infotext: the "parameters" text that says what made an image.

The webui stores it in every PNG it writes, and its "PNG Info" tab, CivitAI and the metadata readers
understand it. `format_infotext` writes it in the webui's own layout (`create_infotext` in its
modules/processing.py) and `parse_infotext` reads it with the webui's own rule
(`parse_generation_parameters` in modules/infotext_utils.py), in time linear in the text's length.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
from dataclasses import dataclass, field

_NEGATIVE = "Negative prompt:"
_RE_IMAGESIZE = re.compile(r"^(\d+)x(\d+)$")
# The pieces of the webui's pair regex, r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)',
# each matched on its own so that nothing is ever scanned twice (see `_pairs`).
_SPACES = re.compile(r"\s*")
_KEY_TAIL = re.compile(r"[\w \-/]*")
_WORD = re.compile(r"\w")


def _default_version() -> str:
    from . import __version__

    return f"latentforge {__version__}"


@dataclass
class GenerationInfo:
    """What made an image, as AUTOMATIC1111's infotext records it.

    `sampler` is A1111's display name ("Euler a", "DPM++ 2M"), `schedule_type` its schedule name
    ("Automatic", "Karras"). `model_hash` is A1111's short hash (see `modelhash.model_hash`); empty or
    None fields are left out of the text, as the webui leaves out what does not apply. `clip_skip` is
    written only above 1, `denoising_strength` only for img2img, `mask_blur` only for inpainting.
    `refiner_name`, `refiner_hash` and `refiner_switch_at` are set when SDXL's refiner took over: the
    webui writes "Refiner: <name> [<short hash>]" (its checkpoint's short_title; the name alone without
    a hash) and "Refiner switch at: 0.8", after "Mask blur" among its extra parameters. `variation_seed`,
    `variation_seed_strength` and `seed_resize_from` ("WxH") are A1111's seed options (seeds.py). `vae_name` and
    `vae_hash` name a VAE file used instead of the checkpoint's own ("VAE hash", "VAE", after "Model").
    `extra` holds any further keys in A1111 spelling (its `extra_generation_params`), written after
    the standard ones and before "Version".
    """

    prompt: str
    negative_prompt: str = ""
    steps: int = 20
    sampler: str = "Euler a"
    schedule_type: str | None = "Automatic"
    cfg_scale: float = 7.0
    seed: int = 0
    width: int = 512
    height: int = 512
    model_hash: str | None = None
    model_name: str | None = None
    vae_hash: str | None = None
    vae_name: str | None = None
    variation_seed: int | None = None
    variation_seed_strength: float | None = None
    seed_resize_from: str | None = None  # "WxH"
    denoising_strength: float | None = None
    conditional_mask_weight: float | None = None
    clip_skip: int = 1
    ensd: int | None = None  # A1111's eta noise seed delta, written when a stochastic sampler used it
    rng: str | None = None
    tiling: bool | None = None  # A1111's "Tiling: True"
    mask_blur: int | None = None
    refiner_name: str | None = None
    refiner_hash: str | None = None
    refiner_switch_at: float | None = None
    extra: dict[str, object] = field(default_factory=dict)
    version: str | None = field(default_factory=_default_version)


def _number(value: object) -> object:
    """Numbers as the webui writes slider values: 7.0 -> 7, 7.5 -> 7.5 (JSON numbers from the browser)."""
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return int(value)
    return value


def quote(value: object) -> str:
    """A1111's `quote()`: a value holding ',', ':' or a newline is written as a JSON string.

    One addition: a value that starts and ends with '"' is quoted too, since the webui's own parser
    would otherwise take it for a quoted one and strip its quotes (the webui quotes only the three).
    """
    text = str(value)
    if "," in text or "\n" in text or ":" in text or (len(text) >= 2 and text[0] == text[-1] == '"'):
        return json.dumps(text, ensure_ascii=False)
    return text


def infotext_params(info: GenerationInfo) -> dict[str, object]:
    """The last line's key/value pairs in A1111's order (create_infotext), absent ones left out."""
    params: dict[str, object] = {
        "Steps": info.steps,
        "Sampler": info.sampler,
        "Schedule type": info.schedule_type,
        "CFG scale": info.cfg_scale,
        "Seed": info.seed,
        "Size": f"{info.width}x{info.height}",
        "Model hash": info.model_hash,
        "Model": info.model_name,
        "VAE hash": info.vae_hash,
        "VAE": info.vae_name,
        "Variation seed": info.variation_seed,
        "Variation seed strength": info.variation_seed_strength,
        "Seed resize from": info.seed_resize_from,
        "Denoising strength": info.denoising_strength,
        "Conditional mask weight": info.conditional_mask_weight,
        "Clip skip": info.clip_skip if info.clip_skip is not None and info.clip_skip > 1 else None,
        "ENSD": info.ensd,
        "RNG": info.rng,
        "Tiling": info.tiling,
    }
    # like the webui's **p.extra_generation_params: a key already listed keeps its place
    refiner = _refiner(info)
    switch_at = info.refiner_switch_at if refiner is not None else None  # a switch without a refiner says nothing
    params.update({"Mask blur": info.mask_blur, "Refiner": refiner, "Refiner switch at": switch_at, **info.extra})
    params["Version"] = info.version
    return {key: _number(value) for key, value in params.items() if value is not None and value != ""}


def _refiner(info: GenerationInfo) -> str | None:
    """The webui's "Refiner" value: "<name> [<short hash>]", the name alone when there is no hash."""
    if not info.refiner_name:
        return None
    return f"{info.refiner_name} [{info.refiner_hash}]" if info.refiner_hash else info.refiner_name


def format_infotext(info: GenerationInfo) -> str:
    """AUTOMATIC1111's infotext: the prompt, "Negative prompt: ..." (when there is one), the parameters.

    >>> format_infotext(GenerationInfo("a cat", steps=20, seed=1234, version=None))
    'a cat\\nSteps: 20, Sampler: Euler a, Schedule type: Automatic, CFG scale: 7, Seed: 1234, Size: 512x512'
    """
    pairs = infotext_params(info).items()
    params = ", ".join(key if key == value else f"{key}: {quote(value)}" for key, value in pairs)
    negative = f"\n{_NEGATIVE} {info.negative_prompt}" if info.negative_prompt else ""
    return f"{info.prompt}{negative}\n{params}".strip()


def parse_infotext(text: str) -> dict[str, str]:
    """Read an infotext by the webui's rule (parse_generation_parameters), values as strings.

    The last line holds the parameters when the webui's regex finds at least three pairs in it (else
    it belongs to the prompt); the lines before are the prompt, up to a line starting with
    "Negative prompt:", which starts the negative prompt. Quoted values are JSON-decoded, and a value
    like "512x768" is split into "<key>-1" and "<key>-2" (so Size gives Size-1 = width, Size-2 = height).
    Keys are the webui's ("Prompt", "Negative prompt", "Steps", "CFG scale", ...). Unlike the webui,
    no defaults for absent keys are filled in (it adds "Clip skip": "1", "Schedule type": "Automatic", ...).
    """
    *lines, last = text.strip().split("\n")
    pairs = _pairs(last)
    if len(pairs) < 3:
        lines.append(last)
        pairs = []
    prompt: list[str] = []
    negative: list[str] = []
    in_negative = False
    for line in lines:
        line = line.strip()
        if line.startswith(_NEGATIVE):
            in_negative = True
            line = line[len(_NEGATIVE) :].strip()
        (negative if in_negative else prompt).append(line)
    result = {"Prompt": "\n".join(prompt), "Negative prompt": "\n".join(negative)}
    for key, value in pairs:
        if not value:  # the webui fails on these (value[0]) and skips them
            continue
        if value[0] == '"' and value[-1] == '"':
            with contextlib.suppress(ValueError):
                value = json.loads(value)
        size = _RE_IMAGESIZE.match(value) if isinstance(value, str) else None
        if size is not None:
            result[f"{key}-1"], result[f"{key}-2"] = size.group(1), size.group(2)
        else:
            result[key] = str(value)
    return result


def _pairs(line: str) -> list[tuple[str, str]]:
    """The webui's `re_param.findall(line)` for a line without newlines, in time linear in its length.

    The regex, tried at every position, rescans the same run of key characters from each of them
    (quadratic: an 80,000-character line took 32 s). Here a failed try skips what the tries inside it
    would fail on too: every position in a run of key characters that is not followed by ':' fails.
    """
    found: list[tuple[str, str]] = []
    pos, end = 0, len(line)
    while pos < end:
        key_start = _scan(_SPACES, line, pos)
        if key_start >= end or not _WORD.match(line, key_start):
            pos = key_start + 1
            continue
        colon = _scan(_KEY_TAIL, line, key_start + 1)
        if colon == key_start + 1 or colon >= end or line[colon] != ":":
            pos = colon  # every try from here up to `colon` fails the same way
            continue
        value_start = _scan(_SPACES, line, colon + 1)
        value_end, pos = _value(line, value_start)
        found.append((line[key_start:colon], line[value_start:value_end]))
    return found


def _value(line: str, start: int) -> tuple[int, int]:
    """A value starting at `start`: where it ends, and where the next pair may start (after its comma).

    As the webui's regex: a JSON-like string in double quotes followed by ',' or the end of the line,
    else everything up to the next ','.
    """
    if line.startswith('"', start):
        close = _closing_quote(line, start + 1)
        if close > start + 1 and (close + 1 == len(line) or line[close + 1] == ","):
            return close + 1, close + 2
    comma = _find_comma(line, start)
    return (len(line), len(line)) if comma < 0 else (comma, comma + 1)


def _scan(pattern: re.Pattern[str], line: str, start: int) -> int:
    """Where the run of `pattern` (a repeated character class) that begins at `start` ends."""
    return pattern.match(line, start).end()


def _find_comma(line: str, start: int) -> int:
    """The first ',' at or after `start`, else -1."""
    return line.find(",", start)


def _closing_quote(line: str, start: int) -> int:
    """The '"' that closes a quoted value whose text begins at `start`, else -1.

    It is the first '"' with an even number of backslashes before it (back to `start`): in
    `(?:\\\\.|[^\\\\"])+"` a backslash always escapes the next character, so a run of them that starts
    at or after `start` pairs off from its first one.
    """
    quote_at = line.find('"', start)
    while quote_at >= 0:
        first = quote_at
        while first > start and line[first - 1] == "\\":
            first -= 1
        if (quote_at - first) % 2 == 0:
            return quote_at
        quote_at = line.find('"', quote_at + 1)
    return -1


__all__ = ["GenerationInfo", "format_infotext", "infotext_params", "parse_infotext", "quote"]
