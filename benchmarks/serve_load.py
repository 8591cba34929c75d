"""Load benchmark of `latentforge serve`: N concurrent webuiapi clients, a fixed number of txt2img requests.

    python -m benchmarks.serve_load [--model PATH] [--clients 1 2 4 8] [--requests 32] [--steps N] [--no-doc]

Starts `latentforge serve` in its own process (--threads, default 2) on a free loopback port. Each request
is a txt2img of its own seed with the model's defaults (sampler, steps, guidance, native size) unless
--steps is given. The 1-client run comes first and its images are the references: at every other
concurrency each response must be the same image, pixel for pixel, for its seed. Reports throughput
and p50 / p95 latency per concurrency, and the library's own time per image (Pipeline.generate in
this process, before the server starts) for the HTTP + queue overhead. Writes its section of
docs/server.md and the raw numbers to benchmarks/out/serve_load.json.

Without --model it uses the model shipped in the package; while none ships, a random-weight model of
the shipped model's architecture (the training recipes' defaults), built once into benchmarks/.cache:
timings do not depend on the weights, and the report says which model was used.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import (
    CACHE,
    REPO,
    THREADS,
    limit_threads,
    machine_info,
    machine_markdown,
    markdown_table,
    replace_section,
    worker_env,
)

DOC = REPO / "docs" / "server.md"
OUT = REPO / "benchmarks" / "out" / "serve_load.json"
PROXY = CACHE / "shipped-architecture-random.safetensors"
SECTION = "serve-load"
PROMPTS = ("a red circle", "a blue square above a green triangle", "two yellow circles on black", "a small triangle")
FIRST_SEED = 1000


def build_proxy(path: Path) -> None:
    """A random-weight model with the shipped model's architecture and sampling defaults (what `train all`
    followed by `train export` would make, untrained)."""
    import torch

    from latentforge.checkpoints import write_single_file
    from latentforge.config import ModelConfig, SamplingDefaults
    from latentforge.text_encoder import TextEncoder
    from latentforge.training.configs import CLIPTrainConfig, UNetTrainConfig, VAETrainConfig
    from latentforge.training.unet import fit_to_parts
    from latentforge.unet import UNet
    from latentforge.vae import AutoencoderKL

    torch.manual_seed(0)
    vae, text = AutoencoderKL(VAETrainConfig().model), TextEncoder(CLIPTrainConfig().text)
    recipe = fit_to_parts(UNetTrainConfig(), vae, text)
    unet = UNet(recipe.model)
    with torch.no_grad():  # off the initial values (fresh LayerNorms give text vectors of mean exactly 0)
        for module in (vae, text, unet):
            for weight in module.parameters():
                weight.add_(torch.randn_like(weight) * 0.03)
    defaults = SamplingDefaults(recipe.sample_sampler, recipe.sample_steps, recipe.sample_cfg_scale)
    config = ModelConfig(unet=recipe.model, vae=vae.config, text_encoder=text.config, defaults=defaults)
    parts = {"unet": unet.state_dict(), "vae": vae.state_dict(), "text_encoder": text.state_dict()}
    path.parent.mkdir(parents=True, exist_ok=True)
    write_single_file(config, parts, path)


def resolve_model(given: str | None) -> tuple[Path, str]:
    """The model to serve and how to describe it."""
    from latentforge.pipeline import DEFAULT_MODEL

    if given:
        return Path(given), Path(given).name
    if DEFAULT_MODEL.is_file():
        return DEFAULT_MODEL, f"the shipped model ({DEFAULT_MODEL.name})"
    if not PROXY.is_file():
        build_proxy(PROXY)
    return PROXY, "a random-weight model of the shipped model's architecture (no trained model ships yet)"


def request(k: int, steps: int | None) -> dict[str, Any]:
    """The k-th request: its own seed and a prompt; everything else the model's defaults."""
    return {"prompt": PROMPTS[k % len(PROMPTS)], "seed": FIRST_SEED + k, **({"steps": steps} if steps else {})}


def pixels_digest(image) -> str:
    return hashlib.sha256(np.asarray(image.convert("RGB")).tobytes()).hexdigest()


def library_seconds(model: Path, count: int, steps: int | None, threads: int) -> float:
    """Median seconds of one Pipeline.generate of these requests, in this process (no HTTP, no queue)."""
    import latentforge

    limit_threads(threads)
    pipe = latentforge.load(model)
    pipe.generate(**request(0, steps))  # warm-up
    times = []
    for k in range(count):
        start = time.perf_counter()
        pipe.generate(**request(k, steps))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


class Server:
    """`latentforge serve --model PATH --port 0` in its own process; `url` once it listens."""

    def __init__(self, model: Path, threads: int) -> None:
        command = [sys.executable, "-m", "latentforge.cli", "serve", "--model", str(model), "--port", "0"]
        self.proc = subprocess.Popen(command, cwd=REPO, env=worker_env(threads), text=True,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip
        self.log: list[str] = []
        for line in self.proc.stdout:
            self.log.append(line)
            found = re.search(r"running on (http://127\.0\.0\.1:\d+)", line)
            if found:
                self.url = found.group(1)
                break
        else:
            raise RuntimeError("the server did not start:\n" + "".join(self.log))
        threading.Thread(target=lambda: self.log.extend(self.proc.stdout), daemon=True).start()

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=60)


