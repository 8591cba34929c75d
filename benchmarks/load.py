"""Checkpoint load benchmark: latentforge.load vs diffusers' from_single_file on an SD 1.5-sized file.

    python -m benchmarks.load [--repeats 3] [--accelerate] [--no-doc]

Builds a random-weight SD 1.5-sized checkpoint once (benchmarks/.cache/, git-ignored), then times
each load in a fresh process, alternating the libraries, and writes its section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.common import (
    CACHE,
    REPO,
    THREADS,
    cpu_seconds,
    emit,
    limit_threads,
    machine_info,
    machine_markdown,
    markdown_table,
    memory_now,
    package_version,
    publish,
    run_isolated,
    spread,
    timed,
    warm_page_cache,
    worker_env,
)

SEED = 0
WITH_METADATA = CACHE / "sd15-random.safetensors"  # as write_single_file makes it: our config in the metadata
FILES = {  # what is benchmarked: no metadata, like the SD 1.5 files people have
    "fp32": CACHE / "sd15-random-nometa.safetensors",
    "fp16": CACHE / "sd15-random-nometa-fp16.safetensors",
}
CONFIG_FOLDER = CACHE / "sd15-config"  # config-only diffusers folder for from_single_file without a hub
ACCELERATE_SITE = CACHE / "accelerate-site"  # `pip install --target` of accelerate, used only with --accelerate
COMPONENTS = ("unet", "vae", "text_encoder")  # the models each library's pipeline holds
OUT = REPO / "benchmarks" / "out" / "load.json"  # raw results (git-ignored)
SECTION = "load"


@dataclass(frozen=True)
class Library:
    name: str
    family: str  # which loader: "latentforge" or "diffusers"
    pythonpath: tuple[Path, ...] = ()


LIBRARIES = {
    "latentforge": Library("latentforge", "latentforge"),
    "diffusers": Library("diffusers", "diffusers"),
    "diffusers+accelerate": Library("diffusers+accelerate", "diffusers", (ACCELERATE_SITE,)),
}


# --------------------------------------------------------------------------- the checkpoint


def model_config():
    """The SD 1.5 architecture, from latentforge's presets."""
    from latentforge.config import ModelConfig
    from latentforge.text_encoder import SD1_TEXT_ENCODER
    from latentforge.unet import SD1_UNET
    from latentforge.vae import SD_VAE

    return ModelConfig(unet=SD1_UNET, vae=SD_VAE, text_encoder=SD1_TEXT_ENCODER)


def random_parts(seed: int, config: Any = None) -> dict[str, dict[str, Any]]:
    """Randomly initialised UNet, VAE and text encoder weights (SD 1.5's shapes, or `config`'s), each part
    seeded on its own."""
    import torch

    from latentforge.text_encoder import TextEncoder
    from latentforge.unet import UNet
    from latentforge.vae import AutoencoderKL

    config = config or model_config()
    builders = {"unet": (UNet, config.unet), "vae": (AutoencoderKL, config.vae),
                "text_encoder": (TextEncoder, config.text_encoder)}  # fmt: skip
    parts = {}
    for offset, (name, (cls, part_config)) in enumerate(builders.items()):
        torch.manual_seed(seed + offset)
        parts[name] = cls(part_config).state_dict()
    return parts


def half(tensors: dict[str, Any]) -> dict[str, Any]:
    """Floating-point tensors cast to float16, the rest as they are."""
    import torch

    return {k: v.to(torch.float16) if v.is_floating_point() else v for k, v in tensors.items()}


