"""Speed and memory of latentforge against diffusers and OpenVINO on the same SD 1.5-shaped work, random weights, CPU.

    python -m benchmarks.vs_diffusers [--engines latentforge,diffusers,openvino] [--dtypes float32,bfloat16]
        [--repeats 3] [--no-whole] [--resume] [--no-doc] [--size sd15|small] [--openvino-python PATH] [--prepare]

Every engine loads the same cached random-weight SD 1.5-sized single file (benchmarks/.cache/, built by
benchmarks.load when missing); OpenVINO (optimum-intel's OVStableDiffusionPipeline) runs an IR exported
once from it (diffusers' conversion of the file, then optimum-intel's export, cached in benchmarks/.cache/).
OpenVINO lives in a virtual environment of its own (--openvino-python, default ../ov-venv/bin/python next
to the repository); without one its rows are skipped. Operations: each engine runs in a long-lived process
of its own; the parent asks them for one call at a time, alternating them (order reversed every other
call), and takes the median of --repeats timed calls after one warm-up. Whole txt2img runs: each in a fresh
process (import, load, one 512 x 512 txt2img), which gives its time, the load time and the peak memory.
Writes the 'speed' section of docs/benchmarks.md. Results are saved after every call; --resume carries on
after an interruption. --size small runs everything on a tiny random model (a quick check of the harness;
its numbers mean nothing).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from benchmarks.common import (
    CACHE,
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
from benchmarks.load import CONFIG_FOLDER, FILES, model_config, prepare, random_parts, write_config_folder

if TYPE_CHECKING:
    import torch
    from PIL import Image

MODULE = "benchmarks.vs_diffusers"
OUT = REPO / "benchmarks" / "out" / "vs_diffusers.json"  # raw results (git-ignored)
PARTIAL = REPO / "benchmarks" / "out" / "vs_diffusers.partial.json"  # results so far, for --resume
ARTIFACTS = REPO / "benchmarks" / "out" / "vs_diffusers"  # worker logs and the outputs compared
SECTION = "speed"
DTYPES = ("float32", "bfloat16")
LIBRARIES = ("latentforge", "diffusers", "openvino")  # latentforge first: the others are the references
OURS = "latentforge"
# OpenVINO's Python environment (see docs/benchmarks.md for how it is installed): never this one's
OPENVINO_PYTHON = REPO.parent / "ov-venv" / "bin" / "python"
OPENVINO_THREADS = {"INFERENCE_NUM_THREADS": str(THREADS)}  # the same 2 threads as torch's pools

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
class Model:
    """The checkpoint every engine loads, and what is derived from it."""

    name: str
    checkpoint: Path  # single file, CompVis key names, no metadata
    config_folder: Path  # config-only diffusers folder, for from_single_file without a hub

    @property
    def diffusers_folder(self) -> Path:
        """The checkpoint as a diffusers folder (diffusers' conversion), kept only while exporting."""
        return CACHE / f"{self.name}-diffusers"

    @property
    def openvino_folder(self) -> Path:
        """optimum-intel's OpenVINO IR of the checkpoint (dynamic shapes; reshaped at load)."""
        return CACHE / f"{self.name}-openvino"


MODELS = {
    "sd15": Model("sd15", FILES["fp32"], CONFIG_FOLDER),  # SD 1.5-sized, random weights
    # a tiny model of the same family (768-wide text, 8 heads, 8x VAE) to check the harness in a minute
    "small": Model("small", CACHE / "small-random-nometa.safetensors", CACHE / "small-config"),
}


def small_config() -> Any:
    """The tiny model's latentforge config: SD 1.5's shapes at a fraction of the width and depth."""
    from dataclasses import replace

    config = model_config()
    return replace(
        config,
        unet=replace(config.unet, model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(0, 1)),
        vae=replace(config.vae, base_channels=32, channel_mult=(1, 1, 2, 2), num_res_blocks=1),
        text_encoder=replace(config.text_encoder, layers=2),
    )


def prepare_small(model: Model = MODELS["small"]) -> None:
    """The tiny model's checkpoint file and config folder, when missing."""
    if not model.checkpoint.exists():
        from latentforge.checkpoints import single_file_tensors
        from latentforge.weightfiles import write_safetensors

        config = small_config()
        model.checkpoint.parent.mkdir(parents=True, exist_ok=True)
        write_safetensors(single_file_tensors(config, random_parts(0, config)), model.checkpoint)
    write_config_folder(model.config_folder, small_config())


@dataclass(frozen=True)
class WholeRun:
    """One whole txt2img in a fresh process."""

    label: str
    library: str
    dtype: str  # "auto": latentforge's own choice
    defaults: bool = False  # latentforge's default settings (sampler, guidance) instead of Euler / CFG 7.5


WHOLE_RUNS = (  # indices are the keys of saved results: add new runs at the end
    WholeRun("diffusers float32 (its default)", "diffusers", "float32"),
    WholeRun("latentforge float32", "latentforge", "float32"),
    WholeRun("diffusers bfloat16", "diffusers", "bfloat16"),
    WholeRun("latentforge bfloat16", "latentforge", "bfloat16"),
    WholeRun("latentforge defaults (dtype auto, Euler a, CFG 7)", "latentforge", "auto", defaults=True),
    WholeRun("openvino float32 (precision hint f32)", "openvino", "float32"),
    WholeRun("openvino bfloat16 (its default on this CPU)", "openvino", "bfloat16"),
)


# --------------------------------------------------------------------------- what differs between the libraries


@dataclass(frozen=True)
class Adapter:
    """How one library loads the checkpoint and runs each measured operation (everything else is shared)."""

    load: Callable[[Model, str], Any]
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
        load=lambda model, dtype: latentforge.load(model.checkpoint, dtype=dtype, device="cpu"),
        encode_text=lambda pipe: torch.cat([cond.context for cond in pipe.encode_prompt(PROMPT, NEGATIVE)]),
        unet=lambda pipe, x, t, context: pipe.unet(x, t, context),
        vae_decode=lambda pipe, z: pipe.vae.decode(z),
        vae_encode=lambda pipe, image: torch.cat(pipe.vae.encode(image), dim=1),
        txt2img=txt2img,
    )


