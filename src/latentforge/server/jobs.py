"""The models the server offers, and the worker that runs their jobs one at a time."""

from __future__ import annotations

import base64
import collections
import concurrent.futures
import gc
import functools
import io
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, PngImagePlugin

from .. import pngfiles
from ..checkpoints import read_checkpoint
from ..adapters.library import Library
from ..pipeline import Pipeline, Step, default_model_path, load

PREVIEW_EVERY_S = 0.25  # at most this often a step preview is decoded ...
PREVIEW_COST = 0.2  # ... and previews take at most this share of the time (slow VAEs preview less often)
PREVIEW_WANTED_S = 3.0  # previews are made only while someone asked /progress for one this recently


class Skipped(Exception):
    """The running image is skipped (A1111's /skip): the job goes on with its next image."""


class Interrupted(Exception):
    """Raised from the step callback to stop the running job."""


class ModelError(ValueError):
    """A configured model that cannot be loaded: the server's fault, HTTP 500 (and one line from `serve`)."""


class QueueFull(RuntimeError):
    """Too many jobs waiting: HTTP 503."""


@dataclass
class ModelEntry:
    path: Path
    name: str  # the file stem / folder name, as load() names the model (the infotext's "Model")
    title: str  # the file or folder name: A1111's "title", what sd_model_checkpoint takes
    hash: str | None = None  # A1111's short model hash, known once the model has been loaded


class Models:
    """The configured models by name, the selected one, and up to `keep` of them loaded (one load at a time:
    the worker and a request selecting a model may both load)."""

    def __init__(
        self, paths: list[str | None], keep: int = 2, loader: Callable[[Path], Pipeline] = load,
        check: Callable[[Path], object] = read_checkpoint,
    ) -> None:  # fmt: skip
        self.entries: dict[str, ModelEntry] = {}
        for given in paths or [None]:
            path = default_model_path() if given is None else Path(given)
            if not path.exists():
                raise ValueError(f"--model {path}: no such file or folder")
            entry = ModelEntry(path, path.stem, path.name)
            if entry.name in self.entries:
                raise ValueError(f"two models are named {entry.name!r} ({self.entries[entry.name].path}, {path})")
            self.entries[entry.name] = entry
        self.current = next(iter(self.entries))
        self.keep = max(1, keep)
        self.loader, self.check = loader, check  # check: reads a model's file without building it (memory-mapped)
        self.loaded: collections.OrderedDict[str, Pipeline] = collections.OrderedDict()
        self.lock = threading.Lock()
        self.library = Library()  # the add-on folders every loaded model uses (the app sets its own)

    def find(self, name: object) -> ModelEntry | None:
        """A model by A1111's title ("model.safetensors", also with " [hash]" after it) or its name."""
        key = re.sub(r"\s*\[[0-9a-fA-F]*\]$", "", str(name).strip())
        return next((entry for entry in self.entries.values() if key in (entry.name, entry.title)), None)

    def select(self, name: str) -> None:
        """Make `name` the current model, loaded first: one that cannot be loaded (ModelError) leaves the
        current one current. A file that cannot be read is found before anything is dropped from memory; one
        that fails later (building the model) may have cost the least recently used its place."""
        self.get(name)
        self.current = name

    def get(self, name: str) -> Pipeline:
        """The loaded model, loading it first (dropping the least recently used beyond `keep`)."""
        with self.lock:
            return self._get(name)

    def unload(self) -> None:
        """Drop every loaded model from memory (A1111's unload-checkpoint); a running job keeps the one it
        uses until it ends, and the next job or `get` loads its model again."""
        with self.lock:
            self.loaded.clear()
        gc.collect()

    def _get(self, name: str) -> Pipeline:
        if name in self.loaded:
            self.loaded.move_to_end(name)
            return self.loaded[name]
        entry = self.entries[name]
        try:
            if len(self.loaded) >= self.keep:  # read before a loaded model makes room: a bad file costs none
                self.check(entry.path)
            while len(self.loaded) >= self.keep:
                self.loaded.popitem(last=False)
            pipe = self.loader(entry.path)
            entry.hash = pipe.model_hash
        except (ValueError, OSError) as e:
            raise ModelError(f"cannot load model {entry.title}: {e}") from e
        self.loaded[name] = pipe
        return pipe


@dataclass(eq=False)
class Job:
    """One request's images: a generate() call per image (image i with seed + i), and its progress."""

    model: str
    calls: list[dict[str, Any]]
    refiner: str | None = None  # the configured model that takes over (passed to every call as `refiner`)
    vae: Path | None = None  # a VAE file to decode with instead of the model's own (the sd_vae option)
    run: Callable[[Pipeline], Any] | None = None  # instead of the calls: a function of the model (GET /explain)
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)
    timestamp: str = field(default_factory=lambda: time.strftime("%Y%m%d%H%M%S"))
    interrupted: bool = False
    skipped: int | None = None  # the image /skip asked to drop
    started: float = 0.0
    image: int = 0  # the image being made
    pass_no: int = 0  # its pass: 1 is the hires fix's second pass (A1111 counts each pass as a job)
    passes: int = 1
    step: int = 0  # sampler steps done of the pass
    steps: int = 0
    preview: str | None = None  # base64 PNG of the latest step's predicted image
    preview_at: float = 0.0
    preview_cost: float = 0.0


@dataclass
class Result:
    images: list[Image.Image]  # with info["parameters"]; those made before an interrupt
    model: ModelEntry
    inpainting: bool


