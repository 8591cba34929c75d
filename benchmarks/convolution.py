"""The fast convolutions against oneDNN's direct ones, per shape of SD 1.5's UNet and VAE at 512 x 512.

    python -m benchmarks.convolution [--repeats 5] [--no-doc]

For each shape and dtype, the plain way (F.conv2d, channels-last as the models run it; after
F.interpolate for an upsampling) against `latentforge.convolution`'s (Winograd `conv3x3`,
`upsampled_conv3x3` for nearest 2x upsampling then a 3 x 3 convolution, or `unfolded_conv3x3` for tiny
images), each call paying its weight transform as the models' calls do: the two alternate, median of the
repeats; each one's relative L2 error against float64; and whether the models take the fast way there
(`winograd_wins` / `upsample_wins` / `unfold_wins`).
Writes the table into docs/benchmarks.md (section `convolution`) and benchmarks/out/convolution.json.
"""

from __future__ import annotations

import argparse
import functools
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
from latentforge import convolution

OUT = Path(__file__).resolve().parent / "out" / "convolution.json"
# (what, where, batch, input channels, output channels, input height = width). "winograd": the 3 x 3
# stride-1 convolutions with 256 or more channels (and two narrower ones, to show why those stay direct);
# "upsample": the Upsample layers (input size before the 2x); "unfold": the smallest levels' convolutions
# (and the next level up, to show where the matrix product stops winning).
SHAPES = [
    ("winograd", "UNet 64x64", 2, 320, 320, 64),
    ("winograd", "UNet 64x64, skip concatenated", 2, 960, 320, 64),
    ("winograd", "UNet 32x32", 2, 640, 640, 32),
    ("winograd", "UNet 16x16", 2, 1280, 1280, 16),
    ("winograd", "VAE decoder 64x64", 1, 512, 512, 64),
    ("winograd", "VAE decoder 128x128", 1, 512, 512, 128),
    ("winograd", "VAE decoder 256x256", 1, 512, 512, 256),
    ("winograd", "VAE decoder 256x256, narrowing", 1, 512, 256, 256),
    ("winograd", "VAE decoder 512x512", 1, 256, 256, 512),
    ("winograd", "VAE decoder 512x512, narrowing", 1, 256, 128, 512),
    ("winograd", "VAE decoder 512x512, last level", 1, 128, 128, 512),
    ("upsample", "UNet 16x16 -> 32x32", 2, 1280, 1280, 16),
    ("upsample", "UNet 32x32 -> 64x64", 2, 640, 640, 32),
    ("upsample", "VAE decoder 64x64 -> 128x128", 1, 512, 512, 64),
    ("upsample", "VAE decoder 128x128 -> 256x256", 1, 512, 512, 128),
    ("upsample", "VAE decoder 256x256 -> 512x512", 1, 256, 256, 256),
    ("unfold", "UNet 8x8", 2, 1280, 1280, 8),
    ("unfold", "UNet 8x8, skip concatenated", 2, 2560, 1280, 8),
    ("unfold", "UNet 8x8, no guidance batch", 1, 1280, 1280, 8),
    ("unfold", "SD 2.x 768 px UNet 12x12", 2, 1280, 1280, 12),
    ("unfold", "UNet 16x16", 2, 1280, 1280, 16),
    ("unfold", "UNet 8x8, 640 channels (256 px images)", 2, 640, 640, 8),
]
WAYS = {  # kind: (its name in the table, the fast function, the rule the models follow)
    "winograd": ("Winograd", None, convolution.winograd_wins),
    "upsample": ("folded 2x upsampling", convolution.upsampled_conv3x3, convolution.upsample_wins),
    "unfold": ("one matrix product", convolution.unfolded_conv3x3, convolution.unfold_wins),
}


