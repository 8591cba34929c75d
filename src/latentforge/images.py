"""Images on disk: AUTOMATIC1111's infotext, PNG writing and reading, input images and masks, tensors.

The infotext is the "parameters" text AUTOMATIC1111's webui stores in every PNG it writes, and that
its "PNG Info" tab, CivitAI and the metadata readers understand. `format_infotext` writes it in the
webui's own layout (`create_infotext` in its modules/processing.py) and `parse_infotext` reads it
with the webui's own rule (`parse_generation_parameters` in modules/infotext_utils.py).

PNGs are written under A1111's names (``00000-<seed>.png``, the next number in the folder), first to
a temporary file in that folder and then hard-linked to a name nobody holds yet: two processes never
take the same name, nothing is ever overwritten, and an interrupted run leaves no partial PNG.

Input images are checked before they are decoded: a missing, empty or unreadable file, or a header
that declares more pixels than allowed (a decompression bomb), is a one-line `ImageError`.
Tensors follow diffusers' `VaeImageProcessor` to the bit: images in [-1, 1], masks binarised at 0.5.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import math
import os
import re
import secrets
import struct
import warnings
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont, ImageOps, PngImagePlugin, UnidentifiedImageError

from .atomic import fsync_file, fsync_folder
from .errors import FileError
from .weightfiles import CheckpointError

PathLike = str | os.PathLike[str]

# The webui's PNG text key and its infotext regex, verbatim (modules/infotext_utils.py):
# `key: value` pairs, the value either a JSON string in double quotes or anything up to the next comma.
PNG_TEXT_KEY = "parameters"
_RE_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
_RE_IMAGESIZE = re.compile(r"^(\d+)x(\d+)$")
_NEGATIVE = "Negative prompt:"

# 8192 x 8192: far above any Stable Diffusion input, far below what would exhaust memory.
DEFAULT_MAX_PIXELS = 8192 * 8192
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_MAX_TEXT_BYTES = PngImagePlugin.MAX_TEXT_CHUNK  # Pillow's own cap on one (decompressed) text chunk
_WEIGHT_SUFFIXES = (".safetensors", ".ckpt", ".bin", ".pt", ".pth")
_HASH_BLOCK = 1024 * 1024
# A1111's sanitize_filename_part: characters that no file name may hold on any common system.
_BAD_NAME_CHARS = re.compile(r'[<>:"/\\|?*\x00-\x1f\x7f]')


class ImageError(FileError):
    """An image or output folder that cannot be used."""


# --------------------------------------------------------------------------- infotext


def _default_version() -> str:
    from . import __version__

    return f"latentforge {__version__}"


@dataclass
class GenerationInfo:
    """What made an image, as AUTOMATIC1111's infotext records it.

    `sampler` is A1111's display name ("Euler a", "DPM++ 2M"), `schedule_type` its schedule name
    ("Automatic", "Karras"). `model_hash` is A1111's short hash (see `model_hash`); empty or None
    fields are left out of the text, as the webui leaves out what does not apply. `clip_skip` is
    written only above 1, `denoising_strength` only for img2img, `mask_blur` only for inpainting.
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
    denoising_strength: float | None = None
    conditional_mask_weight: float | None = None
    clip_skip: int = 1
    rng: str | None = None
    mask_blur: int | None = None
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
        "Denoising strength": info.denoising_strength,
        "Conditional mask weight": info.conditional_mask_weight,
        "Clip skip": info.clip_skip if info.clip_skip is not None and info.clip_skip > 1 else None,
        "RNG": info.rng,
    }
    # like the webui's **p.extra_generation_params: a key already listed keeps its place
    params.update({"Mask blur": info.mask_blur, **info.extra})
    params["Version"] = info.version
    return {key: _number(value) for key, value in params.items() if value is not None and value != ""}


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
    if len(_RE_PARAM.findall(last)) < 3:
        lines.append(last)
        last = ""
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
    for key, value in _RE_PARAM.findall(last):
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


