"""The FastAPI app: the A1111 routes, the web page, and the ways to run it."""

from __future__ import annotations

import asyncio
import dataclasses
import resource
import socket
import threading
import time
from collections.abc import Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from .. import __version__, images, infotext, pngfiles
from ..adapters.embeddings import Embedding
from ..adapters.library import Library, lora_listing
from ..pipeline import Pipeline, load, resolve_device
from ..samplers import SPECS
from ..request import MAX_SEED
from ..seeds import rng_source
from ..styles import read_styles
from ..upscalers import LATENT_UPSCALE_MODES, Upscalers
from .a1111 import (
    ExtrasBatchImages,
    ExtrasSingleImage,
    FieldError,
    SPEED_DEFAULTS,
    Img2Img,
    Txt2Img,
    answer,
    decode_base64,
    error_loc,
    find_model,
    html_info,
    make_job,
    read_upload,
    run_extras,
    set_speed,
    vae_option,
)  # fmt: skip
from .guard import Guard, is_loopback
from .jobs import Job, ModelError, Models, QueueFull, Worker, png_base64

DISCONNECT_POLL_S = 0.25  # how often a waiting request checks that its client is still there


@dataclass
class Settings:
    """What `latentforge serve` is started with."""

    models: list[str | None] = field(default_factory=lambda: [None])  # files / diffusers folders; None = shipped
    host: str = "127.0.0.1"
    port: int = 7860
    api_auth: str | None = None  # "USER:PASS": HTTP Basic auth on every route
    cors_allow_origins: list[str] = field(default_factory=list)  # origins allowed cross-origin requests
    max_body_bytes: int = 32 * 1024 * 1024
    max_image_pixels: int = images.DEFAULT_MAX_PIXELS  # per decoded request image, checked from its header
    max_queue: int = 64  # jobs waiting behind the running one; more are refused with 503
    keep_loaded: int = 2  # models kept in memory; the least recently used is dropped
    dtype: str = "auto"
    device: str = "auto"
    vae_tiling: bool = False  # Pipeline.vae_tiling for every model: large images decoded in tiles
    lora_dirs: list[str] = field(default_factory=list)  # folders of LoRA files, named by <lora:NAME:W> in prompts
    embedding_dirs: list[str] = field(default_factory=list)  # folders of textual-inversion embeddings
    vae_dirs: list[str] = field(default_factory=list)  # folders of VAE files, chosen by the sd_vae option
    upscaler_dirs: list[str] = field(default_factory=list)  # folders of ESRGAN / Real-ESRGAN upscaler files
    styles_file: str | None = None  # A1111's styles.csv: the prompt styles requests may name
    # A1111's VAE-approx folder: taesd_decoder.* (SD 1.x/2.x) and taesdxl_decoder.* (SDXL), the tiny decoders
    # that draw the live previews and the final image when sd_vae_decode_method is TAESD
    tiny_decoder_dir: str | None = None
    explain_clip: str | None = None  # a `latentforge train clip` run folder: /explain's images-against-captions figure


def configured_models(settings: Settings, library: Library | None = None, upscalers: Upscalers | None = None) -> Models:
    """The models named by the settings, loaded with their dtype, device, VAE tiling, the add-on folders and
    the upscalers (one of each, shared by all) when first used."""
    library = library or settings_library(settings)
    upscalers = upscalers or settings_upscalers(settings)

    def loader(path: Path) -> Pipeline:
        pipe = load(path, dtype=settings.dtype, device=settings.device)
        pipe.vae_tiling = settings.vae_tiling
        pipe.library = library
        pipe.upscalers = upscalers
        if settings.tiny_decoder_dir:
            found = tiny_decoder_in(Path(settings.tiny_decoder_dir), pipe.config)
            if found is not None:
                pipe.load_tiny_decoder(found)
        return pipe

    return Models(settings.models, settings.keep_loaded, loader)


TINY_DECODER_SUFFIXES = (".safetensors", ".pth")


def tiny_decoder_in(folder: Path, config) -> Path | None:
    """The tiny decoder of this model's family in A1111's VAE-approx folder: taesdxl_decoder for SDXL (and its
    refiner), taesd_decoder for SD 1.x/2.x; None when the folder has none."""
    stem = "taesdxl_decoder" if config.version.startswith("sdxl") else "taesd_decoder"
    return next((folder / f"{stem}{suffix}" for suffix in TINY_DECODER_SUFFIXES if (folder / f"{stem}{suffix}").is_file()), None)


