"""Training the KL autoencoder: reconstruction loss plus a small KL term, then the latent scale.

When training ends the latents of a few batches of data are measured and 1 / their standard deviation
becomes the exported VAEConfig's scaling_factor (Stable Diffusion's 0.18215 was found the same way),
so that the UNet trains on latents of unit variance.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..images import image_strip, tensor_to_images
from ..vae import AutoencoderKL, VAEConfig
from .configs import VAETrainConfig, run_relative
from .data import open_datasets, take
from .loop import (
    EXPORTS,
    SINGLE_PROCESS,
    Dist,
    Finish,
    Report,
    Result,
    StepRandom,
    Task,
    read_part,
    stack_rows,
    train,
    write_part,
    write_png,
)


def reparameterise(mean: torch.Tensor, logvar: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """A posterior sample mean + std * eps with the noise given; all (B, z, h, w)."""
    return mean + torch.exp(0.5 * logvar) * eps


def kl_per_sample(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, exp(logvar)) || N(0, 1)) summed over latents: (B, z, h, w) -> (B,)."""
    return 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).flatten(1).sum(1)


class VAEObjective(nn.Module):
    """Images (B, 3, H, W) and posterior noise (B, z, h, w) -> reconstruction + kl_weight * KL, per pixel."""

    def __init__(self, vae: AutoencoderKL, recon_loss: str, kl_weight: float) -> None:
        super().__init__()
        self.vae = vae
        self.recon = F.l1_loss if recon_loss == "l1" else F.mse_loss
        self.kl_weight = kl_weight

    def forward(self, images: torch.Tensor, eps: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """-> (loss (), {"recon": (), "kl": ()}); the KL is per sample, divided by the pixels like the recon."""
        mean, logvar = self.vae.encode(images)
        decoded = self.vae.decode(reparameterise(mean, logvar, eps))
        recon = self.recon(decoded, images)
        kl = kl_per_sample(mean, logvar).mean()
        loss = recon + self.kl_weight * kl / images[0].numel()
        return loss, {"recon": recon.detach(), "kl": kl.detach()}


@torch.no_grad()
def measure_scaling_factor(vae: AutoencoderKL, images: torch.Tensor, batch: int, seed: int) -> float:
    """1 / std of posterior samples of the images' latents (images (N, 3, H, W))."""
    generator = torch.Generator().manual_seed(seed)
    device = next(vae.parameters()).device
    samples = []
    for chunk in images.split(batch):
        mean, logvar = vae.encode(chunk.to(device))
        eps = torch.randn(mean.shape, generator=generator).to(device)
        samples.append(reparameterise(mean, logvar, eps).flatten().cpu())
    return float(1.0 / torch.cat(samples).std())


def _report(heldout: torch.Tensor) -> Report:
    """Held-out images over their reconstructions (posterior means), and the held-out L1 error."""

    @torch.no_grad()
    def report(vae: nn.Module, path: Path) -> dict[str, float]:
        images = heldout.to(next(vae.parameters()).device)
        decoded = vae.decode(vae.encode(images)[0]).clamp(-1, 1)
        rows = [image_strip(tensor_to_images(x.float().cpu())) for x in (images, decoded)]
        write_png(stack_rows(rows), path)
        return {"heldout_l1": float((decoded - images).abs().mean())}

    return report


def _finish(config: VAETrainConfig, scale_images: torch.Tensor, kept_scale: float | None) -> Finish:
    """Measure the latent scale on the data (or keep the frozen encoder's) and export the VAE with it."""

    def finish(vae: nn.Module, run_dir: Path) -> None:
        scale = kept_scale or measure_scaling_factor(vae, scale_images, config.batch_size, config.seed)
        exported = dataclasses.replace(vae.config, scaling_factor=scale)
        write_part(vae, exported, "vae", run_dir / EXPORTS["vae"])

    return finish


def start_from(vae: AutoencoderKL, config: VAETrainConfig, init: tuple[VAEConfig, dict]) -> float | None:
    """Load the init part (config, tensors) into vae; freeze the encoder side unless config.train_encoder.
    Returns the init's scaling_factor when the encoder is frozen (the latent space, hence its scale, is kept)."""
    init_config, tensors = init
    if dataclasses.replace(init_config, scaling_factor=vae.config.scaling_factor) != vae.config:
        raise ValueError(f"init {config.init}: its VAE config {init_config} differs from this run's model {vae.config}")
    vae.load_state_dict(tensors, strict=True)
    if config.train_encoder:
        return None
    vae.encoder.requires_grad_(False)
    vae.quant_conv.requires_grad_(False)
    return init_config.scaling_factor


def vae_task(config: VAETrainConfig, heldout: Any, init: tuple[VAEConfig, dict] | None = None) -> Task:
    """The VAE trainer as a Task for the shared loop (model initialised from config.seed, or from init:
    the (config, tensors) of config.init)."""
    torch.manual_seed(config.seed)
    vae, kept_scale = AutoencoderKL(config.model), None
    if init is not None:
        kept_scale = start_from(vae, config, init)
    latent = (config.model.latent_channels, config.image_size // vae.downscale, config.image_size // vae.downscale)
    scale_images = take(heldout, config.scale_batches * config.batch_size)[0]

    def inputs(images: torch.Tensor, captions: list[str], draws: StepRandom) -> dict[str, torch.Tensor]:
        return {"images": images, "eps": draws.normal(*latent)}

    return Task(
        name="vae",
        model=vae,
        objective=VAEObjective(vae, config.recon_loss, config.kl_weight),
        inputs=inputs,
        report=_report(scale_images[: config.sample_count]),
        finish=_finish(config, scale_images, kept_scale),
    )


def train_vae(
    config: VAETrainConfig, run_dir: str | Path, dist: Dist = SINGLE_PROCESS, resume: bool = False, dataset: Any = None,
    heldout: Any = None,
) -> Result:  # fmt: skip
    """Train a VAE into run_dir; at the end run_dir/vae.safetensors holds it with its measured scaling_factor."""
    init = None
    if config.init:  # read now; the run's config.json keeps the path relative to the run folder
        init = read_part(config.init, "vae")
        config = dataclasses.replace(config, init=run_relative(config.init, run_dir))
    dataset, heldout = open_datasets(config, dataset, heldout)
    return train(vae_task(config, heldout, init), config, run_dir, dataset, dist, resume)

