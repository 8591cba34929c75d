"""SDXL speed and memory of latentforge against diffusers, random weights at full SDXL base size, CPU.

    python -m benchmarks.sdxl [--sizes 512,1024] [--dtypes bfloat16,float32] [--repeats 3] [--steps 4]
                              [--no-whole] [--resume] [--no-doc]

Builds once (benchmarks/.cache/, git-ignored) a random SDXL base in diffusers' published shapes, saved by
diffusers' save_pretrained as a float16 folder, and latentforge's float16 single file of it in the original
key names (`latentforge convert`); both libraries load that one single file. Operations: a guided UNet step
(batch 2) per latent size, and the VAE decode at 1024 x 1024, each library in a long-lived worker of its
own, alternating call by call (see benchmarks.vs_diffusers). Whole 1024 x 1024 generations, each in a fresh
process with its peak RSS. Writes the 'sdxl' section of docs/benchmarks.md; results are saved after every
call, and --resume carries on after an interruption.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from benchmarks.common import (
    CACHE,
    GB,
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
from benchmarks.vs_diffusers import (
    Progress,
    difference,
    dtype_list,
    ratio,
    read_output,
    save_output,
)

if TYPE_CHECKING:
    import torch
    from PIL import Image

MODULE = "benchmarks.sdxl"
FOLDER = CACHE / "sdxl-random-fp16"  # diffusers' save_pretrained of the random pipeline, float16
CHECKPOINT = CACHE / "sdxl-random-fp16.safetensors"  # latentforge convert of FOLDER: original key names, float16
SEED = 0


# --------------------------------------------------------------------------- the random SDXL base


def sdxl_components() -> dict[str, Any]:
    """The models of a StableDiffusionXLPipeline in SDXL base's published shapes, randomly initialised in
    float32 (each seeded on its own) and cast to float16 one at a time, to keep the peak near one model."""
    import diffusers
    import torch
    import transformers

    builders: dict[str, Callable[[], Any]] = {
        "unet": lambda: diffusers.UNet2DConditionModel(
            sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
            block_out_channels=(320, 640, 1280),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=[1, 2, 10], attention_head_dim=[5, 10, 20], use_linear_projection=True,
            cross_attention_dim=2048, addition_embed_type="text_time", addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816, norm_num_groups=32,
        ),
        "vae": lambda: diffusers.AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=1024,
            block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4, scaling_factor=0.13025, force_upcast=True,
        ),
        "text_encoder": lambda: transformers.CLIPTextModel(transformers.CLIPTextConfig(
            hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
            projection_dim=768, hidden_act="quick_gelu", max_position_embeddings=77, vocab_size=49408,
        )),
        "text_encoder_2": lambda: transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(
            hidden_size=1280, intermediate_size=5120, num_attention_heads=20, num_hidden_layers=32,
            projection_dim=1280, hidden_act="gelu", max_position_embeddings=77, vocab_size=49408, pad_token_id=0,
        )),
    }  # fmt: skip
    models = {}
    for offset, (name, build) in enumerate(builders.items()):
        torch.manual_seed(SEED + offset)
        models[name] = build().to(torch.float16).eval()
        print(f"  built {name}: {sum(p.numel() for p in models[name].parameters()) / 1e9:.2f} G parameters", flush=True)
    return models


def build_model(folder: Path = FOLDER, checkpoint: Path = CHECKPOINT) -> None:
    """Write the random SDXL folder (diffusers) and its single file (latentforge convert) when missing."""
    if not folder.exists():
        import diffusers
        import transformers

        from latentforge.tokenizer import Tokenizer

        print(f"building a random SDXL base (seed {SEED}) in {folder} ...", flush=True)
        vocab = CACHE / "sdxl-vocab"
        Tokenizer().save_pretrained(vocab / "1")
        Tokenizer(pad_token="!").save_pretrained(vocab / "2")  # SDXL's second tokenizer pads with "!"
        scheduler = diffusers.EulerDiscreteScheduler(
            beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
            timestep_spacing="leading",
        )  # fmt: skip
        scheduler.register_to_config(clip_sample=False, set_alpha_to_one=False, skip_prk_steps=True)
        pipe = diffusers.StableDiffusionXLPipeline(
            **sdxl_components(), scheduler=scheduler,
            tokenizer=transformers.CLIPTokenizer.from_pretrained(vocab / "1"),
            tokenizer_2=transformers.CLIPTokenizer.from_pretrained(vocab / "2"),
            force_zeros_for_empty_prompt=True,
        )  # fmt: skip
        tmp = folder.with_name(folder.name + ".tmp")
        pipe.save_pretrained(tmp)
        del pipe
        os.replace(tmp, folder)
    if not checkpoint.exists():
        print(f"converting to {checkpoint} ...", flush=True)
        tmp = checkpoint.with_name(checkpoint.stem + ".tmp.safetensors")
        tmp.unlink(missing_ok=True)
        convert = [sys.executable, "-m", "latentforge.cli", "convert", str(folder), str(tmp), "--dtype", "float16"]
        subprocess.run(convert, cwd=REPO, check=True)
        os.replace(tmp, checkpoint)


OUT = REPO / "benchmarks" / "out" / "sdxl.json"  # raw results (git-ignored)
PARTIAL = REPO / "benchmarks" / "out" / "sdxl.partial.json"  # results so far, for --resume
ARTIFACTS = REPO / "benchmarks" / "out" / "sdxl"  # worker logs and the outputs compared
SECTION = "sdxl"
DTYPES = ("bfloat16", "float32")
SIZES = (512, 1024)
LIBRARIES = ("latentforge", "diffusers")

PROMPT = "a photo of an astronaut riding a horse on mars"
NEGATIVE = "blurry, low quality"
STEPS = 4
CFG_SCALE = 7.0  # latentforge's default for SDXL; diffusers is given the same
SIZE = 1024  # whole generations and the VAE decode
TIMESTEP = 500
DECODE = "decode"
EXTRAPOLATE_STEPS = 30  # the whole runs' time at this many steps: measured + the extra steps at the operations' step
MARGIN_GB = 3.0  # activations and interpreter, on top of the weights, when deciding whether two workers fit


def unet_op(size: int) -> str:
    return f"unet{size}"


def op_order(op: str) -> int:
    """UNet steps by size, then the decode."""
    return 10**9 if op == DECODE else int(op.removeprefix("unet"))


def op_label(op: str) -> str:
    """What the tables call an operation."""
    if op == DECODE:
        return f"VAE decode 1x4x{SIZE // 8}x{SIZE // 8} -> {SIZE}x{SIZE}"
    size = int(op.removeprefix("unet"))
    return f"UNet step, batch 2 (guidance), {size // 8}x{size // 8} latents ({size}x{size})"


@dataclass(frozen=True)
class WholeRun:
    """One whole txt2img in a fresh process."""

    label: str
    library: str
    dtype: str  # "auto": latentforge's own choice


WHOLE_RUNS = (
    WholeRun("latentforge defaults (dtype auto = bfloat16, Euler a, CFG 7)", "latentforge", "auto"),
    WholeRun("diffusers bfloat16 (Euler a, CFG 7)", "diffusers", "bfloat16"),
    WholeRun("diffusers float32, its default dtype (Euler a, CFG 7)", "diffusers", "float32"),
)


# --------------------------------------------------------------------------- what differs between the libraries


@dataclass(frozen=True)
class Adapter:
    """How one library loads the checkpoint and runs each measured operation (everything else is shared)."""

    load: Callable[[str], Any]  # dtype -> pipeline (whole runs)
    models: Callable[[str, bool, bool], tuple[Any, Any]]  # (dtype, UNet?, VAE?) -> (UNet | None, VAE | None)
    unet: Callable[[Any, dict[str, torch.Tensor]], torch.Tensor]  # (UNet, inputs) -> noise, (2, 4, h, w)
    vae_decode: Callable[[Any, torch.Tensor], torch.Tensor]  # (VAE, latents) -> image in [-1, 1]
    txt2img: Callable[[Any, int], Image.Image]  # (pipeline, steps) -> image


def latentforge_adapter() -> Adapter:
    import latentforge

    def models(dtype: str, unet: bool, vae: bool) -> tuple[Any, Any]:
        pipe = latentforge.load(CHECKPOINT, dtype=dtype, device="cpu")  # the text encoders go with `pipe`
        return (pipe.unet if unet else None), (pipe.vae if vae else None)

    return Adapter(
        load=lambda dtype: latentforge.load(CHECKPOINT, dtype=dtype, device="cpu"),
        models=models,
        unet=lambda unet, i: unet(i["x"], i["t"], i["context"], i["vector"]),
        vae_decode=lambda vae, z: vae.decode(z),
        txt2img=lambda pipe, steps: pipe.generate(PROMPT, NEGATIVE, steps=steps, seed=SEED, width=SIZE, height=SIZE)[0],
    )


def diffusers_adapter() -> Adapter:
    import torch
    from diffusers import (
        AutoencoderKL,
        EulerAncestralDiscreteScheduler,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )

    def load(dtype: str) -> Any:
        pipe = StableDiffusionXLPipeline.from_single_file(
            str(CHECKPOINT), config=str(FOLDER), local_files_only=True, torch_dtype=getattr(torch, dtype),
        )  # fmt: skip
        pipe.scheduler = EulerAncestralDiscreteScheduler.from_config(pipe.scheduler.config)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def models(dtype: str, unet: bool, vae: bool) -> tuple[Any, Any]:
        # from the folder the single file was converted from (the same weights): from_single_file would hold
        # the whole file's tensors beside the whole pipeline while it loads
        kwargs = {"local_files_only": True, "torch_dtype": getattr(torch, dtype)}
        return (
            UNet2DConditionModel.from_pretrained(FOLDER, subfolder="unet", **kwargs).eval() if unet else None,
            AutoencoderKL.from_pretrained(FOLDER, subfolder="vae", **kwargs).eval() if vae else None,
        )

    def unet(model: Any, i: dict[str, torch.Tensor]) -> torch.Tensor:
        added = {"text_embeds": i["pooled"], "time_ids": i["time_ids"]}
        return model(i["x"], i["t"], encoder_hidden_states=i["context"], added_cond_kwargs=added).sample

    def txt2img(pipe: Any, steps: int) -> Image.Image:
        return pipe(
            PROMPT, negative_prompt=NEGATIVE, height=SIZE, width=SIZE, num_inference_steps=steps,
            guidance_scale=CFG_SCALE, generator=torch.Generator().manual_seed(SEED),
        ).images[0]  # fmt: skip

    return Adapter(
        load=load,
        models=models,
        unet=unet,
        vae_decode=lambda vae, z: vae.decode(z).sample,
        txt2img=txt2img,
    )


ADAPTERS: dict[str, Callable[[], Adapter]] = {"latentforge": latentforge_adapter, "diffusers": diffusers_adapter}


# --------------------------------------------------------------------------- inside a worker process


def make_inputs(dtype: str, size: int) -> dict[str, torch.Tensor]:
    """The same seeded random inputs in every worker (drawn in float32, then cast). The added vector is given
    raw to diffusers (pooled text, size numbers) and embedded to latentforge (pooled text + the numbers'
    sinusoidal embeddings), which is what each UNet takes."""
    import torch

    from latentforge.conditioning import size_embedding
    from latentforge.unet import SDXL_SIZE_EMBED_DIM

    g = torch.Generator().manual_seed(SEED)
    cast = getattr(torch, dtype)
    latent = size // 8
    pooled = torch.randn(2, 1280, generator=g)
    numbers = [[size, size, 0, 0, size, size]] * 2  # original size, crop top-left, target size
    return {
        "x": torch.randn(2, 4, latent, latent, generator=g).to(cast),
        "context": torch.randn(2, 77, 2048, generator=g).to(cast),
        "pooled": pooled.to(cast),
        "time_ids": torch.tensor(numbers, dtype=torch.float32).to(cast),
        "vector": torch.cat([pooled, size_embedding(numbers, SDXL_SIZE_EMBED_DIM)], dim=-1).to(cast),
        "t": torch.tensor(TIMESTEP),
    }


def speed_worker(library: str, dtype: str, ops: Sequence[str]) -> None:
    """Load, keep only the models `ops` need, say so, then answer {"op": name, "save": path | None} until
    stdin closes."""
    import torch

    limit_threads(THREADS)
    adapter = ADAPTERS[library]()
    (unet, vae), load_s = timed(lambda: adapter.models(dtype, any(op != DECODE for op in ops), DECODE in ops))
    calls: dict[str, Callable[[], Any]] = {}
    for op in ops:
        if op == DECODE:
            z = torch.randn(1, 4, SIZE // 8, SIZE // 8, generator=torch.Generator().manual_seed(SEED)).to(getattr(torch, dtype))
            calls[op] = lambda z=z: adapter.vae_decode(vae, z)
        else:
            inputs = make_inputs(dtype, int(op.removeprefix("unet")))
            calls[op] = lambda inputs=inputs: adapter.unet(unet, inputs)
    # one untimed call at 64 x 64 pixels pays the process-wide one-time costs (first oneDNN use, lazy imports)
    # before any timed call, also where the first call of an operation is the one timed (--float32-repeats 0)
    tiny = make_inputs(dtype, 64)
    with torch.no_grad():
        _, prime_s = timed(lambda: [
            adapter.unet(unet, tiny) if unet is not None else None,
            adapter.vae_decode(vae, tiny["x"][:1]) if vae is not None else None,
        ])  # fmt: skip
    emit({"ready": True, "load_s": load_s, "prime_s": prime_s, "memory": memory_now()})
    serve_calls(calls, save_output)


def whole_worker(index: int, steps: int) -> dict[str, Any]:
    """In a fresh process: load, then one whole txt2img; times, the memory after each phase and the peaks."""
    run = WHOLE_RUNS[index]
    limit_threads(THREADS)
    adapter = ADAPTERS[run.library]()
    image, result = load_then_generate(lambda: adapter.load(run.dtype), lambda pipe: adapter.txt2img(pipe, steps))
    return {**result, "saved": save_output(image, ARTIFACTS / "whole" / f"{index}")}


# --------------------------------------------------------------------------- the parent


def output_path(dtype: str, library: str, op: str) -> Path:
    return ARTIFACTS / dtype / f"{library}-{op}"


def weights_gb(dtype: str, ops: Sequence[str]) -> float:
    """What one speed worker keeps: the UNet and / or the VAE, at `dtype`."""
    import json

    import torch

    header = CHECKPOINT.open("rb").read(8)
    meta = json.loads(CHECKPOINT.open("rb").read(8 + int.from_bytes(header, "little"))[8:])
    prefixes = (("model.diffusion_model.",) if any(op != DECODE for op in ops) else ()) + (
        ("first_stage_model.",) if DECODE in ops else ()
    )
    count = 0
    for key, info in meta.items():
        if key != "__metadata__" and key.startswith(prefixes):
            n = 1
            for d in info["shape"]:
                n *= d
            count += n
    return count * getattr(torch, dtype).itemsize / GB


def paired(dtype: str, ops: Sequence[str]) -> bool:
    """Whether both libraries' workers fit in memory at once (else they run one after the other)."""
    import psutil

    return 2 * (weights_gb(dtype, ops) + MARGIN_GB) < psutil.virtual_memory().available / GB