def build_checkpoints(seed: int = SEED) -> None:
    """Write the cached checkpoint files that are missing: with metadata, and metadata-free fp32 and fp16."""
    if WITH_METADATA.exists() and all(path.exists() for path in FILES.values()):
        return
    from latentforge.checkpoints import single_file_tensors, write_single_file
    from latentforge.weightfiles import write_safetensors

    CACHE.mkdir(parents=True, exist_ok=True)
    print(f"building a random SD 1.5-sized checkpoint (seed {seed}) in {CACHE} ...", flush=True)
    config = model_config()
    parts = random_parts(seed)
    if not WITH_METADATA.exists():
        write_single_file(config, parts, WITH_METADATA)
    tensors = single_file_tensors(config, parts)
    if not FILES["fp32"].exists():
        write_safetensors(tensors, FILES["fp32"])
    if not FILES["fp16"].exists():
        write_safetensors(half(tensors), FILES["fp16"])


def write_config_folder(folder: Path = CONFIG_FOLDER, config: Any = None) -> None:
    """A diffusers StableDiffusionPipeline folder with every config and the tokenizer, but no weights
    (SD 1.5's configs, or `config`'s)."""
    if (folder / "model_index.json").exists():
        return
    from latentforge import layouts
    from latentforge.atomic import write_json
    from latentforge.checkpoints import SD_SCHEDULER
    from latentforge.tokenizer import Tokenizer

    config = config or model_config()
    configs = {
        "unet/config.json": layouts.unet_config_to_diffusers(config.unet),
        "vae/config.json": layouts.vae_config_to_diffusers(config.vae),
        "text_encoder/config.json": layouts.text_encoder_config_to_diffusers(config.text_encoder),
        "scheduler/scheduler_config.json": {**SD_SCHEDULER, "prediction_type": config.prediction_type},
    }
    for name, content in configs.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        write_json(content, folder / name)
    Tokenizer().save_pretrained(folder / "tokenizer")
    index = {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": package_version("diffusers"),
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", SD_SCHEDULER["_class_name"]],
        "safety_checker": [None, None],
        "feature_extractor": [None, None],
        "requires_safety_checker": False,
    }
    write_json(index, folder / "model_index.json")  # last: its presence marks a complete folder


def install_accelerate(target: Path = ACCELERATE_SITE) -> None:
    """pip-install accelerate into a private folder (never into the shared environment)."""
    if (target / "accelerate").is_dir():
        return
    print(f"installing accelerate into {target} ...", flush=True)
    command = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target), "accelerate"]
    subprocess.run(command, check=True)


# --------------------------------------------------------------------------- inside a worker process


def import_latentforge() -> Callable[[Path], Any]:
    """Import latentforge; return its load call."""
    import latentforge

    return lambda path: latentforge.load(path, dtype="float32", device="cpu")


def import_diffusers() -> Callable[[Path], Any]:
    """Import diffusers; return its single-file load call (configs from the local folder, no hub)."""
    import torch
    from diffusers import StableDiffusionPipeline

    return lambda path: StableDiffusionPipeline.from_single_file(
        str(path), config=str(CONFIG_FOLDER), local_files_only=True, safety_checker=None, torch_dtype=torch.float32
    )


IMPORTERS: dict[str, Callable[[], Callable[[Path], Any]]] = {
    "latentforge": import_latentforge,
    "diffusers": import_diffusers,
}


def component(pipe: Any, name: str) -> Any:
    """One model of either library's pipeline (latentforge keeps its text encoder in its conditioner)."""
    return getattr(pipe, name) if hasattr(pipe, name) else getattr(pipe.conditioner, name)


def weights(pipe: Any) -> list[Any]:
    """Every tensor of the pipeline's UNet, VAE and text encoder."""
    return [t for name in COMPONENTS for t in component(pipe, name).state_dict().values()]


