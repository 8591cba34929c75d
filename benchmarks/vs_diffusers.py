"""Speed and memory of latentforge against diffusers on the same SD 1.5-shaped work, random weights, CPU.

    python -m benchmarks.vs_diffusers [--dtypes float32,bfloat16] [--repeats 3] [--no-whole] [--resume] [--no-doc]

Both libraries load the same cached random-weight SD 1.5-sized single file (benchmarks/.cache/, built by
benchmarks.load when missing). Operations: each library runs in a long-lived process of its own; the
parent asks the two for one call at a time, alternating them (order reversed every other call), and
takes the median of --repeats timed calls after one warm-up. Whole txt2img runs: each in a fresh process
(import, load, one 512 x 512 txt2img), which gives its time, the load time and the peak memory. Writes
the 'speed' section of docs/benchmarks.md. Results are saved after every call; --resume carries on after
an interruption.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from benchmarks.common import (
    REPO,
    THREADS,
    Worker,
    abba,
    ask_in_turn,
    emit,
    limit_threads,
    load_then_generate,
    machine_info,
    machine_markdown,
    markdown_table,
    memory_now,
    publish,
    run_isolated,
    serve_calls,
    spread,
    timed,
    warm_page_cache,
    worker_env,
)
from benchmarks.load import CONFIG_FOLDER, FILES, prepare

if TYPE_CHECKING:
    import torch
    from PIL import Image

MODULE = "benchmarks.vs_diffusers"
CHECKPOINT = FILES["fp32"]  # SD 1.5-sized, random weights, CompVis key names, no metadata
OUT = REPO / "benchmarks" / "out" / "vs_diffusers.json"  # raw results (git-ignored)
PARTIAL = REPO / "benchmarks" / "out" / "vs_diffusers.partial.json"  # results so far, for --resume
ARTIFACTS = REPO / "benchmarks" / "out" / "vs_diffusers"  # worker logs and the outputs compared
SECTION = "speed"
DTYPES = ("float32", "bfloat16")
LIBRARIES = ("latentforge", "diffusers")

PROMPT = "a photo of an astronaut riding a horse on mars"
NEGATIVE = "blurry, low quality"
SEED = 0
STEPS = 20
CFG_SCALE = 7.5
SIZE = 512
TIMESTEP = 500

OPERATIONS = {  # name -> what the table calls it
    "text": "text encoding (prompt + negative, 2x77)",
    "unet": "UNet step, batch 2 (guidance), 64x64 latents",
    "decode": "VAE decode 1x4x64x64 -> 512x512",
    "encode": "VAE encode 512x512 -> 1x4x64x64",
}


@dataclass(frozen=True)
class WholeRun:
    """One whole txt2img in a fresh process."""

    label: str
    library: str
    dtype: str  # "auto": latentforge's own choice
    defaults: bool = False  # latentforge's default settings (sampler, guidance) instead of Euler / CFG 7.5


WHOLE_RUNS = (
    WholeRun("diffusers float32 (its default)", "diffusers", "float32"),
    WholeRun("latentforge float32", "latentforge", "float32"),
    WholeRun("diffusers bfloat16", "diffusers", "bfloat16"),
    WholeRun("latentforge bfloat16", "latentforge", "bfloat16"),
    WholeRun("latentforge defaults (dtype auto, Euler a, CFG 7)", "latentforge", "auto", defaults=True),
)


# --------------------------------------------------------------------------- what differs between the libraries


@dataclass(frozen=True)
class Adapter:
    """How one library loads the checkpoint and runs each measured operation (everything else is shared)."""

    load: Callable[[Path, str], Any]
    encode_text: Callable[[Any], torch.Tensor]  # -> (2, 77, 768): prompt, negative prompt
    unet: Callable[[Any, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]  # (x, t, context) -> noise
    vae_decode: Callable[[Any, torch.Tensor], torch.Tensor]  # latents -> image in [-1, 1]
    vae_encode: Callable[[Any, torch.Tensor], torch.Tensor]  # image -> (1, 8, h, w): posterior mean, log-variance
    txt2img: Callable[[Any, bool], Image.Image]  # (pipe, latentforge's defaults?) -> image


def latentforge_adapter() -> Adapter:
    import torch

    import latentforge

    def txt2img(pipe: Any, defaults: bool) -> Image.Image:
        if defaults:
            return pipe.generate(PROMPT, steps=STEPS, seed=SEED)[0]
        return pipe.generate(PROMPT, steps=STEPS, sampler="Euler", cfg_scale=CFG_SCALE, seed=SEED)[0]

    return Adapter(
        load=lambda path, dtype: latentforge.load(path, dtype=dtype, device="cpu"),
        encode_text=lambda pipe: torch.cat([cond.context for cond in pipe.encode_prompt(PROMPT, NEGATIVE)]),
        unet=lambda pipe, x, t, context: pipe.unet(x, t, context),
        vae_decode=lambda pipe, z: pipe.vae.decode(z),
        vae_encode=lambda pipe, image: torch.cat(pipe.vae.encode(image), dim=1),
        txt2img=txt2img,
    )


def diffusers_adapter() -> Adapter:
    import torch
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

    def load(path: Path, dtype: str) -> Any:
        pipe = StableDiffusionPipeline.from_single_file(
            str(path), config=str(CONFIG_FOLDER), local_files_only=True, safety_checker=None,
            torch_dtype=getattr(torch, dtype),
        )  # fmt: skip
        pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def encode(pipe: Any, image: torch.Tensor) -> torch.Tensor:
        posterior = pipe.vae.encode(image).latent_dist
        return torch.cat([posterior.mean, posterior.logvar], dim=1)

    def txt2img(pipe: Any, defaults: bool) -> Image.Image:
        generator = torch.Generator().manual_seed(SEED)
        return pipe(
            PROMPT, height=SIZE, width=SIZE, num_inference_steps=STEPS, guidance_scale=CFG_SCALE, generator=generator
        ).images[0]

    return Adapter(
        load=load,
        encode_text=lambda pipe: torch.cat(pipe.encode_prompt(PROMPT, "cpu", 1, True, NEGATIVE), dim=0),
        unet=lambda pipe, x, t, context: pipe.unet(x, t, encoder_hidden_states=context).sample,
        vae_decode=lambda pipe, z: pipe.vae.decode(z).sample,
        vae_encode=encode,
        txt2img=txt2img,
    )


ADAPTERS: dict[str, Callable[[], Adapter]] = {"latentforge": latentforge_adapter, "diffusers": diffusers_adapter}


# --------------------------------------------------------------------------- inside a worker process


def make_inputs(dtype: str) -> dict[str, torch.Tensor]:
    """The same seeded random inputs in every worker (drawn in float32, then cast)."""
    import torch

    g = torch.Generator().manual_seed(SEED)
    cast = getattr(torch, dtype)
    latent = SIZE // 8
    return {
        "x": torch.randn(2, 4, latent, latent, generator=g).to(cast),
        "context": torch.randn(2, 77, 768, generator=g).to(cast),
        "z": torch.randn(1, 4, latent, latent, generator=g).to(cast),
        "image": (torch.rand(1, 3, SIZE, SIZE, generator=g) * 2 - 1).to(cast),
        "t": torch.tensor(TIMESTEP),
    }


def save_output(value: Any, path: Path) -> str:
    """An output to disk for the parent to compare: a PNG for an image, else a float32 tensor."""
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    if hasattr(value, "save"):
        target = path.with_suffix(".png")
        value.save(target)
    else:
        target = path.with_suffix(".pt")
        torch.save(value.detach().float().contiguous(), target)
    return str(target)


def speed_worker(library: str, dtype: str) -> None:
    """Load once, say so, then answer {"op": name, "save": path | None} until stdin closes."""

    limit_threads(THREADS)
    adapter = ADAPTERS[library]()
    inputs = make_inputs(dtype)
    pipe, load_s = timed(lambda: adapter.load(CHECKPOINT, dtype))
    calls = {
        "text": lambda: adapter.encode_text(pipe),
        "unet": lambda: adapter.unet(pipe, inputs["x"], inputs["t"], inputs["context"]),
        "decode": lambda: adapter.vae_decode(pipe, inputs["z"]),
        "encode": lambda: adapter.vae_encode(pipe, inputs["image"]),
    }
    emit({"ready": True, "load_s": load_s, "memory": memory_now()})
    serve_calls(calls, save_output)


def whole_worker(index: int) -> dict[str, Any]:
    """In a fresh process: load, then one whole txt2img; times, the memory after each phase and the peaks."""
    run = WHOLE_RUNS[index]
    limit_threads(THREADS)
    adapter = ADAPTERS[run.library]()
    image, result = load_then_generate(
        lambda: adapter.load(CHECKPOINT, run.dtype), lambda pipe: adapter.txt2img(pipe, run.defaults)
    )
    return {**result, "saved": save_output(image, ARTIFACTS / "whole" / f"{index}")}


# --------------------------------------------------------------------------- the parent


class Progress:
    """Every result so far, written to disk after each call, so that `--resume` carries on after an
    interrupted run instead of starting over."""

    def __init__(self, settings: dict[str, Any], resume: bool, path: Path = PARTIAL) -> None:
        self.path = path
        data = json.loads(path.read_text()) if resume and path.exists() else None
        if data is not None and data["settings"] != settings:
            raise SystemExit(f"{path} was made with other settings ({data['settings']}); run without --resume")
        self.data: dict[str, Any] = data or {"settings": settings, "speed": {}, "whole": {}, "sessions": 0}
        self.data["sessions"] += 1
        self.save()

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.write_text(json.dumps(self.data, indent=1))
        os.replace(tmp, self.path)


def output_path(dtype: str, library: str, op: str) -> Path:
    return ARTIFACTS / dtype / f"{library}-{op}"


def start_workers(dtype: str) -> tuple[dict[str, Worker], dict[str, Any]]:
    """One loaded speed worker per library, started one after the other (no two loads at once)."""
    workers: dict[str, Worker] = {}
    loads = {}
    try:
        for library in LIBRARIES:
            warm_page_cache(CHECKPOINT)
            log = ARTIFACTS / f"{library}-{dtype}.log"
            workers[library] = Worker(MODULE, ["--speed-worker", library, "--dtype", dtype], worker_env(THREADS), log)
            loads[library] = workers[library].receive()
            print(f"  {library} loaded in {loads[library]['load_s']:.1f} s", flush=True)
    except BaseException:
        for worker in workers.values():
            worker.proc.kill()
            worker.close()
        raise
    return workers, loads


def measure_speed(dtype: str, repeats: int, progress: Progress) -> dict[str, Any]:
    """Warm-up (outputs saved), then `repeats` rounds, the libraries alternating call by call."""
    record = progress.data["speed"].setdefault(dtype, {"runs": [], "loads": [], "done": False})
    if record["done"]:
        return record
    print(f"{dtype}: starting the workers ...", flush=True)
    workers, loads = start_workers(dtype)
    record["loads"].append(loads)
    try:
        for turn, op in enumerate(OPERATIONS):
            for library in abba(LIBRARIES, turn):
                workers[library].ask({"op": op, "save": str(output_path(dtype, library, op))})
        done = {(r["repeat"], r["op"], r["library"]) for r in record["runs"]}

        def keep(result: dict[str, Any]) -> None:
            record["runs"].append(result)
            progress.save()
            print(f"  {result['repeat'] + 1}/{repeats} {result['op']:<7} {result['library']:<12} "
                  f"{result['seconds']:7.2f} s", flush=True)  # fmt: skip

        ask_in_turn(workers, list(OPERATIONS), repeats, done, keep)
        record["done"] = True
    finally:
        for worker in workers.values():
            worker.close()
        progress.save()
    return record


def measure_whole(progress: Progress) -> dict[str, Any]:
    """Each whole run in a fresh process (those done in an earlier session skipped)."""
    results = progress.data["whole"]
    for index, run in enumerate(WHOLE_RUNS):
        if str(index) in results:
            continue
        warm_page_cache(CHECKPOINT)
        result = run_isolated(MODULE, ["--whole-worker", str(index)], worker_env(THREADS), timeout=3600)
        results[str(index)] = result
        progress.save()
        print(f"  {run.label:<52} {result['txt2img_s']:7.1f} s, peak RSS "
              f"{result['memory']['after_txt2img']['peak']:.2f} GB", flush=True)  # fmt: skip
    return results


# --------------------------------------------------------------------------- comparing outputs


def read_output(base: Path) -> Any:
    import numpy as np
    import torch
    from PIL import Image

    if base.with_suffix(".png").exists():
        return np.asarray(Image.open(base.with_suffix(".png")).convert("RGB")).astype(np.float64)
    return torch.load(base.with_suffix(".pt")).double().numpy()


def difference(ours: Any, ref: Any) -> dict[str, float]:
    """Max and mean |ours - ref|, and the largest |ref| for scale."""
    import numpy as np

    diff = np.abs(ours - ref)
    return {"max": float(diff.max()), "mean": float(diff.mean()), "scale": float(np.abs(ref).max())}


def compare_outputs(dtypes: Sequence[str], whole: dict[str, Any]) -> dict[str, Any]:
    """latentforge's outputs against diffusers' (same dtype), and bfloat16 against float32 (same library)."""
    checks: dict[str, Any] = {}
    for dtype in dtypes:
        checks[dtype] = {
            op: difference(read_output(output_path(dtype, "latentforge", op)), read_output(output_path(dtype, "diffusers", op)))
            for op in OPERATIONS
        }  # fmt: skip
    images = {(r.library, r.dtype, r.defaults): whole[str(i)]["saved"] for i, r in enumerate(WHOLE_RUNS) if str(i) in whole}

    def image_diff(a: tuple, b: tuple) -> dict[str, float] | None:
        if a not in images or b not in images:
            return None
        return difference(read_output(Path(images[a]).with_suffix("")), read_output(Path(images[b]).with_suffix("")))

    checks["images"] = {
        f"latentforge vs diffusers, {d}": image_diff(("latentforge", d, False), ("diffusers", d, False)) for d in DTYPES
    } | {
        "latentforge bfloat16 vs float32": image_diff(("latentforge", "bfloat16", False), ("latentforge", "float32", False)),
        "diffusers bfloat16 vs float32": image_diff(("diffusers", "bfloat16", False), ("diffusers", "float32", False)),
    }  # fmt: skip
    return checks


# --------------------------------------------------------------------------- reporting


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}" if b else "n/a"


def speed_table(runs: Sequence[dict[str, Any]]) -> str:
    """One row per operation: both libraries' medians and ranges, their ratio, the CPU use."""
    headers = ["operation", "latentforge s (median)", "min..max", "diffusers s (median)", "min..max",
               "latentforge / diffusers", "CPU s per s (lf / diffusers)"]  # fmt: skip
    rows = []
    for op in OPERATIONS:
        cells = []
        for library in LIBRARIES:
            mine = [r for r in runs if r["op"] == op and r["library"] == library]
            cells.append((spread([r["seconds"] for r in mine]), statistics.median(r["cpu_s"] / r["seconds"] for r in mine)))
        (lf, lf_cpu), (df, df_cpu) = cells
        rows.append([
            OPERATIONS[op], f"{lf['median']:.3f}", f"{lf['min']:.3f}..{lf['max']:.3f}", f"{df['median']:.3f}",
            f"{df['min']:.3f}..{df['max']:.3f}", f"**{ratio(lf['median'], df['median'])}**", f"{lf_cpu:.2f} / {df_cpu:.2f}",
        ])  # fmt: skip
    return markdown_table(headers, rows)