def start_worker(library: str, dtype: str, ops: Sequence[str]) -> tuple[Worker, dict[str, Any]]:
    warm_page_cache(CHECKPOINT)
    log = ARTIFACTS / f"{library}-{dtype}.log"
    args = ["--speed-worker", library, "--dtype", dtype, "--ops", ",".join(ops)]
    worker = Worker(MODULE, args, worker_env(THREADS), log)
    try:
        ready = worker.receive()
    except BaseException:
        worker.proc.kill()
        worker.close()
        raise
    print(f"  {library} loaded in {ready['load_s']:.1f} s, RSS {ready['memory']['rss']:.2f} GB", flush=True)
    return worker, ready


def run_calls(workers: dict[str, Worker], record: dict[str, Any], ops: Sequence[str], repeats: int,
              progress: Progress, dtype: str) -> None:  # fmt: skip
    """Warm-up (outputs saved) then `repeats` rounds over the libraries in `workers`, alternating call by call."""
    names = [name for name in LIBRARIES if name in workers]
    done = {(r["repeat"], r["op"], r["library"]) for r in record["runs"]}
    record.setdefault("warmups", {})
    for turn, op in enumerate(ops):
        for library in abba(names, turn):
            if repeats == 0 and (0, op, library) in done:
                continue
            result = workers[library].ask({"op": op, "save": str(output_path(dtype, library, op))})
            record["warmups"][f"{library}/{op}"] = result
            if repeats == 0:  # the first call is the one timed
                record["runs"].append({**result, "library": library, "op": op, "repeat": 0, "first": True})
            progress.save()
            print(f"  warm-up {op:<8} {library:<12} {result['seconds']:7.2f} s", flush=True)

    def keep(result: dict[str, Any]) -> None:
        record["runs"].append(result)
        progress.save()
        print(f"  {result['repeat'] + 1}/{repeats} {result['op']:<8} {result['library']:<12} "
              f"{result['seconds']:7.2f} s", flush=True)  # fmt: skip

    ask_in_turn({name: workers[name] for name in names}, ops, repeats, done, keep)


