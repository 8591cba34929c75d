"""LoRA training: low-rank updates of a frozen model's attention and MLP layers, written as a kohya file.

Each targeted layer W (a linear, or a 1 x 1 convolution) gains a parallel path scale * up(down(x)), with
down (rank x in) drawn as kaiming-uniform, up (out x rank) zero, and scale = alpha / rank: at step 0 the
model is exactly the base. The targets are kohya's defaults for SD 1.x / 2.x: every linear and 1 x 1
convolution inside the UNet's spatial transformers (proj_in, attn1 / attn2 to_q, to_k, to_v, to_out.0,
ff.net.0.proj, ff.net.2, proj_out) and, with `train_text_encoder`, the text encoder's q / k / v / out
projections and fc1 / fc2. The network is an nn.ModuleDict keyed by kohya module names, so its state dict
is the file's tensors: `<name>.lora_down.weight`, `<name>.lora_up.weight`, `<name>.alpha`.

The objective is the UNet trainer's denoising loss (VAE latents, SD's noise schedule, captions dropped
for classifier-free guidance), with the text encoder run under autograd when its layers carry LoRA.
The data is the shapes world with extra kinds (`kinds`: stars mixed into the ordinary scenes, so the
old concepts keep being seen) or a folder of captioned images; the loop (checkpoints, exact resume,
torchrun) is the one every trainer uses.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from .. import checkpoints
from ..adapters.names import kohya_name
from ..config import ModelConfig
from ..images import image_strip
from ..inference import set_inference
from ..pipeline import Pipeline, build, default_model_path, from_parts, load_tokenizer
from ..schedules import SD_DEFAULT
from ..text_encoder import TextEncoder
from ..tokenizer import Tokenizer
from ..unet import SpatialTransformer, UNet
from ..vae import AutoencoderKL
from ..weightfiles import write_safetensors
from .configs import CONFIG_FILE, LoraTrainConfig, run_relative
from .judge import judge_image, score
from .loop import SINGLE_PROCESS, Dist, Result, StepRandom, Task, train, write_png
from .vae import reparameterise
from .world import CaptionFolder, Scene, ShapesWorld, grammar_prompts

TEXT_TARGETS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1", "mlp.fc2")
BASE_MODEL_VERSIONS = {"sd1": "sd_v1", "sd2": "sd_v2_512"}  # kohya's ss_base_model_version (SD 2.x v: sd_v2_768_v)


# --------------------------------------------------------------------------- the network


class LoRAModule(nn.Module):
    """The low-rank path beside one layer: x -> scale * up(down(x)), shaped like the layer's output."""

    def __init__(self, base: nn.Module, rank: int, alpha: float) -> None:
        super().__init__()
        weight = base.weight
        out_features, in_features = weight.shape[:2]
        if weight.dim() == 4:
            if weight.shape[2:] != (1, 1):
                raise ValueError(f"LoRA targets linears and 1 x 1 convolutions, got a {tuple(weight.shape[2:])} kernel")
            self.lora_down = nn.Conv2d(in_features, rank, 1, bias=False)
            self.lora_up = nn.Conv2d(rank, out_features, 1, bias=False)
        else:
            self.lora_down = nn.Linear(in_features, rank, bias=False)
            self.lora_up = nn.Linear(rank, out_features, bias=False)
        nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))  # as nn.Linear's own init (and kohya's)
        nn.init.zeros_(self.lora_up.weight)  # the base model, unchanged, at step 0
        self.register_buffer("alpha", torch.tensor(float(alpha)))
        self.rank = rank

    @property
    def scale(self) -> float:
        """alpha / rank: the factor on up(down(x))."""
        return float(self.alpha) / self.rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The change to the layer's output for its input x: (..., in) -> (..., out), or NCHW for convolutions."""
        return self.lora_up(self.lora_down(x)) * self.scale

    def delta_weight(self) -> torch.Tensor:
        """The same change as a weight (out, in) or (out, in, 1, 1): merged into the layer, it does what forward
        does."""
        up, down = self.lora_up.weight, self.lora_down.weight
        return (up.flatten(1) @ down.flatten(1)).reshape(up.shape[0], down.shape[1], *down.shape[2:]) * self.scale


