"""LoRA switching benchmark: merging a rank-32 kohya LoRA into an SD 1.5-sized model, switching to another
and back to the model's own weights, latentforge against diffusers' load_lora_weights + fuse_lora.

    python -m benchmarks.lora [--repeats 3] [--dtypes bfloat16,float32] [--no-doc]

Both libraries load the cached random-weight SD 1.5-sized file of benchmarks.load (built when missing) and
two random rank-32 kohya LoRAs over kohya's default layers (the UNet's attention, projection and feed-forward
layers, the text encoder's attention and MLP layers; written once to benchmarks/.cache/). In one process,
the two libraries take turns; each timed operation is the median of --repeats after one warm-up:

- apply: the model's own weights -> LoRA A merged (latentforge: `use_loras`, the file read and placed the
  first time only, as a server keeps them; diffusers: `load_lora_weights` + `fuse_lora`, which reads the
  file each time);
- switch: A -> B;
- restore: back to the model's own weights (diffusers: `unfuse_lora` + `unload_lora_weights`).
Writes the 'lora' section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from benchmarks.common import (
    CACHE,
    REPO,
    THREADS,
    limit_threads,
    machine_info,
    machine_markdown,
    markdown_table,
    publish,
    timed,
)

RANK = 32
LORAS = {"A": CACHE / "sd15-lora-a.safetensors", "B": CACHE / "sd15-lora-b.safetensors"}
OUT = REPO / "benchmarks" / "out" / "lora.json"
SECTION = "lora"
UNET_LAYERS = ("attn1.", "attn2.", "proj_in", "proj_out", "ff.net")  # kohya's default UNet targets


def write_loras(pipe: Any) -> None:
    """Two random rank-32 kohya LoRAs for the SD 1.5 architecture (diffusers-style names, alpha 16)."""
    import torch

    from latentforge.adapters.names import kohya_name, patchable_modules
    from latentforge.weightfiles import write_safetensors

    for seed, path in enumerate(LORAS.values()):
        if path.exists():
            continue
        g = torch.Generator().manual_seed(seed)
        sd = {}
        for part in ("text_encoder", "unet"):
            for name, module in patchable_modules(pipe.models()[part]).items():
                wanted = UNET_LAYERS if part == "unet" else ("encoder.layers.",)
                if not any(w in name for w in wanted):
                    continue
                out, inp = module.weight.shape[:2]
                key = kohya_name(part, name, pipe.config.unet)
                extra = [1, 1] if module.weight.dim() == 4 else []
                sd[f"{key}.lora_down.weight"] = (torch.randn(RANK, inp, *extra, generator=g) * 0.01).half()
                sd[f"{key}.lora_up.weight"] = (torch.randn(out, RANK, *extra, generator=g) * 0.01).half()
                sd[f"{key}.alpha"] = torch.tensor(16.0).half()
        write_safetensors(sd, path, metadata={"ss_network_dim": str(RANK), "ss_network_alpha": "16"})
        print(f"wrote {path} ({len(sd) // 3} modules)", flush=True)


def latentforge_ops(path: Path, dtype: str) -> tuple[dict[str, Callable[[], Any]], float]:
    import latentforge

    pipe = latentforge.load(path, dtype=dtype, device="cpu")
    write_loras(pipe)
    _, first = timed(lambda: pipe.use_loras({LORAS["A"]: 1.0}))  # reads and places A, then merges
    pipe.use_loras({LORAS["B"]: 1.0})  # B read and placed too
    pipe.use_loras({})

    def apply() -> None:
        pipe.use_loras({})
        return timed(lambda: pipe.use_loras({LORAS["A"]: 1.0}))[1]

    def switch() -> None:
        pipe.use_loras({LORAS["A"]: 1.0})
        return timed(lambda: pipe.use_loras({LORAS["B"]: 1.0}))[1]

    def restore() -> None:
        pipe.use_loras({LORAS["A"]: 1.0})
        return timed(lambda: pipe.use_loras({}))[1]

    return {"apply": apply, "switch": switch, "restore": restore}, first


def diffusers_ops(dtype: str) -> tuple[dict[str, Callable[[], Any]], float]:
    import torch
    from diffusers import StableDiffusionPipeline

    from benchmarks.load import CONFIG_FOLDER, FILES

    pipe = StableDiffusionPipeline.from_single_file(
        str(FILES["fp32"]), config=str(CONFIG_FOLDER), local_files_only=True, safety_checker=None,
        torch_dtype=getattr(torch, dtype),
    )  # fmt: skip

    def load(name: str) -> None:
        pipe.load_lora_weights(str(LORAS[name]), adapter_name=name)
        pipe.fuse_lora(adapter_names=[name])

    def unload() -> None:
        pipe.unfuse_lora()
        pipe.unload_lora_weights()

    _, first = timed(lambda: load("A"))
    unload()

    def apply() -> float:
        return timed(lambda: load("A"))[1] + (unload() or 0)

    def switch() -> float:
        load("A")
        return timed(lambda: (unload(), load("B")))[1] + (unload() or 0)

    def restore() -> float:
        load("A")
        return timed(unload)[1]

    return {"apply": apply, "switch": switch, "restore": restore}, first


def measure(dtype: str, repeats: int) -> dict[str, Any]:
    """Each operation of both libraries, taking turns; seconds (medians) and the first apply."""
    from benchmarks.load import CONFIG_FOLDER, FILES, WITH_METADATA, build_checkpoints, write_config_folder

    build_checkpoints()
    write_config_folder(CONFIG_FOLDER)
    ours, ours_first = latentforge_ops(WITH_METADATA if WITH_METADATA.exists() else FILES["fp32"], dtype)
    theirs, theirs_first = diffusers_ops(dtype)
    result: dict[str, Any] = {"first apply": {"latentforge": ours_first, "diffusers": theirs_first}}
    for op in ours:
        ours[op](), theirs[op]()  # warm-up
        times: dict[str, list[float]] = {"latentforge": [], "diffusers": []}
        for turn in range(repeats):
            order = [("latentforge", ours), ("diffusers", theirs)]
            for library, ops in order if turn % 2 == 0 else reversed(order):
                times[library].append(ops[op]())
        result[op] = {library: statistics.median(values) for library, values in times.items()}
        print(f"{dtype} {op}: {result[op]}", flush=True)
    return result


def render(info: dict[str, Any], command: str, runs: dict[str, dict[str, Any]], repeats: int) -> str:
    rows = []
    for dtype, result in runs.items():
        for op, times in result.items():
            ours, theirs = times["latentforge"], times["diffusers"]
            rows.append([dtype, op, f"{ours:.2f} s", f"{theirs:.2f} s", f"{ours / theirs:.2f}x"])
    table = markdown_table(["dtype", "operation", "latentforge", "diffusers", "ratio"], rows, "llrrr")
    return f"""## LoRA: apply, switch, restore

`{command}` ({repeats} timed repeats after a warm-up, the libraries taking turns in one process, {THREADS}
threads). A random rank-32 kohya LoRA (fp16 file) over kohya's default layers of an SD 1.5-sized model:
{{unet attention, projections, feed-forward; text encoder attention, MLP}}. latentforge merges it into the
weights and keeps the originals of the weights it changes (restoring is a copy back, bit for bit); a file is
read and placed once and kept while unchanged ("first apply" includes that). diffusers:
`load_lora_weights` + `fuse_lora` (it reads the file every time), `unfuse_lora` + `unload_lora_weights`.
Neither has a per-step cost once fused / merged.

{table}

{machine_markdown(info)}
"""


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dtypes", default="bfloat16,float32")
    p.add_argument("--no-doc", action="store_true", help="print the section without writing docs/benchmarks.md")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    limit_threads()
    runs = {dtype: measure(dtype, args.repeats) for dtype in args.dtypes.split(",")}
    command = "python -m benchmarks.lora " + " ".join(argv if argv is not None else sys.argv[1:])
    info = machine_info()
    publish(OUT, {"machine": info, "runs": runs}, render(info, command.strip(), runs, args.repeats), SECTION, not args.no_doc)


if __name__ == "__main__":
    main()