def settings_library(settings: Settings) -> Library:
    return Library.from_dirs(settings.lora_dirs, settings.embedding_dirs, settings.vae_dirs)


def settings_upscalers(settings: Settings) -> Upscalers:
    return Upscalers.from_dirs(settings.upscaler_dirs, device=resolve_device(settings.device))


def memory_report() -> dict[str, Any]:
    """A1111's /memory: the machine's RAM (bytes, from /proc/meminfo) and this process's, and CUDA's."""
    ram: dict[str, Any] = {}
    try:
        fields = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines() if ":" in line)
        total = int(fields["MemTotal"].split()[0]) * 1024
        free = int(fields["MemAvailable"].split()[0]) * 1024
        ram = {"free": free, "used": total - free, "total": total}
    except (OSError, KeyError, ValueError):
        ram = {"error": "no /proc/meminfo on this system"}
    ram["process_peak"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if not torch.cuda.is_available():
        return {"ram": ram, "cuda": {"error": "no CUDA device"}}
    free, total = torch.cuda.mem_get_info()
    stats = torch.cuda.memory_stats()
    cuda = {
        "system": {"free": free, "used": total - free, "total": total},
        "active": {"current": stats.get("active_bytes.all.current", 0), "peak": stats.get("active_bytes.all.peak", 0)},
        "allocated": {"current": torch.cuda.memory_allocated(), "peak": torch.cuda.max_memory_allocated()},
        "reserved": {"current": torch.cuda.memory_reserved(), "peak": torch.cuda.max_memory_reserved()},
        "events": {"retries": stats.get("num_alloc_retries", 0), "oom": stats.get("num_ooms", 0)},
    }
    return {"ram": ram, "cuda": cuda}


STATIC = {
    "/": ("index.html", "text/html"),
    "/app.js": ("app.js", "text/javascript"),
    "/style.css": ("style.css", "text/css"),
}
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
}
# latentforge explain's page is self-contained: its images are data URIs, its style inline
EXPLAIN_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; img-src data:; style-src 'unsafe-inline'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
}


