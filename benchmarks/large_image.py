"""Peak memory of one large txt2img or img2img (default 1024 x 1024) on the SD 1.5-sized random-weight file,
weights included.

    python -m benchmarks.large_image [--size 1024] [--steps 2] [--dtype auto] [--vae-tiling] [--img2img]

Runs in a fresh process of its own (so its peak RSS is this job's alone): load, then one txt2img. The peak
does not grow with the step count (every step needs the same memory), so 2 steps measure it. Prints one
line; the README's Speed section quotes it.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from PIL import Image

from benchmarks.common import THREADS, limit_threads, memory_now
from benchmarks.load import FILES, prepare


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=1024, help="image width and height (default 1024)")
    parser.add_argument("--steps", type=int, default=2, help="sampler steps (default 2)")
    parser.add_argument("--dtype", default="auto", help="as latentforge.load takes it (default auto)")
    parser.add_argument("--vae-tiling", action="store_true", help="decode in 512 x 512 tiles (Pipeline.vae_tiling)")
    parser.add_argument("--img2img", action="store_true", help="img2img from a noise image (strength 1: every step)")
    args = parser.parse_args()
    prepare(accelerate=False)
    limit_threads(THREADS)
    import latentforge

    pipe = latentforge.load(FILES["fp32"], dtype=args.dtype, device="cpu")
    pipe.vae_tiling = args.vae_tiling
    init = {}
    if args.img2img:  # the VAE encoder's peak comes on top of the sampling's
        noise = np.random.default_rng(0).integers(0, 256, (args.size, args.size, 3), dtype=np.uint8)
        init = {"init_image": Image.fromarray(noise), "strength": 1.0}
    start = time.perf_counter()
    pipe.generate("a photo of an astronaut riding a horse on mars", steps=args.steps, sampler="Euler", seed=0,
                  width=args.size, height=args.size, **init)  # fmt: skip
    seconds = time.perf_counter() - start
    print(f"{args.size}x{args.size} {'img2img' if init else 'txt2img'}, {args.steps} steps, "
          f"{str(pipe.dtype).removeprefix('torch.')}, "
          f"{'tiled' if args.vae_tiling else 'whole'} VAE decode, {THREADS} threads: "
          f"{seconds:.1f} s, peak RSS of the process {memory_now()['peak']:.2f} GB "
          "(load + generation, weights included)")  # fmt: skip


if __name__ == "__main__":
    main()
