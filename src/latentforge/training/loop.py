"""The one training loop that the VAE, CLIP and UNet trainers parameterise.

A trainer hands `train` a `Task`: the module whose weights are trained, the objective (a module whose
forward returns the loss, and the one DistributedDataParallel wraps), how a batch and the step's
random draws become the objective's inputs, a report (sample images and held-out metrics) and the
final export. The loop owns everything else: AdamW with warm-up, gradient clipping, EMA, progress bar
and log, checkpoints, resuming and data parallelism.

- Exact resumption: every random draw of step s is a function of (seed, s) only (`StepRandom`), and
  the data position (samples consumed) is saved with each checkpoint; a resumed run therefore does
  exactly what the uninterrupted one would have done from that step on.
- Data parallelism: each rank takes every n-th sample of the global batch and the same slice of each
  random draw, which is made for the whole global batch; DDP averages the gradients, so n ranks compute
  what one process computes on the same global batch.
- Checkpoints: a folder `checkpoints/step-NNNNNNNN/` (weights as safetensors, optimizer via torch.save,
  state.json) is written under a temporary name, renamed into place, and only then named in
  `checkpoints/latest.json` (itself written atomically); older ones are deleted after that. A crash at
  any moment leaves the previous checkpoint whole and named.
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as torch_dist
from PIL import Image
from torch import nn
from tqdm import tqdm

from ..atomic import atomic_path, fsync_folder, write_json
from ..text_encoder import TextEncoder, TextEncoderConfig
from ..unet import UNet, UNetConfig
from ..vae import AutoencoderKL, VAEConfig
from ..weightfiles import read_state_dict, write_safetensors
from .configs import CONFIG_FILE, TrainConfig, config_to_dict, model_config
from .data import batches, mix_seed

CHECKPOINTS = "checkpoints"
LATEST = "latest.json"
LOG_FILE = "log.jsonl"
SAMPLES = "samples"
# what the trainers export into their run folders when they finish: file name, module and config classes
EXPORTS = {"vae": "vae.safetensors", "text_encoder": "text_encoder.safetensors", "unet": "unet.safetensors"}
PARTS = {"vae": (AutoencoderKL, VAEConfig), "text_encoder": (TextEncoder, TextEncoderConfig), "unet": (UNet, UNetConfig)}
PART_KEY = "latentforge_part"  # safetensors metadata: which part a file holds ...
PART_CONFIG_KEY = "latentforge_part_config"  # ... and its config as JSON


# --------------------------------------------------------------------------- processes


@dataclass(frozen=True)
class Dist:
    """Where this process stands in a data-parallel run (rank 0 of 1 without torchrun)."""

    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        """Rank 0: the only one that writes checkpoints, samples, logs and exports."""
        return self.rank == 0


SINGLE_PROCESS = Dist()


def setup_distributed(device: str = "auto", init_method: str = "env://") -> Dist:
    """Join the process group torchrun describes (WORLD_SIZE, RANK, LOCAL_RANK); without it, one process.

    NCCL on CUDA, gloo on the CPU; each rank uses GPU LOCAL_RANK when there are GPUs."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    target = torch.device("cuda", local) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(target)
    if world == 1:
        return Dist(0, 1, target)
    rank = int(os.environ["RANK"])
    if not torch_dist.is_initialized():
        backend = "nccl" if use_cuda else "gloo"
        torch_dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world)
    return Dist(rank, world, target)


def teardown_distributed() -> None:
    """Leave the process group, if this process joined one."""
    if torch_dist.is_initialized():
        torch_dist.destroy_process_group()


def barrier(dist: Dist) -> None:
    """Wait for every rank (no-op in a single process)."""
    if dist.world > 1:
        torch_dist.barrier()


