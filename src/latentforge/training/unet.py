"""Training the UNet to predict noise on VAE latents, conditioned on a frozen text encoder.

Latents are posterior samples of the trained VAE times its measured scaling_factor, noised with Stable
Diffusion's schedule (SD_DEFAULT's alphas_cumprod) at uniformly drawn timesteps; the context is the
frozen text encoder's last layer after its final norm, exactly what the Pipeline feeds the UNet; a
caption is replaced by "" with probability uncond_prob so that classifier-free guidance works. The
samples are drawn by latentforge's own Pipeline with the EMA weights, and `assemble` puts the EMA
UNet, the VAE and the text encoder together into a model that checkpoints.write_single_file writes.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from ..checkpoints import Parts
from ..config import ModelConfig, SamplingDefaults
from ..images import image_strip
from ..inference import set_inference
from ..pipeline import Pipeline, from_parts
from ..samplers import get_sampler
from ..schedules import SD_DEFAULT
from ..text_encoder import TextEncoder
from ..tokenizer import Tokenizer
from ..unet import UNet
from ..vae import AutoencoderKL
from .clip import train_clip
from .configs import (
    CONFIG_FILE,
    TrainConfig,
    UNetTrainConfig,
    load_run_config,
    run_relative,
)
from .data import open_datasets, take
from .loop import (
    EXPORTS,
    SINGLE_PROCESS,
    Dist,
    Report,
    Result,
    StepRandom,
    Task,
    load_part,
    read_part,
    stack_rows,
    train,
    write_part,
    write_png,
)  # fmt: skip
from .vae import reparameterise, train_vae

HELDOUT_LOSS_SAMPLES = 32  # held-out images whose denoising loss each report measures


class DiffusionObjective(nn.Module):
    """Images (b, 3, H, W) and ids (b, 77) -> epsilon-prediction MSE; the VAE and text encoder stay frozen."""

    def __init__(self, unet: UNet, vae: AutoencoderKL, text_encoder: TextEncoder) -> None:
        super().__init__()
        self.unet, self.vae, self.text_encoder = unet, vae, text_encoder
        self.register_buffer("alphas_cumprod", SD_DEFAULT.alphas_cumprod.clone(), persistent=False)

    @torch.no_grad()
    def condition(self, images: torch.Tensor, ids: torch.Tensor, eps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(scaled latents (b, 4, h, w) from posterior noise eps, text context (b, 77, width))."""
        mean, logvar = self.vae.encode(images)
        latents = reparameterise(mean, logvar, eps) * self.vae.config.scaling_factor
        return latents, self.text_encoder(ids)

    def denoising_loss(
        self, latents: torch.Tensor, context: torch.Tensor, timesteps: torch.Tensor, noise: torch.Tensor, unet: nn.Module
    ) -> torch.Tensor:
        """MSE between the noise and unet's prediction of it from the latents noised to `timesteps` (b,)."""
        alpha = self.alphas_cumprod[timesteps].view(-1, 1, 1, 1)
        noisy = alpha.sqrt() * latents + (1 - alpha).sqrt() * noise
        return F.mse_loss(unet(noisy, timesteps, context), noise)

    def forward(
        self, images: torch.Tensor, ids: torch.Tensor, timesteps: torch.Tensor, noise: torch.Tensor, eps: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """-> (loss (), {}): noise and eps (b, 4, h, w), timesteps (b,) int64."""
        latents, context = self.condition(images, ids, eps)
        return self.denoising_loss(latents, context, timesteps, noise, self.unet), {}


def sample_grid(pipe: Pipeline, prompts: list[str], config: UNetTrainConfig) -> Image.Image:
    """One row per prompt of config.sample_seeds images (seeds seed, seed + 1, ...), shown at twice their size."""
    size = config.image_size
    rows = []
    for prompt in prompts:
        drawn = pipe.generate(
            prompt, steps=config.sample_steps, sampler=config.sample_sampler, cfg_scale=config.sample_cfg_scale,
            seed=config.seed, width=size, height=size, batch_size=config.sample_seeds,
        )  # fmt: skip
        big = [image.resize((2 * size, 2 * size), Image.Resampling.NEAREST) for image in drawn]
        rows.append(image_strip(big, [prompt] + [""] * (len(big) - 1)))
    return stack_rows(rows)


def _report(config: UNetTrainConfig, objective: DiffusionObjective, heldout: Any, tokenizer: Tokenizer) -> Report:
    """Samples drawn by the Pipeline with the shown (EMA) weights, and the denoising loss of fixed held-out draws."""
    prompts = take(heldout, config.sample_count)[1]
    images, captions = take(heldout, HELDOUT_LOSS_SAMPLES)
    g = torch.Generator().manual_seed(config.seed)
    latent = (config.model.out_channels, config.model.sample_size, config.model.sample_size)
    ids = tokenizer(captions)
    timesteps = torch.randint(SD_DEFAULT.num_train_timesteps, (len(captions),), generator=g)
    noise, eps = torch.randn((len(captions), *latent), generator=g), torch.randn((len(captions), *latent), generator=g)
    vae, text_encoder = objective.vae, objective.text_encoder

    @torch.no_grad()
    def report(unet: nn.Module, path: Path) -> dict[str, float]:
        device = next(unet.parameters()).device
        latents, context = objective.condition(images.to(device), ids.to(device), eps.to(device))
        loss = float(objective.denoising_loss(latents, context, timesteps.to(device), noise.to(device), unet))
        model = ModelConfig(unet=unet.config, vae=vae.config, text_encoder=text_encoder.config)
        parts = {"unet": unet.state_dict(), "vae": vae.state_dict(), "text_encoder": text_encoder.state_dict()}
        write_png(sample_grid(from_parts(model, parts, tokenizer, device, torch.float32), prompts, config), path)
        return {"heldout_loss": loss}

    return report


def unet_task(
    config: UNetTrainConfig, vae: AutoencoderKL, text_encoder: TextEncoder, heldout: Any, init: tuple | None = None
) -> Task:
    """The UNet trainer as a Task for the shared loop; config.model must already fit the VAE and text
    encoder. The UNet starts from config.seed, or from init: the (config, tensors) of config.init."""
    tokenizer = Tokenizer(max_length=text_encoder.config.max_length)
    torch.manual_seed(config.seed)
    unet = UNet(config.model)
    if init is not None:
        if init[0] != config.model:
            raise ValueError(f"init {config.init}: its UNet config {init[0]} differs from this run's {config.model}")
        unet.load_state_dict(init[1], strict=True)
    objective = DiffusionObjective(unet, vae, text_encoder)
    latent = (config.model.out_channels, config.model.sample_size, config.model.sample_size)

    def inputs(images: torch.Tensor, captions: list[str], draws: StepRandom) -> dict[str, torch.Tensor]:
        dropped = draws.uniform() < config.uncond_prob
        captions = ["" if drop else text for drop, text in zip(dropped.tolist(), captions)]
        return {
            "images": images,
            "ids": tokenizer(captions).to(images.device),
            "timesteps": draws.integers(SD_DEFAULT.num_train_timesteps),
            "noise": draws.normal(*latent),
            "eps": draws.normal(*latent),
        }

    def finish(trained: nn.Module, run_dir: Path) -> None:
        write_part(trained, config.model, "unet", run_dir / EXPORTS["unet"])

    return Task(
        name="unet",
        model=unet,
        objective=objective,
        inputs=inputs,
        report=_report(config, objective, heldout, tokenizer),
        finish=finish,
    )


def fit_to_parts(config: UNetTrainConfig, vae: AutoencoderKL, text_encoder: TextEncoder) -> UNetTrainConfig:
    """The config with the UNet's context_dim, channels and sample_size taken from the text encoder and VAE."""
    if config.image_size % vae.downscale:
        raise ValueError(f"image_size {config.image_size} is not a multiple of the VAE's downscale {vae.downscale}")
    z = vae.config.latent_channels
    model = dataclasses.replace(
        config.model, context_dim=text_encoder.config.width, in_channels=z, out_channels=z,
        sample_size=config.image_size // vae.downscale,
    )  # fmt: skip
    return dataclasses.replace(config, model=model)


def train_unet(
    config: UNetTrainConfig, run_dir: str | Path, dist: Dist = SINGLE_PROCESS, resume: bool = False, dataset: Any = None,
    heldout: Any = None,
) -> Result:  # fmt: skip
    """Train a UNet into run_dir on config.vae / config.text_encoder (run folders or exported files)."""
    run_dir = Path(run_dir)
    if not config.vae or not config.text_encoder:
        raise ValueError("the UNet trainer needs --vae (a VAE run or file) and --text-encoder (a CLIP run or file)")
    # frozen and only ever run: their inference fast paths apply
    vae = set_inference(load_part(config.vae, "vae"))
    text_encoder = set_inference(load_part(config.text_encoder, "text_encoder"))
    config = fit_to_parts(config, vae, text_encoder)
    init = read_part(config.init, "unet") if config.init else None  # run folder: its exported EMA weights
    stored = {"vae": run_relative(config.vae, run_dir), "text_encoder": run_relative(config.text_encoder, run_dir)}
    if config.init:
        stored["init"] = run_relative(config.init, run_dir)
    config = dataclasses.replace(config, **stored)
    dataset, heldout = open_datasets(config, dataset, heldout)
    return train(unet_task(config, vae, text_encoder, heldout, init), config, run_dir, dataset, dist, resume)


def train_all(
    run_dir: str | Path, configs: dict[str, TrainConfig], dist: Dist = SINGLE_PROCESS, resume: bool = False
) -> dict[str, Result]:
    """VAE, then CLIP, then the UNet on those two, in run_dir/vae, run_dir/clip and run_dir/unet."""
    root = Path(run_dir)
    results = {
        "vae": train_vae(configs["vae"], root / "vae", dist, resume),
        "clip": train_clip(configs["clip"], root / "clip", dist, resume),
    }
    unet_config = dataclasses.replace(configs["unet"], vae=str(root / "vae"), text_encoder=str(root / "clip"))
    results["unet"] = train_unet(unet_config, root / "unet", dist, resume)
    return results


def same_encoder(trained_on: tuple, other: tuple, name: str | Path) -> tuple:
    """`other` (config, tensors), after checking that it encodes exactly as the VAE the UNet trained on."""
    encoder = [k for k in trained_on[1] if k.startswith(("encoder.", "quant_conv."))]
    same = trained_on[0].scaling_factor == other[0].scaling_factor and all(
        k in other[1] and torch.equal(trained_on[1][k], other[1][k]) for k in encoder
    )
    if not same:
        raise ValueError(f"{name}: its encoder differs from the one the UNet was trained on; only a VAE "
                         "fine-tuned with train_encoder false (same encoder, new decoder) can replace it")  # fmt: skip
    return other


def assemble(run_dir: str | Path, vae: str | Path | None = None, **defaults: Any) -> tuple[ModelConfig, Parts, Tokenizer]:
    """The full model of a finished run: EMA UNet, VAE and text encoder, and the default Tokenizer.

    run_dir is a `train all` folder or a UNet run folder; the VAE and text encoder are the ones its
    config.json names, or `vae`: a VAE with the same encoder and a retrained decoder (a `train vae`
    run with train_encoder false). The model's sampling defaults (sampler, steps, cfg_scale) are those given, the
    rest the run's sample settings.
    The result goes straight to checkpoints.write_single_file."""
    root = Path(run_dir)
    unet_run = root / "unet" if (root / "unet" / CONFIG_FILE).is_file() else root
    if not (unet_run / CONFIG_FILE).is_file():
        raise ValueError(f"{root}: neither a `train all` folder nor a UNet run folder (no {CONFIG_FILE})")
    config = load_run_config("unet", unet_run)
    unet_config, unet = read_part(unet_run, "unet")
    vae_config, vae_tensors = read_part(config.vae, "vae")
    if vae is not None:
        vae_config, vae_tensors = same_encoder((vae_config, vae_tensors), read_part(vae, "vae"), vae)
    text_config, text = read_part(config.text_encoder, "text_encoder")
    run_defaults = {"sampler": config.sample_sampler, "steps": config.sample_steps, "cfg_scale": config.sample_cfg_scale}
    sampling = SamplingDefaults(**(run_defaults | {k: v for k, v in defaults.items() if v is not None}))
    get_sampler(sampling.sampler)  # an unknown name fails here, listing the known ones
    model = ModelConfig(unet=unet_config, vae=vae_config, text_encoder=text_config, defaults=sampling)
    return model, {"unet": unet, "vae": vae_tensors, "text_encoder": text}, Tokenizer(max_length=text_config.max_length)