def touch(pipe: Any) -> float:
    """Read every weight once (pages in what a memory-mapped load left in the file); their sum.

    Single-threaded, so that this probe itself does not wait on a descheduled second thread."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            return sum(float(t.sum()) for t in weights(pipe))
    finally:
        torch.set_num_threads(threads)


def describe_weights(pipe: Any) -> dict[str, Any]:
    """Parameter count and floating dtypes of the loaded pipeline (to check both load the same thing)."""
    params = [p for name in COMPONENTS for p in component(pipe, name).parameters()]
    return {
        "params": sum(p.numel() for p in params),
        "dtypes": sorted({str(p.dtype) for p in params}),
    }


def measure_once(family: str, path: Path) -> dict[str, Any]:
    """One load in this (fresh) process: import and load times, memory after each step."""
    started = time.perf_counter()
    import torch  # noqa: F401  (timed apart: both libraries pay it)

    torch_import_s = time.perf_counter() - started
    limit_threads(THREADS)
    loader, import_s = timed(IMPORTERS[family])
    before = memory_now()
    dynamo_before = "torch._dynamo" in sys.modules
    cpu_before = cpu_seconds()
    pipe, load_s = timed(lambda: loader(path))
    load_cpu_s = cpu_seconds() - cpu_before
    after_load = memory_now()
    _, touch_s = timed(lambda: touch(pipe))
    after_touch = memory_now()
    return {
        "torch_import_s": torch_import_s,
        "import_s": import_s,
        "load_s": load_s,
        "load_cpu_s": load_cpu_s,
        "touch_s": touch_s,
        "memory": {"before_load": before, "after_load": after_load, "after_touch": after_touch},
        "accelerate": importlib.util.find_spec("accelerate") is not None,
        # torch._dynamo takes about a second to import; say whether the load call paid for it
        "dynamo_imported_by_load": not dynamo_before and "torch._dynamo" in sys.modules,
        "loadavg": os.getloadavg()[0],
        **describe_weights(pipe),
    }


def equivalence(path: Path) -> dict[str, Any]:
    """Load the file with both libraries in this process and compare one UNet output, and the inferred config."""
    import torch

    from latentforge.checkpoints import CONFIG_METADATA_KEY
    from latentforge.weightfiles import read_state_dict
    from latentforge.config import ModelConfig

    limit_threads(THREADS)
    ours = import_latentforge()(path)
    ref = import_diffusers()(path)
    stored = ModelConfig.from_json(read_state_dict(WITH_METADATA)[1][CONFIG_METADATA_KEY])
    generator = torch.Generator().manual_seed(SEED)
    latents = torch.randn(1, 4, 8, 8, generator=generator)
    context = torch.randn(1, 77, 768, generator=generator)
    timestep = torch.tensor([500])
    with torch.no_grad():
        a = ours.unet(latents, timestep, context)
        b = ref.unet(latents, timestep, encoder_hidden_states=context).sample
    return {
        "max_abs_diff": (a - b).abs().max().item(),
        "max_abs_output": b.abs().max().item(),
        "config_matches_metadata": ours.config == stored,
        "config": ours.config.describe(),
        "latentforge": describe_weights(ours),
        "diffusers": describe_weights(ref),
    }


# --------------------------------------------------------------------------- the parent process


def schedule(libraries: Sequence[str], files: Sequence[str], repeats: int) -> list[tuple[int, str, str]]:
    """(repeat, file, library) runs: libraries alternate, in reversed order every other repeat (ABBA)."""
    runs = []
    for repeat in range(repeats):
        order = list(libraries) if repeat % 2 == 0 else list(reversed(libraries))
        runs += [(repeat, file, library) for file in files for library in order]
    return runs


def measure_all(libraries: Sequence[str], files: Sequence[str], repeats: int) -> list[dict[str, Any]]:
    """Every scheduled run in its own process, each after an untimed warm-up read of its file."""
    results = []
    for repeat, file, name in schedule(libraries, files, repeats):
        library = LIBRARIES[name]
        warm_page_cache(FILES[file])
        env = worker_env(THREADS, library.pythonpath)
        result = run_isolated("benchmarks.load", ["--worker", library.family, "--file", file], env)
        result.update(repeat=repeat, file=file, library=name)
        print(f"  repeat {repeat + 1}/{repeats} {file} {name:<21} load {result['load_s']:6.2f} s  "
              f"peak {result['memory']['after_load']['peak']:5.2f} GB  touch {result['touch_s']:5.2f} s", flush=True)
        results.append(result)
    return results


def check_all(files: Sequence[str]) -> dict[str, dict[str, Any]]:
    """The (untimed) equivalence check of each file, in a process of its own."""
    return {file: run_isolated("benchmarks.load", ["--check", file], worker_env(THREADS)) for file in files}


def summarise(results: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    """Per (file, library): spread of each measurement over the repeats."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in results:
        groups.setdefault((r["file"], r["library"]), []).append(r)
    summary = {}
    for key, runs in groups.items():
        summary[key] = {
            "load_s": spread([r["load_s"] for r in runs]),
            "load_cpu_s": spread([r["load_cpu_s"] for r in runs]),
            "touch_s": spread([r["touch_s"] for r in runs]),
            "total_s": spread([r["load_s"] + r["touch_s"] for r in runs]),
            "import_s": spread([r["import_s"] + r["torch_import_s"] for r in runs]),
            "peak_gb": spread([r["memory"]["after_load"]["peak"] for r in runs]),
            "rss_load_gb": spread([r["memory"]["after_load"]["rss"] for r in runs]),
            "file_load_gb": spread([r["memory"]["after_load"]["file"] for r in runs]),
            "rss_touch_gb": spread([r["memory"]["after_touch"]["rss"] for r in runs]),
            "base_gb": spread([r["memory"]["before_load"]["rss"] for r in runs]),
            "end_to_end_s": spread([r["torch_import_s"] + r["import_s"] + r["load_s"] + r["touch_s"] for r in runs]),
            "accelerate": runs[0]["accelerate"],
            "dynamo_in_load": any(r["dynamo_imported_by_load"] for r in runs),
        }
    return summary