def diffusers_adapter() -> Adapter:
    import torch
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

    def load(model: Model, dtype: str) -> Any:
        pipe = StableDiffusionPipeline.from_single_file(
            str(model.checkpoint), config=str(model.config_folder), local_files_only=True, safety_checker=None,
            torch_dtype=getattr(torch, dtype),
        )  # fmt: skip
        pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def encode(pipe: Any, image: torch.Tensor) -> torch.Tensor:
        posterior = pipe.vae.encode(image).latent_dist
        return torch.cat([posterior.mean, posterior.logvar], dim=1)

    return Adapter(
        load=load,
        encode_text=lambda pipe: torch.cat(pipe.encode_prompt(PROMPT, "cpu", 1, True, NEGATIVE), dim=0),
        unet=lambda pipe, x, t, context: pipe.unet(x, t, encoder_hidden_states=context).sample,
        vae_decode=lambda pipe, z: pipe.vae.decode(z).sample,
        vae_encode=encode,
        txt2img=diffusers_txt2img,
    )


def diffusers_txt2img(pipe: Any, defaults: bool) -> Image.Image:
    """diffusers' call (also OpenVINO's: optimum-intel's pipeline is a diffusers StableDiffusionPipeline)."""
    import torch

    generator = torch.Generator().manual_seed(SEED)
    return pipe(
        PROMPT, height=SIZE, width=SIZE, num_inference_steps=STEPS, guidance_scale=CFG_SCALE, generator=generator
    ).images[0]


def openvino_config(dtype: str) -> dict[str, str]:
    """OpenVINO CPU plugin settings: torch's thread count; float32 asks for f32 inference, bfloat16 leaves
    the precision to OpenVINO's default hint (bf16 on a CPU with AVX-512 BF16 or AMX, else f32)."""
    return {**OPENVINO_THREADS, **({"INFERENCE_PRECISION_HINT": "f32"} if dtype == "float32" else {})}


