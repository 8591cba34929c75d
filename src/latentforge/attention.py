"""Scaled dot-product attention, with a faster path for long bfloat16 self-attention on the CPU.

PyTorch's CPU SDPA kernel runs SD's 4096-token, 40-wide-head self-attention at ~140 GFLOP/s, the same
in float32 and bfloat16. In bfloat16 the plain formulation is faster when it is cut so that one block
of scores stays in cache: per head, 512 queries at a time, scores = q k^T (oneDNN bfloat16 GEMM, the
1/sqrt(d) scale applied in its float32 accumulator), softmax, then probabilities x values, the values
zero-padded to a multiple of 16 wide (oneDNN's GEMM is 1.9x faster for 48 columns than for SD 1.5's 40).
On the 2-core AVX-512 BF16 CPU this takes 0.66-0.70x SDPA's time at SD 1.5's 64 x 64 level, 0.60-0.79x
at its 32 x 32 level (1024 tokens of 80-wide heads), 0.56-0.68x for SD 2.x's 64-wide heads and
0.47-0.54x for the VAE's one 512-wide head (five runs of `python -m benchmarks.transformer`,
docs/benchmarks.md). At 256 tokens the two are within noise (0.74-1.10x) and with 77 keys
(cross-attention) SDPA is faster, so SDPA is used there, and in float32 always.
It rounds the scores and probabilities to bfloat16 where SDPA keeps them in float32, which a bfloat16
UNet does not feel (tests/test_attention.py; docs/design.md "The fast path").
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

BLOCK_QUERIES = 512  # queries per block: 512 x 4096 bfloat16 scores = 4 MB (256-2048 measured: best or near it)
MIN_TOKENS = 1024  # below this (query or key length) SDPA is kept: as fast or faster there
VALUE_WIDTH_MULTIPLE = 16  # values are zero-padded to a multiple of this width: oneDNN's bfloat16 GEMM
# runs the scores x values product 1.9x faster for SD 1.5's 40-wide heads padded to 48 than unpadded


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v for (B, heads, N, d) q and (B, heads, M, d) k, v -> (B, heads, N, dv)."""
    if blocked_wins(q, k):
        return blocked_attention(q, k, v)
    return F.scaled_dot_product_attention(q, k, v)


def blocked_wins(q: torch.Tensor, k: torch.Tensor) -> bool:
    """Whether blocked_attention beats SDPA here (measured: CPU bfloat16, long queries and keys)."""
    return (
        q.device.type == "cpu"
        and q.dtype == k.dtype == torch.bfloat16
        and min(q.shape[-2], k.shape[-2]) >= MIN_TOKENS
    )


def blocked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Attention one head and BLOCK_QUERIES queries at a time; strided q, k, v are read in place (values
    whose width is not a multiple of VALUE_WIDTH_MULTIPLE are copied, zero-padded, one head at a time).
    The result is a (B, heads, N, dv) view of a (B, N, heads, dv) tensor, so that merging the heads
    back into (B, N, heads * dv) costs no copy."""
    batch, heads, n, d = q.shape
    dv = v.shape[-1]
    out = q.new_empty(batch, n, heads, dv)
    scores = q.new_empty(min(BLOCK_QUERIES, n), k.shape[-2])
    width = -(-dv // VALUE_WIDTH_MULTIPLE) * VALUE_WIDTH_MULTIPLE
    padded = q.new_zeros(k.shape[-2], width) if width != dv else None
    result = q.new_empty(len(scores), width) if padded is not None else None
    scale = d**-0.5
    for b in range(batch):
        for h in range(heads):
            keys_t = k[b, h].t()
            values = v[b, h]
            if padded is not None:
                padded[:, :dv] = values
                values = padded
            for start in range(0, n, BLOCK_QUERIES):
                stop = min(n, start + BLOCK_QUERIES)
                block = scores[: stop - start]
                torch.addmm(block, q[b, h, start:stop], keys_t, beta=0, alpha=scale, out=block)
                probabilities = torch.softmax(block, dim=-1, out=block)  # in place: no 4 MB allocation per block
                if padded is None:
                    torch.mm(probabilities, values, out=out[b, start:stop, h])
                else:
                    torch.mm(probabilities, values, out=result[: stop - start])
                    out[b, start:stop, h] = result[: stop - start, :dv]
    return out.transpose(1, 2)