def results_table(summary: dict[tuple[str, str], dict[str, Any]]) -> str:
    """One row per (file, library): times in seconds, memory in GB (medians)."""
    headers = [
        "file", "library", "load s (median)", "min..max", "load CPU s", "peak RSS GB", "RSS after load GB",
        "of which file-backed", "first touch s", "RSS after touch GB", "imports s",
    ]  # fmt: skip
    rows = []
    for (file, library), s in summary.items():
        load = s["load_s"]
        rows.append([
            file, library, f"{load['median']:.2f}", f"{load['min']:.2f}..{load['max']:.2f}", f"{s['load_cpu_s']['median']:.2f}",
            f"{s['peak_gb']['median']:.2f}", f"{s['rss_load_gb']['median']:.2f}", f"{s['file_load_gb']['median']:.2f}",
            f"{s['touch_s']['median']:.2f}", f"{s['rss_touch_gb']['median']:.2f}", f"{s['import_s']['median']:.2f}",
        ])  # fmt: skip
    return markdown_table(headers, rows, align="ll" + "r" * (len(headers) - 2))


def ratios_table(summary: dict[tuple[str, str], dict[str, Any]]) -> str:
    """latentforge / each diffusers variant, per file: below 1 means latentforge needs less."""
    headers = [
        "file", "latentforge / …", "load time", "load + first touch", "imports + load + first touch",
        "peak RSS", "RSS after load", "RSS after touch",
    ]  # fmt: skip
    keys = ("load_s", "total_s", "end_to_end_s", "peak_gb", "rss_load_gb", "rss_touch_gb")
    rows = []
    for (file, library), s in summary.items():
        ours = summary.get((file, "latentforge"))
        if library == "latentforge" or ours is None:
            continue
        rows.append([file, library, *(f"{ours[k]['median'] / s[k]['median']:.2f}" for k in keys)])
    return markdown_table(headers, rows, align="ll" + "r" * len(keys))