def whole_table(whole: dict[str, Any]) -> str:
    """One row per whole run: txt2img time, its ratio to diffusers' float32 default, load and memory."""
    base = whole.get("0", {}).get("txt2img_s")
    headers = ["run", "txt2img s", "/ diffusers float32", "load s", "peak RSS GB (whole process)",
               "peak RSS during txt2img GB", "RSS after load GB (file-backed)"]  # fmt: skip
    rows = []
    for index, run in enumerate(WHOLE_RUNS):
        r = whole.get(str(index))
        if r is None:
            continue
        load = r["memory"]["after_load"]
        rows.append([
            run.label, f"{r['txt2img_s']:.1f}", f"**{ratio(r['txt2img_s'], base)}**" if base else "n/a",
            f"{r['load_s']:.1f}", f"{r['memory']['after_txt2img']['peak']:.2f}", f"{r['txt2img_peak_gb']:.2f}",
            f"{load['rss']:.2f} ({load['file']:.2f})",
        ])  # fmt: skip
    return markdown_table(headers, rows)


def check_lines(checks: dict[str, Any]) -> list[str]:
    lines = []
    for dtype in DTYPES:
        if dtype in checks:
            parts = [f"{op} {c['max']:.2e} (outputs up to {c['scale']:.1f})" for op, c in checks[dtype].items()]
            lines.append(f"{dtype}, max |latentforge - diffusers| on identical inputs: " + "; ".join(parts))
    for name, c in checks.get("images", {}).items():
        if c is not None:
            lines.append(f"whole txt2img images, {name}: max pixel difference {c['max']:.0f}/255, mean {c['mean']:.2f}")
    return lines