def measure_speed(dtype: str, ops: Sequence[str], repeats: int, progress: Progress) -> dict[str, Any]:
    """Both workers at once, alternating call by call, when they fit in memory; else one library's worker
    after the other's (each: warm-up, then `repeats` calls per operation)."""
    record = progress.data["speed"].setdefault(dtype, {"runs": [], "loads": [], "done": False})
    if record["done"]:
        return record
    record["paired"] = paired(dtype, ops)
    print(f"{dtype}: {'both workers at once' if record['paired'] else 'one worker at a time'} ...", flush=True)
    groups = [list(LIBRARIES)] if record["paired"] else [[library] for library in LIBRARIES]
    for group in groups:
        if all((r, op, lib) in {(x["repeat"], x["op"], x["library"]) for x in record["runs"]}
               for r in range(max(repeats, 1)) for op in ops for lib in group):  # fmt: skip
            continue
        workers: dict[str, Worker] = {}
        try:
            for library in group:
                workers[library], ready = start_worker(library, dtype, ops)
                record["loads"].append({"library": library, **ready})
            run_calls(workers, record, ops, repeats, progress, dtype)
        finally:
            for worker in workers.values():
                worker.close()
            progress.save()
    record["done"] = True
    progress.save()
    return record


def measure_whole(steps: int, progress: Progress) -> dict[str, Any]:
    """Each whole run in a fresh process (those done in an earlier session skipped)."""
    results = progress.data["whole"]
    for index, run in enumerate(WHOLE_RUNS):
        if str(index) in results:
            continue
        warm_page_cache(CHECKPOINT)
        args = ["--whole-worker", str(index), "--steps", str(steps)]
        try:
            result = run_isolated(MODULE, args, worker_env(THREADS), timeout=3600)
        except RuntimeError as error:  # e.g. killed for memory: say so in the table, go on
            print(f"  {run.label}: {error}", flush=True)
            results[str(index)] = {"failed": str(error)[-2000:]}
            progress.save()
            continue
        results[str(index)] = result
        progress.save()
        print(f"  {run.label:<58} {result['txt2img_s']:7.1f} s, peak RSS "
              f"{result['memory']['after_txt2img']['peak']:.2f} GB", flush=True)  # fmt: skip
    return results