def measure(kind: str, batch: int, c_in: int, c_out: int, size: int, dtype: torch.dtype, repeats: int) -> dict:
    g = torch.Generator().manual_seed(0)
    conv = convolution.Conv2d(c_in, c_out, 3, padding=1).to(memory_format=torch.channels_last).eval()
    conv.requires_grad_(False)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) / (9 * c_in) ** 0.5)
        conv.bias.copy_(torch.randn(c_out, generator=g) * 0.1)
        x64 = torch.randn(batch, c_in, size, size, generator=g, dtype=torch.float64)
        up = (lambda x: F.interpolate(x, scale_factor=2.0, mode="nearest")) if kind == "upsample" else (lambda x: x)
        want = F.conv2d(up(x64), conv.weight.double(), conv.bias.double(), padding=1)
        conv = conv.to(dtype)
        x = x64.to(dtype).contiguous(memory_format=torch.channels_last)
        _, fast, rule = WAYS[kind]
        if kind == "winograd":
            fast = functools.partial(convolution.conv3x3, algorithm=convolution.ALGORITHMS[dtype])
        ways = {
            "plain": lambda: F.conv2d(up(x), conv.weight, conv.bias, padding=1),
            "fast": lambda: fast(x, conv.weight, conv.bias),
        }
        used = rule(conv, x)
        times = alternate(ways, repeats)
        error = {name: relative_error(fn(), want) for name, fn in ways.items()}
    return {
        "plain_s": times["plain"],
        "fast_s": times["fast"],
        "plain_error": error["plain"],
        "fast_error": error["fast"],
        "used": used,
        "gflop": 2 * want.numel() // c_out * c_in * c_out * 9 / 1e9,  # the plain way's multiply-adds x 2
    }


def render(info: dict, results: list[dict], repeats: int) -> str:
    rows = [
        [
            r["where"], WAYS[r["kind"]][0],
            f"{r['batch']} x {r['c_in']} x {r['size']}^2 -> {r['c_out']}", r["dtype"],
            f"{r['plain_s'] * 1e3:.1f}", f"{r['gflop'] / r['plain_s']:.0f}", f"{r['fast_s'] * 1e3:.1f}",
            f"**{r['fast_s'] / r['plain_s']:.2f}**", f"{r['plain_error']:.1e} / {r['fast_error']:.1e}",
            "yes" if r["used"] else "no",
        ]
        for r in results
    ]  # fmt: skip
    headers = ["convolution", "fast way", "input -> output channels", "dtype", "plain ms", "plain GFLOP/s",
               "fast ms", "fast / plain", "error vs float64 (plain / fast)", "models use it"]  # fmt: skip
    return "\n".join([
        "## Fast 3 x 3 convolutions",
        "",
        "`python -m benchmarks.convolution`",
        "",
        machine_markdown(info),
        "",
        f"One call, {THREADS} threads, median of {repeats} calls of each way, alternating, after a warm-up. *plain*: "
        "`F.conv2d` on channels-last tensors (after `F.interpolate` for an upsampling), what the models did before; "
        "*fast*: `latentforge/convolution.py` with its weight transform, as each call pays it (Winograd F(4x4, 3x3) "
        "in float32, F(2x2, 3x3) in bfloat16; upsampling folded into four 2 x 2 convolutions; for tiny images one "
        "matrix product of the 3 x 3 neighbourhoods and the weights). *models use it*: the rule the models follow "
        "for that input.",
        "",
        markdown_table(headers, rows, align="lllrrrrrrl"),
    ])  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per shape, dtype and way (default 5)")
    parser.add_argument("--no-doc", action="store_true", help="print the table but leave docs/benchmarks.md alone")
    args = parser.parse_args()
    limit_threads(THREADS)
    results = []
    for dtype in (torch.float32, torch.bfloat16):
        for kind, where, batch, c_in, c_out, size in SHAPES:
            result = measure(kind, batch, c_in, c_out, size, dtype, args.repeats)
            result.update(kind=kind, where=where, batch=batch, c_in=c_in, c_out=c_out, size=size,
                          dtype=str(dtype).removeprefix("torch."))  # fmt: skip
            ratio = result["fast_s"] / result["plain_s"]
            print(f"{result['dtype']:8} {kind:8} {where:32} plain {result['plain_s'] * 1e3:7.1f} ms  "
                  f"fast {result['fast_s'] * 1e3:7.1f} ms  ({ratio:.2f}x)", flush=True)  # fmt: skip
            results.append(result)
    info = machine_info()
    publish(OUT, {"machine": info, "repeats": args.repeats, "results": results},
            render(info, results, args.repeats), "convolution", to_doc=not args.no_doc)  # fmt: skip


if __name__ == "__main__":
    main()