def openvino_adapter() -> Adapter:
    """optimum-intel's OVStableDiffusionPipeline on the exported IR, reshaped to static 512 x 512, batch 1
    (the UNet then takes the guided batch of 2), compiled at load. Its models take and give torch tensors."""
    import torch
    from diffusers import EulerDiscreteScheduler
    from optimum.intel import OVStableDiffusionPipeline

    def posterior(dist: Any) -> torch.Tensor:  # diffusers' DiagonalGaussianDistribution, as diffusers' adapter reads it
        return torch.cat([dist.mean, dist.logvar], dim=1)

    def load(model: Model, dtype: str) -> Any:
        pipe = OVStableDiffusionPipeline.from_pretrained(
            str(model.openvino_folder), export=False, ov_config=openvino_config(dtype), compile=False,
            local_files_only=True,
        )  # fmt: skip
        pipe.reshape(batch_size=1, height=SIZE, width=SIZE, num_images_per_prompt=1)
        pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
        pipe.set_progress_bar_config(disable=True)
        pipe.compile()
        return pipe

    return Adapter(
        load=load,
        encode_text=lambda pipe: torch.cat(pipe.encode_prompt(PROMPT, "cpu", 1, True, NEGATIVE), dim=0),
        # the models give ModelOutputs named after the IR outputs (out_sample; sample; latent_dist): take the first
        unet=lambda pipe, x, t, context: pipe.unet(x, t, encoder_hidden_states=context)[0],
        vae_decode=lambda pipe, z: pipe.vae_decoder(latent_sample=z)[0],
        vae_encode=lambda pipe, image: posterior(pipe.vae_encoder(sample=image)[0]),
        txt2img=diffusers_txt2img,
    )


def openvino_precision(pipe: Any) -> str:
    """The inference precision OpenVINO compiled the UNet with (what its hint resolved to)."""
    precision = pipe.unet.request.get_property("INFERENCE_PRECISION_HINT")
    return precision.get_type_name() if hasattr(precision, "get_type_name") else str(precision)  # "f32", "bf16"


ADAPTERS: dict[str, Callable[[], Adapter]] = {
    "latentforge": latentforge_adapter, "diffusers": diffusers_adapter, "openvino": openvino_adapter,
}  # fmt: skip


# --------------------------------------------------------------------------- inside a worker process


def make_inputs(dtype: str) -> dict[str, torch.Tensor]:
    """The same seeded random inputs in every worker (drawn in float32, then cast; OpenVINO's workers take
    them back to float32, its models' input type)."""
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


def speed_worker(library: str, dtype: str, model: Model) -> None:
    """Load once, say so, then answer {"op": name, "save": path | None} until stdin closes."""

    limit_threads(THREADS)
    adapter = ADAPTERS[library]()
    inputs = make_inputs(dtype)
    if library == "openvino":
        inputs = {name: value.float() if value.is_floating_point() else value for name, value in inputs.items()}
    pipe, load_s = timed(lambda: adapter.load(model, dtype))
    ready: dict[str, Any] = {"ready": True, "load_s": load_s, "memory": memory_now()}
    if library == "openvino":
        ready["precision"] = openvino_precision(pipe)
    calls = {
        "text": lambda: adapter.encode_text(pipe),
        "unet": lambda: adapter.unet(pipe, inputs["x"], inputs["t"], inputs["context"]),
        "decode": lambda: adapter.vae_decode(pipe, inputs["z"]),
        "encode": lambda: adapter.vae_encode(pipe, inputs["image"]),
    }
    emit(ready)
    serve_calls(calls, save_output)


def whole_worker(index: int, model: Model) -> dict[str, Any]:
    """In a fresh process: load, then one whole txt2img; times, the memory after each phase and the peaks."""
    run = WHOLE_RUNS[index]
    limit_threads(THREADS)
    adapter = ADAPTERS[run.library]()
    loaded: list[Any] = []

    def load() -> Any:
        loaded.append(adapter.load(model, run.dtype))
        return loaded[0]

    image, result = load_then_generate(load, lambda pipe: adapter.txt2img(pipe, run.defaults))
    if run.library == "openvino":
        result["precision"] = openvino_precision(loaded[0])
    return {**result, "saved": save_output(image, ARTIFACTS / "whole" / f"{index}")}


def stand_in_folder(model: Model) -> Path:
    """The diffusers folder with a tiny UNet of the same interface in place of the real one (see export_openvino)."""
    return CACHE / f"{model.name}-diffusers-standin"


def save_diffusers_folder(model: Model) -> dict[str, Any]:
    """(In this repository's environment) the checkpoint through diffusers' from_single_file, the same
    conversion the diffusers rows load, saved as a diffusers folder, and beside it the stand-in folder: the
    same parts but the UNet, which is a tiny one with the same inputs and outputs."""
    import torch
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    pipe = StableDiffusionPipeline.from_single_file(
        str(model.checkpoint), config=str(model.config_folder), local_files_only=True, safety_checker=None,
        torch_dtype=torch.float32,
    )  # fmt: skip
    pipe.save_pretrained(str(model.diffusers_folder), safe_serialization=True)
    config = dict(pipe.unet.config)
    tiny = {"block_out_channels": (32, 32), "layers_per_block": 1, "attention_head_dim": 8,
            "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"), "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D")}  # fmt: skip
    pipe.unet = UNet2DConditionModel.from_config({**config, **tiny})
    pipe.save_pretrained(str(stand_in_folder(model)), safe_serialization=True)
    return {"saved": str(model.diffusers_folder)}