# --------------------------------------------------------------------------- comparing outputs


def compare_outputs(speed: dict[str, Any], whole: dict[str, Any]) -> dict[str, Any]:
    """latentforge's outputs against diffusers' (same dtype, identical inputs), and the two whole bfloat16 images."""
    checks: dict[str, Any] = {}
    for dtype, record in speed.items():
        ops = sorted({r["op"] for r in record["runs"]}, key=op_order)
        checks[dtype] = {}
        for op in ops:
            paths = [output_path(dtype, library, op) for library in LIBRARIES]
            if all(p.with_suffix(".pt").exists() for p in paths):
                checks[dtype][op] = difference(read_output(paths[0]), read_output(paths[1]))
    saved = {WHOLE_RUNS[int(i)].library + "/" + WHOLE_RUNS[int(i)].dtype: r["saved"] for i, r in whole.items() if "saved" in r}
    images = {}
    for name, a, b in (("latentforge auto (bfloat16) vs diffusers bfloat16", "latentforge/auto", "diffusers/bfloat16"),
                       ("latentforge auto (bfloat16) vs diffusers float32", "latentforge/auto", "diffusers/float32")):  # fmt: skip
        if a in saved and b in saved:
            images[name] = difference(read_output(Path(saved[a]).with_suffix("")), read_output(Path(saved[b]).with_suffix("")))
    checks["images"] = images
    return checks


