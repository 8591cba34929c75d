"""The spatial transformer's fast paths against the plain ones, per shape of SD's UNet and VAE at 512 x 512.

    python -m benchmarks.transformer [--repeats 7] [--no-doc]

Attention: `latentforge.attention.blocked_attention` (bfloat16, per head and 512 queries at a time,
values padded to a multiple of 16 wide) against PyTorch's SDPA, with each one's relative L2 error
against float64 SDPA, and whether the models take the blocked way there (`blocked_wins`).
Feed-forward: `latentforge.unet.FeedForward` in inference (FEED_FORWARD_ROWS tokens at a time)
against the same layers in one call, float32 and bfloat16. The two ways alternate; medians of the
repeats after a warm-up. Writes docs/benchmarks.md (section `transformer`) and
benchmarks/out/transformer.json.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.common import (
    THREADS,
    alternate,
    limit_threads,
    machine_info,
    machine_markdown,
    markdown_table,
    publish,
    relative_error,
)
from latentforge import attention, unet
from latentforge.inference import set_inference

OUT = Path(__file__).resolve().parent / "out" / "transformer.json"
# (where, batch, heads, query tokens, key tokens, head width)
ATTENTION = [
    ("SD 1.5 UNet 64x64 self", 2, 8, 4096, 4096, 40),
    ("SD 1.5 UNet 32x32 self", 2, 8, 1024, 1024, 80),
    ("SD 1.5 UNet 16x16 self", 2, 8, 256, 256, 160),
    ("SD 1.5 UNet 64x64 cross (77 text tokens)", 2, 8, 4096, 77, 40),
    ("SD 2.x UNet 64x64 self", 2, 5, 4096, 4096, 64),
    ("SD 2.x UNet 32x32 self", 2, 10, 1024, 1024, 64),
    ("VAE 64x64 (one 512-wide head)", 1, 1, 4096, 4096, 512),
]
# (where, batch, tokens, width)
FEED_FORWARD = [
    ("SD 1.5 UNet 64x64", 2, 4096, 320),
    ("SD 1.5 UNet 32x32", 2, 1024, 640),
    ("SD 1.5 UNet 16x16", 2, 256, 1280),
]


def measure_attention(batch: int, heads: int, n: int, m: int, width: int, repeats: int) -> dict:
    g = torch.Generator().manual_seed(0)
    q64, k64, v64 = (torch.randn(batch, count, heads, width, generator=g, dtype=torch.float64).transpose(1, 2)
                     for count in (n, m, m))  # fmt: skip
    want = F.scaled_dot_product_attention(q64, k64, v64)
    q, k, v = (t.bfloat16() for t in (q64, k64, v64))  # strided (B, heads, N, d) views, as the models make them
    ways = {
        "plain": lambda: F.scaled_dot_product_attention(q, k, v),
        "fast": lambda: attention.blocked_attention(q, k, v),
    }
    with torch.inference_mode():
        seconds = alternate(ways, repeats)
        errors = {name: relative_error(fn(), want) for name, fn in ways.items()}
    return {"dtype": "bfloat16", "plain_s": seconds["plain"], "fast_s": seconds["fast"],
            "plain_error": errors["plain"], "fast_error": errors["fast"], "used": attention.blocked_wins(q, k)}  # fmt: skip


def measure_feed_forward(batch: int, tokens: int, width: int, dtype: torch.dtype, repeats: int) -> dict:
    torch.manual_seed(0)
    ff = set_inference(unet.FeedForward(width).double().eval().requires_grad_(False))  # as `load` leaves it
    x64 = torch.randn(batch, tokens, width, dtype=torch.float64)
    with torch.inference_mode():
        want = ff.net(x64)
        ff, x = ff.to(dtype), x64.to(dtype)
        ways = {"plain": lambda: ff.net(x), "fast": lambda: ff(x)}
        seconds = alternate(ways, repeats)
        errors = {name: relative_error(fn(), want) for name, fn in ways.items()}
    return {"dtype": str(dtype).removeprefix("torch."), "plain_s": seconds["plain"], "fast_s": seconds["fast"],
            "plain_error": errors["plain"], "fast_error": errors["fast"], "used": batch * tokens > unet.FEED_FORWARD_ROWS}  # fmt: skip


def render(info: dict, results: list[dict], repeats: int) -> str:
    rows = [
        [r["part"], r["where"], r["shape"], r["dtype"], f"{r['plain_s'] * 1e3:.1f}", f"{r['fast_s'] * 1e3:.1f}",
         f"**{r['fast_s'] / r['plain_s']:.2f}**", f"{r['plain_error']:.1e} / {r['fast_error']:.1e}",
         "yes" if r["used"] else "no"]
        for r in results
    ]  # fmt: skip
    headers = ["part", "where", "shape", "dtype", "plain ms", "fast ms", "fast / plain",
               "error vs float64 (plain / fast)", "models use it"]  # fmt: skip
    return "\n".join([
        "## Attention and feed-forward",
        "",
        "`python -m benchmarks.transformer`",
        "",
        machine_markdown(info),
        "",
        f"One call, {THREADS} threads, median of {repeats} calls of each way, alternating, after a warm-up. Attention "
        "(bfloat16; shape: batch x heads x query tokens x key tokens x head width): *plain* is PyTorch's SDPA, *fast* "
        "`latentforge.attention.blocked_attention` (per head, 512 queries at a time, values zero-padded to a multiple of "
        "16 wide). Feed-forward (shape: batch x tokens x width; GEGLU to 8x the width, then back): *plain* is the layers "
        f"in one call, *fast* `latentforge.unet.FeedForward` in inference ({unet.FEED_FORWARD_ROWS} tokens at a "
        "time). *models use it*: the rule the models follow for that input.",
        "",
        markdown_table(headers, rows, align="llllrrrrl"),
    ])  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=7, help="timed calls per shape, dtype and way (default 7)")
    parser.add_argument("--no-doc", action="store_true", help="print the table but leave docs/benchmarks.md alone")
    args = parser.parse_args()
    limit_threads(THREADS)
    results = []
    for where, batch, heads, n, m, width in ATTENTION:
        result = measure_attention(batch, heads, n, m, width, args.repeats)
        results.append(dict(result, part="attention", where=where, shape=f"{batch} x {heads} x {n} x {m} x {width}"))
    for dtype in (torch.float32, torch.bfloat16):
        for where, batch, tokens, width in FEED_FORWARD:
            result = measure_feed_forward(batch, tokens, width, dtype, args.repeats)
            results.append(dict(result, part="feed-forward", where=where, shape=f"{batch} x {tokens} x {width}"))
    for r in results:
        print(f"{r['part']:12} {r['where']:42} {r['dtype']:8} plain {r['plain_s'] * 1e3:7.1f} ms  "
              f"fast {r['fast_s'] * 1e3:7.1f} ms  ({r['fast_s'] / r['plain_s']:.2f}x)  used {r['used']}")  # fmt: skip
    info = machine_info()
    publish(OUT, {"machine": info, "repeats": args.repeats, "results": results},
            render(info, results, args.repeats), "transformer", to_doc=not args.no_doc)  # fmt: skip


if __name__ == "__main__":
    main()