def create_app(settings: Settings, models: Models | None = None) -> FastAPI:
    """The ASGI app: the API under /sdapi/v1 and the web page at /. Its worker runs while the app does."""
    library, upscalers = settings_library(settings), settings_upscalers(settings)
    styles = read_styles(settings.styles_file) if settings.styles_file else {}
    if settings.explain_clip is not None:  # a folder that is not a CLIP run is said at start, not per page
        from ..explain.clip import read_clip

        read_clip(settings.explain_clip)
    models = models or configured_models(settings, library, upscalers)
    for pipe in models.loaded.values():  # models loaded before the app (serve loads the first) share them too
        pipe.library, pipe.upscalers = library, upscalers
    models.library = library
    worker = Worker(models, settings.max_queue)
    options: dict[str, Any] = {"CLIP_stop_at_last_layers": 1, "sd_vae": "Automatic", "eta_noise_seed_delta": 0,
                               "randn_source": "CPU", **SPEED_DEFAULTS}  # fmt: skip

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        worker.start()
        yield
        worker.stop()

    app = FastAPI(title="latentforge", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None)
    app.add_middleware(
        Guard, host=settings.host, origins=settings.cors_allow_origins, api_auth=settings.api_auth,
        max_body=settings.max_body_bytes,
    )  # fmt: skip
    if settings.cors_allow_origins:
        app.add_middleware(
            CORSMiddleware, allow_origins=settings.cors_allow_origins, allow_credentials=True,
            allow_methods=["*"], allow_headers=["*"],
        )  # fmt: skip

    @app.exception_handler(ValueError)
    async def unprocessable(request: Request, error: ValueError) -> JSONResponse:
        detail = [{"type": "value_error", "loc": error_loc(error), "msg": str(error)}]
        return JSONResponse({"detail": detail}, status_code=422)

    @app.exception_handler(ModelError)
    async def model_error(request: Request, error: ModelError) -> JSONResponse:
        return JSONResponse({"detail": str(error)}, status_code=500)

    @app.exception_handler(QueueFull)
    async def queue_full(request: Request, error: QueueFull) -> JSONResponse:
        return JSONResponse({"detail": str(error)}, status_code=503)

    async def generate(request: Request, req: Txt2Img) -> Any:
        clip_skip = options["CLIP_stop_at_last_layers"]
        job, seeds, subseeds = await run_in_threadpool(
            make_job, req, models, clip_skip, settings.max_image_pixels, options["sd_vae"], styles, upscalers,
            {key: options[key] for key in SPEED_DEFAULTS}, options["eta_noise_seed_delta"], options["randn_source"],
        )
        waiting = asyncio.wrap_future(worker.submit(job))
        while not waiting.done():
            await asyncio.wait({waiting}, timeout=DISCONNECT_POLL_S)
            if not waiting.done() and await request.is_disconnected():
                worker.cancel(job)
                return Response(status_code=499)
        return await run_in_threadpool(answer, req, waiting.result(), seeds, subseeds, clip_skip)

    @app.post("/sdapi/v1/txt2img")
    async def txt2img(req: Txt2Img, request: Request) -> Any:
        return await generate(request, req)

    @app.post("/sdapi/v1/img2img")
    async def img2img(req: Img2Img, request: Request) -> Any:
        return await generate(request, req)

    @app.get("/sdapi/v1/progress")
    def progress(skip_current_image: bool = False) -> dict[str, Any]:
        return worker.progress(with_image=not skip_current_image)

    @app.post("/sdapi/v1/interrupt")
    def interrupt() -> dict:
        worker.interrupt()
        return {}

    @app.post("/sdapi/v1/skip")
    def skip() -> dict:
        worker.skip()
        return {}

    @app.get("/sdapi/v1/prompt-styles")
    def prompt_styles() -> list[dict[str, str]]:
        return [{"name": s.name, "prompt": s.prompt, "negative_prompt": s.negative_prompt} for s in styles.values()]

    @app.get("/sdapi/v1/face-restorers")
    def face_restorers() -> list:
        return []  # latentforge has none

    @app.post("/sdapi/v1/refresh-checkpoints")
    def refresh_checkpoints() -> None:
        """The models are the ones `serve --model` names (no folder is scanned), so there is nothing to find."""

    @app.get("/sdapi/v1/memory")
    def memory() -> dict[str, Any]:
        return memory_report()

    @app.get("/sdapi/v1/cmd-flags")
    def cmd_flags() -> dict[str, Any]:
        """How the server was started (serve's flags), without the credentials."""
        flags = dataclasses.asdict(settings)
        flags["api_auth"] = settings.api_auth is not None
        return flags

    @app.get("/sdapi/v1/samplers")
    def samplers() -> list[dict[str, Any]]:
        return [
            {"name": s.a1111_name, "aliases": [s.name], "options": {"scheduler": s.schedule.lower()}} for s in SPECS
        ]

    @app.get("/sdapi/v1/schedulers")
    def schedulers() -> list[dict[str, Any]]:
        names = dict.fromkeys(s.schedule for s in SPECS)
        return [
            {"name": n.lower(), "label": n, "aliases": None, "default_rho": -1, "need_inner_model": False}
            for n in names
        ]

    @app.get("/sdapi/v1/sd-models")
    def sd_models() -> list[dict[str, Any]]:
        return [
            {
                "title": e.title,
                "model_name": e.name,
                "hash": e.hash,
                "sha256": None,
                "filename": e.title,
                "config": None,
            }
            for e in models.entries.values()
        ]

    @app.get("/sdapi/v1/loras")
    def loras() -> list[dict[str, Any]]:
        return lora_listing(library.loras)

    @app.post("/sdapi/v1/refresh-loras")
    def refresh_loras() -> None:
        library.loras.refresh()

    @app.get("/sdapi/v1/embeddings")
    def embeddings() -> dict[str, dict[str, Any]]:
        """A1111's listing for the current model: those it can use ("loaded") and the others ("skipped")."""
        usable, skipped = models.get(models.current).embeddings()
        return {
            "loaded": {name: embedding_entry(e) for name, e in usable.items()},
            "skipped": {name: {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None, "shape": None,
                               "vectors": None, "reason": why} for name, why in skipped.items()},
        }  # fmt: skip

    @app.post("/sdapi/v1/refresh-embeddings")
    def refresh_embeddings() -> None:
        library.embeddings.refresh()

    @app.get("/sdapi/v1/sd-vae")
    def sd_vae() -> list[dict[str, Any]]:
        return [{"model_name": path.name, "filename": str(path)} for path in library.vaes.files().values()]

    @app.post("/sdapi/v1/refresh-vae")
    def refresh_vae() -> None:
        library.vaes.refresh()

    @app.get("/sdapi/v1/upscalers")
    def upscaler_list() -> list[dict[str, Any]]:
        return upscalers.listing()

    @app.post("/sdapi/v1/refresh-upscalers")
    def refresh_upscalers() -> None:
        upscalers.folder.refresh()

    @app.get("/sdapi/v1/latent-upscale-modes")
    def latent_upscale_modes() -> list[dict[str, str]]:
        return [{"name": name} for name in LATENT_UPSCALE_MODES]

    @app.post("/sdapi/v1/extra-single-image")
    def extra_single_image(req: ExtrasSingleImage) -> dict[str, str]:
        """Upscaling only (no face restorers); one upscale runs at a time, beside any generation."""
        done, text = run_extras(req, {"image": req.image}, upscalers, settings.max_image_pixels)
        return {"html_info": html_info(text), "image": png_base64(done[0])}

    @app.post("/sdapi/v1/extra-batch-images")
    def extra_batch_images(req: ExtrasBatchImages) -> dict[str, Any]:
        texts = {f"imageList.{i}.data": item.data for i, item in enumerate(req.imageList)}
        done, text = run_extras(req, texts, upscalers, settings.max_image_pixels)
        return {"html_info": html_info(text), "images": [png_base64(image) for image in done]}

    @app.get("/sdapi/v1/options")
    def get_options() -> dict[str, Any]:
        entry = models.entries[models.current]
        return {
            "sd_model_checkpoint": entry.title,
            "sd_checkpoint_hash": entry.hash,
            "samples_format": "png",
            **options,
        }

    @app.post("/sdapi/v1/options")
    def set_options(changes: dict[str, Any]) -> None:
        """sd_model_checkpoint, CLIP_stop_at_last_layers, sd_vae, eta_noise_seed_delta, randn_source and the speed options (SPEED_OPTIONS, speed_preset)
        are used; other options are accepted and ignored.
        A model is loaded before it becomes current: one that cannot be loaded is a 500 and changes nothing."""
        clip_skip = changes.get("CLIP_stop_at_last_layers", options["CLIP_stop_at_last_layers"])
        if isinstance(clip_skip, bool) or not isinstance(clip_skip, int) or clip_skip < 1:
            raise FieldError(
                "CLIP_stop_at_last_layers", f"CLIP_stop_at_last_layers must be a whole number >= 1, got {clip_skip!r}"
            )
        vae = vae_option(library, changes.get("sd_vae", options["sd_vae"]), "sd_vae")
        try:
            rng = rng_source(changes.get("randn_source", options["randn_source"]))
        except ValueError as e:
            raise FieldError("randn_source", str(e)) from None
        ensd = changes.get("eta_noise_seed_delta", options["eta_noise_seed_delta"])
        if isinstance(ensd, bool) or not isinstance(ensd, int) or not 0 <= ensd <= MAX_SEED:
            raise FieldError(
                "eta_noise_seed_delta", f"eta_noise_seed_delta must be between 0 and {MAX_SEED}, got {ensd!r}"
            )
        speed = set_speed({key: options[key] for key in SPEED_DEFAULTS}, changes, only_edits=True)  # checked first
        if "sd_model_checkpoint" in changes:
            models.select(find_model(models, changes["sd_model_checkpoint"], "sd_model_checkpoint").name)
        options["CLIP_stop_at_last_layers"] = clip_skip
        options["sd_vae"] = vae
        options["eta_noise_seed_delta"] = ensd
        options["randn_source"] = rng
        options.update(speed)

    @app.post("/sdapi/v1/png-info")
    def png_info(body: dict[str, str]) -> dict[str, Any]:
        text = read_upload(decode_base64(body.get("image", ""), "image"), "image", pngfiles.read_infotext)
        return {"info": text or "", "items": {}, "parameters": infotext.parse_infotext(text) if text else {}}

    @app.get("/sdapi/v1/scripts")
    def scripts() -> dict[str, list]:
        return {"txt2img": [], "img2img": []}

    @app.get("/sdapi/v1/script-info")
    def script_info() -> list:
        return []  # no scripts

    @app.get("/sdapi/v1/extensions")
    def extensions() -> list:
        return []  # no extensions

    @app.get("/sdapi/v1/hypernetworks")
    def hypernetworks() -> list:
        return []  # latentforge reads no hypernetwork files (LoRA replaced them)

    @app.get("/sdapi/v1/realesrgan-models")
    def realesrgan_models() -> list[dict[str, Any]]:
        """The (Real-)ESRGAN files of the upscaler folder: A1111 lists its Real-ESRGAN models here."""
        return [{"name": u["name"], "path": u["model_path"], "scale": u["scale"]}
                for u in upscalers.listing() if u["model_path"] is not None]  # fmt: skip

    @app.post("/sdapi/v1/unload-checkpoint")
    def unload_checkpoint() -> dict:
        models.unload()
        return {}

    @app.post("/sdapi/v1/reload-checkpoint")
    def reload_checkpoint() -> dict:
        models.get(models.current)  # a model that cannot be loaded is ModelError's 500, as in a switch
        return {}

    for route, what in NOT_HERE.items():
        app.add_api_route(route, not_here(what), methods=["POST"])

    @app.get("/explain", include_in_schema=False)
    async def explain_page(
        prompt: str, seed: int = 0, steps: int | None = None, fast_decode: bool = False, guidance_runs: bool = False
    ) -> Response:  # fmt: skip
        """`latentforge explain`'s page for the current model, made by the worker between generations; the
        options are the command's `--fast-decode` (with the model's tiny decoder) and `--guidance-runs`; the
        server's --explain-clip is the command's --clip."""

        def page(pipe: Pipeline) -> str:
            from ..explain import explain, render

            run = explain(
                pipe, prompt, seed=seed, steps=steps, fast_decode=fast_decode, guidance_runs=guidance_runs,
                clip=settings.explain_clip,
            )  # fmt: skip
            return render(run)

        html = await asyncio.wrap_future(worker.submit(Job(models.current, [], run=page)))
        return Response(html, media_type="text/html", headers=EXPLAIN_HEADERS)

    for route, (name, media_type) in STATIC.items():
        app.add_api_route(route, static_page(name, media_type), methods=["GET"], include_in_schema=False)
    return app