# --------------------------------------------------------------------------- reporting


def speed_table(record: dict[str, Any], ops: Sequence[str]) -> str:
    """One row per operation: both libraries' medians and ranges, their ratio, the CPU use, the peak memory."""
    headers = ["operation", "calls", "latentforge s (median)", "min..max", "diffusers s (median)", "min..max",
               "latentforge / diffusers", "CPU s per s (lf / diffusers)", "peak RSS in the call GB (lf / diffusers)"]  # fmt: skip
    rows = []
    runs = record["runs"]
    for op in ops:
        cells = []
        for library in LIBRARIES:
            mine = [r for r in runs if r["op"] == op and r["library"] == library]
            if not mine:
                break
            cells.append((
                spread([r["seconds"] for r in mine]), statistics.median(r["cpu_s"] / r["seconds"] for r in mine),
                max(r["peak_gb"] for r in mine), len(mine),
            ))  # fmt: skip
        if len(cells) < 2:
            continue
        (lf, lf_cpu, lf_peak, n), (df, df_cpu, df_peak, _) = cells
        rows.append([
            op_label(op), n, f"{lf['median']:.2f}", f"{lf['min']:.2f}..{lf['max']:.2f}", f"{df['median']:.2f}",
            f"{df['min']:.2f}..{df['max']:.2f}", f"**{ratio(lf['median'], df['median'])}**",
            f"{lf_cpu:.2f} / {df_cpu:.2f}", f"{lf_peak:.2f} / {df_peak:.2f}",
        ])  # fmt: skip
    return markdown_table(headers, rows)


def step_seconds(speed: dict[str, Any], library: str, dtype: str) -> float | None:
    """Median guided UNet step at SIZE from the operations, or None where it was not measured."""
    dtype = "bfloat16" if dtype == "auto" else dtype
    runs = [r["seconds"] for r in speed.get(dtype, {}).get("runs", []) if r["op"] == unet_op(SIZE) and r["library"] == library]
    return statistics.median(runs) if runs else None


def whole_table(whole: dict[str, Any], steps: int, speed: dict[str, Any]) -> str:
    """One row per whole run: txt2img time, the same extrapolated to EXTRAPOLATE_STEPS steps, load, memory."""
    headers = ["run", f"txt2img s ({steps} steps)", "/ diffusers float32",
               f"{EXTRAPOLATE_STEPS} steps s (extrapolated)", "load s", "peak RSS GB (whole process)",
               "peak RSS during txt2img GB", "RSS after load GB (file-backed)"]  # fmt: skip
    base = whole.get("2", {}).get("txt2img_s")
    rows = []
    for index, run in enumerate(WHOLE_RUNS):
        r = whole.get(str(index))
        if r is None:
            continue
        if "failed" in r:
            rows.append([run.label, "failed: " + r["failed"].strip().splitlines()[-1][:80], "", "", "", "", "", ""])
            continue
        load = r["memory"]["after_load"]
        step = step_seconds(speed, run.library, run.dtype)
        longer = "n/a" if step is None else f"{r['txt2img_s'] + (EXTRAPOLATE_STEPS - steps) * step:.0f}"
        rows.append([
            run.label, f"{r['txt2img_s']:.1f}", f"**{ratio(r['txt2img_s'], base)}**" if base else "n/a", longer,
            f"{r['load_s']:.1f}", f"{r['memory']['after_txt2img']['peak']:.2f}", f"{r['txt2img_peak_gb']:.2f}",
            f"{load['rss']:.2f} ({load['file']:.2f})",
        ])  # fmt: skip
    return markdown_table(headers, rows)