def model_hash(path: PathLike) -> str:
    """A1111's "Model hash": the first 10 hex digits of the SHA-256 of the checkpoint file's bytes.

    For a folder (the diffusers layout, which the webui cannot load and so has no hash for), the
    SHA-256 runs over its weight files (.safetensors, .ckpt, .bin, .pt, .pth, in any subfolder, hidden
    ones skipped), one after another in the sorted order of their paths relative to the folder: the
    hash of ``cat`` of those files in that order. Files are read in 1 MiB blocks.
    """
    root = Path(path)
    if root.is_dir():
        files = sorted(
            (p for p in root.rglob("*") if p.suffix in _WEIGHT_SUFFIXES and p.is_file()),
            key=lambda p: p.relative_to(root).as_posix(),
        )
        files = [p for p in files if not any(part.startswith(".") for part in p.relative_to(root).parts)]
        if not files:
            fix = "give a checkpoint file or a diffusers folder"
            raise CheckpointError(root, "folder holds no weight files to hash", fix)
    elif root.exists():
        files = [root]
    else:
        raise CheckpointError(root, "no such file or folder")
    digest = hashlib.sha256()
    for file in files:
        try:
            with open(file, "rb") as stream:
                for block in iter(lambda: stream.read(_HASH_BLOCK), b""):
                    digest.update(block)
        except OSError as exc:
            raise CheckpointError(file, f"cannot read file to hash it ({exc.strerror or exc})") from exc
    return digest.hexdigest()[:10]


HASH_CACHE_ENV = "LATENTFORGE_CACHE_DIR"  # where model hashes are remembered (default: the user's cache folder)


def hash_cache_file() -> Path:
    """$LATENTFORGE_CACHE_DIR/model-hashes.json, else under $XDG_CACHE_HOME/latentforge or ~/.cache/latentforge."""
    folder = os.environ.get(HASH_CACHE_ENV) or Path(
        os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache", "latentforge"
    )
    return Path(folder) / "model-hashes.json"


def cached_model_hash(path: PathLike) -> str:
    """`model_hash`, remembered across processes for a single file, keyed by its absolute path, size and
    modification time (as AUTOMATIC1111's cache.json does): hashing SD 1.5 takes ~4.5 s of a 2-core CPU,
    in front of every first image. Folders are hashed each time. A cache that cannot be read or written
    is ignored."""
    file = Path(path).resolve()
    if not file.is_file():
        return model_hash(file)
    stat = file.stat()
    stamp = [stat.st_size, stat.st_mtime_ns]
    store = hash_cache_file()
    try:
        cache = json.loads(store.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        cache = {}
    cache = cache if isinstance(cache, dict) else {}
    entry = cache.get(str(file))
    if isinstance(entry, dict) and entry.get("stamp") == stamp and isinstance(entry.get("hash"), str):
        return entry["hash"]
    cache[str(file)] = {"stamp": stamp, "hash": model_hash(file)}
    temp = store.with_name(f".{store.name}.{os.getpid()}.tmp")
    try:
        store.parent.mkdir(parents=True, exist_ok=True)
        temp.write_text(json.dumps(cache, indent=1), encoding="utf-8")
        os.replace(temp, store)
    except OSError:
        with contextlib.suppress(OSError):
            temp.unlink(missing_ok=True)
    return cache[str(file)]["hash"]


# --------------------------------------------------------------------------- PNG writing


def check_output_folder(path: PathLike) -> Path:
    """Make sure images can be written to `path` (created if missing); call it before any work.

    Raises ImageError (a ValueError) naming the path when it is a file, lies under a file, cannot be
    created, or does not accept a new file (checked by creating and removing one).
    """
    folder = Path(path)
    fix = "choose another output folder"
    if folder.exists() and not folder.is_dir():
        raise ImageError(folder, "is a file, not a folder", f"{fix}, or move the file away")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError) as exc:
        raise ImageError(folder, "cannot create the folder: a file is in the way on its path", fix) from exc
    except OSError as exc:
        raise ImageError(folder, f"cannot create the folder ({exc.strerror or exc})", fix) from exc
    try:
        probe = _create_temp(folder, ".write-test")
        probe.unlink()
    except OSError as exc:
        cause = f"folder is not writable ({exc.strerror or exc})"
        raise ImageError(folder, cause, f"{fix} or fix its permissions") from exc
    return folder