def embedding_entry(embedding: Embedding) -> dict[str, Any]:
    """A1111's fields of an embedding: its width (the first text encoder's) and vector count."""
    first = next(iter(embedding.vectors.values()))
    return {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None, "shape": first.shape[1],
            "vectors": first.shape[0]}  # fmt: skip


NOT_HERE = {  # A1111 routes that need parts latentforge does not have: each answers 501 with what to do instead
    "/sdapi/v1/interrogate": "describing an image needs a captioning model (BLIP, DeepDanbooru), which latentforge "
    "does not have; an image made here carries its prompt: read it with POST /sdapi/v1/png-info",
    "/sdapi/v1/create/embedding": "latentforge does not train embeddings; `latentforge train lora` trains a LoRA",
    "/sdapi/v1/train/embedding": "latentforge does not train embeddings; `latentforge train lora` trains a LoRA",
    "/sdapi/v1/create/hypernetwork": "latentforge has no hypernetworks; `latentforge train lora` trains a LoRA",
    "/sdapi/v1/train/hypernetwork": "latentforge has no hypernetworks; `latentforge train lora` trains a LoRA",
}


def not_here(what: str) -> Callable[[], JSONResponse]:
    """A route that answers 501 Not Implemented with one line saying why and what to use instead."""

    def route() -> JSONResponse:
        return JSONResponse({"detail": what}, status_code=501)

    return route