def check_lines(checks: dict[str, Any]) -> list[str]:
    lines = []
    for dtype in DTYPES:
        if checks.get(dtype):
            parts = [f"{op_label(op)}: {c['max']:.2e} (outputs up to {c['scale']:.1f}, mean |difference| {c['mean']:.1e})"
                     for op, c in checks[dtype].items()]  # fmt: skip
            lines.append(f"{dtype}, max |latentforge - diffusers| on identical inputs: " + "; ".join(parts))
    for name, c in checks.get("images", {}).items():
        lines.append(f"whole {SIZE}x{SIZE} images, {name}: max pixel difference {c['max']:.0f}/255, mean {c['mean']:.2f}")
    return lines


def calls_note(repeats: int) -> str:
    if repeats == 0:
        return ("one timed call per operation and library, the first of its shape in the worker (no warm-up of "
                "the same call: it includes the per-shape set-up, small beside these calls: compare the bfloat16 "
                "warm-ups)")
    calls = "one timed call" if repeats == 1 else f"{repeats} timed calls"
    return f"{calls} per operation and library, each after one untimed warm-up of the same call"


def notes(speed: dict[str, Any], whole: dict[str, Any], repeats: dict[str, int], steps: int, sessions: int) -> list[str]:
    """How to read the tables, and what the numbers depend on."""
    calls = [r for s in speed.values() for r in s["runs"]]
    done = [r for r in whole.values() if "txt2img_s" in r]
    loadavg = [r["loadavg"] for r in calls + done]
    cores = [r["cpu_s"] / r["seconds"] for r in calls] + [r["cpu_s"] / r["txt2img_s"] for r in done]
    how = {dtype: ("both workers loaded at once, alternating call by call (order reversed every other call)"
                   if s.get("paired") else "one library's worker after the other's: two of them do not fit in "
                   "memory at once") for dtype, s in speed.items()}  # fmt: skip
    operations = (
        "Operations: each library in a long-lived worker of its own that holds only the UNet and the VAE "
        "(latentforge: `latentforge.load(<the single file>)`, its text encoders dropped; diffusers: "
        "`UNet2DConditionModel` / `AutoencoderKL.from_pretrained(<the folder>, subfolder=..., torch_dtype=...)`, "
        "the weights the single file was converted from: `from_single_file` holds the whole file's tensors beside "
        "the whole pipeline while it loads (see the whole runs' peaks), too much for two workers at once); seeded "
        f"random inputs (text vectors too), identical in both; under `torch.no_grad()`; t = {TIMESTEP}. Each worker "
        "makes one untimed call at 64x64 pixels after loading (process-wide one-time costs). "
        + " ".join(f"{dtype}: {calls_note(repeats[dtype])}, {how[dtype]}." for dtype in speed)
    )
    inputs = (
        "*UNet step*: latentforge's `pipe.unet(x, t, context, vector)` with the added vector already embedded "
        "(pooled text + the six size numbers' 256-wide sinusoidal embeddings, 2816) against diffusers' "
        "`unet(x, t, encoder_hidden_states=context, added_cond_kwargs={text_embeds, time_ids})`, which embeds the "
        "numbers itself (microseconds). *VAE decode*: the VAE modules alone, no scaling or PIL conversion. "
        "*peak RSS in the call*: VmHWM reset right before the call, the worker's weights included."
    )
    whole_runs = (
        f"Whole runs: a fresh process imports, loads and runs one {SIZE}x{SIZE} txt2img with {steps} steps (few, "
        "to fit the time: a step is one guided UNet call, so the operations above give the cost of more steps; "
        "the rest is the prompt encoding and the VAE decode, once per image; the extrapolated column adds "
        f"{EXTRAPOLATE_STEPS} - {steps} steps at the median guided {SIZE}x{SIZE} step of the same library and dtype "
        "from the operations). latentforge: "
        f"`generate(prompt, negative, steps={steps}, seed={SEED}, width={SIZE}, height={SIZE})`, everything else "
        "its defaults (dtype auto = bfloat16 on this CPU, Euler a, CFG 7). diffusers: "
        "`StableDiffusionXLPipeline.from_single_file(<the same file>, config=<the folder>, local_files_only=True, "
        f"torch_dtype=...)` with `EulerAncestralDiscreteScheduler` and `guidance_scale={CFG_SCALE:g}` so that "
        "both do the same work (its own defaults, Euler and 5.0, cost the same per step); float32 is the dtype it "
        "loads in by default. Each process's first call pays one-time costs (oneDNN kernel set-up); latentforge's "
        "model hash for the infotext (a SHA-256 of the file) is remembered across processes and was already known. "
        "*peak RSS (whole process)* is `ru_maxrss`: import, load and txt2img; *during txt2img* is VmHWM reset right "
        "before the call; *file-backed* is `RssFile`, weights mapped from the safetensors file."
    )
    machine = (
        f"*CPU s per s*: user + system CPU time over wall time; {THREADS}.0 is both threads busy. Other people's "
        "test runs share this 2-core machine now and then, so the times are noisy: the 1-minute load average at "
        f"the end of the calls was {min(loadavg):.1f}..{max(loadavg):.1f} (our own {THREADS} threads count for "
        f"about {THREADS}; above about {THREADS + 0.5} something else ran); CPU seconds per second "
        f"{min(cores):.2f}..{max(cores):.2f}, median {statistics.median(cores):.2f}."
    )
    lines = [operations, inputs, whole_runs, machine]
    if sessions > 1:
        lines.append(f"This run was interrupted and resumed ({sessions} sessions, `--resume`); each session started "
                     "new workers and warmed every operation up again.")  # fmt: skip
    return lines


