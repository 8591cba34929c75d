"""A loaded Stable Diffusion model: tokenizer, text encoder, UNet and VAE, on one device and dtype."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from . import checkpoints
from .checkpoints import Parts
from .config import ModelConfig
from .text_encoder import TextEncoder
from .tokenizer import Tokenizer
from .unet import UNet
from .vae import AutoencoderKL

DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
}  # fmt: skip


@dataclass
class Pipeline:
    tokenizer: Tokenizer
    text_encoder: TextEncoder
    unet: UNet
    vae: AutoencoderKL
    config: ModelConfig
    device: torch.device
    dtype: torch.dtype
    name: str = ""

    @torch.no_grad()
    def encode_prompt(self, prompts: str | list[str], clip_skip: int = 1) -> torch.Tensor:
        """Prompts -> text vectors (B, 77, width) that the UNet's cross-attention reads."""
        ids = self.tokenizer(prompts).to(self.device)
        return self.text_encoder(ids, clip_skip=clip_skip)


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """'auto' is CUDA when there is a GPU, else the CPU."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except RuntimeError:
        raise ValueError(f"unknown device {device!r}; use 'auto', 'cpu', 'cuda' or 'cuda:N'") from None


def resolve_dtype(dtype: str | torch.dtype = "auto", device: torch.device = torch.device("cpu")) -> torch.dtype:
    """'auto' is float16 on CUDA and float32 on the CPU; names like 'bf16' are accepted."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use 'auto', 'float32', 'float16' or 'bfloat16'")
    return DTYPES[dtype]


def build(cls: type[nn.Module], config, tensors: dict[str, torch.Tensor], device, dtype) -> nn.Module:
    """Make a module on the meta device and adopt the tensors as its weights (emptying `tensors`):
    no random initialisation runs, and no second copy of the weights is made."""
    with torch.device("meta"):
        module = cls(config)
    weights = {}
    for key in list(tensors):  # pop as we go: a converted tensor never sits beside its source
        value = tensors.pop(key)
        weights[key] = value.to(device=device, dtype=dtype if value.is_floating_point() else value.dtype)
    module.load_state_dict(weights, strict=True, assign=True)
    return module.eval().requires_grad_(False)


def from_parts(
    config: ModelConfig, parts: Parts, tokenizer: Tokenizer, device: torch.device, dtype: torch.dtype, name: str = ""
) -> Pipeline:
    """Assemble a Pipeline from checked, our-named weights."""
    return Pipeline(
        tokenizer=tokenizer,
        text_encoder=build(TextEncoder, config.text_encoder, parts.pop("text_encoder"), device, dtype),
        unet=build(UNet, config.unet, parts.pop("unet"), device, dtype),
        vae=build(AutoencoderKL, config.vae, parts.pop("vae"), device, dtype),
        config=config,
        device=device,
        dtype=dtype,
        name=name,
    )


def load_tokenizer(path: str | os.PathLike, config: ModelConfig) -> Tokenizer:
    """The model's own tokenizer/ folder when it has one, else the shipped CLIP vocabulary."""
    folder = Path(path) / "tokenizer"
    if folder.is_dir():
        return Tokenizer.from_pretrained(folder)
    return Tokenizer(pad_token=config.pad_token, max_length=config.text_encoder.max_length)


def load(
    path: str | os.PathLike | None = None,
    dtype: str | torch.dtype = "auto",
    device: str | torch.device = "auto",
    prediction_type: str | None = None,
) -> Pipeline:
    """Load a Stable Diffusion 1.x/2.x model: a single .safetensors/.ckpt file or a diffusers folder.

    `prediction_type` ("epsilon" or "v_prediction") overrides what the checkpoint implies, for
    the files whose weights cannot tell."""
    if path is None:
        raise ValueError("no default model ships yet: pass the path of a checkpoint file or diffusers folder")
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    config, parts = checkpoints.read_checkpoint(path, prediction_type)
    tokenizer = load_tokenizer(path, config)
    return from_parts(config, parts, tokenizer, device, dtype, name=Path(path).stem)