class StepRandom:
    """The random draws of one step: each made for the whole global batch, this rank keeping its slice.

    They depend only on (seed, step) and the order they are asked for, never on the number of ranks."""

    def __init__(self, seed: int, step: int, global_batch: int, dist: Dist) -> None:
        self.generator = torch.Generator().manual_seed(mix_seed(seed, 1, step))
        self.global_batch = global_batch
        self.rows = slice(dist.rank, None, dist.world)
        self.device = dist.device

    def normal(self, *shape: int) -> torch.Tensor:
        """(b, *shape) standard normal draws."""
        return torch.randn((self.global_batch, *shape), generator=self.generator)[self.rows].to(self.device)

    def uniform(self) -> torch.Tensor:
        """(b,) draws from U[0, 1)."""
        return torch.rand(self.global_batch, generator=self.generator)[self.rows].to(self.device)

    def integers(self, high: int) -> torch.Tensor:
        """(b,) int64 draws from 0 .. high - 1."""
        return torch.randint(high, (self.global_batch,), generator=self.generator)[self.rows].to(self.device)


def mean_over_ranks(values: dict[str, torch.Tensor], dist: Dist) -> dict[str, float]:
    """Scalar tensors averaged over the ranks, as floats (one all-reduce for all of them)."""
    stacked = torch.stack([v.detach().float().reshape(()) for v in values.values()])
    if dist.world > 1:
        torch_dist.all_reduce(stacked)
        stacked /= dist.world
    return dict(zip(values, stacked.tolist()))


# --------------------------------------------------------------------------- the task


# (weights to show, png path) -> held-out metrics: writes the sample image of a step (rank 0 only)
Report = Callable[[nn.Module, Path], dict[str, float]]
# (final weights, run folder) -> None: writes the run's export (rank 0 only)
Finish = Callable[[nn.Module, Path], None]


@dataclass
class Task:
    """What a trainer plugs into the loop."""

    name: str  # "vae", "clip", "unet": the progress bar's label
    model: nn.Module  # the weights trained: checkpointed, averaged by the EMA
    objective: nn.Module  # forward(**inputs) -> (loss (), {metric: ()}); holds `model` (and frozen parts)
    inputs: Callable[[torch.Tensor, list[str], StepRandom], dict[str, Any]]  # (images (b,3,H,W), captions, draws)
    report: Report  # called with the EMA copy when there is one
    finish: Finish


class EMA:
    """Exponential moving average of a module's parameters, in a frozen copy of the module."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.module = copy.deepcopy(model).requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        """Move towards `model` after optimizer step `step` (1-based); the decay ramps up over early steps."""
        decay = min(self.decay, (1 + step) / (10 + step))
        for average, param in zip(self.module.parameters(), model.parameters(), strict=True):
            average.lerp_(param.detach(), 1.0 - decay)
        for average, buffer in zip(self.module.buffers(), model.buffers(), strict=True):
            average.copy_(buffer)


def learning_rate(config: TrainConfig, step: int) -> float:
    """The learning rate of 0-based step `step`: linear warm-up to config.lr, constant, then a linear
    cooldown to 0 over the last config.cooldown_steps steps (warm-up / stable / decay)."""
    scale = 1.0
    if config.warmup_steps:
        scale = min(scale, (step + 1) / config.warmup_steps)
    if config.cooldown_steps:
        scale = min(scale, (config.steps - step) / config.cooldown_steps)
    return config.lr * max(scale, 0.0)


# --------------------------------------------------------------------------- checkpoints


@dataclass
class TrainState:
    """What a checkpoint stores besides tensors."""

    step: int = 0  # optimizer steps done
    samples_seen: int = 0  # the data position: samples of the training stream consumed
    seed: int = 0  # with `step`, determines every later random draw


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The folder of the run's newest complete checkpoint, or None."""
    pointer = Path(run_dir) / CHECKPOINTS / LATEST
    if not pointer.is_file():
        return None
    folder = pointer.parent / json.loads(pointer.read_text(encoding="utf-8"))["folder"]
    if not folder.is_dir():
        raise ValueError(f"{pointer} names {folder.name}, which is missing; the run folder was damaged")
    return folder