def notes(speed: dict[str, Any], whole: dict[str, Any], repeats: int, sessions: int) -> list[str]:
    """How to read the tables, and what the numbers depend on."""
    runs = [r for s in speed.values() for r in s["runs"]] + list(whole.values())
    loadavg = [r["loadavg"] for r in runs]
    cores = [r["cpu_s"] / r.get("seconds", r.get("txt2img_s", 1)) for r in runs]
    lines = [
        f"Operations: each call timed after one untimed warm-up of the same call in the same process; {repeats} "
        "timed calls per library, the libraries alternating call by call (order reversed every other call); "
        f"seeded random inputs, identical in both processes; t = {TIMESTEP}; under `torch.no_grad()`.",
        "*text encoding*: latentforge's `pipe.encode_prompt(prompt, negative)` (tokenizer, A1111 emphasis parsing, "
        "CLIP) against diffusers' `pipe.encode_prompt(prompt, 'cpu', 1, True, negative)`. *VAE encode/decode*: the "
        "VAE modules alone, no scaling or PIL conversion.",
        f"Whole runs: a fresh process imports, loads and runs one {SIZE}x{SIZE} txt2img, {STEPS} steps (its first "
        "call: it pays one-time costs such as oneDNN kernel set-up and, for latentforge, the checkpoint's SHA-256 "
        f"for the infotext). Euler, CFG {CFG_SCALE}, seed {SEED}, except *latentforge defaults*: "
        f"`generate(prompt, steps={STEPS}, seed={SEED})` with everything else left to latentforge (dtype auto, "
        "the checkpoint's default sampler Euler a and CFG 7). *peak RSS (whole process)* is `ru_maxrss`: import, load "
        "and txt2img; *during txt2img* is VmHWM reset right before the call (`/proc/self/clear_refs`), weights "
        "included; *file-backed* is `RssFile`, weights mapped from the safetensors file.",
        f"*CPU s per s*: user + system CPU time over wall time; {THREADS}.0 is both threads busy. 1-minute load "
        f"average at the end of the calls {min(loadavg):.1f}..{max(loadavg):.1f} (our own {THREADS} threads count "
        f"for about {THREADS}); CPU seconds per second {min(cores):.2f}..{max(cores):.2f}, median "
        f"{statistics.median(cores):.2f}.",
    ]
    if sessions > 1:
        lines.append(f"This run was interrupted and resumed ({sessions} sessions, `--resume`); each session started "
                     "new workers and warmed every operation up again.")  # fmt: skip
    return lines


