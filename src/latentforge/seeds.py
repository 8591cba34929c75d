"""An image's starting noise from its seed, with A1111's seed options: the random source, the variation
seed, seed resize and the eta noise seed delta.

Without them the noise is the first draw of the image's generator (a CPU generator seeded with its seed),
the same numbers as A1111's with its random source set to "CPU".

- **Random source** (A1111's `randn_source`): "CPU" (the default: torch's CPU generator), "NV" (CUDA's draws
  computed on the CPU, `philox.PhiloxGenerator`) or "GPU" (A1111's default, what an NVIDIA card draws: NV
  here). Every draw of a generation (starting noise, variation, a sampler's noise) comes from that source.

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

from .philox import PhiloxGenerator, normal

RNG_SOURCES = ("CPU", "NV", "GPU")
COSINE_LINEAR = 0.9995  # the webui's threshold: above this mean cosine the two noises are mixed linearly


@dataclass(frozen=True)
class SeedOptions:
    """The seed options of a request: `subseed` for image 0 (image i uses subseed + i, as its seed is seed + i),
    its `strength` (0: off), and `resize_from` (width, height) in pixels or None."""

    subseed: int = 0
    strength: float = 0.0
    resize_from: tuple[int, int] | None = None
    noise_delta: int = 0  # A1111's eta noise seed delta (ENSD)
    rng: str = "CPU"  # A1111's random source: RNG_SOURCES

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
            "rng": self.rng,  # always written (A1111 leaves out its default, GPU; ours is CPU, and old files had none)
        }


def initial_noise(
    shape: tuple[int, ...], seed: int, generator: torch.Generator, options: SeedOptions, index: int, downscale: int
) -> torch.Tensor:
    """The (1, C, h, w) starting noise of image `index`, whose generator (seeded with `seed`) draws it first
    unless seed resize is on; `downscale` is the VAE's (pixels per latent)."""
    noise = normal(shape, generator)
    small = None
    if options.resize_from is not None:
        width, height = options.resize_from
        small = (*shape[:2], height // downscale, width // downscale)
        if small == tuple(shape):
            small = None
    drawn = noise if small is None else normal(small, make_generator(seed, options.rng))
    if options.strength:
        other = normal(drawn.shape, make_generator(options.subseed + index, options.rng))
        drawn = slerp(options.strength, drawn, other)
    if small is None:
        return drawn
    return paste_centred(drawn, noise)


def sampler_generator(seed: int, generator: torch.Generator, options: SeedOptions) -> torch.Generator:
    """The generator a sampler draws its noise from once the starting noise is drawn: the image's own, or with
    an eta noise seed delta a fresh one seeded with seed + delta (as the webui reseeds after the first noise)."""
    return make_generator(seed + options.noise_delta, options.rng) if options.noise_delta else generator


def make_generator(seed: int, rng: str = "CPU") -> torch.Generator | PhiloxGenerator:
    """A generator of the random source seeded with `seed`: torch's CPU one, or CUDA's draws (NV, GPU)."""
    return torch.Generator().manual_seed(seed) if rng == "CPU" else PhiloxGenerator(seed)


def rng_source(value: object) -> str:
    """A1111's random source by name (any case): "CPU", "NV" or "GPU"; one line otherwise."""
    found = next((name for name in RNG_SOURCES if str(value).strip().upper() == name), None)
    if found is None:
        raise ValueError(f"rng must be one of {', '.join(RNG_SOURCES)} (A1111's random sources), got {value!r}")
    return found


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