def export_openvino(model: Model) -> dict[str, Any]:
    """(In OpenVINO's environment) the OpenVINO IR of the model, float32 weights (no weight compression),
    written to a temporary folder and renamed when complete. optimum-intel exports the stand-in folder (the
    text encoder, the VAE, the tokenizer and scheduler, the folder layout its pipeline reads); the real UNet is
    converted with openvino.convert_model, which optimum-intel's export calls too, and put in the stand-in's
    place: optimum-intel's own export of the SD 1.5 UNet was killed for memory at 23 GB on this 24 GB machine,
    the direct conversion of the same diffusers module peaks at 6.5 GB."""
    import openvino as ov
    import torch
    from diffusers import UNet2DConditionModel
    from optimum.intel import OVStableDiffusionPipeline

    target = model.openvino_folder
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    start = time.perf_counter()
    OVStableDiffusionPipeline.from_pretrained(
        str(stand_in_folder(model)), export=True, compile=False, load_in_8bit=False, local_files_only=True,
    ).save_pretrained(str(partial))  # fmt: skip
    unet = UNet2DConditionModel.from_pretrained(str(model.diffusers_folder / "unet"), torch_dtype=torch.float32).eval()
    size = unet.config.sample_size
    example = (torch.randn(2, 4, size, size), torch.tensor([500, 500]), torch.randn(2, 77, unet.config.cross_attention_dim))

    class UNetCall(torch.nn.Module):  # diffusers' UNet as optimum-intel exports it
        def __init__(self) -> None:
            super().__init__()
            self.unet = unet

        def forward(self, sample: Any, timestep: Any, encoder_hidden_states: Any) -> Any:
            return self.unet(sample, timestep, encoder_hidden_states, return_dict=False)[0]

    with torch.no_grad():
        converted = ov.convert_model(UNetCall(), example_input=example)
    converted.outputs[0].get_tensor().set_names({"out_sample"})
    ov.save_model(converted, str(partial / "unet" / "openvino_model.xml"), compress_to_fp16=False)
    shutil.copy(model.diffusers_folder / "unet" / "config.json", partial / "unet" / "config.json")
    os.replace(partial, target)
    return {"saved": str(target), "export_s": time.perf_counter() - start}


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


@dataclass(frozen=True)
class Engines:
    """The engines of this run, the model they load and the Python each runs under."""

    names: tuple[str, ...]
    model: Model
    openvino_python: Path = OPENVINO_PYTHON

    def interpreter(self, library: str) -> Path:
        return self.openvino_python if library == "openvino" else Path(sys.executable)

    def warm(self, library: str) -> None:
        """An untimed read of the files a load reads, so that every load starts from a warm page cache."""
        if library == "openvino":
            for path in sorted(self.model.openvino_folder.glob("*/openvino_model.bin")):
                warm_page_cache(path)
        else:
            warm_page_cache(self.model.checkpoint)

    def worker_args(self, *args: str) -> list[str]:
        return [*args, "--size", self.model.name]

    def references(self) -> list[str]:
        """The engines latentforge is compared with (ratios: latentforge / each)."""
        return [name for name in self.names if name != OURS] if OURS in self.names else []


def start_workers(dtype: str, engines: Engines) -> tuple[dict[str, Worker], dict[str, Any]]:
    """One loaded speed worker per library, started one after the other (no two loads at once)."""
    workers: dict[str, Worker] = {}
    loads = {}
    try:
        for library in engines.names:
            engines.warm(library)
            log = ARTIFACTS / f"{library}-{dtype}.log"
            args = engines.worker_args("--speed-worker", library, "--dtype", dtype)
            workers[library] = Worker(MODULE, args, worker_env(THREADS), log, engines.interpreter(library))
            loads[library] = workers[library].receive()
            print(f"  {library} loaded in {loads[library]['load_s']:.1f} s", flush=True)
    except BaseException:
        for worker in workers.values():
            worker.proc.kill()
            worker.close()
        raise
    return workers, loads