def save_png(
    image: Image.Image,
    folder: PathLike,
    info: GenerationInfo | None = None,
    stem: str | None = None,
    *,
    parameters: str | None = None,
) -> Path:
    """Write `image` as ``<folder>/NNNNN-<stem>.png`` with its infotext; return the path written.

    The infotext (PNG text chunk "parameters", tEXt, or iTXt when it is not Latin-1) is
    format_infotext(info), else `parameters`, else the image's own info["parameters"] (which
    Pipeline.generate sets). `stem` defaults to the seed (from `info`, else from the infotext), as the
    webui's default "[seed]" file pattern; with neither the name is just ``NNNNN.png``. NNNNN is
    one more than the highest number any file in the folder starts with (the webui's rule), and the
    next one again if another writer takes that name first: no file is ever overwritten.
    """
    folder = Path(folder)
    if info is not None:
        parameters = format_infotext(info)
    elif parameters is None:
        parameters = image.info.get(PNG_TEXT_KEY)
    if stem is None:
        seed = info.seed if info is not None else parse_infotext(parameters).get("Seed") if parameters else None
        stem = "" if seed is None else str(seed)
    suffix = f"-{_safe_stem(folder, stem)}.png" if stem else ".png"
    pnginfo = PngImagePlugin.PngInfo()
    if parameters is not None:
        pnginfo.add_text(PNG_TEXT_KEY, parameters)  # Pillow falls back to iTXt when not Latin-1
    try:
        temp = _create_temp(folder, ".png.tmp")
    except OSError as exc:
        cause = f"cannot write an image here ({exc.strerror or exc})"
        raise ImageError(folder, cause, "check the output folder") from exc
    try:
        try:
            with open(temp, "wb") as file:
                image.save(file, format="PNG", pnginfo=pnginfo)
            fsync_file(temp)
            target = _link_unique(temp, folder, suffix)
        except OSError as exc:
            cause = f"cannot write the PNG ({exc.strerror or exc})"
            raise ImageError(folder, cause, "check free space and permissions") from exc
    finally:  # also on Ctrl-C: the temp file never outlives the call
        with contextlib.suppress(FileNotFoundError):
            temp.unlink()
    fsync_folder(folder)
    return target


def _safe_stem(folder: Path, stem: str) -> str:
    """A file-name part: characters no system allows become "_" (as the webui does); never a path."""
    cleaned = _BAD_NAME_CHARS.sub("_", stem).strip().rstrip(".")[:128]
    if not cleaned:
        raise ImageError(folder, f"unusable file name part {stem!r}", "give a stem with letters or digits")
    return cleaned


def _create_temp(folder: Path, suffix: str) -> Path:
    """A new, empty, hidden file in `folder`, created exclusively, with the usual permissions (umask)."""
    while True:
        path = folder / f".latentforge-{os.getpid()}-{secrets.token_hex(6)}{suffix}"
        try:
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return path
        except FileExistsError:
            continue


def next_sequence_number(folder: PathLike) -> int:
    """The webui's get_next_sequence_number: 1 + the largest number a file name starts with, else 0.

    A name counts when the part before its first "-" (extension removed) is a number:
    "00007-1234.png" and "00007.png" count as 7, "grid-0001.png" does not count.
    """
    highest = -1
    for name in os.listdir(folder):
        head = os.path.splitext(name)[0].split("-")[0]
        if head.isascii() and head.isdigit():
            highest = max(highest, int(head))
    return highest + 1