class Worker:
    """Runs the jobs one at a time, in order, on its own thread; reports and interrupts the running one."""

    def __init__(self, models: Models, max_queue: int = 64) -> None:
        self.models = models
        self.max_queue = max_queue
        self.waiting: collections.deque[Job] = collections.deque()
        self.current: Job | None = None
        self.cond = threading.Condition()
        self.closed = False
        self.preview_wanted = 0.0  # when a client last asked /progress for a preview (monotonic)
        self.thread = threading.Thread(target=self._run, name="latentforge-worker", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        with self.cond:
            self.closed = True
            self.interrupt()
            for job in self.waiting:
                job.future.cancel()
            self.waiting.clear()
            self.cond.notify_all()
        self.thread.join(timeout=10)

    def submit(self, job: Job) -> concurrent.futures.Future:
        with self.cond:
            if len(self.waiting) >= self.max_queue:
                raise QueueFull(f"{len(self.waiting)} jobs are waiting already; try again later")
            self.waiting.append(job)
            self.cond.notify()
        return job.future

    def cancel(self, job: Job) -> None:
        """The client has gone: its job leaves the queue, or stops if it is running."""
        with self.cond:
            if job in self.waiting:
                self.waiting.remove(job)
                job.future.cancel()
            job.interrupted = True

    def interrupt(self) -> None:
        """Stop the running job (those waiting are not touched)."""
        with self.cond:
            if self.current is not None:
                self.current.interrupted = True

    def skip(self) -> None:
        """Drop the image being made (A1111's /skip): the running job goes on with its next image."""
        with self.cond:
            if self.current is not None:
                self.current.skipped = self.current.image

    def _run(self) -> None:
        while True:
            with self.cond:
                while not self.waiting and not self.closed:
                    self.cond.wait()
                if self.closed:
                    return
                job = self.current = self.waiting.popleft()
            job.future.set_running_or_notify_cancel()
            try:
                job.future.set_result(self._generate(job) if job.run is None else job.run(self.models.get(job.model)))
            except Exception as e:  # noqa: BLE001 -- any error is the request's, raised again in its handler
                job.future.set_exception(e)
            finally:
                with self.cond:
                    self.current = None

    def _generate(self, job: Job) -> Result:
        job.started = time.monotonic()
        pipe = self.models.get(job.model)
        if pipe.vae_file != job.vae:
            pipe.load_vae(job.vae)
        refiner = {"refiner": self.models.get(job.refiner)} if job.refiner is not None else {}
        done: list[Image.Image] = []
        on_step = functools.partial(self._on_step, job, pipe)
        try:
            for i, call in enumerate(job.calls):
                job.image, job.pass_no, job.step = i, 0, 0
                try:
                    done += pipe.generate(**call, **refiner, callback=on_step)
                except Skipped:
                    continue
        except Interrupted:
            pass
        return Result(done, self.models.entries[job.model], pipe.config.inpainting)

    def _on_step(self, job: Job, pipe: Pipeline, step: Step) -> None:
        if job.interrupted:
            raise Interrupted
        if job.skipped == job.image:
            raise Skipped
        job.step, job.steps, job.pass_no, job.passes = step.step + 1, step.steps, step.pass_no, step.passes
        now = time.monotonic()
        wait = max(PREVIEW_EVERY_S, job.preview_cost / PREVIEW_COST)
        if now - self.preview_wanted < PREVIEW_WANTED_S and now - job.preview_at >= wait:
            job.preview = png_base64(pipe.preview(step.denoised)[0])
            job.preview_at = time.monotonic()
            job.preview_cost = job.preview_at - now

    def progress(self, with_image: bool) -> dict[str, Any]:
        """AUTOMATIC1111's /progress answer for the running job (all zeros when idle)."""
        with self.cond:
            job, queued = self.current, len(self.waiting)
        if with_image:
            self.preview_wanted = time.monotonic()
        state = {
            "skipped": False, "interrupted": False, "stopping_generation": False, "job": "", "job_count": 0,
            "job_timestamp": "0", "job_no": 0, "sampling_step": 0, "sampling_steps": 0, "queued": queued,
        }  # fmt: skip
        if job is None:
            return {"progress": 0.0, "eta_relative": 0.0, "state": state, "current_image": None, "textinfo": None}
        count = len(job.calls)
        # with the hires fix each image is two jobs, as A1111 counts them: the bar runs once over both passes
        jobs, job_no = count * job.passes, job.image * job.passes + job.pass_no
        fraction = (job_no + (job.step / job.steps if job.steps else 0.0)) / jobs
        elapsed = time.monotonic() - job.started
        where = f"image {job.image + 1}/{count}" + (", hires pass" if job.pass_no else "")
        state |= {
            "skipped": job.skipped == job.image, "interrupted": job.interrupted, "job": where, "job_count": jobs,
            "job_timestamp": job.timestamp, "job_no": job_no, "sampling_step": job.step, "sampling_steps": job.steps,
        }  # fmt: skip
        return {
            "progress": fraction,
            "eta_relative": elapsed / fraction - elapsed if fraction > 0 else 0.0,
            "state": state,
            "current_image": job.preview if with_image else None,
            "textinfo": f"{where}, step {job.step}/{job.steps}",
        }


def png_base64(image: Image.Image) -> str:
    """A PNG (with the image's infotext, when it has one) as base64 text."""
    pnginfo = PngImagePlugin.PngInfo()
    if pngfiles.PNG_TEXT_KEY in image.info:
        pnginfo.add_text(pngfiles.PNG_TEXT_KEY, image.info[pngfiles.PNG_TEXT_KEY])
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=pnginfo)
    return base64.b64encode(buffer.getvalue()).decode("ascii")