def render(info: dict[str, Any], command: str, speed: dict[str, Any], whole: dict[str, Any],
           checks: dict[str, Any], repeats: int, sessions: int) -> str:  # fmt: skip
    """The whole docs section."""
    tables = "\n\n".join(f"### Operations, {dtype}\n\n{speed_table(s['runs'])}" for dtype, s in speed.items())
    whole_block = f"### Whole txt2img, one fresh process each\n\n{whole_table(whole)}" if whole else ""
    bullets = "\n".join(f"- {line}" for line in notes(speed, whole, repeats, sessions))
    checks_md = "\n".join(f"- {line}" for line in check_lines(checks))
    return f"""
## Speed and memory against diffusers

`{command}`

{machine_markdown(info)}

SD 1.5 shapes with random weights: both libraries load the same single file
(`{CHECKPOINT.relative_to(REPO)}`, {CHECKPOINT.stat().st_size / 1e9:.2f} GB float32, CompVis key names, no
metadata) on the CPU: `latentforge.load(path, dtype=..., device="cpu")` against
`StableDiffusionPipeline.from_single_file(path, config=<local config-only folder>, local_files_only=True,
safety_checker=None, torch_dtype=...)`, each in processes of its own ({THREADS} torch threads,
`OMP_NUM_THREADS={THREADS}`). Times in seconds; a ratio below 1 means latentforge is faster.

{tables}

{whole_block}

Equivalence of the outputs (at bfloat16 the libraries round at different places):

{checks_md}

{bullets}
"""