def static_page(name: str, media_type: str) -> Callable[[], Response]:
    """A route answering with one file of the web page (read once, from the package: never a request's path)."""
    content = (resources.files("latentforge") / "static" / name).read_bytes()

    def page() -> Response:
        return Response(content, media_type=media_type, headers=PAGE_HEADERS)

    return page


def serve(settings: Settings) -> None:
    """Load the first model (a broken one fails here, before the port opens) and serve until Ctrl-C."""
    if settings.api_auth is not None and ":" not in settings.api_auth:
        raise ValueError("--api-auth must be USER:PASS")
    if settings.max_body_bytes < 1:
        raise ValueError(f"--max-body-mb must be at least 1, got {settings.max_body_bytes // 2**20}")
    models = configured_models(settings)
    pipe = models.get(models.current)
    print(f"latentforge serve: {models.current} ({pipe.config.describe()}); the API at /sdapi/v1, a web page at /")
    if not is_loopback(settings.host) and settings.api_auth is None:
        print(f"latentforge serve: warning: {settings.host} is not a loopback address and --api-auth is not set")
    app = create_app(settings, models)
    uvicorn.run(app, host=settings.host, port=settings.port, timeout_graceful_shutdown=2, server_header=False)


class ServerThread:
    """Serve an app on a free loopback port in a background thread: `with ServerThread(app) as url: ...`."""

    def __init__(self, app: FastAPI, host: str = "127.0.0.1") -> None:
        self.socket = socket.create_server((host, 0))
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.socket]}, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.01)
        host, port = self.socket.getsockname()[:2]
        return f"http://{host}:{port}"

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.socket.close()