def measure_speed(dtype: str, repeats: int, progress: Progress, engines: Engines) -> dict[str, Any]:
    """Warm-up (outputs saved), then `repeats` rounds, the libraries alternating call by call."""
    record = progress.data["speed"].setdefault(dtype, {"runs": [], "loads": [], "done": False})
    if record["done"]:
        return record
    print(f"{dtype}: starting the workers ...", flush=True)
    workers, loads = start_workers(dtype, engines)
    record["loads"].append(loads)
    try:
        for turn, op in enumerate(OPERATIONS):
            for library in abba(engines.names, turn):
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


def measure_whole(progress: Progress, engines: Engines) -> dict[str, Any]:
    """Each whole run of the chosen engines in a fresh process (those done in an earlier session skipped)."""
    results = progress.data["whole"]
    for index, run in enumerate(WHOLE_RUNS):
        if str(index) in results or run.library not in engines.names:
            continue
        engines.warm(run.library)
        args = engines.worker_args("--whole-worker", str(index))
        result = run_isolated(MODULE, args, worker_env(THREADS), timeout=3600, interpreter=engines.interpreter(run.library))
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


def compare_outputs(dtypes: Sequence[str], whole: dict[str, Any], engines: Engines) -> dict[str, Any]:
    """latentforge's outputs against each reference's (same dtype), and bfloat16 against float32 (same library)."""
    checks: dict[str, Any] = {}
    for dtype in dtypes:
        checks[dtype] = {
            ref: {
                op: difference(read_output(output_path(dtype, OURS, op)), read_output(output_path(dtype, ref, op)))
                for op in OPERATIONS
            }
            for ref in engines.references()
        }  # fmt: skip
    images = {(r.library, r.dtype, r.defaults): whole[str(i)]["saved"] for i, r in enumerate(WHOLE_RUNS) if str(i) in whole}

    def image_diff(a: tuple, b: tuple) -> dict[str, float] | None:
        if a not in images or b not in images:
            return None
        return difference(read_output(Path(images[a]).with_suffix("")), read_output(Path(images[b]).with_suffix("")))

    checks["images"] = {
        f"{OURS} vs {ref}, {d}": image_diff((OURS, d, False), (ref, d, False)) for ref in LIBRARIES[1:] for d in DTYPES
    } | {
        f"{library} bfloat16 vs float32": image_diff((library, "bfloat16", False), (library, "float32", False))
        for library in LIBRARIES
    }  # fmt: skip
    return checks


# --------------------------------------------------------------------------- reporting


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}" if b else "n/a"


def speed_table(runs: Sequence[dict[str, Any]]) -> str:
    """One row per operation: each engine's median and range, latentforge / each reference, the CPU use."""
    engines = [name for name in LIBRARIES if any(r["library"] == name for r in runs)]
    references = [name for name in engines if name != OURS] if OURS in engines else []
    headers = ["operation"]
    for name in engines:
        headers += [f"{name} s (median)", "min..max"]
    headers += [f"{OURS} / {ref}" for ref in references]
    headers += [f"CPU s per s ({' / '.join(engines)})"]
    rows = []
    for op in OPERATIONS:
        times, cpu = {}, {}
        for library in engines:
            mine = [r for r in runs if r["op"] == op and r["library"] == library]
            times[library] = spread([r["seconds"] for r in mine])
            cpu[library] = statistics.median(r["cpu_s"] / r["seconds"] for r in mine)
        row = [OPERATIONS[op]]
        for library in engines:
            t = times[library]
            row += [f"{t['median']:.3f}", f"{t['min']:.3f}..{t['max']:.3f}"]
        row += [f"**{ratio(times[OURS]['median'], times[ref]['median'])}**" for ref in references]
        row += [" / ".join(f"{cpu[library]:.2f}" for library in engines)]
        rows.append(row)
    return markdown_table(headers, rows)