def save_checkpoint(
    run_dir: Path, state: TrainState, model: nn.Module, ema: EMA | None, optimizer: torch.optim.Optimizer, keep: int
) -> Path:
    """Write checkpoint `state.step` beside the others, make it the latest, delete all but the `keep` newest."""
    root = Path(run_dir) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    name = f"step-{state.step:08d}"
    final = root / name
    current = latest_checkpoint(run_dir)
    if current == final:
        return final  # already saved (a resumed run that had nothing left to do)
    for stale in root.glob(".step-*.tmp-*"):  # left by a process killed while saving
        shutil.rmtree(stale, ignore_errors=True)
    temp = root / f".{name}.tmp-{os.getpid()}"
    temp.mkdir()
    try:
        write_safetensors(_contiguous(model.state_dict()), temp / "model.safetensors")
        if ema is not None:
            write_safetensors(_contiguous(ema.module.state_dict()), temp / "ema.safetensors")
        with atomic_path(temp / "optimizer.pt") as path:
            torch.save(optimizer.state_dict(), path)
        write_json(vars(state), temp / "state.json")
        if final.exists():  # a save of this step that never became the latest
            shutil.rmtree(final)
        os.replace(temp, final)
        fsync_folder(root)
        write_json({"folder": name, "step": state.step}, root / LATEST)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    _prune(root, keep)
    return final