def run_load(url: str, clients: int, count: int, steps: int | None) -> dict[str, Any]:
    """`count` requests over `clients` threads, each its own webuiapi client; per-request latency and digest."""
    import webuiapi

    port = int(url.rsplit(":", 1)[1])
    latencies: dict[int, float] = {}
    digests: dict[int, str] = {}
    errors: list[str] = []
    used: list[str] = []  # the settings each image was made with, as the server reports them
    next_request = iter(range(count))
    lock = threading.Lock()

    def client() -> None:
        api = webuiapi.WebUIApi(port=port, sampler=None, steps=None)  # None: leave them to the model
        while True:
            with lock:
                k = next(next_request, None)
            if k is None:
                return
            payload = request(k, steps)
            start = time.perf_counter()
            try:
                result = api.txt2img(**payload, width=None, height=None, cfg_scale=None)
            except Exception as e:  # noqa: BLE001 -- reported, and the run counts as failed
                errors.append(f"request {k}: {e}")
                continue
            latencies[k] = time.perf_counter() - start
            digests[k] = pixels_digest(result.image)
            info = result.info
            used.append(f"{info['sampler_name']}, {info['steps']} steps, guidance {info['cfg_scale']:g}, "
                        f"{info['width']}x{info['height']}")  # fmt: skip

    start = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start
    ordered = sorted(latencies.values())
    return {
        "clients": clients,
        "requests": count,
        "wall_s": wall,
        "throughput": len(latencies) / wall,
        "p50_s": float(np.percentile(ordered, 50)) if ordered else float("nan"),
        "p95_s": float(np.percentile(ordered, 95)) if ordered else float("nan"),
        "errors": errors,
        "digests": digests,
        "settings": sorted(set(used)),
    }


def report(results: list[dict[str, Any]], described: str, library_s: float, args, info: dict) -> str:
    """The docs section: how it was run, on what, the table, and what the numbers mean."""
    steps = f"{args.steps} steps" if args.steps else "the model's default steps"
    command = f"python -m benchmarks.serve_load --clients {' '.join(map(str, args.clients))} --requests {args.requests}"
    command += f" --steps {args.steps}" if args.steps else ""
    command += f" --threads {args.threads}" if args.threads != THREADS else ""
    rows = [
        [r["clients"], r["requests"], f"{r['wall_s']:.1f}", f"{r['throughput']:.2f}", f"{r['p50_s']:.2f}",
         f"{r['p95_s']:.2f}", r["matches"]]
        for r in results
    ]  # fmt: skip
    headers = ["clients", "requests", "wall s", "images / s", "p50 latency s", "p95 latency s", "same image as alone"]
    return f"""## Load

`{command}`

{machine_markdown(info)}

Model: {described}. Each request is a txt2img of its own seed ({steps}, the model's sampler,
guidance and native size: {"; ".join(results[0]["settings"])}) sent by webuiapi; each client sends its
next request as soon as the last one returns. The server runs in its own process, torch threads: {args.threads}; the clients share the
same cores. The 1-client run's images are the references: *same image as alone* counts the
responses that are, pixel for pixel, the image of their seed.

{markdown_table(headers, rows)}

Load average of the machine (1 min) before and after the runs: {args.load[0]:.1f}, {args.load[1]:.1f}
(other work sharing the cores makes every figure slower and noisier).

Pipeline.generate alone, in one process with the same threads, before the server started:
{library_s:.3f} s per image (median), {1 / library_s:.2f} images / s. One job runs at a time, so the
latency grows with the queue (about clients x the time per image) while the throughput stays that of
one generation after another.
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="checkpoint file or diffusers folder (default: the shipped model)")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--steps", type=int, help="sampler steps (default: the model's)")
    parser.add_argument(
        "--threads", type=int, default=THREADS, help=f"torch threads of the server (default: {THREADS})"
    )
    parser.add_argument("--no-doc", action="store_true", help="do not write docs/server.md")
    args = parser.parse_args()
    if args.clients[0] != 1:
        args.clients = [1, *args.clients]  # the references
    model, described = resolve_model(args.model)
    load_before = os.getloadavg()[0]
    library_s = library_seconds(model, min(args.requests, 8), args.steps, args.threads)
    server = Server(model, args.threads)
    try:
        run_load(server.url, 1, 2, args.steps)  # warm-up
        results = []
        for clients in args.clients:
            result = run_load(server.url, clients, args.requests, args.steps)
            reference = results[0]["digests"] if results else result["digests"]
            result["matches"] = f"{sum(result['digests'].get(k) == d for k, d in reference.items())} / {args.requests}"
            results.append(result)
            print(json.dumps({k: v for k, v in result.items() if k != "digests"}), flush=True)
    finally:
        server.stop()
    args.load = (load_before, os.getloadavg()[0])
    info = machine_info()
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(
        json.dumps({"machine": info, "model": described, "library_s": library_s, "results": results}, indent=1)
    )
    body = report(results, described, library_s, args, info)
    print(body)
    if any(r["errors"] for r in results) or any(not r["matches"].startswith(f"{args.requests} ") for r in results):
        sys.exit("some requests failed or did not match their seed's image: see above")
    if not args.no_doc:
        replace_section(DOC, SECTION, body, title="# The server")


if __name__ == "__main__":
    main()
