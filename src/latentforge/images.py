"""Images in and out of the pipeline: input images and masks checked before decoding, tensors, preview strips.

Input images are checked before they are decoded: a missing, empty or unreadable file, or a header
that declares more pixels than allowed (a decompression bomb), is a one-line `ImageError`.
Tensors follow diffusers' `VaeImageProcessor` to the bit: images in [-1, 1], masks binarised at 0.5.
"""

from __future__ import annotations

import contextlib
import os
import struct
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont, ImageOps, UnidentifiedImageError

from .errors import FileError

PathLike = str | os.PathLike[str]

# 8192 x 8192: far above any Stable Diffusion input, far below what would exhaust memory.
DEFAULT_MAX_PIXELS = 8192 * 8192
_BOMB_FIX = "refusing to decode it (a decompression bomb?); use a smaller image or raise max_pixels"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class ImageError(FileError):
    """An image or output folder that cannot be used."""


# --------------------------------------------------------------------------- input images


def check_file(path: PathLike) -> None:
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


def declared_size(path: PathLike, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> tuple[int, int]:
    """An image file's (width, height) from its header alone, no pixel decoded; more than `max_pixels`
    (None: only Pillow's limit) is an ImageError, as are a missing, empty or unreadable file."""
    check_file(path)
    try:
        png_size = _png_size(path)
    except OSError as exc:
        raise ImageError(path, f"cannot open file ({exc.strerror or exc})") from exc
    if png_size is not None:
        _check_pixels(path, png_size, max_pixels)
    with _pillow_errors(path, png_size), Image.open(path) as image:
        return _check_pixels(path, image.size, max_pixels)


def _check_pixels(path: PathLike, size: tuple[int, int], max_pixels: int | None) -> tuple[int, int]:
    if max_pixels and size[0] * size[1] > max_pixels:
        cause = f"header declares {size[0]}x{size[1]}, more than {max_pixels} pixels"
        raise ImageError(path, cause, _BOMB_FIX)
    return size


@contextlib.contextmanager
def _pillow_errors(path: PathLike, png_size: tuple[int, int] | None) -> Iterator[None]:
    """Pillow's failures while opening or decoding `path` as one-line ImageErrors naming it."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # max_pixels decides instead
            yield
    except ImageError:
        raise
    except Image.DecompressionBombError as exc:
        pillow_limit = f"Pillow's limit of {2 * Image.MAX_IMAGE_PIXELS} pixels"
        declared = f"header declares {png_size[0]}x{png_size[1]}" if png_size else "declared size is too large"
        raise ImageError(path, f"{declared}, more than {pillow_limit}", _BOMB_FIX) from exc
    except UnidentifiedImageError as exc:
        raise ImageError(path, "not an image file Pillow can read", "give a PNG, JPEG or WebP image") from exc
    except Exception as exc:  # truncated data, bad CRC, broken zlib stream ... : one line, naming the file
        raise ImageError(path, f"cannot decode image ({type(exc).__name__}: {exc})", "the file is damaged") from exc


def _open_image(path: PathLike, max_pixels: int | None, mode: str) -> Image.Image:
    """Decode an image file after checking its declared size; EXIF rotation applied, then `mode`."""
    declared_size(path, max_pixels)
    with _pillow_errors(path, None), Image.open(path) as image:
        image.load()
        return _to_8_bit(ImageOps.exif_transpose(image)).convert(mode)


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


def _png_size(path: PathLike) -> tuple[int, int] | None:
    """Width and height from a PNG's IHDR, without Pillow; None when not a PNG."""
    with open(path, "rb") as file:
        head = file.read(24)
    if len(head) < 24 or not head.startswith(PNG_SIGNATURE) or head[12:16] != b"IHDR":
        return None
    return struct.unpack(">II", head[16:24])


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


# A1111's img2img resize modes, by its names (its API numbers them 0-3 in this order)
RESIZE_MODES = ("Just resize", "Crop and resize", "Resize and fill", "Just resize (latent upscale)")


def resize_mode_name(value: object) -> str:
    """A resize mode by A1111's name (any case) or number -> its name; one line listing them otherwise."""
    return named_choice("resize_mode", RESIZE_MODES, value)


def named_choice(what: str, names: tuple[str, ...], value: object, numbered: bool = True) -> str:
    """One of A1111's named options by its name (any case) or, when `numbered`, its position (as its API numbers
    them) -> the name; one line listing them otherwise."""
    if numbered and isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(names):
        return names[value]
    found = next((name for name in names if str(value).strip().lower() == name.lower()), None)
    if found is None:
        known = ", ".join(f"{i}: {n!r}" if numbered else repr(n) for i, n in enumerate(names))
        raise ValueError(f"{what} must be one of {known}; got {value!r}")
    return found


def resize_for(image: Image.Image, size: tuple[int, int], mode: str, resample: int = Image.LANCZOS) -> Image.Image:
    """`image` at `size` (width, height) by one of A1111's first three resize modes: stretched ("Just resize"),
    scaled to cover and centre-cropped ("Crop and resize"), or scaled to fit, centred, with the bands left over
    filled by stretching the scaled image's edge rows or columns ("Resize and fill"); A1111's rounding."""
    width, height = size
    if mode == RESIZE_MODES[0] or image.size == size:
        return image if image.size == size else image.resize(size, resample)
    ratio, image_ratio = width / height, image.width / image.height
    cover = mode == RESIZE_MODES[1]
    by_width = ratio > image_ratio if cover else ratio < image_ratio  # scale to the target's width, else its height
    scaled = (width, image.height * width // image.width) if by_width else (image.width * height // image.height, height)
    resized = image.resize(scaled, resample)
    out = Image.new(image.mode, size)
    left, top = width // 2 - scaled[0] // 2, height // 2 - scaled[1] // 2
    out.paste(resized, (left, top))
    if not cover:
        _fill_bands(out, resized, left, top, resample)
    return out


def _fill_bands(out: Image.Image, resized: Image.Image, left: int, top: int, resample: int) -> None:
    """"Resize and fill": the bands beside the centred image get its first / last row or column, stretched; both
    bands are as wide as the first, as in A1111 (the second runs over the edge by a line when the scaled image's
    side is odd)."""
    w, h = resized.size
    if top > 0:  # bands above and below
        out.paste(resized.resize((out.width, top), resample, box=(0, 0, w, 0)), (0, 0))
        out.paste(resized.resize((out.width, top), resample, box=(0, h, w, h)), (0, top + h))
    elif left > 0:  # bands left and right
        out.paste(resized.resize((left, out.height), resample, box=(0, 0, 0, h)), (0, 0))
        out.paste(resized.resize((left, out.height), resample, box=(w, 0, w, h)), (left + w, 0))


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
    "ImageError",
    "check_file",
    "declared_size",
    "image_strip",
    "image_to_tensor",
    "load_image",
    "load_mask",
    "mask_to_tensor",
    "tensor_to_images",
]
