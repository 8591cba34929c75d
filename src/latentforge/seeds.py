"""An image's starting noise from its seed, with A1111's two seed options: the variation seed and seed resize.

Without them the noise is the first draw of the image's generator (a CPU generator seeded with its seed),
the same numbers as A1111's with its random source set to "CPU".

- **Variation seed** (A1111's ``subseed`` / ``subseed_strength``): the noise is moved toward a second
  seed's noise by spherical interpolation at the strength: 0 keeps the seed's noise, 1 gives the variation
  seed's, and a small strength makes a nearby picture. The interpolation is the webui's: each (channel,
  column) of the latent is one vector along the height axis, and where the two noises are nearly
  parallel (mean cosine above 0.9995, e.g. the same seed twice) the webui mixes them linearly, weighting
  the seed's noise by the strength; both are kept so that the same seeds give the same noise.
- **Seed resize** (A1111's "Resize seed from width/height"): the noise the seed would make at another
  size, centred in this size's noise (cropped where it is larger), so that a seed keeps its composition
  when the size changes. The variation seed's noise is drawn at that other size too.
- **Eta noise seed delta** (A1111's ENSD setting, 31337 in many shared infotexts): the noise a stochastic
  sampler draws after the starting noise comes from a generator seeded with seed + delta instead of
  continuing the seed's (`sampler_generator`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

COSINE_LINEAR = 0.9995  # the webui's threshold: above this mean cosine the two noises are mixed linearly


@dataclass(frozen=True)
class SeedOptions:
    """The seed options of a request: `subseed` for image 0 (image i uses subseed + i, as its seed is seed + i),
    its `strength` (0: off), and `resize_from` (width, height) in pixels or None."""

    subseed: int = 0
    strength: float = 0.0
    resize_from: tuple[int, int] | None = None
    noise_delta: int = 0  # A1111's eta noise seed delta (ENSD)

    def info_fields(self, index: int, stochastic: bool) -> dict[str, object]:
        """infotext.GenerationInfo's fields for image `index` (A1111's "Variation seed", "Variation seed
        strength" when the strength is above 0, "Seed resize from", and "ENSD" when a `stochastic` sampler
        used it); None where off."""
        on = self.strength > 0
        return {
            "variation_seed": self.subseed + index if on else None,
            "variation_seed_strength": self.strength if on else None,
            "seed_resize_from": None if self.resize_from is None else "{}x{}".format(*self.resize_from),
            "ensd": self.noise_delta if self.noise_delta and stochastic else None,
        }


def initial_noise(
    shape: tuple[int, ...], seed: int, generator: torch.Generator, options: SeedOptions, index: int, downscale: int
) -> torch.Tensor:
    """The (1, C, h, w) starting noise of image `index`, whose generator (seeded with `seed`) draws it first
    unless seed resize is on; `downscale` is the VAE's (pixels per latent)."""
    noise = torch.randn(shape, generator=generator)
    small = None
    if options.resize_from is not None:
        width, height = options.resize_from
        small = (*shape[:2], height // downscale, width // downscale)
        if small == tuple(shape):
            small = None
    drawn = noise if small is None else torch.randn(small, generator=torch.Generator().manual_seed(seed))
    if options.strength:
        other = torch.randn(drawn.shape, generator=torch.Generator().manual_seed(options.subseed + index))
        drawn = slerp(options.strength, drawn, other)
    if small is None:
        return drawn
    return paste_centred(drawn, noise)


def sampler_generator(seed: int, generator: torch.Generator, options: SeedOptions) -> torch.Generator:
    """The generator a sampler draws its noise from once the starting noise is drawn: the image's own, or with
    an eta noise seed delta a fresh one seeded with seed + delta (as the webui reseeds after the first noise)."""
    return torch.Generator().manual_seed(seed + options.noise_delta) if options.noise_delta else generator


def slerp(t: float, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation from `a` (t = 0) to `b` (t = 1) of (1, C, H, W) noise, each (channel, column)
    a vector along H, as the webui interpolates; nearly parallel noises are mixed linearly as it does."""
    cosine = (a / a.norm(dim=2, keepdim=True) * (b / b.norm(dim=2, keepdim=True))).sum(2, keepdim=True)
    if cosine.mean() > COSINE_LINEAR:
        return a * t + b * (1 - t)
    omega = torch.acos(cosine)
    sine = torch.sin(omega)
    return torch.sin((1 - t) * omega) / sine * a + torch.sin(t * omega) / sine * b  # t = 1 gives b exactly


def paste_centred(small: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """`noise` with `small` over its centre, the webui's way: per axis the offset is half the difference
    rounded down, and where `small` is the larger it is cropped by that offset on both sides (so an odd
    difference leaves this size's own noise in the last row or column)."""
    (top, from_top, h), (left, from_left, w) = (_overlap(noise.shape[i], small.shape[i]) for i in (2, 3))
    out = noise.clone()
    out[:, :, top : top + h, left : left + w] = small[:, :, from_top : from_top + h, from_left : from_left + w]
    return out


def _overlap(size: int, small: int) -> tuple[int, int, int]:
    """(offset in the noise, offset in `small`, length) along one axis."""
    offset = (size - small) // 2
    return (offset, 0, small) if offset >= 0 else (0, -offset, small + 2 * offset)
