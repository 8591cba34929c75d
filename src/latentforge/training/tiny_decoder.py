"""Distilling a tiny decoder (TAESD) from a model's full VAE decoder (`latentforge train tiny-decoder`).

The data's images are encoded by the model's frozen VAE encoder (the posterior mean); the full decoder's image
of those latents, clamped to [-1, 1] as every image is, is the target, and the tiny decoder reads the same
latents times the model's scaling_factor (the UNet's latents, which is what it decodes in use). The loss is
L1 + mse_weight * MSE per pixel. The loop (checkpoints, exact resume, torchrun) is the one every trainer uses;
the run ends with RUN/tiny_decoder.safetensors in madebyollin's taesd_decoder names.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .. import checkpoints
from ..images import image_strip, tensor_to_images
from ..pipeline import build, default_model_path
from ..tiny_decoder import TinyDecoder, write_tiny_decoder
from ..vae import AutoencoderKL
from .configs import TinyDecoderTrainConfig, run_relative
from .data import open_datasets, take
from .loop import SINGLE_PROCESS, Dist, Report, Result, StepRandom, Task, stack_rows, train, write_png

EXPORT = "tiny_decoder.safetensors"


def load_vae(path: str | Path = "", device: torch.device | str = "cpu") -> AutoencoderKL:
    """The frozen float32 VAE of the model at `path` ("" = the shipped one); its config is .config."""
    path = Path(path) if path else default_model_path()
    if not path.exists():
        raise ValueError(f"--base {path}: no such file or folder; give a checkpoint file or diffusers folder")
    config, parts = checkpoints.read_checkpoint(path)
    return build(AutoencoderKL, config.vae, parts.pop("vae"), device, torch.float32)


@torch.no_grad()
def teacher(vae: AutoencoderKL, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (B, 3, H, W) -> (the UNet's latents (B, C, h, w): posterior mean * scaling_factor, the full
    decoder's image of them (B, 3, H, W), clamped to [-1, 1])."""
    mean = vae.encode(images)[0]
    return mean * vae.config.scaling_factor, vae.decode(mean).clamp(-1, 1)


def pixel_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean absolute difference of two image batches (B, 3, H, W) in [-1, 1], as 8-bit images (0-255 scale)."""
    quantised = [((x.float() * 0.5 + 0.5).clamp(0, 1) * 255).round() for x in (a, b)]
    return float((quantised[0] - quantised[1]).abs().mean())


class TinyDecoderObjective(nn.Module):
    """Images (B, 3, H, W) -> L1 + mse_weight * MSE between the tiny and the full decoder's images."""

    def __init__(self, decoder: TinyDecoder, vae: AutoencoderKL, mse_weight: float) -> None:
        super().__init__()
        self.decoder = decoder  # the only trained weights
        self.vae = vae
        self.mse_weight = mse_weight

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """-> (loss (), {"l1": (), "mse": ()})."""
        latents, target = teacher(self.vae, images)
        decoded = self.decoder(latents)
        l1, mse = F.l1_loss(decoded, target), F.mse_loss(decoded, target)
        return l1 + self.mse_weight * mse, {"l1": l1.detach(), "mse": mse.detach()}


def _report(vae: AutoencoderKL, heldout: torch.Tensor, shown: int) -> Report:
    """Held-out images over the full and the tiny decoder's images; the mean per-pixel difference (0-255)."""

    @torch.no_grad()
    def report(decoder: nn.Module, path: Path) -> dict[str, float]:
        device = next(decoder.parameters()).device
        full, tiny = [], []
        for chunk in heldout.to(device).split(16):
            latents, target = teacher(vae, chunk)
            full.append(target)
            tiny.append(decoder(latents))
        full, tiny = torch.cat(full), torch.cat(tiny)
        rows = [image_strip(tensor_to_images(x[:shown].float().cpu())) for x in (heldout, full, tiny.clamp(-1, 1))]
        write_png(stack_rows(rows), path)
        return {
            "heldout_pixel_difference": pixel_difference(tiny, full),
            "heldout_l1": float((tiny - full).abs().mean()),
        }

    return report


def tiny_decoder_task(config: TinyDecoderTrainConfig, vae: AutoencoderKL, heldout: Any) -> Task:
    """The tiny-decoder trainer as a Task for the shared loop: the decoder initialised from config.seed and
    trained, the VAE frozen."""
    torch.manual_seed(config.seed)
    decoder = TinyDecoder(config.model)
    vae.requires_grad_(False)
    images = take(heldout, max(config.heldout_count, config.sample_count))[0]

    def inputs(images: torch.Tensor, captions: list[str], draws: StepRandom) -> dict[str, torch.Tensor]:
        return {"images": images}

    def finish(trained: nn.Module, run_dir: Path) -> None:
        write_tiny_decoder(trained, run_dir / EXPORT)

    return Task(
        name="tiny-decoder",
        model=decoder,
        objective=TinyDecoderObjective(decoder, vae, config.mse_weight),
        inputs=inputs,
        report=_report(vae, images[: config.heldout_count], config.sample_count),
        finish=finish,
    )


def train_tiny_decoder(
    config: TinyDecoderTrainConfig, run_dir: str | Path, dist: Dist = SINGLE_PROCESS, resume: bool = False,
    dataset: Any = None, heldout: Any = None,
) -> Result:  # fmt: skip
    """Distil a tiny decoder from config.base's VAE into run_dir; writes run_dir/tiny_decoder.safetensors."""
    vae = load_vae(config.base, dist.device)
    if config.image_size % vae.downscale:
        raise ValueError(f"image_size {config.image_size} is not a multiple of the VAE's {vae.downscale}")
    if vae.downscale != config.model.upscale:
        raise ValueError(f"the tiny decoder upscales {config.model.upscale}x; this model's VAE {vae.downscale}x")
    model = dataclasses.replace(config.model, latent_channels=vae.config.latent_channels)
    base = run_relative(config.base, run_dir) if config.base else ""  # config.json keeps it run-relative
    config = dataclasses.replace(config, model=model, base=base)
    dataset, heldout = open_datasets(config, dataset, heldout)
    return train(tiny_decoder_task(config, vae, heldout), config, run_dir, dataset, dist, resume)