# --------------------------------------------------------------------------- command line


def dtype_list(text: str) -> list[str]:
    """Comma-separated dtypes, checked."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names or any(name not in DTYPES for name in names):
        raise argparse.ArgumentTypeError(f"expected some of {', '.join(DTYPES)}, got {text!r}")
    return names


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command line of the benchmark (and of its hidden worker modes)."""
    parser = argparse.ArgumentParser(prog=f"python -m {MODULE}", description=__doc__.splitlines()[0])
    parser.add_argument("--dtypes", type=dtype_list, default=list(DTYPES), help="float32, bfloat16 or both (default: both)")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per operation and library (default 3)")
    parser.add_argument("--no-whole", action="store_true", help="skip the whole txt2img runs (time, load, memory)")
    parser.add_argument("--resume", action="store_true",
                        help=f"carry on from {PARTIAL.relative_to(REPO)} (an interrupted run with the same settings)")
    parser.add_argument("--no-doc", action="store_true", help="print the tables but leave docs/benchmarks.md alone")
    parser.add_argument("--speed-worker", choices=sorted(ADAPTERS), help=argparse.SUPPRESS)
    parser.add_argument("--whole-worker", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--dtype", choices=DTYPES, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    """Run the benchmark (or, with a hidden worker flag, one worker)."""
    args = parse_args(argv)
    if args.speed_worker:
        return speed_worker(args.speed_worker, args.dtype)
    if args.whole_worker is not None:
        return emit(whole_worker(args.whole_worker))
    prepare(accelerate=False)
    info = machine_info()
    progress = Progress({"dtypes": args.dtypes, "repeats": args.repeats, "whole": not args.no_whole}, args.resume)
    speed = {dtype: measure_speed(dtype, args.repeats, progress) for dtype in args.dtypes}
    whole = {} if args.no_whole else measure_whole(progress)
    checks = compare_outputs(args.dtypes, whole)
    given = [a for a in (argv if argv is not None else sys.argv[1:]) if a != "--resume"]
    command = f"python -m {MODULE}" + (" " + " ".join(given)).rstrip()
    sessions = progress.data["sessions"]
    markdown = render(info, command, speed, whole, checks, args.repeats, sessions)
    data = {"machine": info, "command": command, "speed": speed, "whole": whole, "equivalence": checks}
    publish(OUT, data, markdown, SECTION, not args.no_doc)
    return None


if __name__ == "__main__":
    main()