def whole_table(whole: dict[str, Any]) -> str:
    """One row per whole run: txt2img time, its ratio to diffusers' float32 default, latentforge's (same dtype,
    same settings) time over a reference's, load and memory."""
    base = whole.get("0", {}).get("txt2img_s")
    ours = {run.dtype: whole[str(i)]["txt2img_s"] for i, run in enumerate(WHOLE_RUNS)
            if run.library == OURS and not run.defaults and str(i) in whole}  # fmt: skip
    headers = ["run", "txt2img s", "/ diffusers float32", f"{OURS} (same dtype) / this", "load s",
               "peak RSS GB (whole process)", "peak RSS during txt2img GB", "RSS after load GB (file-backed)"]  # fmt: skip
    rows = []
    for index, run in enumerate(WHOLE_RUNS):
        r = whole.get(str(index))
        if r is None:
            continue
        load = r["memory"]["after_load"]
        mine = ours.get(run.dtype) if run.library != OURS else None
        rows.append([
            run.label, f"{r['txt2img_s']:.1f}", f"**{ratio(r['txt2img_s'], base)}**" if base else "n/a",
            f"**{ratio(mine, r['txt2img_s'])}**" if mine else "", f"{r['load_s']:.1f}",
            f"{r['memory']['after_txt2img']['peak']:.2f}", f"{r['txt2img_peak_gb']:.2f}", f"{load['rss']:.2f} ({load['file']:.2f})",
        ])  # fmt: skip
    return markdown_table(headers, rows)


def check_lines(checks: dict[str, Any]) -> list[str]:
    lines = []
    for dtype in DTYPES:
        for ref, ops in checks.get(dtype, {}).items():
            parts = [f"{op} {c['max']:.2e} (outputs up to {c['scale']:.1f})" for op, c in ops.items()]
            lines.append(f"{dtype}, max |{OURS} - {ref}| on identical inputs: " + "; ".join(parts))
    for name, c in checks.get("images", {}).items():
        if c is not None:
            lines.append(f"whole txt2img images, {name}: max pixel difference {c['max']:.0f}/255, mean {c['mean']:.2f}")
    return lines


def openvino_notes(speed: dict[str, Any], whole: dict[str, Any]) -> list[str]:
    """What the OpenVINO rows ran, and at which precision OpenVINO compiled them."""
    precisions = {f"{dtype} rows: {loads['openvino']['precision']}" for dtype, s in speed.items()
                  for loads in s["loads"] if "openvino" in loads}  # fmt: skip
    precisions |= {f"whole run '{WHOLE_RUNS[int(i)].label}': {r['precision']}" for i, r in whole.items() if "precision" in r}
    if not precisions:
        return []
    return [
        "*openvino*: optimum-intel's `OVStableDiffusionPipeline` on an OpenVINO IR exported once from the same file "
        "(diffusers' `from_single_file` conversion saved as a diffusers folder; `OVStableDiffusionPipeline."
        "from_pretrained(folder, export=True, load_in_8bit=False)` exports its text encoder and VAE, float32 weights; "
        "the UNet is diffusers' module converted by `openvino.convert_model`, which optimum-intel's export calls too: "
        "optimum-intel's own export of this UNet was killed for memory at 23 GB here), loaded with `reshape(batch_size=1, "
        f"height={SIZE}, width={SIZE}, num_images_per_prompt=1)` (static shapes; the UNet takes the guided batch of 2) "
        f"and `compile()` (its *load s* includes reading the IR and compiling), `INFERENCE_NUM_THREADS={THREADS}`. "
        "Operations call the pipeline's OpenVINO models (`pipe.unet`, `pipe.vae_decoder`, `pipe.vae_encoder`, the "
        "text encoder through diffusers' `encode_prompt`) with the same inputs in float32, OpenVINO's input type (the "
        "bfloat16 inputs of the other engines, cast back). *float32*: `ov_config={\"INFERENCE_PRECISION_HINT\": \"f32\"}`; "
        "*bfloat16*: OpenVINO's default hint, which is bf16 on a CPU with AVX-512 BF16 or AMX (activations and "
        "weights in bf16 inside, float32 in and out). Compiled precision: " + "; ".join(sorted(precisions)) + ". It "
        "runs in a Python environment of its own (optimum-intel needs other transformers/diffusers versions than "
        "this repository's).",
    ]


def notes(speed: dict[str, Any], whole: dict[str, Any], repeats: int, sessions: int) -> list[str]:
    """How to read the tables, and what the numbers depend on."""
    runs = [r for s in speed.values() for r in s["runs"]] + list(whole.values())
    loadavg = [r["loadavg"] for r in runs]
    cores = [r["cpu_s"] / r.get("seconds", r.get("txt2img_s", 1)) for r in runs]
    lines = [
        f"Operations: each call timed after one untimed warm-up of the same call in the same process; {repeats} "
        "timed calls per library, the libraries alternating call by call (order reversed every other call); "
        f"seeded random inputs, identical in every process; t = {TIMESTEP}; under `torch.no_grad()`.",
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
        *openvino_notes(speed, whole),
    ]
    if sessions > 1:
        lines.append(f"This run was interrupted and resumed ({sessions} sessions, `--resume`); each session started "
                     "new workers and warmed every operation up again.")  # fmt: skip
    return lines