def checks_markdown(checks: dict[str, dict[str, Any]]) -> str:
    """The equivalence checks as a bullet list."""
    lines = []
    for file, c in checks.items():
        same = c["latentforge"]["params"] == c["diffusers"]["params"]
        lines.append(
            f"- {file}: UNet output max |latentforge − diffusers| = {c['max_abs_diff']:.2e} "
            f"(outputs up to {c['max_abs_output']:.2f}); parameters {c['latentforge']['params']:,} vs "
            f"{c['diffusers']['params']:,}{'' if same else ' (DIFFERENT)'}; config inferred from the tensors "
            f"({c['config']}) {'equals' if c['config_matches_metadata'] else 'DIFFERS FROM'} the one write_single_file stores"
        )
    return "\n".join(lines)


def notes(summary: dict[tuple[str, str], dict[str, Any]], loadavg: Sequence[float]) -> list[str]:
    """How to read the tables, and what this run's numbers depend on."""
    base = [s["base_gb"]["median"] for s in summary.values()]
    without = sorted({lib for (_, lib), s in summary.items() if lib != "latentforge" and not s["accelerate"]})
    dynamo = sorted({lib for (_, lib), s in summary.items() if s["dynamo_in_load"]})
    worst = max(s["load_s"]["max"] / s["load_s"]["min"] for s in summary.values())
    lines = [
        "*load s*: wall time of the load call only; *load CPU s*: user + system CPU time of that call (all threads); "
        "*imports s*: `import torch` plus the library's import, timed apart.",
        f"*peak RSS*: `ru_maxrss` up to the end of the load, imports included ({min(base):.2f}..{max(base):.2f} GB is the interpreter, "
        "torch and the library before loading). *RSS after load* counts file-backed pages (memory-mapped weights) "
        "too; *of which file-backed* is `RssFile`, page-cache pages that the kernel can drop and re-read.",
        "*first touch*: one single-threaded pass summing every weight right after the load. A memory-mapped load "
        "reads the weights only when they are first used, so *load + first touch* is the fair time-to-usable-weights "
        "comparison. latentforge maps the file once and keeps each tensor mapped when no dtype conversion "
        "is needed, except the convolution weights, which it copies into channels-last (the faster layout for "
        "oneDNN: docs/design.md) and which are therefore anonymous memory after the load; diffusers with accelerate "
        "maps too. fp16 files are converted to float32 during the load: those weights end up in anonymous memory for "
        "every library (latentforge hands back each source tensor's pages as soon as it is converted).",
    ]
    if without:
        lines.append(
            f"{', '.join(without)} ran without `accelerate` (as installed here): diffusers then builds every model "
            "with random initialisation and copies the weights in (`low_cpu_mem_usage` needs accelerate)."
        )
    if "diffusers+accelerate" in {lib for _, lib in summary}:
        lines.append("*diffusers+accelerate*: the same call with accelerate importable (pip-installed into "
                     "benchmarks/.cache only, put on the worker's PYTHONPATH).")
    if dynamo:
        lines.append(
            f"The load call of {', '.join(dynamo)} imported `torch._dynamo` (about 0.9 s here, once per process): building "
            "the models under `torch.device('meta')` runs `nn.Embedding`'s `normal_` init through `torch._refs`, whose "
            "`torch._compile` wrapper imports dynamo. `import diffusers` imports dynamo itself, so for diffusers that "
            "second is in *imports s*; *imports + load + first touch* counts it once for everyone."
        )
    busy = max(loadavg) > THREADS + 0.5  # more than our own threads: someone else was running too
    lines.append(
        ("Caveat: other work ran on" if busy else "Noise: a quiet run on")
        + f" this {os.cpu_count()}-core machine (1-minute load "
        f"average during the runs {min(loadavg):.1f}..{max(loadavg):.1f}; the largest max/min of one row's load "
        f"times is {worst:.1f}x). With {THREADS} threads on {os.cpu_count()} shared cores each parallel op waits for "
        "its slower thread, so calls made of many small parallel ops (the per-tensor float16 -> float32 conversions, "
        "about 1,100 of them) slow down by seconds when others are busy, while loads that only map the file barely "
        "move. The alternating order spreads that noise over the libraries alike; compare medians and minima."
    )
    return lines