def _link_unique(temp: Path, folder: Path, suffix: str) -> Path:
    """Give the finished temp file the next free NNNNN name; a name taken meanwhile is skipped."""
    number = next_sequence_number(folder)
    for _ in range(100_000):
        target = folder / f"{number:05}{suffix}"
        try:
            os.link(temp, target)  # fails if the name exists: atomic, and never overwrites
            return target
        except FileExistsError:
            number += 1
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS, errno.EMLINK, errno.EXDEV):
                raise
            # no hard links here (FAT, some network shares): reserve the name, then replace it
            try:
                os.close(os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            except FileExistsError:
                number += 1
                continue
            os.replace(temp, target)
            return target
    raise ImageError(folder, "no free file name found", "choose another output folder")


# --------------------------------------------------------------------------- PNG reading


def read_infotext(path: PathLike) -> str | None:
    """The "parameters" text of a PNG (tEXt, zTXt or iTXt, anywhere in the file), else None.

    Only the chunk headers are read: the pixels are never decoded, so a huge image is no problem.
    Not a PNG, or a PNG without that text: None. A missing or empty file, or one cut short before
    the text: ImageError (a PNG cut short after it, e.g. an interrupted copy, still gives the text).
    """
    _check_file(path)
    found = None
    try:
        with open(path, "rb") as file:
            if file.read(len(_PNG_SIGNATURE)) != _PNG_SIGNATURE:
                return None
            for kind, data in _png_chunks(path, file, {b"tEXt", b"zTXt", b"iTXt"}):
                text = _png_text(kind, data, PNG_TEXT_KEY)
                if text is not None:
                    found = text  # the last one wins, as in Pillow's image.info
    except ImageError:
        if found is None:
            raise
    except OSError as exc:
        raise ImageError(path, f"cannot read file ({exc.strerror or exc})") from exc
    return found


def _png_chunks(path: PathLike, file: IO[bytes], wanted: set[bytes]) -> Iterator[tuple[bytes, bytes]]:
    """(type, data) of the wanted chunks, seeking over all others, up to IEND."""
    while True:
        head = file.read(8)
        if len(head) < 8:
            raise ImageError(path, "PNG is cut short (no IEND chunk)", "the file is damaged")
        length, kind = struct.unpack(">I4s", head)
        if kind in wanted and length <= _MAX_TEXT_BYTES:
            data = file.read(length)
            if len(data) < length:
                cause = f"PNG is cut short (in its {kind.decode('latin-1')} chunk)"
                raise ImageError(path, cause, "the file is damaged")
            yield kind, data
        else:
            file.seek(length, os.SEEK_CUR)
        file.seek(4, os.SEEK_CUR)  # CRC
        if kind == b"IEND":
            return


def _png_text(kind: bytes, data: bytes, key: str) -> str | None:
    """The text of a tEXt/zTXt/iTXt chunk whose keyword is `key`, else None (also when malformed)."""
    keyword, _, rest = data.partition(b"\0")
    if keyword != key.encode("latin-1"):
        return None
    try:
        if kind == b"tEXt":
            return rest.decode("latin-1")
        if kind == b"zTXt":
            return _inflate(rest[1:]).decode("latin-1")
        compressed, _method, rest = rest[0], rest[1], rest[2:]
        _lang, _, rest = rest.partition(b"\0")
        _translated, _, rest = rest.partition(b"\0")
        return (_inflate(rest) if compressed else rest).decode("utf-8")
    except (IndexError, ValueError, zlib.error):
        return None


def _inflate(data: bytes) -> bytes:
    """zlib-decompress at most Pillow's text-chunk cap (a zip bomb in a text chunk is refused)."""
    inflater = zlib.decompressobj()
    out = inflater.decompress(data, _MAX_TEXT_BYTES)
    if inflater.unconsumed_tail:
        raise ValueError("text chunk too large")
    return out


def _png_size(path: PathLike) -> tuple[int, int] | None:
    """Width and height from a PNG's IHDR, without Pillow; None when not a PNG."""
    with open(path, "rb") as file:
        head = file.read(24)
    if len(head) < 24 or not head.startswith(_PNG_SIGNATURE) or head[12:16] != b"IHDR":
        return None
    return struct.unpack(">II", head[16:24])


# --------------------------------------------------------------------------- input images


def _check_file(path: PathLike) -> None:
    """The failures that come before any decoding: missing, a folder, empty."""
    try:
        size = os.stat(path).st_size
    except FileNotFoundError as exc:
        raise ImageError(path, "no such file", "check the path") from exc
    except OSError as exc:
        raise ImageError(path, f"cannot open file ({exc.strerror or exc})") from exc
    if Path(path).is_dir():
        raise ImageError(path, "is a folder, not an image file")
    if size == 0:
        raise ImageError(path, "empty file (0 bytes)", "the file was not written completely; make or copy it again")


def _open_image(path: PathLike, max_pixels: int | None, mode: str) -> Image.Image:
    """Decode an image file after checking its declared size; EXIF rotation applied, then `mode`."""
    _check_file(path)
    limit = f"{max_pixels} pixels"
    bomb_fix = "refusing to decode it (a decompression bomb?); use a smaller image or raise max_pixels"
    try:
        png_size = _png_size(path)
    except OSError as exc:
        raise ImageError(path, f"cannot open file ({exc.strerror or exc})") from exc
    if png_size is not None and max_pixels and png_size[0] * png_size[1] > max_pixels:
        raise ImageError(path, f"header declares {png_size[0]}x{png_size[1]}, more than {limit}", bomb_fix)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # max_pixels decides instead
            with Image.open(path) as image:
                width, height = image.size
                if max_pixels and width * height > max_pixels:
                    raise ImageError(path, f"header declares {width}x{height}, more than {limit}", bomb_fix)
                image.load()
                return _to_8_bit(ImageOps.exif_transpose(image)).convert(mode)
    except ImageError:
        raise
    except Image.DecompressionBombError as exc:
        pillow_limit = f"Pillow's limit of {2 * Image.MAX_IMAGE_PIXELS} pixels"
        declared = f"header declares {png_size[0]}x{png_size[1]}" if png_size else "declared size is too large"
        raise ImageError(path, f"{declared}, more than {pillow_limit}", bomb_fix) from exc
    except UnidentifiedImageError as exc:
        raise ImageError(path, "not an image file Pillow can read", "give a PNG, JPEG or WebP image") from exc
    except Exception as exc:  # truncated data, bad CRC, broken zlib stream ... : one line, naming the file
        raise ImageError(path, f"cannot decode image ({type(exc).__name__}: {exc})", "the file is damaged") from exc


def _to_8_bit(image: Image.Image) -> Image.Image:
    """16-bit grayscale scaled to 8 bits (Pillow's own conversion would clip everything above 255)."""
    if not image.mode.startswith("I;16"):
        return image
    return Image.fromarray(np.round(np.asarray(image, dtype=np.float64) / 257).astype(np.uint8))


def load_image(path: PathLike, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Image.Image:
    """An input image (img2img, inpainting) as RGB, with its EXIF rotation applied, alpha dropped.

    The header's declared width x height is checked against `max_pixels` before anything is decoded
    (None: only Pillow's own limit, about 179 million pixels, which also applies above that).
    Errors are ImageError (ValueError), one line naming the file.
    """
    return _open_image(path, max_pixels, "RGB")


def load_mask(path: PathLike, size: tuple[int, int], max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Image.Image:
    """An inpainting mask as L (white = repaint), which must be `size` = (width, height) of the image."""
    mask = _open_image(path, max_pixels, "L")
    if mask.size != tuple(size):
        raise ImageError(
            path,
            f"mask is {mask.width}x{mask.height} but the image is {size[0]}x{size[1]}",
            "make the mask the same size as the image",
        )
    return mask


# --------------------------------------------------------------------------- tensors


def image_to_tensor(image: Image.Image) -> torch.Tensor:
    """(1, 3, H, W) float32 in [-1, 1], as diffusers' VaeImageProcessor.preprocess (x / 255 * 2 - 1)."""
    array = np.array(image.convert("RGB")).astype(np.float32) / 255.0
    return 2.0 * torch.from_numpy(array).permute(2, 0, 1).unsqueeze(0).contiguous() - 1.0


def mask_to_tensor(mask: Image.Image) -> torch.Tensor:
    """(1, 1, H, W) float32 of 0 and 1: diffusers' inpainting mask processor (grayscale, >= 0.5 -> 1)."""
    array = np.array(mask.convert("L")).astype(np.float32) / 255.0
    return torch.from_numpy((array >= 0.5).astype(np.float32))[None, None]


def tensor_to_images(x: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) in [-1, 1] -> B RGB images, bit-identical to VaeImageProcessor.postprocess(x, "pil").

    Same steps: (x * 0.5 + 0.5).clamp(0, 1) in x's dtype, then float32, * 255, round half to even, uint8.
    """
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"expected images of shape (B, 3, H, W), got {tuple(x.shape)}")
    array = (x.detach() * 0.5 + 0.5).clamp(0, 1).cpu().permute(0, 2, 3, 1).float().numpy()
    array = (array * 255).round().astype("uint8")
    return [Image.fromarray(a) for a in array]


def image_strip(images: Sequence[Image.Image], labels: Sequence[str] | None = None) -> Image.Image:
    """The images side by side (top-aligned, RGB), each with its label in a band above it, if given."""
    if not images:
        raise ValueError("image_strip needs at least one image")
    if labels is not None and len(labels) != len(images):
        raise ValueError(f"image_strip: {len(images)} images but {len(labels)} labels")
    tallest = max(image.height for image in images)
    font = band = None
    if labels is not None:
        font = ImageFont.load_default(size=max(10, min(24, tallest // 12)))
        top, bottom = font.getbbox("Ag")[1::2]
        band = bottom + top + 6
    strip = Image.new("RGB", (sum(image.width for image in images), tallest + (band or 0)))
    draw = ImageDraw.Draw(strip)
    x = 0
    for i, image in enumerate(images):
        strip.paste(image.convert("RGB"), (x, band or 0))
        if labels is not None:
            draw.text((x + 3, 3), _fit(draw, str(labels[i]), font, image.width - 6), fill="white", font=font)
        x += image.width
    return strip


def _fit(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> str:
    """`text`, cut with "..." to fit `width` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text + "..." if text else ""


__all__ = [
    "DEFAULT_MAX_PIXELS",
    "GenerationInfo",
    "ImageError",
    "PNG_TEXT_KEY",
    "check_output_folder",
    "format_infotext",
    "image_strip",
    "image_to_tensor",
    "infotext_params",
    "load_image",
    "load_mask",
    "mask_to_tensor",
    "model_hash",
    "next_sequence_number",
    "parse_infotext",
    "quote",
    "read_infotext",
    "save_png",
    "tensor_to_images",
]