def render(info: dict[str, Any], command: str, speed: dict[str, Any], whole: dict[str, Any],
           checks: dict[str, Any], repeats: int, sessions: int, model: Model) -> str:  # fmt: skip
    """The whole docs section."""
    tables = "\n\n".join(f"### Operations, {dtype}\n\n{speed_table(s['runs'])}" for dtype, s in speed.items())
    whole_block = f"### Whole txt2img, one fresh process each\n\n{whole_table(whole)}" if whole else ""
    bullets = "\n".join(f"- {line}" for line in notes(speed, whole, repeats, sessions))
    checks_md = "\n".join(f"- {line}" for line in check_lines(checks))
    return f"""
## Speed and memory against diffusers and OpenVINO

`{command}`

{machine_markdown(info)}

SD 1.5 shapes with random weights: every engine loads the same single file
(`{model.checkpoint.relative_to(REPO)}`, {model.checkpoint.stat().st_size / 1e9:.2f} GB float32, CompVis key names, no
metadata) on the CPU: `latentforge.load(path, dtype=..., device="cpu")` against
`StableDiffusionPipeline.from_single_file(path, config=<local config-only folder>, local_files_only=True,
safety_checker=None, torch_dtype=...)` and OpenVINO's IR of it, each in processes of its own ({THREADS} threads,
`OMP_NUM_THREADS={THREADS}`). Times in seconds; a ratio (latentforge / a reference) below 1 means latentforge
is faster.

{tables}

{whole_block}

Equivalence of the outputs (at bfloat16 the engines round at different places):

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


def engine_list(text: str) -> list[str]:
    """Comma-separated engines, checked, in the tables' order (latentforge first)."""
    names = {name.strip() for name in text.split(",") if name.strip()}
    if not names or names - set(LIBRARIES):
        raise argparse.ArgumentTypeError(f"expected some of {', '.join(LIBRARIES)}, got {text!r}")
    return [name for name in LIBRARIES if name in names]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command line of the benchmark (and of its hidden worker modes)."""
    parser = argparse.ArgumentParser(prog=f"python -m {MODULE}", description=__doc__.splitlines()[0])
    parser.add_argument("--engines", type=engine_list, default=list(LIBRARIES),
                        help=f"which engines to run, comma-separated (default: {','.join(LIBRARIES)}); ratios are "
                        "latentforge / each other one")  # fmt: skip
    parser.add_argument("--dtypes", type=dtype_list, default=list(DTYPES), help="float32, bfloat16 or both (default: both)")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per operation and library (default 3)")
    parser.add_argument("--no-whole", action="store_true", help="skip the whole txt2img runs (time, load, memory)")
    parser.add_argument("--resume", action="store_true",
                        help=f"carry on from {PARTIAL.relative_to(REPO)} (an interrupted run with the same settings)")
    parser.add_argument("--no-doc", action="store_true", help="print the tables but leave docs/benchmarks.md alone")
    parser.add_argument("--size", choices=sorted(MODELS), default="sd15",
                        help="sd15: the SD 1.5-sized checkpoint (default); small: a tiny random model of the same "
                        "family, to check the harness quickly (never written to the docs)")  # fmt: skip
    parser.add_argument("--openvino-python", type=Path, default=OPENVINO_PYTHON,
                        help=f"Python of the environment with optimum-intel and OpenVINO (default: {OPENVINO_PYTHON}); "
                        "without it the openvino rows are skipped")  # fmt: skip
    parser.add_argument("--prepare", action="store_true",
                        help="only build what the runs need (checkpoint, config folder, OpenVINO IR), then stop")
    parser.add_argument("--speed-worker", choices=sorted(ADAPTERS), help=argparse.SUPPRESS)
    parser.add_argument("--whole-worker", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--dtype", choices=DTYPES, help=argparse.SUPPRESS)
    parser.add_argument("--save-diffusers-folder", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--export-openvino", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    return args


def openvino_versions(python: Path) -> dict[str, str] | None:
    """The versions in OpenVINO's environment, or None (with the reason printed) where it cannot run
    optimum-intel's pipeline."""
    if not python.exists():
        print(f"openvino: skipped (no Python at {python}; install it as docs/benchmarks.md says, or pass "
              "--openvino-python)", flush=True)  # fmt: skip
        return None
    names = ("openvino", "optimum-intel", "optimum", "diffusers", "transformers", "torch")
    script = ("import json, importlib.metadata as m; from optimum.intel import OVStableDiffusionPipeline; "
              f"print(json.dumps({{n: m.version(n) for n in {names!r}}}))")  # fmt: skip
    proc = subprocess.run([str(python), "-c", script], capture_output=True, text=True, env=worker_env(THREADS))
    if proc.returncode != 0:
        reason = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        print(f"openvino: skipped ({python} cannot import optimum-intel's pipeline: {reason})", flush=True)
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def prepare_openvino(engines: Engines) -> None:
    """The model's OpenVINO IR, exported once when missing: diffusers' conversion of the single file saved as a
    diffusers folder (in this environment), then optimum-intel's export of that (in OpenVINO's); the
    intermediate folder is removed afterwards."""
    model = engines.model
    if (model.openvino_folder / "model_index.json").exists():
        return
    args = engines.worker_args()
    if not (stand_in_folder(model) / "model_index.json").exists():
        print(f"openvino: converting {model.checkpoint.name} to a diffusers folder ...", flush=True)
        run_isolated(MODULE, ["--save-diffusers-folder", *args], worker_env(THREADS), timeout=3600)
    print(f"openvino: exporting to OpenVINO IR in {model.openvino_folder} ...", flush=True)
    result = run_isolated(MODULE, ["--export-openvino", *args], worker_env(THREADS), timeout=7200,
                          interpreter=engines.openvino_python)  # fmt: skip
    print(f"openvino: exported in {result['export_s']:.0f} s", flush=True)
    shutil.rmtree(model.diffusers_folder)
    shutil.rmtree(stand_in_folder(model))