def targets(speed: dict[str, Any], whole: dict[str, Any]) -> list[str]:
    """The issue's targets against the measured numbers."""
    lines = []
    for dtype, record in speed.items():
        for op in sorted({r["op"] for r in record["runs"]} - {DECODE}, key=op_order):
            med = [statistics.median(r["seconds"] for r in record["runs"] if r["op"] == op and r["library"] == lib)
                   for lib in LIBRARIES if any(r["op"] == op and r["library"] == lib for r in record["runs"])]  # fmt: skip
            if len(med) == 2:
                verdict = "met" if med[0] / med[1] <= 0.8 else "not met"
                lines.append(f"guided step {op_label(op).split(', ')[-1]}, {dtype}: {med[0] / med[1]:.2f}x diffusers' "
                             f"(target <= 0.80x): {verdict}")  # fmt: skip
    ours = whole.get("0", {}).get("memory", {}).get("after_txt2img", {}).get("peak")
    if ours is not None:
        theirs = {WHOLE_RUNS[int(i)].dtype: r["memory"]["after_txt2img"]["peak"] for i, r in whole.items() if "memory" in r}
        parts = [f"{ours:.2f} GB (target <= 10 GB: {'met' if ours <= 10 else 'not met'})"]
        for dtype in ("bfloat16", "float32"):
            if dtype in theirs:
                parts.append(f"diffusers {dtype} {theirs[dtype]:.2f} GB ({'met' if ours <= theirs[dtype] else 'not met'})")
        lines.append("whole-generation peak RSS, latentforge bfloat16 with the weights: " + "; ".join(parts))
    return lines


def render(info: dict[str, Any], command: str, speed: dict[str, Any], whole: dict[str, Any], checks: dict[str, Any],
           repeats: dict[str, int], steps: int, sessions: int) -> str:  # fmt: skip
    """The whole docs section."""
    tables = "\n\n".join(
        f"### Operations, {dtype}\n\n{speed_table(s, s['ops'])}" for dtype, s in speed.items() if s["runs"]
    )
    whole_block = f"### Whole {SIZE}x{SIZE} txt2img, one fresh process each\n\n{whole_table(whole, steps, speed)}" if whole else ""
    bullets = "\n".join(f"- {line}" for line in notes(speed, whole, repeats, steps, sessions))
    checks_md = "\n".join(f"- {line}" for line in check_lines(checks))
    targets_md = "\n".join(f"- {line}" for line in targets(speed, whole))
    return f"""
## SDXL against diffusers

`{command}`

{machine_markdown(info)}

SDXL base shapes (diffusers' published configs: UNet 2.57 G parameters, CLIP ViT-L and OpenCLIP bigG, SDXL's
VAE) with random weights, built by diffusers and transformers and saved with `save_pretrained` in float16;
`latentforge convert` made the single file both libraries load (`{CHECKPOINT.relative_to(REPO)}`,
{CHECKPOINT.stat().st_size / 1e9:.2f} GB float16, original key names, no metadata), on the CPU, each library in
processes of its own ({THREADS} torch threads, `OMP_NUM_THREADS={THREADS}`). Times in seconds; a ratio below 1
means latentforge is faster.

{tables}

{whole_block}

Against the issue's targets:

{targets_md}

Equivalence of the outputs (at bfloat16 the libraries round at different places):

{checks_md}

{bullets}
"""