class LoRANetwork(nn.ModuleDict):
    """kohya module name -> LoRAModule. Its state dict is a kohya file's tensors; `targets` maps each kohya
    name to (part, module name in our model), for merging."""

    def __init__(self, targets: dict[str, tuple[str, str, nn.Module]], rank: int, alpha: float) -> None:
        super().__init__({name: LoRAModule(module, rank, alpha) for name, (_, _, module) in targets.items()})
        self.targets = {name: (part, ours) for name, (part, ours, _) in targets.items()}

    def attach(self, modules: dict[str, nn.Module]) -> list[torch.utils.hooks.RemovableHandle]:
        """Add each LoRA path to its layer's output (a forward hook per layer); returns the hooks' handles."""
        handles = []
        for name, module in modules.items():
            lora = self[name]
            handles.append(module.register_forward_hook(lambda _, args, out, lora=lora: out + lora(args[0])))
        return handles

    def merge_into(self, parts: dict[str, dict[str, torch.Tensor]]) -> None:
        """Add every layer's delta_weight to its weight in `parts` (our names; float32 from here on)."""
        with torch.no_grad():
            for name, (part, ours) in self.targets.items():
                key = ours + ".weight"
                parts[part][key] = parts[part][key].float() + self[name].delta_weight().float().cpu()


def lora_targets(unet: UNet, text_encoder: TextEncoder | None) -> dict[str, tuple[str, str, nn.Module]]:
    """kohya name -> (part, our module name, module): the UNet's transformer linears and 1 x 1 convolutions,
    and (when a text encoder is given) its attention and MLP projections."""
    found = {}
    for prefix, block in unet.named_modules():
        if isinstance(block, SpatialTransformer):
            for name, module in block.named_modules():
                if isinstance(module, (nn.Linear, nn.Conv2d)):
                    ours = f"{prefix}.{name}"
                    found[kohya_name("unet", ours, unet.config)] = ("unet", ours, module)
    if text_encoder is not None:
        for ours, module in text_encoder.named_modules():
            if ours.endswith(TEXT_TARGETS):
                found[kohya_name("text_encoder", ours)] = ("text_encoder", ours, module)
    return found


# --------------------------------------------------------------------------- the base model


@dataclasses.dataclass
class Base:
    """The frozen model a LoRA is trained on, its fast paths off (autograd runs through it)."""

    path: Path
    config: ModelConfig
    unet: UNet
    vae: AutoencoderKL
    text_encoder: TextEncoder
    tokenizer: Tokenizer


