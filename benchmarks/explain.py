"""What `latentforge explain` costs against one plain generation of the same settings.

    python -m benchmarks.explain [--repeats 3] [--model PATH] [--steps N] [--no-doc]

In one process, taking turns after a warm-up: a plain `generate` (the model's defaults, or --steps), the
explain run (`explain.explain`: the same generation with the attention probes, plus the guidance comparison,
forward diffusion and the decodes its figures need), and drawing the page (`explain.render`). Medians of
--repeats. Default model: the shipped one; --model benchmarks/.cache/sd15-random.safetensors (built by
benchmarks.load) for SD 1.5 shapes. Writes the 'explain' section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from benchmarks.common import REPO, THREADS, alternate, limit_threads, machine_info, machine_markdown, markdown_table, publish

OUT = REPO / "benchmarks" / "out" / "explain.json"
SECTION = "explain"
PROMPT, SEED = "a red circle above a blue square, white background", 7


def measure(model: str | None, steps: int | None, repeats: int) -> dict[str, float]:
    import latentforge
    from latentforge.explain import explain, render

    pipe = latentforge.load(model)
    settings = {"steps": steps} if steps else {}
    runs: list = []
    times = alternate(
        {
            "generation": lambda: pipe.generate(PROMPT, seed=SEED, **settings),
            "explain run": lambda: runs.append(explain(pipe, PROMPT, seed=SEED, **settings)),
            "page drawing": lambda: render(runs[-1]),
        },
        repeats,
    )
    return times | {"model": pipe.name or "shipped", "describe": pipe.config.describe(), "dtype": str(pipe.dtype)}


def render_section(info: dict, command: str, result: dict) -> str:
    plain = result["generation"]
    rows = [[name, f"{result[name]:.2f} s", f"{result[name] / plain:.1f}x"] for name in ("generation", "explain run", "page drawing")]
    total = result["explain run"] + result["page drawing"]
    rows.append(["explain in all", f"{total:.2f} s", f"{total / plain:.1f}x"])
    table = markdown_table(["what", "time", "vs the generation"], rows, "lrr")
    return f"""## Explain: the cost of a page

`{command}`: {result['model']} ({result['describe']}, {result['dtype'].removeprefix('torch.')}), the model's
default sampler, steps and guidance, {THREADS} threads, medians after a warm-up, the three taking turns. The
explain run is one generation with the attention probes plus the guidance comparison (two more
generations), the forward-diffusion and training-example calls, and a VAE decode of each shown step's
latents and predicted image.

{table}

{machine_markdown(info)}
"""


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--model", help="checkpoint (default: the shipped model)")
    p.add_argument("--steps", type=int, help="sampler steps (default: the model's)")
    p.add_argument("--no-doc", action="store_true", help="print the section without writing docs/benchmarks.md")
    args = p.parse_args(argv)
    limit_threads()
    result = measure(args.model, args.steps, args.repeats)
    command = "python -m benchmarks.explain " + " ".join(argv if argv is not None else sys.argv[1:])
    info = machine_info()
    publish(OUT, {"machine": info, "result": result}, render_section(info, command.strip(), result), SECTION, not args.no_doc)


if __name__ == "__main__":
    main()