# --------------------------------------------------------------------------- command line


def size_list(text: str) -> list[int]:
    """Comma-separated latent sizes in pixels, checked."""
    try:
        sizes = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        sizes = []
    if not sizes or any(size <= 0 or size % 64 for size in sizes):
        raise argparse.ArgumentTypeError(f"expected pixel sizes that are multiples of 64, like 512,1024; got {text!r}")
    return sizes


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command line of the benchmark (and of its hidden worker modes)."""
    parser = argparse.ArgumentParser(prog=f"python -m {MODULE}", description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=size_list, default=list(SIZES), help="UNet step image sizes (default 512,1024)")
    parser.add_argument("--dtypes", type=dtype_list, default=list(DTYPES), help="bfloat16, float32 or both (default: both)")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per operation and library (default 3)")
    parser.add_argument("--float32-repeats", type=int,
                        help="timed calls in float32 (default: --repeats; 0: time the first call, no warm-up)")
    parser.add_argument("--float32-decode", action="store_true", help="also time the VAE decode in float32")
    parser.add_argument("--steps", type=int, default=STEPS, help=f"steps of the whole generations (default {STEPS})")
    parser.add_argument("--no-whole", action="store_true", help="skip the whole txt2img runs (time, load, memory)")
    parser.add_argument("--whole-first", action="store_true", help="the whole runs before the operations")
    parser.add_argument("--resume", action="store_true",
                        help=f"carry on from {PARTIAL.relative_to(REPO)} (an interrupted run with the same settings)")
    parser.add_argument("--no-doc", action="store_true", help="print the tables but leave docs/benchmarks.md alone")
    parser.add_argument("--report", action="store_true",
                        help=f"measure nothing: publish what {PARTIAL.relative_to(REPO)} holds (a cut-off run)")
    parser.add_argument("--build-only", action="store_true", help="build the cached random SDXL files and stop")
    parser.add_argument("--speed-worker", choices=sorted(ADAPTERS), help=argparse.SUPPRESS)
    parser.add_argument("--whole-worker", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--dtype", choices=DTYPES, help=argparse.SUPPRESS)
    parser.add_argument("--ops", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.repeats < 1 or (args.float32_repeats is not None and args.float32_repeats < 0) or args.steps < 1:
        parser.error("--repeats and --steps must be at least 1, --float32-repeats at least 0")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    """Run the benchmark (or, with a hidden worker flag, one worker)."""
    args = parse_args(argv)
    if args.speed_worker:
        return speed_worker(args.speed_worker, args.dtype, args.ops.split(","))
    if args.whole_worker is not None:
        return emit(whole_worker(args.whole_worker, args.steps))
    build_model()
    if args.build_only:
        return None
    info = machine_info()
    repeats = {dtype: args.repeats if dtype == "bfloat16" or args.float32_repeats is None else args.float32_repeats
               for dtype in args.dtypes}  # fmt: skip
    ops = {dtype: [*map(unet_op, args.sizes), *([DECODE] if dtype == "bfloat16" or args.float32_decode else [])]
           for dtype in args.dtypes}  # fmt: skip
    settings = {"dtypes": args.dtypes, "sizes": args.sizes, "repeats": repeats, "steps": args.steps,
                "whole": not args.no_whole, "float32_decode": args.float32_decode}  # fmt: skip
    progress = Progress(settings, args.resume or args.report, path=PARTIAL)
    if args.report:
        progress.data["sessions"] -= 1
    info = progress.data.setdefault("machine", info)  # the first session's: when the measuring began
    speed: dict[str, Any] = {}
    whole: dict[str, Any] = progress.data["whole"]
    if args.whole_first and not args.no_whole and not args.report:
        whole = measure_whole(args.steps, progress)
    for dtype in args.dtypes:
        if args.report:
            speed[dtype] = progress.data["speed"].get(dtype, {"runs": []})
        else:
            speed[dtype] = measure_speed(dtype, ops[dtype], repeats[dtype], progress)
        speed[dtype]["ops"] = ops[dtype]
    if not args.whole_first and not args.no_whole and not args.report:
        whole = measure_whole(args.steps, progress)
    checks = compare_outputs(speed, whole)
    given = [a for a in (argv if argv is not None else sys.argv[1:]) if a not in ("--resume", "--report")]
    command = f"python -m {MODULE}" + (" " + " ".join(given)).rstrip()
    markdown = render(info, command, speed, whole, checks, repeats, args.steps, progress.data["sessions"])
    data = {"machine": info, "command": command, "speed": speed, "whole": whole, "equivalence": checks}
    publish(OUT, data, markdown, SECTION, not args.no_doc)
    return None


if __name__ == "__main__":
    main()
