"""What `latentforge explain` costs against one plain generation of the same settings.

    python -m benchmarks.explain [--repeats 3] [--model PATH] [--tiny-decoder FILE] [--dtype D] [--steps N] [--no-doc]

In one process, taking turns after a warm-up: a plain `generate` (the model's defaults, or --steps), the
explain run (`explain.explain`: the same generation with the probes, plus the forward-diffusion calls and
the decodes its figures need), the same with --fast-decode (when the model has a tiny decoder: the shipped
one, or --tiny-decoder), and drawing the page (`explain.render`). Medians of --repeats. Default model: the
shipped one; --model benchmarks/.cache/sd15-random.safetensors (built by benchmarks.load) for SD 1.5 shapes,
with --tiny-decoder benchmarks/.cache/sd15-taesd-random.safetensors (built by benchmarks.skip_work).
Writes the 'explain' section of docs/benchmarks.md, 'explain <model file stem>' for --model, ' float32' added for
--dtype float32 (--no-doc: print it only).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from benchmarks.common import REPO, THREADS, alternate, limit_threads, machine_info, machine_markdown, markdown_table, publish

OUT = REPO / "benchmarks" / "out"
SECTION = "explain"  # the shipped model's section in bfloat16; see main() for the others
PROMPT, SEED = "a red circle above a blue square, white background", 7


NAMES = ("generation", "explain run", "explain run, --fast-decode", "page drawing")


def measure(
    model: str | None, tiny_decoder: str | None, steps: int | None, repeats: int, dtype: str = "auto"
) -> dict[str, float]:
    import latentforge
    from latentforge.explain import explain, render

    pipe = latentforge.load(model, dtype=dtype)
    if tiny_decoder:
        pipe.load_tiny_decoder(tiny_decoder)
    settings = {"steps": steps} if steps else {}
    runs: list = []
    calls = {
        "generation": lambda: pipe.generate(PROMPT, seed=SEED, **settings),
        "explain run": lambda: runs.append(explain(pipe, PROMPT, seed=SEED, **settings)),
        "explain run, --fast-decode": lambda: explain(pipe, PROMPT, seed=SEED, fast_decode=True, **settings),
        "page drawing": lambda: render(runs[-1]),
    }
    if pipe.tiny_decoder is None:
        del calls["explain run, --fast-decode"]
    times = alternate(calls, repeats)
    return times | {"model": pipe.name or "shipped", "describe": pipe.config.describe(), "dtype": str(pipe.dtype)}


def render_section(info: dict, command: str, result: dict) -> str:
    plain = result["generation"]
    rows = [[name, f"{result[name]:.2f} s", f"{result[name] / plain:.2f}x"] for name in NAMES if name in result]
    total = result["explain run"] + result["page drawing"]
    rows.append(["explain in all (run and drawing)", f"{total:.2f} s", f"{total / plain:.2f}x"])
    table = markdown_table(["what", "time", "vs the generation"], rows, "lrr")
    return f"""## Explain: the cost of a page, {result["model"]}

`{command}`: {result['model']} ({result['describe']}, {result['dtype'].removeprefix('torch.')}), the model's
default sampler, steps and guidance, {THREADS} threads, medians after a warm-up, taking turns. The explain
run is one generation with the probes, the image's encode, one UNet call (the training example) and the
decodes of the figures (about 18 images: the shown steps, the guidance mixes, the noise levels), by the VAE,
or with --fast-decode by the tiny decoder (which pays off on large models only: at 64 x 64 the shipped
model's VAE decoder is the cheaper of the two).

{table}

{machine_markdown(info)}
"""


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--model", help="checkpoint (default: the shipped model)")
    p.add_argument("--tiny-decoder", metavar="FILE", help="a tiny decoder for the --fast-decode row (the shipped model has one)")
    p.add_argument("--steps", type=int, help="sampler steps (default: the model's)")
    p.add_argument("--dtype", default="auto", help="the models' dtype (default: latentforge's, bfloat16 here)")
    p.add_argument("--no-doc", action="store_true", help="print the section without writing docs/benchmarks.md")
    args = p.parse_args(argv)
    limit_threads()
    result = measure(args.model, args.tiny_decoder, args.steps, args.repeats, args.dtype)
    command = "python -m benchmarks.explain " + " ".join(argv if argv is not None else sys.argv[1:])
    info = machine_info()
    section = SECTION if args.model is None else f"{SECTION} {Path(args.model).stem}"
    section += "" if args.dtype == "auto" else f" {args.dtype}"
    out = OUT / f"{section.replace(' ', '-')}.json"
    publish(out, {"machine": info, "result": result}, render_section(info, command.strip(), result), section, not args.no_doc)


if __name__ == "__main__":
    main()
