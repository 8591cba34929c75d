"""A1111's inpainting options: what the masked part starts from ("Masked content") and "Inpaint area".

- **Masked content** (A1111's `inpainting_fill`, 0-3): "fill" paints the masked part with the colours around
  it before encoding (`fill`: the unmasked pixels blurred outwards, from a wide blur to a sharp one, each
  composited over the last); "original" keeps the image (the default); "latent noise" fills it that way and
  then puts the starting noise into the masked latents; "latent nothing" fills it and zeroes them.
- **Only masked** (A1111's `inpaint_full_res`): the mask's bounding box, grown by `padding` pixels and then to
  the aspect ratio of the generation size, is cut out of the image and the mask and scaled to that size
  ("Resize and fill"), so the model paints the masked part at its full resolution; the result is scaled back
  into the box and pasted over the original through the mask (`PasteBack`), as A1111 and diffusers'
  `padding_mask_crop` do.
- **Overlay** (A1111 always, diffusers only with `padding_mask_crop`): over the whole picture too, the init
  image's unmasked pixels are put back over the result (the VAE's round trip changes them a little),
  through the mask doubled in strength (A1111's: only the outer half of a blurred edge blends).
"""

from __future__ import annotations

from dataclasses import dataclass

from PIL import Image, ImageFilter, ImageOps

from .images import RESIZE_MODES, named_choice, resize_for

MASKED_CONTENT = ("fill", "original", "latent noise", "latent nothing")  # A1111's inpainting_fill 0-3
INPAINT_AREAS = ("whole picture", "only masked")  # A1111's inpaint_full_res False / True
# the fill's blurs, widest first: (radius, times composited)
FILL_PASSES = ((256, 1), (64, 1), (16, 2), (4, 4), (2, 2), (0, 1))


def masked_content_name(value: object) -> str:
    """A1111's masked content by name (any case) or number -> its name; one line listing them otherwise."""
    return named_choice("masked_content", MASKED_CONTENT, value)


def inpaint_area_name(value: object) -> str:
    """"whole picture" or "only masked" (any case; True / False as A1111's inpaint_full_res)."""
    if isinstance(value, bool):
        return INPAINT_AREAS[value]
    return named_choice("inpaint_area", INPAINT_AREAS, value, numbered=False)


def fill(image: Image.Image, mask: Image.Image) -> Image.Image:
    """`image` with its masked part (white in `mask`) painted with the colours around it."""
    kept = Image.new("RGBa", image.size)
    kept.paste(image.convert("RGBA").convert("RGBa"), mask=ImageOps.invert(mask.convert("L")))  # premultiplied
    out = Image.new("RGBA", image.size)
    for radius, times in FILL_PASSES:
        blurred = kept.filter(ImageFilter.GaussianBlur(radius)).convert("RGBA")
        for _ in range(times):
            out.alpha_composite(blurred)
    return out.convert("RGB")


@dataclass(frozen=True)
class PasteBack:
    """What an inpainting puts back over what it made: the original image through the mask, the made image
    first scaled into `box` (left, top, right, bottom) when only that part was painted ("only masked")."""

    original: Image.Image
    mask: Image.Image
    box: tuple[int, int, int, int] | None = None

    @classmethod
    def overlay(cls, image: Image.Image, mask: Image.Image) -> PasteBack:
        """The whole picture's overlay: `image` and `mask` at the generation size, the mask doubled (A1111's)."""
        return cls(image.convert("RGB"), mask.convert("L").point(lambda v: min(255, 2 * v)))

    @classmethod
    def cut(cls, image: Image.Image, mask: Image.Image, padding: int, size: tuple[int, int]) -> PasteBack:
        """The box around `mask`'s white part for a generation of `size` (width, height); one line if it has none."""
        found = mask.convert("L").getbbox()
        if found is None:
            raise ValueError("the mask is all black (nothing to repaint): inpaint_area 'only masked' needs a white part")
        left, top, right, bottom = found
        padded = (max(left - padding, 0), max(top - padding, 0), min(right + padding, mask.width),
                  min(bottom + padding, mask.height))  # fmt: skip
        return cls(image, mask, grow_to_ratio(padded, size, mask.size))

    def crops(self, size: tuple[int, int]) -> tuple[Image.Image, Image.Image]:
        """The image and the mask cut to the box and scaled to `size`, as A1111 scales them ("Resize and fill")."""
        image = resize_for(self.original.convert("RGB").crop(self.box), size, RESIZE_MODES[2])
        return image, resize_for(self.mask.crop(self.box), size, RESIZE_MODES[2])

    def paste(self, made: Image.Image) -> Image.Image:
        """`made` (scaled back into the box, "Crop and resize", when there is one) over the original, through
        the mask; its infotext is kept."""
        whole = made.convert("RGB")
        if self.box is not None:
            left, top, right, bottom = self.box
            whole = self.original.convert("RGB").copy()
            whole.paste(resize_for(made.convert("RGB"), (right - left, bottom - top), RESIZE_MODES[1]), (left, top))
        out = Image.composite(whole, self.original.convert("RGB"), self.mask.convert("L"))
        out.info.update(made.info)
        return out


def grow_to_ratio(
    box: tuple[int, int, int, int], size: tuple[int, int], bounds: tuple[int, int]
) -> tuple[int, int, int, int]:
    """`box` grown on its short side to the aspect ratio of `size`, kept inside `bounds` (width, height) by
    shifting it, and cut at the far edge when even the whole side is too short (A1111's expand_crop_region)."""
    left, top, right, bottom = box
    if (right - left) / (bottom - top) > size[0] / size[1]:
        top, bottom = _grow(top, bottom, int((right - left) / (size[0] / size[1]) - (bottom - top)), bounds[1])
    else:
        left, right = _grow(left, right, int((bottom - top) * (size[0] / size[1]) - (right - left)), bounds[0])
    return left, top, right, bottom


def _grow(start: int, stop: int, by: int, limit: int) -> tuple[int, int]:
    """[start, stop) grown by `by` (half before, the rest after), shifted back inside [0, limit), then cut to it."""
    start, stop = start - by // 2, stop + by - by // 2
    if stop >= limit:
        start, stop = start - (stop - limit), limit
    if start < 0:
        start, stop = 0, stop - start
    return start, min(stop, limit)
