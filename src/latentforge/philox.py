"""A CPU generator whose normal draws are what `torch.randn(..., device="cuda")` draws for the same seed:
A1111's "NV" random source, which also stands in for its default "GPU" source on NVIDIA cards.

CUDA's generator is Philox 4x32 with 10 rounds (Salmon et al., "Parallel random numbers: as easy as 1, 2,
3", SC 2011; the multipliers 0xD2511F53 / 0xCD9E8D57 and the key increments 0x9E3779B9 / 0xBB67AE85 are
theirs). As A1111's NV source lays it out: element i of a draw uses the counter (offset, 0, i, 0) and the
seed as the key (low word, high word); each draw advances the offset by one. The first two of the four
words make one normal by Box-Muller, u = x 2^-32 + 2^-33 and v = 2 pi (y 2^-32 + 2^-33), z = sqrt(-2 ln u)
sin(v), with the constants rounded to float32 and the arithmetic in float64, rounded to float32 at the end
(as that source computes it; CUDA computes it in float32, so the two differ by a float32 step or two).
Seed 0's first draw of 3 x 4 is within 3e-7 of CUDA's `torch.randn(3, 4)` after `torch.manual_seed(0)` as
A1111 documents it (-0.92466259, -0.42534415, -2.6438457, 0.14518388, ...).
"""

from __future__ import annotations

import numpy as np
import torch

MULTIPLIERS = (0xD2511F53, 0xCD9E8D57)
KEY_STEPS = (0x9E3779B9, 0xBB67AE85)
ROUNDS = 10
_WORD = np.uint64(0xFFFFFFFF)
_SCALE = float(np.float32(2.3283064e-10))  # 2^-32 as float32 holds it
_ANGLE = float(np.float32(2.3283064e-10 * 6.2831855))  # 2 pi 2^-32, likewise


class PhiloxGenerator:
    """Normal draws on the CPU that match CUDA's for a seed; `randn(shape)` draws and advances the offset."""

    device = torch.device("cpu")

    def __init__(self, seed: int) -> None:
        self.seed, self.offset = int(seed) % 2**64, 0

    def randn(self, shape: tuple[int, ...] | torch.Size) -> torch.Tensor:
        """(shape) float32 standard normals, the next draw of this generator."""
        n = int(np.prod(shape, dtype=np.int64))
        if n >= 2**32:
            raise ValueError(f"a Philox draw holds fewer than 2^32 numbers, asked for {n}")
        counter = [np.full(n, self.offset, np.uint64), np.zeros(n, np.uint64), np.arange(n, dtype=np.uint64),
                   np.zeros(n, np.uint64)]  # fmt: skip
        self.offset += 1
        x, y = philox_4x32(counter, (self.seed & 0xFFFFFFFF, self.seed >> 32))[:2]
        u = x.astype(np.float64) * _SCALE + _SCALE / 2
        v = y.astype(np.float64) * _ANGLE + _ANGLE / 2
        z = np.sqrt(-2.0 * np.log(u)) * np.sin(v)
        return torch.from_numpy(z.astype(np.float32)).reshape(tuple(shape))


def philox_4x32(counter: list[np.ndarray], key: tuple[int, int]) -> list[np.ndarray]:
    """Philox 4x32-10 of counters given as four uint64 arrays of 32-bit words -> the four output words."""
    c0, c1, c2, c3 = counter
    k0, k1 = np.uint64(key[0]), np.uint64(key[1])
    for i in range(ROUNDS):
        high0, high1 = c0 * np.uint64(MULTIPLIERS[0]), c2 * np.uint64(MULTIPLIERS[1])  # 32 x 32 -> 64 bits
        c0, c1, c2, c3 = (high1 >> np.uint64(32)) ^ c1 ^ k0, high1 & _WORD, (high0 >> np.uint64(32)) ^ c3 ^ k1, high0 & _WORD
        if i < ROUNDS - 1:
            k0, k1 = (k0 + np.uint64(KEY_STEPS[0])) & _WORD, (k1 + np.uint64(KEY_STEPS[1])) & _WORD
    return [c0, c1, c2, c3]


def normal(
    shape: tuple[int, ...] | torch.Size, generator, dtype: torch.dtype | None = None, device=None
) -> torch.Tensor:
    """Standard normals from a torch.Generator or a PhiloxGenerator (None: torch's global one)."""
    if isinstance(generator, PhiloxGenerator):
        return generator.randn(shape).to(dtype=dtype or torch.float32, device=device or "cpu")
    return torch.randn(shape, generator=generator, dtype=dtype, device=device)