def _contiguous(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """State-dict tensors as contiguous CPU tensors, ready for safetensors."""
    return {k: v.detach().contiguous().cpu() for k, v in tensors.items()}


def _prune(root: Path, keep: int) -> None:
    """Delete all but the `keep` newest checkpoint folders (never the one latest.json names)."""
    latest = json.loads((root / LATEST).read_text(encoding="utf-8"))["folder"]
    folders = sorted(p for p in root.glob("step-*") if p.is_dir() and p.name != latest)
    for old in folders[: max(0, len(folders) - (keep - 1))]:
        shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(
    folder: Path, model: nn.Module, ema: EMA | None, optimizer: torch.optim.Optimizer, device: torch.device
) -> TrainState:
    """Restore weights, EMA and optimizer from a checkpoint folder; return its TrainState."""
    model.load_state_dict(read_state_dict(folder / "model.safetensors")[0], strict=True)
    if ema is not None:
        ema_file = folder / "ema.safetensors"
        source = ema_file if ema_file.is_file() else folder / "model.safetensors"  # EMA switched on later
        ema.module.load_state_dict(read_state_dict(source)[0], strict=True)
    optimizer.load_state_dict(torch.load(folder / "optimizer.pt", map_location=device, weights_only=True))
    return TrainState(**json.loads((folder / "state.json").read_text(encoding="utf-8")))


def checkpoint_weights(run_dir: str | Path) -> dict[str, torch.Tensor]:
    """The trained weights (not the EMA) of a run folder's latest checkpoint, to start another run from."""
    folder = latest_checkpoint(Path(run_dir)) if Path(run_dir).is_dir() else None
    if folder is None:
        raise ValueError(f"{run_dir}: not a run folder with a checkpoint; give a folder `latentforge train` wrote")
    return read_state_dict(folder / "model.safetensors")[0]


# --------------------------------------------------------------------------- exported parts


def write_part(module: nn.Module, config: Any, kind: str, path: Path) -> None:
    """Atomically write one model part (vae, text_encoder, unet) as safetensors, its config in the metadata."""
    metadata = {PART_KEY: kind, PART_CONFIG_KEY: json.dumps(config_to_dict(config))}
    write_safetensors(_contiguous(module.state_dict()), path, metadata=metadata)


def resolve_part(source: str | Path, kind: str) -> Path:
    """A part file, given the file itself or the run folder that exported it."""
    path = Path(source)
    if path.is_dir():
        path = path / EXPORTS[kind]
        if not path.is_file():
            raise ValueError(f"{path.parent}: no {EXPORTS[kind]} in this run folder; has its training finished?")
    elif not path.is_file():
        raise ValueError(f"{path}: no such file or run folder")
    return path


def read_part(source: str | Path, kind: str) -> tuple[Any, dict[str, torch.Tensor]]:
    """(config, tensors) of a part written by write_part, from its file or the run folder that exported it."""
    path = resolve_part(source, kind)
    tensors, metadata = read_state_dict(path)
    if metadata.get(PART_KEY) != kind:
        found = metadata.get(PART_KEY)
        what = f"a {found} file" if found else "not a part file written by latentforge train"
        raise ValueError(f"{path}: expected the {kind} exported by latentforge train, found {what}")
    return model_config(PARTS[kind][1], json.loads(metadata[PART_CONFIG_KEY])), tensors


def load_part(source: str | Path, kind: str) -> nn.Module:
    """The exported part (vae, text_encoder, unet) as a frozen module in eval mode; its config is .config."""
    config, tensors = read_part(source, kind)
    module = PARTS[kind][0](config)
    module.load_state_dict(tensors, strict=True)
    return module.eval().requires_grad_(False)


# --------------------------------------------------------------------------- images


def write_png(image: Image.Image, path: Path) -> Path:
    """Write a PNG atomically (a temporary file renamed into place)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as temp:
        image.save(temp, format="PNG")
    return path


def stack_rows(rows: list[Image.Image]) -> Image.Image:
    """Images one under the other (left-aligned, RGB)."""
    grid = Image.new("RGB", (max(r.width for r in rows), sum(r.height for r in rows)))
    y = 0
    for row in rows:
        grid.paste(row.convert("RGB"), (0, y))
        y += row.height
    return grid


# --------------------------------------------------------------------------- the loop


@dataclass
class Result:
    """What a call of `train` did."""

    step: int  # steps done in all (including those before a resume)
    losses: list[float]  # the loss of each step this call ran, averaged over the ranks
    report: dict[str, float]  # the final held-out metrics
    model: nn.Module  # the trained weights
    shown: nn.Module  # what the samples and the export use: the EMA copy when there is one, else `model`


def prepare_run(run_dir: Path, config: TrainConfig, resume: bool, dist: Dist) -> Path | None:
    """Check the run folder against --resume and the seed, write config.json (rank 0); return the checkpoint to resume."""
    found = latest_checkpoint(run_dir)
    if found is not None and not resume:
        raise ValueError(f"{run_dir} already holds a checkpoint ({found.name}); pass --resume or choose a new --run")
    if found is not None:
        seed = json.loads((found / "state.json").read_text(encoding="utf-8"))["seed"]
        if seed != config.seed:
            raise ValueError(f"{run_dir} was trained with seed {seed}; resume it with the same seed")
    if dist.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_json(config_to_dict(config), run_dir / CONFIG_FILE)
    barrier(dist)
    return found


@dataclass
class Run:
    """The live state of one call of `train`."""

    task: Task
    config: TrainConfig
    run_dir: Path
    dist: Dist
    state: TrainState
    objective: nn.Module  # the task's objective, wrapped in DistributedDataParallel when there are ranks
    optimizer: torch.optim.Optimizer
    ema: EMA | None

    @property
    def shown(self) -> nn.Module:
        """The weights that samples, reports and the export use: the EMA copy when there is one."""
        return self.ema.module if self.ema is not None else self.task.model


def start(task: Task, config: TrainConfig, run_dir: Path, dist: Dist, resume: bool) -> Run:
    """Set up optimizer, EMA and DDP; restore the latest checkpoint when resuming."""
    found = prepare_run(run_dir, config, resume, dist)
    model = task.model.to(dist.device)
    task.objective.to(dist.device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, betas=config.betas, weight_decay=config.weight_decay)
    ema = EMA(model, config.ema_decay) if config.ema_decay > 0 else None
    state = TrainState(seed=config.seed)
    if found is not None:
        state = load_checkpoint(found, model, ema, optimizer, dist.device)
    objective = task.objective
    if dist.world > 1:
        ids = [dist.device.index] if dist.device.type == "cuda" else None
        objective = nn.parallel.DistributedDataParallel(objective, device_ids=ids)
    return Run(task, config, run_dir, dist, state, objective, optimizer, ema)


def train(
    task: Task, config: TrainConfig, run_dir: str | Path, dataset: Any, dist: Dist = SINGLE_PROCESS, resume: bool = False
) -> Result:
    """Run the task from step 0 (or the run's latest checkpoint) to config.steps, report, export."""
    run = start(task, config, Path(run_dir), dist, resume)
    losses = run_steps(run, dataset)
    report = {}
    if dist.main:
        report = report_now(run, final=True)
        task.finish(run.shown, run.run_dir)
    barrier(dist)
    return Result(run.state.step, losses, report, task.model, run.shown)


def run_steps(run: Run, dataset: Any) -> list[float]:
    """The optimizer steps from the run's step to config.steps, with their log, saves and reports."""
    config, state, dist = run.config, run.state, run.dist
    losses: list[float] = []
    if state.step >= config.steps:
        return losses
    data = batches(dataset, state.samples_seen, config.batch_size, dist.rank, dist.world, config.seed)
    bar = tqdm(total=config.steps, initial=state.step, desc=f"train {run.task.name}", disable=not dist.main, unit="step")
    seconds, timed = 0.0, 0  # time spent in steps (not saves or reports) since the last log line
    while state.step < config.steps:
        began = time.perf_counter()
        values = one_step(run, data)
        seconds, timed = seconds + time.perf_counter() - began, timed + 1
        losses.append(values["loss"])
        bar.update(1)
        bar.set_postfix(loss=f"{values['loss']:.4f}")
        if not dist.main:
            continue
        last = state.step == config.steps
        if state.step % config.log_every == 0 or last:
            lr = learning_rate(config, state.step - 1)
            _log(run.run_dir, {"step": state.step, **values, "lr": lr, "s_per_step": seconds / timed})
            seconds, timed = 0.0, 0
        if state.step % config.save_every == 0 or last:
            save_checkpoint(run.run_dir, state, run.task.model, run.ema, run.optimizer, config.keep_checkpoints)
        if config.sample_every and state.step % config.sample_every == 0 and not last:
            report_now(run, final=False, write=bar.write)
    bar.close()
    return losses


def one_step(run: Run, data: Iterator[tuple[torch.Tensor, list[str]]]) -> dict[str, float]:
    """One optimizer step (and EMA update) on the next batch; advances the state; metrics averaged over ranks."""
    config, state, dist = run.config, run.state, run.dist
    images, captions = next(data)
    draws = StepRandom(config.seed, state.step, config.batch_size, dist)
    torch.manual_seed(mix_seed(config.seed, 2, state.step, dist.rank))  # for anything drawing from the global generator
    for group in run.optimizer.param_groups:
        group["lr"] = learning_rate(config, state.step)
    loss, metrics = run.objective(**run.task.inputs(images.to(dist.device), captions, draws))
    if not torch.isfinite(loss):
        raise FloatingPointError(f"{run.task.name}: the loss is {loss.item()} at step {state.step}; lower the lr")
    run.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if config.max_grad_norm > 0:
        params = [p for group in run.optimizer.param_groups for p in group["params"]]
        torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
    run.optimizer.step()
    state.step += 1
    state.samples_seen += config.batch_size
    if run.ema is not None:
        run.ema.update(run.task.model, state.step)
    return mean_over_ranks({"loss": loss, **metrics}, dist)


def report_now(run: Run, final: bool, write: Callable[[str], None] = tqdm.write) -> dict[str, float]:
    """Write the sample image of the current step and log the held-out metrics (rank 0)."""
    step = run.state.step
    report = run.task.report(run.shown, run.run_dir / SAMPLES / f"step-{step:08d}.png")
    _log(run.run_dir, {"step": step, **({"final": True} if final else {}), **report})
    if report:
        write(f"{run.task.name} step {step}: " + ", ".join(f"{k} {v:.4g}" for k, v in report.items()))
    return report


def _log(run_dir: Path, record: dict[str, Any]) -> None:
    """Append one JSON line to the run's log (rank 0)."""
    clean = {k: (round(v, 6) if isinstance(v, float) and math.isfinite(v) else v) for k, v in record.items()}
    with open(run_dir / LOG_FILE, "a", encoding="utf-8") as file:
        file.write(json.dumps(clean) + "\n")
