"""Prompt-following evaluation: generate shapes-world prompts, read the images back, count what is right.

The same prompts and the same image seeds are used at every guidance scale, so scales compare
pair by pair. Accuracies come from the analytic judge (judge.py), not from a learned model.
"""

from __future__ import annotations

import random
import time
from collections.abc import Sequence

from .judge import judge_image, score
from .world import Scene, grammar_prompts

ATTRIBUTES = ("background", "colour", "shape", "size", "position", "relation", "count")
MAX_IMAGE_SEED = 2**32 - 1


def eval_prompts(n: int, seed: int, two_objects_fraction: float = 0.3) -> list[tuple[str, Scene, int]]:
    """n (prompt, target scene, image seed) triples, all derived from `seed`."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a whole number >= 1, got {n!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a whole number >= 0, got {seed!r}")
    if not 0.0 <= two_objects_fraction <= 1.0:
        raise ValueError(f"the two-object fraction must be between 0 and 1, got {two_objects_fraction!r}")
    prompt_rng = random.Random(f"latentforge-eval-prompts:{seed}")
    seed_rng = random.Random(f"latentforge-eval-seeds:{seed}")
    return [(*grammar_prompts(prompt_rng, two_objects_fraction), seed_rng.randint(0, MAX_IMAGE_SEED)) for _ in range(n)]


def resolve_cfg(pipe, cfg_scale: float | None) -> float:
    """The guidance scale to use: the given one, else the model's default (pipe.config.defaults)."""
    if cfg_scale is None:
        return float(pipe.config.defaults.cfg_scale)
    if isinstance(cfg_scale, bool) or not isinstance(cfg_scale, (int, float)):
        raise ValueError(f"each cfg scale must be a number or None (the model's default), got {cfg_scale!r}")
    return float(cfg_scale)


def _accuracy(hits: int, total: int) -> float | None:
    """hits / total, or None when nothing was counted."""
    return hits / total if total else None


def summarize(records: list[dict]) -> dict:
    """Per-attribute accuracy, whole-prompt accuracy for one and two objects, and counts."""
    accuracy, counts = {}, {}
    for key in ATTRIBUTES:
        values = [r["scores"][key] for r in records if key in r["scores"]]
        accuracy[key], counts[key] = _accuracy(sum(values), len(values)), len(values)
    singles = [r["scores"]["all"] for r in records if r["objects"] == 1]
    pairs = [r["scores"]["all"] for r in records if r["objects"] == 2]
    return {
        "accuracy": accuracy,
        "single_object": _accuracy(sum(singles), len(singles)),
        "two_objects": _accuracy(sum(pairs), len(pairs)),
        "all": _accuracy(sum(singles) + sum(pairs), len(records)),
        "counts": {"prompts": len(records), "single_object": len(singles), "two_objects": len(pairs), **counts},
    }


def evaluate_scale(
    pipe, prompts: list[tuple[str, Scene, int]], cfg: float, steps=None, sampler=None, speed=None, keep=None
) -> dict:
    """Generate and judge every prompt at one guidance scale; the summary plus per-prompt records. `speed`:
    generate()'s speed options; `keep`, a list, receives each image."""
    start, records = time.perf_counter(), []
    for prompt, target, image_seed in prompts:
        # steps / sampler None: the model's defaults; width / height None: its native size
        options = {} if speed is None else {"speed": speed}  # a pipeline-like without speed options still evaluates
        image = pipe.generate(prompt, steps=steps, sampler=sampler, cfg_scale=cfg, seed=image_seed, **options)[0]
        if keep is not None:
            keep.append(image)
        reading = judge_image(image)
        records.append(
            {"prompt": prompt, "seed": image_seed, "objects": len(target.objects), "scores": score(reading, target)}
        )
    return {"cfg_scale": cfg, **summarize(records), "seconds": time.perf_counter() - start, "records": records}


def evaluate(
    pipe,
    n: int = 100,
    seed: int = 0,
    cfg_scales: Sequence[float | None] = (1.0, None),
    steps: int | None = None,
    sampler: str | None = None,
    two_objects_fraction: float = 0.3,
    speed=None,
) -> dict:
    """Judge one generated image per grammar prompt at each cfg scale (None: the pipeline's default), made with
    generate()'s `speed` options (None: none)."""
    if not cfg_scales:
        raise ValueError("cfg_scales is empty; give at least one scale, e.g. (1.0, None)")
    prompts = eval_prompts(n, seed, two_objects_fraction)
    scales = [resolve_cfg(pipe, c) for c in cfg_scales]
    results = [evaluate_scale(pipe, prompts, cfg, steps, sampler, speed) for cfg in scales]
    for result, requested in zip(results, cfg_scales):
        result["requested"] = requested
    return {"n": n, "seed": seed, "steps": steps, "sampler": sampler, "scales": results}


def _cell(value: float | None) -> str:
    """An accuracy as a table cell: '0.93', or '-' when nothing was counted."""
    return "-" if value is None else f"{value:.2f}"


def format_report(result: dict) -> str:
    """The evaluation as a markdown table, one row per cfg scale."""
    header = ["cfg", *ATTRIBUTES, "one object", "two objects", "all", "prompts (1 / 2)", "seconds"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for scale in result["scales"]:
        label = f"{scale['cfg_scale']:g}" + (" (default)" if scale.get("requested", 0) is None else "")
        counts = scale["counts"]
        cells = [
            label,
            *(_cell(scale["accuracy"][key]) for key in ATTRIBUTES),
            _cell(scale["single_object"]),
            _cell(scale["two_objects"]),
            _cell(scale["all"]),
            f"{counts['prompts']} ({counts['single_object']} / {counts['two_objects']})",
            f"{scale['seconds']:.1f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    settings = f"n={result['n']}, seed={result['seed']}, steps={result['steps'] or 'default'}, "
    settings += f"sampler={result['sampler'] or 'default'}"
    return "\n".join(lines) + f"\n\n{settings}\n"
