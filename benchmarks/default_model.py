"""Seconds per image of the shipped model at its default settings, against diffusers on the same weights.

    python -m benchmarks.default_model [--images 20] [--no-doc]

The shipped single file is converted to a diffusers folder (benchmarks/.cache/, with the scheduler of
the model's default sampler); both libraries then make the same images (same prompts, seeds, steps,
guidance, 64 x 64), alternating image by image after one warm-up each, in this one process with 2
threads. Reports the median seconds per image and the ratio; writes the 'default-model' section of
docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import time

from benchmarks.common import (
    CACHE,
    DOC,
    limit_threads,
    machine_info,
    machine_markdown,
    markdown_table,
    replace_section,
)

PROMPTS = (
    "a small red circle on the left, white background",
    "a green square above a purple triangle, black background",
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=20, help="images per library (default: 20)")
    parser.add_argument("--no-doc", action="store_true", help="print only; leave docs/benchmarks.md alone")
    args = parser.parse_args()
    limit_threads()
    import diffusers
    import torch

    import latentforge
    from latentforge import pipeline
    from latentforge.checkpoints import read_checkpoint, write_diffusers

    ours = latentforge.load(dtype="float32", device="cpu")
    auto = latentforge.load(device="cpu")  # dtype "auto": what `latentforge generate` runs
    folder = CACHE / "latentforge-shapes-diffusers"  # made again every run: the shipped model changes
    shutil.rmtree(folder, ignore_errors=True)
    config, parts = read_checkpoint(pipeline.DEFAULT_MODEL)
    write_diffusers(config, parts, folder, ours.conditioner.tokenizer)
    ref = diffusers.StableDiffusionPipeline.from_pretrained(folder, local_files_only=True, torch_dtype=torch.float32)
    ref.set_progress_bar_config(disable=True)
    d = ours.config.defaults

    def run_ours(prompt: str, seed: int) -> None:
        ours.generate(prompt, seed=seed)

    def run_auto(prompt: str, seed: int) -> None:
        auto.generate(prompt, seed=seed)

    def run_diffusers(prompt: str, seed: int) -> None:
        ref(prompt, num_inference_steps=d.steps, guidance_scale=d.cfg_scale, height=64, width=64,
            generator=torch.Generator().manual_seed(seed))  # fmt: skip

    auto_name = f"latentforge, dtype auto ({str(auto.dtype).removeprefix('torch.')})"
    runs = {"latentforge": run_ours, auto_name: run_auto, "diffusers": run_diffusers}
    times: dict[str, list[float]] = {name: [] for name in runs}
    for fn in runs.values():
        fn(PROMPTS[0], 0)  # warm-up

    for i in range(args.images):
        order = list(runs)[i % len(runs) :] + list(runs)[: i % len(runs)]  # each library first in turn
        for name in order:
            start = time.perf_counter()
            runs[name](PROMPTS[i % len(PROMPTS)], 100 + i)
            times[name].append(time.perf_counter() - start)
    median = {name: statistics.median(values) for name, values in times.items()}
    rows = [
        [name, f"{median[name]:.3f}", f"{min(times[name]):.3f}..{max(times[name]):.3f}"] for name in runs
    ]
    body = "\n\n".join([
        "## The shipped model",
        f"`python -m benchmarks.default_model --images {args.images}`",
        machine_markdown(machine_info()),
        f"One 64 x 64 image at the model's defaults ({d.describe()}), 2 threads, {args.images} images per "
        "library, the libraries taking turns image by image, after one warm-up each; float32 unless named; "
        "diffusers runs the same weights converted to its layout with the same scheduler.",
        markdown_table(["library", "s / image (median)", "min..max"], rows),
        f"latentforge / diffusers (float32): **{median['latentforge'] / median['diffusers']:.2f}x**; "
        f"{auto_name} / diffusers: **{median[auto_name] / median['diffusers']:.2f}x**.",
    ])  # fmt: skip
    print(body)
    if not args.no_doc:
        replace_section(DOC, "default-model", body)


if __name__ == "__main__":
    main()