def render(info: dict[str, Any], command: str, summary: dict, checks: dict, repeats: int, loadavg: Sequence[float]) -> str:
    """The whole docs section."""
    files = dict.fromkeys(file for file, _ in summary)
    sizes = ", ".join(f"{file} {FILES[file].stat().st_size / 1e9:.2f} GB" for file in files)
    bullets = "\n".join(f"- {line}" for line in notes(summary, loadavg))
    return f"""
## Checkpoint loading

`{command}`

{machine_markdown(info)}

Loads a random-weight SD 1.5-sized single file ({sizes}; original CompVis key names and no metadata,
so latentforge infers the config from the tensors, as for a real SD 1.5 file) into float32 on the CPU:
`latentforge.load(path, dtype="float32", device="cpu")` against
`StableDiffusionPipeline.from_single_file(path, config=<local config-only folder>, local_files_only=True,
safety_checker=None, torch_dtype=torch.float32)`. Every run is a fresh process ({THREADS} torch threads,
`OMP_NUM_THREADS={THREADS}`); {repeats} repeats, the libraries alternating (order reversed every other repeat).
The page cache cannot be dropped without root, so each run is preceded by an untimed read of the whole
file: all numbers are **warm-cache** loads.

{results_table(summary)}

Ratios of medians, latentforge / the other (below 1: latentforge needs less):

{ratios_table(summary)}

{bullets}

Equivalence (untimed; one process per file with both libraries loaded, UNet on 1x4x8x8 latents, t=500,
random 1x77x768 context):

{checks_markdown(checks)}
"""


def prepare(accelerate: bool) -> None:
    """Everything the runs need: the checkpoint files, the config folder, optionally accelerate."""
    build_checkpoints()
    write_config_folder()
    if accelerate:
        install_accelerate()


def file_list(text: str) -> list[str]:
    """Comma-separated names of benchmarked files, checked."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in FILES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"expected some of {', '.join(FILES)}, got {text!r}")
    return names


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command line of the benchmark (and of its hidden worker modes)."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.load", description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="loads per library and file (default 3)")
    parser.add_argument("--files", default="fp32,fp16", type=file_list, help="fp32, fp16 or both (default: fp32,fp16)")
    parser.add_argument("--accelerate", action="store_true",
                        help="also time diffusers with accelerate (pip-installed into benchmarks/.cache only)")
    parser.add_argument("--no-doc", action="store_true", help="print the table but leave docs/benchmarks.md alone")
    parser.add_argument("--prepare", action="store_true", help="only build the cached files, then stop")
    parser.add_argument("--worker", choices=sorted(IMPORTERS), help=argparse.SUPPRESS)
    parser.add_argument("--check", choices=sorted(FILES), help=argparse.SUPPRESS)
    parser.add_argument("--file", choices=sorted(FILES), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    """Run the benchmark (or, with --worker / --check, one measurement inside a fresh process)."""
    args = parse_args(argv)
    if args.worker:
        return emit(measure_once(args.worker, FILES[args.file]))
    if args.check:
        return emit(equivalence(FILES[args.check]))
    prepare(args.accelerate)
    if args.prepare:
        return None
    libraries = ["latentforge", "diffusers"] + (["diffusers+accelerate"] if args.accelerate else [])
    print("equivalence check ...", flush=True)
    checks = check_all(args.files)
    print(checks_markdown(checks), flush=True)
    info = machine_info()
    if args.accelerate:
        info["versions"]["accelerate"] = package_version("accelerate", [ACCELERATE_SITE]) + " (diffusers+accelerate only)"
    results = measure_all(libraries, args.files, args.repeats)
    summary = summarise(results)
    command = "python -m benchmarks.load" + (" " + " ".join(argv if argv is not None else sys.argv[1:])).rstrip()
    markdown = render(info, command, summary, checks, args.repeats, [r["loadavg"] for r in results])
    publish(OUT, {"machine": info, "checks": checks, "runs": results}, markdown, SECTION, not args.no_doc)
    return None


if __name__ == "__main__":
    main()