def load_base(path: str | Path = "", device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> Base:
    """The model at `path` ("" = the shipped one) for LoRA training, in `dtype`; SD 1.x / 2.x only."""
    path = Path(path) if path else default_model_path()
    if not path.exists():
        raise ValueError(f"--base {path}: no such file or folder; give a checkpoint file or diffusers folder")
    config, parts = checkpoints.read_checkpoint(path)
    if config.version not in BASE_MODEL_VERSIONS or config.inpainting:
        raise ValueError(
            f"{path}: a {config.describe()} model; LoRA training supports SD 1.x / 2.x text-to-image models"
        )
    unet = set_inference(build(UNet, config.unet, parts.pop("unet"), device, dtype), False)
    text_encoder = build(TextEncoder, config.text_encoder, parts.pop("text_encoder"), device, dtype)
    text_encoder = set_inference(text_encoder, False)
    vae = build(AutoencoderKL, config.vae, parts.pop("vae"), device, dtype)  # only encodes, under no_grad
    return Base(path, config, unet, vae, text_encoder, load_tokenizer(path, config))


def base_version(config: ModelConfig) -> str:
    """kohya's ss_base_model_version for the model."""
    if config.version == "sd2" and config.prediction_type == "v_prediction":
        return "sd_v2_768_v"
    return BASE_MODEL_VERSIONS[config.version]


# --------------------------------------------------------------------------- the objective


class LoRAObjective(nn.Module):
    """Images (b, 3, H, W) and ids (b, 77) -> the denoising MSE of the base model with the LoRA attached."""

    def __init__(self, network: LoRANetwork, base: Base) -> None:
        super().__init__()
        self.network = network  # the only trained weights (DDP averages their gradients)
        self.unet, self.vae, self.text_encoder = base.unet, base.vae, base.text_encoder
        self.v_prediction = base.config.prediction_type == "v_prediction"
        self.register_buffer("alphas_cumprod", SD_DEFAULT.alphas_cumprod.clone(), persistent=False)
        self.train_text = any(part == "text_encoder" for part, _ in network.targets.values())

    def forward(
        self, images: torch.Tensor, ids: torch.Tensor, timesteps: torch.Tensor, noise: torch.Tensor, eps: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """-> (loss (), {}): noise and eps (b, 4, h, w) draws, timesteps (b,) int64."""
        with torch.no_grad():
            mean, logvar = self.vae.encode(images)
            latents = reparameterise(mean, logvar, eps) * self.vae.config.scaling_factor
        with torch.set_grad_enabled(self.train_text and torch.is_grad_enabled()):
            context = self.text_encoder(ids)
        alpha = self.alphas_cumprod[timesteps].view(-1, 1, 1, 1)
        noisy = alpha.sqrt() * latents + (1 - alpha).sqrt() * noise
        target = alpha.sqrt() * noise - (1 - alpha).sqrt() * latents if self.v_prediction else noise
        return F.mse_loss(self.unet(noisy, timesteps, context), target), {}


# --------------------------------------------------------------------------- the file


def kohya_metadata(config: LoraTrainConfig, base: Base, steps: int, finished: float, ranks: int = 1) -> dict[str, str]:
    """The ss_* fields kohya's trainer writes, which A1111 and ComfyUI show (and read the base version from)."""
    metadata = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(config.rank),
        "ss_network_alpha": f"{config.alpha:g}",
        "ss_base_model_version": base_version(base.config),
        "ss_v2": str(base.config.version == "sd2"),
        "ss_output_name": config.output_name,
        "ss_sd_model_name": base.path.name,
        "ss_steps": str(steps),
        "ss_max_train_steps": str(config.steps),
        "ss_training_started_at": f"{config.started_at:.3f}",
        "ss_training_finished_at": f"{finished:.3f}",
        "ss_learning_rate": f"{config.lr:g}",
        "ss_unet_lr": f"{config.lr:g}",
        "ss_text_encoder_lr": f"{config.lr:g}" if config.train_text_encoder else "0",
        "ss_resolution": f"({config.image_size}, {config.image_size})",
        "ss_batch_size_per_device": str(config.batch_size // ranks),
        "ss_total_batch_size": str(config.batch_size),
        "ss_seed": str(config.seed),
        "ss_lr_warmup_steps": str(config.warmup_steps),
        "ss_network_train_unet_only": str(not config.train_text_encoder),
        "ss_prediction_type": base.config.prediction_type,
        "ss_dataset": config.data if config.data != "shapes" else f"shapes world, kinds {', '.join(config.kinds)}",
    }
    return metadata  # no ss_network_args: plain LoRA, no conv_dim / algo options


def write_lora(network: LoRANetwork, path: Path, metadata: dict[str, str]) -> None:
    """Atomically write the network as a kohya .safetensors (float32 tensors, the ss_* metadata)."""
    tensors = {k: v.detach().float().contiguous().cpu() for k, v in network.state_dict().items()}
    write_safetensors(tensors, path, metadata=metadata)


# --------------------------------------------------------------------------- measuring


def merged_pipeline(base_path: Path, network: LoRANetwork | None, device, dtype: torch.dtype) -> Pipeline:
    """The base model with the network merged into its weights, as a Pipeline (for samples and evaluation)."""
    config, parts = checkpoints.read_checkpoint(base_path)
    if network is not None:
        network.merge_into(parts)
    pipe = from_parts(config, parts, load_tokenizer(base_path, config), device, dtype, name=base_path.stem)
    pipe.source = base_path
    return pipe


def kind_prompts(kind: str, n: int, seed: int, size: str | None = None) -> list[tuple[str, Scene, int]]:
    """n one-object canonical prompts whose object is a `kind` ("a large red star on the left, ..."), with
    their scenes and image seeds, all derived from `seed`; `size` keeps only that size word."""
    rng = random.Random(f"latentforge-kind-prompts:{kind}:{seed}")
    found = []
    while len(found) < n:
        prompt, scene = grammar_prompts(rng, 0.0, (kind,))
        if size is None or scene.objects[0].size == size:
            found.append((prompt, scene, rng.randint(0, 2**32 - 1)))
    return found


def concept_share(pipe: Pipeline, prompts: list[tuple[str, Scene, int]], cfg_scale: float | None = None) -> dict:
    """How many of the prompts' images the judge reads as the asked kind ("kind"), and as the whole prompt
    ("all"), as shares; plus what was read instead (kind -> count)."""
    kind_hits = all_hits = 0
    read: dict[str, int] = {}
    for prompt, scene, seed in prompts:
        reading = judge_image(pipe.generate(prompt, seed=seed, cfg_scale=cfg_scale)[0])
        got = reading.objects[0].kind if reading.objects else "nothing"
        read[got] = read.get(got, 0) + 1
        kind_hits += got == scene.objects[0].kind
        all_hits += score(reading, scene)["all"]
    return {"kind": kind_hits / len(prompts), "all": all_hits / len(prompts), "read": read, "n": len(prompts)}


# --------------------------------------------------------------------------- the task


def open_lora_dataset(config: LoraTrainConfig) -> Any:
    """The training data: the shapes world with config.kinds, or a folder of captioned images."""
    if config.data == "shapes":
        return ShapesWorld(config.seed, config.image_size, config.two_objects_fraction, kinds=config.kinds)
    return CaptionFolder(config.data, config.image_size)


def lora_task(config: LoraTrainConfig, base: Base, ranks: int = 1) -> Task:
    """The LoRA trainer as a Task for the shared loop (over `ranks` processes): the network's weights are
    trained, the base frozen."""
    torch.manual_seed(config.seed)
    targets = lora_targets(base.unet, base.text_encoder if config.train_text_encoder else None)
    network = LoRANetwork(targets, config.rank, config.alpha)
    network.attach({name: module for name, (_, _, module) in targets.items()})
    for model in (base.unet, base.vae, base.text_encoder):
        model.requires_grad_(False)
    objective = LoRAObjective(network, base)
    side = config.image_size // base.vae.downscale
    latent = (base.config.unet.out_channels, side, side)

    def inputs(images: torch.Tensor, captions: list[str], draws: StepRandom) -> dict[str, torch.Tensor]:
        dropped = draws.uniform() < config.uncond_prob
        captions = ["" if drop else text for drop, text in zip(dropped.tolist(), captions)]
        return {
            "images": images,
            "ids": base.tokenizer(captions).to(images.device),
            "timesteps": draws.integers(SD_DEFAULT.num_train_timesteps),
            "noise": draws.normal(*latent),
            "eps": draws.normal(*latent),
        }

    prompts = kind_prompts(config.sample_kind, config.sample_count, config.seed) if config.sample_kind else []

    @torch.no_grad()
    def report(shown: nn.Module, path: Path) -> dict[str, float]:
        """The sample prompts drawn with the network merged into the base; the share judged as sample_kind."""
        if not prompts:
            return {}
        pipe = merged_pipeline(base.path, shown, torch.device("cpu"), torch.float32)
        images = [pipe.generate(p, seed=s)[0] for p, _, s in prompts]
        big = [image.resize((2 * image.width, 2 * image.height), Image.Resampling.NEAREST) for image in images]
        write_png(image_strip(big, [p for p, _, _ in prompts]), path)
        readings = [judge_image(image).objects for image in images]
        kinds = [objects[0].kind if objects else "" for objects in readings]
        return {f"{config.sample_kind}_share": kinds.count(config.sample_kind) / len(kinds)}

    def finish(trained: nn.Module, run_dir: Path) -> None:
        metadata = kohya_metadata(config, base, config.steps, time.time(), ranks)
        write_lora(trained, run_dir / f"{config.output_name}.safetensors", metadata)

    return Task(name="lora", model=network, objective=objective, inputs=inputs, report=report, finish=finish)


def train_lora(
    config: LoraTrainConfig, run_dir: str | Path, dist: Dist = SINGLE_PROCESS, resume: bool = False,
    dataset: Any = None, dtype: torch.dtype = torch.float32,
) -> Result:  # fmt: skip
    """Train a LoRA on config.base (the base model held in `dtype`) into run_dir; writes
    run_dir/<output_name>.safetensors (kohya format)."""
    run_dir = Path(run_dir)
    base = load_base(config.base, dist.device, dtype)
    if config.image_size % base.vae.downscale:
        raise ValueError(f"image_size {config.image_size} is not a multiple of the VAE's {base.vae.downscale}")
    stored = run_dir / CONFIG_FILE
    earlier = json.loads(stored.read_text(encoding="utf-8")).get("started_at") if resume and stored.is_file() else None
    started = earlier or config.started_at or time.time()  # kept on resume: when the run began
    base_path = run_relative(config.base, run_dir) if config.base else ""  # config.json keeps it run-relative
    config = dataclasses.replace(config, started_at=started, base=base_path)
    if dataset is None:
        dataset = open_lora_dataset(config)
    return train(lora_task(config, base, dist.world), config, run_dir, dataset, dist, resume)