def main(argv: Sequence[str] | None = None) -> None:
    """Run the benchmark (or, with a hidden worker flag, one worker)."""
    args = parse_args(argv)
    model = MODELS[args.size]
    if args.speed_worker:
        return speed_worker(args.speed_worker, args.dtype, model)
    if args.whole_worker is not None:
        return emit(whole_worker(args.whole_worker, model))
    if args.save_diffusers_folder:
        return emit(save_diffusers_folder(model))
    if args.export_openvino:
        return emit(export_openvino(model))
    names = list(args.engines)
    ov_versions = openvino_versions(args.openvino_python) if "openvino" in names else None
    if ov_versions is None and "openvino" in names:
        names.remove("openvino")
    if not names:
        raise SystemExit("no engine left to run")
    engines = Engines(tuple(names), model, args.openvino_python)
    if model.name == "small":
        prepare_small(model)
    else:
        prepare(accelerate=False)
    if "openvino" in names:
        prepare_openvino(engines)
    if args.prepare:
        return None
    info = machine_info()
    if ov_versions:
        info["versions"]["openvino"] = (f"{ov_versions['openvino']} (optimum-intel {ov_versions['optimum-intel']}, "
                                        f"diffusers {ov_versions['diffusers']}, transformers {ov_versions['transformers']}, "
                                        f"torch {ov_versions['torch']}: the openvino rows' own environment)")  # fmt: skip
    settings = {"dtypes": args.dtypes, "repeats": args.repeats, "whole": not args.no_whole, "engines": names, "size": model.name}
    progress = Progress(settings, args.resume)
    speed = {dtype: measure_speed(dtype, args.repeats, progress, engines) for dtype in args.dtypes}
    whole = {} if args.no_whole else measure_whole(progress, engines)
    checks = compare_outputs(args.dtypes, whole, engines)
    given = [a for a in (argv if argv is not None else sys.argv[1:]) if a != "--resume"]
    command = f"python -m {MODULE}" + (" " + " ".join(given)).rstrip()
    sessions = progress.data["sessions"]
    markdown = render(info, command, speed, whole, checks, args.repeats, sessions, model)
    data = {"machine": info, "command": command, "speed": speed, "whole": whole, "equivalence": checks}
    publish(OUT, data, markdown, SECTION, not args.no_doc and model.name == "sd15")
    return None


if __name__ == "__main__":
    main()
