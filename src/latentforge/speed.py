"""Work skipped for speed: options that change the picture a little for a shorter run, all off by default.

Each is what another tool calls it, and its infotext field is that tool's where one exists:

- `s_min_uncond` (A1111's "Negative Guidance minimum sigma", infotext ``NGMS``): below this sigma the
  unconditional pass is left out of every other step (of every step with `s_min_uncond_all`); such a step
  is guided by the prompt alone (the conditional prediction, as at guidance 1).
- `skip_early_cfg` (A1111's "Ignore negative prompt during early sampling", ``Skip Early CFG``): the first
  fraction of the steps runs without the unconditional pass.
- `deepcache_interval` (DeepCache, Ma et al. 2024): the whole UNet runs every N-th call; the calls between
  run only the `deepcache_depth` blocks at the top of each side and reuse the deep features the last whole
  call left at that point. A whole call keeps its unconditional pass where one of the two options above
  would skip it, so that its features serve the guided calls after it too.
- `token_merging` (A1111's ``Token merging ratio``; ToMe for SD, Bolya & Hoffman 2023): that share of the
  tokens of the self-attention at the largest level merged into similar ones (tome.py).
- `tiny_decoder` (A1111's ``VAE Decoder: TAESD``): the final image decoded by the tiny autoencoder decoder
  (tiny_decoder.py) instead of the VAE's.

A step's index is the sampler's (guidance.step_of), so with A1111 "every other step" means odd steps: the
first step is always guided. Skipping is not applied to prompts composed with AND (their guided sum has no
unconditional-free form A1111 defines).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .unet import DeepFeatures

MAX_DEEPCACHE_INTERVAL = 10  # DeepCache's paper goes to N = 20 with quality falling fast beyond ~5-10


@dataclass(frozen=True)
class Shortcuts:
    s_min_uncond: float = 0.0  # sigma below which the unconditional pass is skipped on odd steps; 0: never
    s_min_uncond_all: bool = False  # ... on every step below it
    skip_early_cfg: float = 0.0  # the first fraction (0..1) of the steps without the unconditional pass
    deepcache_interval: int = 1  # the whole UNet every N-th call; 1: every call (off)
    deepcache_depth: int = 1  # blocks at the top of each side that run on the calls between (1: the first conv and the last block)
    token_merging: float = 0.0  # share of the top level's self-attention tokens merged, 0 <= r < 1
    tiny_decoder: bool | str = False  # decode the final image with the tiny decoder; "auto": when one is loaded

    def __post_init__(self) -> None:
        for name in ("s_min_uncond", "skip_early_cfg", "token_merging"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name} must be a number, got {value!r}")
        if self.s_min_uncond < 0:
            raise ValueError(f"s_min_uncond must be a sigma >= 0 (0: off), got {self.s_min_uncond}")
        if not 0 <= self.skip_early_cfg <= 1:
            raise ValueError(f"skip_early_cfg must be a fraction of the steps, 0..1, got {self.skip_early_cfg}")
        if not 0 <= self.token_merging < 1:
            raise ValueError(f"token_merging must be a share of the tokens, 0 <= r < 1, got {self.token_merging}")
        for name, top in (("deepcache_interval", MAX_DEEPCACHE_INTERVAL), ("deepcache_depth", None)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1 or (top and value > top):
                bound = f"1..{top}" if top else ">= 1"
                raise ValueError(f"{name} must be a whole number {bound}, got {value!r}")
        if not isinstance(self.s_min_uncond_all, bool):
            raise ValueError(f"s_min_uncond_all must be true or false, got {self.s_min_uncond_all!r}")
        if not isinstance(self.tiny_decoder, bool) and self.tiny_decoder != "auto":
            raise ValueError(f"tiny_decoder must be true, false or 'auto' (when one is loaded), got {self.tiny_decoder!r}")

    def skips_uncond(self, step: int, steps: int, sigma: float) -> bool:
        """Whether sampler step `step` of `steps` at noise level `sigma` leaves the unconditional pass out
        (A1111's order: the early fraction first, then the minimum sigma)."""
        if self.skip_early_cfg and step / steps <= self.skip_early_cfg:
            return True
        return bool(self.s_min_uncond and (step % 2 or self.s_min_uncond_all) and sigma < self.s_min_uncond)

    def infotext(self) -> dict[str, object]:
        """The fields this run adds to the infotext (A1111's names where it has the option)."""
        out: dict[str, object] = {}
        if self.skip_early_cfg:
            out["Skip Early CFG"] = self.skip_early_cfg
        if self.s_min_uncond:
            out["NGMS"] = self.s_min_uncond
            if self.s_min_uncond_all:
                out["NGMS all steps"] = True
        if self.deepcache_interval > 1:
            out["DeepCache"] = f"{self.deepcache_interval}/{self.deepcache_depth}"
        if self.token_merging:
            out["Token merging ratio"] = self.token_merging
        if self.tiny_decoder is True:
            out["VAE Decoder"] = "TAESD"
        return out


# The presets (`--speed NAME`), chosen on the shipped model with `latentforge eval -n 100 --seed 0` (docs/benchmarks.md
# "Skipping work"): `fast` holds the options whose prompt adherence each stayed within 0.02 of the full run;
# `fastest` adds DeepCache, which alone cost 0.03-0.04 there (the combination: 0.95 against 0.98 at the model's
# guidance, 0.90 against 0.94 at guidance 1). Neither
# decodes with the tiny decoder: the shipped one halves the judged adherence (its shapes' edges are off).
PRESETS: dict[str, Shortcuts] = {
    "default": Shortcuts(),
    "fast": Shortcuts(s_min_uncond=2.0, skip_early_cfg=0.2, token_merging=0.5),
    "fastest": Shortcuts(s_min_uncond=2.0, skip_early_cfg=0.2, token_merging=0.5, deepcache_interval=3),
}


def preset(name: str) -> Shortcuts:
    if name not in PRESETS:
        raise ValueError(f"unknown speed preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return PRESETS[name]


class StepCache:
    """Which UNet calls of a run are whole (every `interval`-th, from the first) and the features the others
    reuse. A call with a smaller batch than the stored features (its unconditional pass skipped, which comes
    first in the batch) reuses their last rows; a call with a larger one is made whole. The denoiser keeps
    the unconditional pass in a whole call (`due`), so that its features serve both kinds of call."""

    def __init__(self, interval: int, depth: int) -> None:
        self.interval = interval
        self.calls = 0
        self.whole = DeepFeatures(depth)  # the last whole call's: it stores its features here

    def due(self) -> bool:
        """Whether the next call is a whole one."""
        return self.calls % self.interval == 0

    def next_call(self, batch: int) -> DeepFeatures:
        due, self.calls = self.due(), self.calls + 1
        stored = self.whole.features
        if not due and stored is not None and len(stored) >= batch:
            return DeepFeatures(self.whole.depth, stored[len(stored) - batch :], reuse=True)
        self.whole = DeepFeatures(self.whole.depth)
        return self.whole
