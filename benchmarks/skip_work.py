"""What each way of skipping work (speed.py) saves, and what it costs in the picture.

    python -m benchmarks.skip_work [--part shipped|sd15|sdxl|both] [-n 100] [--no-doc]

shipped: on the shipped model, `latentforge eval -n 100 --seed 0` (the same prompts and image seeds, guidance 1
and the model's default) with each option and without: prompt adherence ("all"), the time of the 100 images,
and the mean per-pixel difference (0-255) of each image from the one made without the option.
sd15: on the random-weight SD 1.5-sized checkpoint (benchmarks.load), bfloat16, 512 x 512, Euler, 20 steps,
guidance 7, one process: the time of one whole txt2img with each option (after a warm-up image), and the
relative difference of its final latents from those of the full computation; then a 4-step LCM image
(guidance 1, a random rank-32 LoRA merged, as an LCM-LoRA would be) decoded by a random-weight tiny decoder.
sdxl: the same measure on the random-weight SDXL base-sized checkpoint (benchmarks.sdxl), bfloat16, 1024 x 1024,
8 steps, with the options that act on SDXL (token merging does not: SDXL has no attention at full resolution).
Random weights say nothing about the quality of real images: the quality columns there only show how far each
option moves the computation. `both` is shipped and sd15. Writes the 'skipping work' section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from collections.abc import Sequence
from typing import Any

from benchmarks.common import CACHE, REPO, THREADS, limit_threads, machine_info, machine_markdown, markdown_table, publish

OUT = REPO / "benchmarks" / "out" / "skip_work.json"
SECTION = "skipping work"
PROMPT, NEGATIVE, SEED = "a photo of an astronaut riding a horse on mars", "blurry, low quality", 0
TINY_DECODER = CACHE / "sd15-taesd-random.safetensors"


def options() -> dict[str, Any]:
    from latentforge.speed import Shortcuts, preset

    return {
        "off": Shortcuts(),
        "NGMS 2 (odd steps)": Shortcuts(s_min_uncond=2.0),
        "NGMS 2, all steps": Shortcuts(s_min_uncond=2.0, s_min_uncond_all=True),
        "Skip Early CFG 0.2": Shortcuts(skip_early_cfg=0.2),
        "DeepCache 2": Shortcuts(deepcache_interval=2),
        "DeepCache 3": Shortcuts(deepcache_interval=3),
        "DeepCache 3, depth 2": Shortcuts(deepcache_interval=3, deepcache_depth=2),
        "ToMe 0.5": Shortcuts(token_merging=0.5),
        "tiny decoder": Shortcuts(tiny_decoder=True),
        "--speed fast": preset("fast"),
        "--speed fastest": preset("fastest"),
        "--speed fastest --fast-decode": dataclasses.replace(preset("fastest"), tiny_decoder=True),
    }


def mean_pixel_difference(a: Any, b: Any) -> float:
    import numpy as np

    return float(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).mean())


def shipped(n: int) -> dict[str, Any]:
    import latentforge
    from latentforge.training.evaluate import eval_prompts, evaluate_scale, resolve_cfg

    pipe = latentforge.load()
    prompts = eval_prompts(n, 0)
    rows: dict[str, Any] = {}
    baseline: dict[float, list] = {}
    for name, speed in options().items():
        if speed.tiny_decoder is True and pipe.tiny_decoder is None:
            print(f"{name}: left out, the shipped model has no tiny decoder in this copy", flush=True)
            continue
        row = {}
        for cfg in (1.0, resolve_cfg(pipe, None)):
            images: list = []
            result = evaluate_scale(pipe, prompts, cfg, speed=speed, keep=images)
            baseline.setdefault(cfg, images)
            diffs = [mean_pixel_difference(a, b) for a, b in zip(images, baseline[cfg])]
            row[f"{cfg:g}"] = {"all": result["all"], "seconds": result["seconds"], "pixels": sum(diffs) / len(diffs)}
        rows[name] = row
        print(name, json.dumps(row), flush=True)
    return {"model": pipe.name, "defaults": pipe.config.defaults.describe(), "n": n, "rows": rows}


SDXL_OPTIONS = ("off", "NGMS 2 (odd steps)", "NGMS 2, all steps", "Skip Early CFG 0.2", "DeepCache 3", "--speed fast",
                "--speed fastest")  # fmt: skip


class Timed:
    """Whole txt2img runs of one pipeline with fixed settings: seconds, and the final latents kept."""

    def __init__(self, pipe: Any, **settings: Any) -> None:
        self.pipe, self.settings, self.latents = pipe, settings, None

    def __call__(self, **changes: Any) -> float:
        start = time.perf_counter()
        self.pipe.generate(**(self.settings | changes), callback=self.keep)
        return time.perf_counter() - start

    def keep(self, step: Any) -> None:
        self.latents = step.latents

    def options(self, names: Sequence[str] | None = None) -> dict[str, Any]:
        """Each option's time and the relative change of its final latents from the first option's (off)."""
        self(steps=1)  # warm-up
        rows: dict[str, Any] = {}
        full = None
        for name, speed in options().items():
            if names is not None and name not in names:
                continue
            seconds = self(speed=speed)
            full = self.latents if full is None else full
            rows[name] = {"seconds": seconds, "latents": float((self.latents - full).norm() / full.norm())}
            print(name, json.dumps(rows[name]), flush=True)
        return rows


def sd15() -> dict[str, Any]:
    import torch

    import latentforge
    from benchmarks.load import FILES, prepare
    from benchmarks.lora import LORAS, write_loras
    from latentforge.speed import Shortcuts
    from latentforge.tiny_decoder import TinyDecoder, write_tiny_decoder

    prepare(accelerate=False)
    pipe = latentforge.load(FILES["fp32"], dtype="bfloat16", device="cpu")
    if not TINY_DECODER.exists():
        torch.manual_seed(0)
        write_tiny_decoder(TinyDecoder(), TINY_DECODER)
    pipe.load_tiny_decoder(TINY_DECODER)
    run = Timed(pipe, prompt=PROMPT, negative_prompt=NEGATIVE, steps=20, sampler="Euler", cfg_scale=7.0, seed=SEED)
    rows = run.options()
    write_loras(pipe)
    lcm = dict(steps=4, sampler="LCM", cfg_scale=1.0, loras={LORAS["A"]: 1.0}, speed=Shortcuts(tiny_decoder=True))
    run(**lcm)  # merges the LoRA
    rows["LCM 4 steps, guidance 1, tiny decoder"] = {"seconds": run(**lcm), "latents": None}
    lcm["speed"] = Shortcuts(tiny_decoder=True, token_merging=0.5)
    rows["LCM 4 steps, guidance 1, tiny decoder, ToMe 0.5"] = {"seconds": run(**lcm), "latents": None}
    print("LCM", json.dumps({k: v for k, v in rows.items() if k.startswith("LCM")}), flush=True)
    return {"dtype": "bfloat16", "rows": rows}


def sdxl() -> dict[str, Any]:
    import latentforge
    from benchmarks.sdxl import CHECKPOINT, build_model

    build_model()
    pipe = latentforge.load(CHECKPOINT, dtype="bfloat16", device="cpu")
    run = Timed(pipe, prompt=PROMPT, negative_prompt=NEGATIVE, steps=8, sampler="Euler", cfg_scale=7.0, seed=SEED)
    return {"dtype": "bfloat16", "rows": run.options(SDXL_OPTIONS)}


def measured(part: dict[str, Any]) -> str:
    """Where a part was measured: its command, commit and date (older results may lack some)."""
    m = part.get("measured", {})
    where = ", ".join(x for x in (f"`{m['command']}`" if "command" in m else "", f"commit {m['git']}" if "git" in m else "",
                                  m.get("date", "")) if x)  # fmt: skip
    return f"Measured with {where}. " if where else ""


def timed_table(rows: dict[str, Any]) -> str:
    """A part's Timed rows: each option's time, its ratio to the option "off", its change ("-": not measured)."""
    off = rows["off"]["seconds"]
    cells = [[name, f"{r['seconds']:.1f} s", f"{r['seconds'] / off:.2f}x", "-" if r["latents"] is None else f"{r['latents']:.3f}"]
             for name, r in rows.items()]  # fmt: skip
    return markdown_table(["option", "time", "vs off", "change"], cells, "lrrr")


def render(info: dict[str, Any], result: dict[str, Any]) -> str:
    from latentforge.speed import PRESETS

    parts = [
        "## Skipping work: speed and what it costs\n\n`python -m benchmarks.skip_work`, one part at a time (a part "
        f"not run keeps its last results; each says where it was measured), {THREADS} threads.\n"
    ]
    if "shipped" in result:
        s = result["shipped"]
        cfgs = list(next(iter(s["rows"].values())))
        headers = ["option"] + [f"{what} (guidance {c})" for c in cfgs for what in ("adherence", "seconds", "pixels")]
        rows = []
        for name, row in s["rows"].items():
            rows.append([name] + [cell for c in cfgs for cell in
                                  (f"{row[c]['all']:.2f}", f"{row[c]['seconds']:.1f}", f"{row[c]['pixels']:.2f}")])  # fmt: skip
        parts.append(
            f"### The shipped model: `latentforge eval -n {s['n']} --seed 0` with each option\n\n"
            f"{measured(s)}{s['model']} ({s['defaults']}). Adherence: the judge's whole-prompt accuracy (1.00 = every prompt "
            "drawn right); seconds: the 100 images; pixels: the mean absolute difference (0-255) of each image from "
            "the one made without the option. At guidance 1 there is no unconditional pass to skip.\n\n"
            + markdown_table(headers, rows, "l" + "r" * (len(headers) - 1))
        )
    if "sd15" in result:
        parts.append(
            "### SD 1.5 shapes, random weights: one 512 x 512 txt2img, bfloat16\n\n"
            f"{measured(result['sd15'])}Euler, 20 steps, guidance 7, each option in turn in one process after a warm-up. Change: the relative "
            "difference of the final latents from the full computation's (random weights: how far the option moves "
            "the computation, not the quality of a real image).\n\n" + timed_table(result["sd15"]["rows"])
        )
    if "sdxl" in result:
        parts.append(
            "### SDXL shapes, random weights: one 1024 x 1024 txt2img, bfloat16\n\n"
            f"{measured(result['sdxl'])}Euler, 8 steps, guidance 7, each option in turn in one process after a warm-up; the change as above. "
            "Token merging is left out: it merges only full-resolution self-attention, which SDXL does not have "
            "(`--speed fast` is then NGMS and Skip Early CFG).\n\n" + timed_table(result["sdxl"]["rows"])
        )
    presets = "; ".join(f"`{name}`: {PRESETS[name]}" for name in ("fast", "fastest"))
    parts.append(f"The presets: {presets}.\n\n{machine_markdown(info)}")
    return "\n\n".join(parts)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=["shipped", "sd15", "sdxl", "both"], default="both")
    parser.add_argument("-n", type=int, default=100, help="prompts of the shipped model's eval (default: 100)")
    parser.add_argument("--no-doc", action="store_true", help="do not write docs/benchmarks.md")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    limit_threads()
    info = machine_info()
    # a part not run this time keeps its last results (benchmarks/out/skip_work.json), so the section shows both
    result: dict[str, Any] = json.loads(OUT.read_text()) if OUT.exists() else {}
    result.pop("info", None)
    command = "python -m benchmarks.skip_work " + " ".join(sys.argv[1:] if argv is None else argv)
    runs = {"shipped": lambda: shipped(args.n), "sd15": sd15, "sdxl": sdxl}
    for part in ("shipped", "sd15") if args.part == "both" else (args.part,):
        result[part] = runs[part]() | {"measured": {"command": command.strip(), "git": info["git"], "date": info["date"]}}
    publish(OUT, {"info": info, **result}, render(info, result), SECTION, not args.no_doc)


if __name__ == "__main__":
    main()
