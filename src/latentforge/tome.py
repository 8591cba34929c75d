"""Token merging (ToMe for SD, Bolya & Hoffman 2023) in the UNet's self-attention; off unless switched on.

`set_token_merging(unet, ratio)` makes each transformer block at the UNet's full resolution run its
self-attention (attn1) on fewer tokens: x + unmerge(attn1(merge(norm1(x)))), where merge averages the
r = int(N * ratio) source tokens most similar to a destination token into it and unmerge copies each
merged token's output back to every token it holds. Cross-attention and the feed-forward see all tokens.
These are the `tomesd` package's defaults (max_downsample=1, merge_attn=True, merge_crossattn=False,
merge_mlp=False, sx = sy = 2), except that the destination is always the top-left token of its 2 x 2 cell
(tomesd's use_rand=False) so that a generation does not depend on a random draw.

Which transformers: tomesd's rule, those whose token count is the latent's (downsample factor 1), i.e. the
ones before the first Downsample and after the last Upsample (level 0). A UNet without attention at level 0,
as SDXL's, is therefore not merged at all, as with tomesd.

The matching follows tomesd's `bipartite_soft_matching_random2d(..., no_rand=True)`: the merged tokens are the
same and in the same order except for the destinations, which are here in raster order (tomesd's come out of
an unstable argsort). Self-attention does not see the order, so the block's output is the same.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

Tokens = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class TokenMerge:
    """A matching of B samples' N tokens onto N - r merged tokens, which `merge` and `unmerge` apply.

    The batch is flattened: token n of sample b is row b * N + n, merged token k of sample b row b * (N - r) + k.
    """

    rows: torch.Tensor  # (B * N,) int64: the merged token each token goes into
    counts: torch.Tensor  # (B * (N - r), 1): how many tokens each merged token holds
    batch: int
    merged: int  # N - r

    def merge(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, C) -> (B, N - r, C): each merged token the mean of its tokens (summed in float32 or wider)."""
        channels = x.shape[-1]
        wide = torch.promote_types(x.dtype, torch.float32)
        sums = x.new_zeros(len(self.counts), channels, dtype=wide)
        sums.index_add_(0, self.rows, x.reshape(-1, channels).to(wide))
        return (sums / self.counts).to(x.dtype).view(self.batch, self.merged, channels)

    def unmerge(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N - r, C) -> (B, N, C): each token gets the row of the merged token it went into."""
        channels = x.shape[-1]
        return x.reshape(-1, channels).index_select(0, self.rows).view(self.batch, -1, channels)


def _unchanged(x: torch.Tensor) -> torch.Tensor:
    return x


def destinations(h: int, w: int, stride: tuple[int, int] = (2, 2), device=None) -> torch.Tensor:
    """Positions (in the raster order of the h x w grid) of the destination tokens: the top-left token of
    each full sy x sx cell, in raster order -> (h // sy * (w // sx),) int64. Tokens in the last rows and
    columns that do not make a full cell (odd h or w) are all sources, as in tomesd."""
    sy, sx = stride
    rows = torch.arange(0, h - sy + 1, sy, device=device)
    columns = torch.arange(0, w - sx + 1, sx, device=device)
    return (rows[:, None] * w + columns).reshape(-1)


def bipartite_soft_matching_2d(
    metric: torch.Tensor, h: int, w: int, r: int, stride: tuple[int, int] = (2, 2)
) -> tuple[Tokens, Tokens]:
    """ToMe for SD's matching of the tokens of an h x w grid, per sample -> (merge, unmerge).

    metric: (B, N = h * w, C), tokens in raster order, compared by cosine similarity. One token per
    stride = (sy, sx) cell is a destination (`destinations`), the others sources; each source picks its
    most similar destination, and the r most similar sources (r capped to the number of sources) are merged
    into theirs. merge: (B, N, C) -> (B, N - r, C), the sources that stay first (most similar first), then
    the destinations (raster order), each the mean of itself and the sources merged into it; unmerge:
    (B, N - r, C) -> (B, N, C), each merged source given its destination's row. r <= 0, or a grid without
    a full cell: both leave the tokens as they are.
    """
    batch, n, _ = metric.shape
    dst = destinations(h, w, stride, metric.device)
    is_dst = torch.zeros(n, dtype=torch.bool, device=metric.device)
    is_dst[dst] = True
    src = (~is_dst).nonzero().squeeze(1)
    r = min(r, len(src))
    if r <= 0 or not len(dst):
        return _unchanged, _unchanged
    with torch.no_grad():
        metric = F.normalize(metric, dim=-1)
        scores = metric[:, src] @ metric[:, dst].transpose(1, 2)  # (B, sources, destinations)
        best, best_dst = scores.max(dim=-1)
        rank = best.argsort(dim=-1, descending=True).argsort(dim=-1)  # 0: the most similar source
        kept = len(src) - r
        source_rows = torch.where(rank >= r, rank - r, kept + best_dst)  # (B, sources)
        rows = torch.empty(batch, n, dtype=torch.long, device=metric.device)
        rows[:, src] = source_rows
        rows[:, dst] = kept + torch.arange(len(dst), device=metric.device)
        rows = (rows + torch.arange(batch, device=metric.device)[:, None] * (n - r)).reshape(-1)
        counts = torch.bincount(rows, minlength=batch * (n - r))[:, None]
    matching = TokenMerge(rows, counts, batch, n - r)
    return matching.merge, matching.unmerge


def full_resolution_transformers(unet: nn.Module) -> list[nn.Module]:
    """The UNet's SpatialTransformers that run at the latent's resolution: before the first Downsample and
    after the last Upsample (the middle block too in a UNet of one level), in the order they run."""
    from .unet import Downsample, SpatialTransformer, Upsample  # here: unet.py imports this module

    found, depth = [], 0
    for block in [*unet.input_blocks, unet.middle_block, *unet.output_blocks]:
        for layer in block:
            if isinstance(layer, Downsample):
                depth += 1
            elif isinstance(layer, Upsample):
                depth -= 1
            elif isinstance(layer, SpatialTransformer) and depth == 0:
                found.append(layer)
    return found


def set_token_merging(unet: nn.Module, ratio: float) -> nn.Module:
    """Merge int(N * ratio) of the N tokens in the self-attention of the UNet's full-resolution transformer
    blocks (see the module's docstring); 0 switches it off. ratio in [0, 1), else a ValueError. Returns `unet`."""
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 <= ratio < 1:
        raise ValueError(f"token merging ratio must be a number in [0, 1), got {ratio!r}")
    for transformer in full_resolution_transformers(unet):
        for block in transformer.transformer_blocks:
            block.token_merge_ratio = float(ratio)
    return unet
