"""The tiny autoencoder decoder (TAESD): a small all-convolution network that turns a UNet's latents into an
image much faster than the full VAE decoder, at some cost in detail.

The architecture is madebyollin's TAESD decoder, the same as diffusers' `AutoencoderTiny` decoder:

    tanh(x / 3) * 3 -> conv3x3(C, W) -> ReLU -> blocks[0] x Block
    -> for each later stage: 2x nearest upsample -> conv3x3(W, W, no bias) -> blocks[i] x Block
    -> conv3x3(W, 3)

with Block(x) = ReLU(conv3x3 -> ReLU -> conv3x3 -> ReLU -> conv3x3 (x) + x). TAESD itself has W = 64,
blocks (3, 3, 3, 1), three upsamplings (8x) and outputs images in [0, 1]; `TinyDecoder` returns them in
[-1, 1], as `AutoencoderKL.decode` does. Unlike the full decoder it reads the UNet's latents as they are
(already multiplied by the model's scaling_factor).

`TinyDecoder` is an nn.Sequential whose state dict is, key for key, madebyollin's `taesd_decoder` file
(index 0 is the clamp, which has no weights; `1.weight`, `3.conv.0.weight`, ...). `read_tiny_decoder`
reads that file (.safetensors or .pth), a diffusers AutoencoderTiny folder or its weights file
(`decoder.layers.N.*`, N one less: diffusers' clamp is no layer; the `encoder.*` weights are left out);
`write_tiny_decoder` writes madebyollin's names, so other tools read our files too.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .checkpoints import _diffusers_weights, _read_json
from .weightfiles import CheckpointError, check_weights_of, read_state_dict, write_safetensors

Tensors = dict[str, torch.Tensor]

FIX = "pass a TAESD decoder: taesd_decoder.safetensors / .pth or a diffusers AutoencoderTiny folder"
DIFFUSERS_PREFIX = "decoder.layers."
# diffusers AutoencoderTiny config values that decide the decoder's arithmetic: only TAESD's are supported
DIFFUSERS_SETTINGS = {"act_fn": "relu", "upsample_fn": "nearest", "upsampling_scaling_factor": 2}


@dataclass(frozen=True)
class TinyDecoderConfig:
    """Shape of a TAESD decoder; the defaults are TAESD's own (SD 1.x/2.x and SDXL latents)."""

    latent_channels: int = 4  # C of the latents it reads
    width: int = 64  # channels of every hidden layer
    blocks: tuple[int, ...] = (3, 3, 3, 1)  # Blocks per stage; a 2x upsampling between stages
    out_channels: int = 3

    def __post_init__(self) -> None:
        """Normalise blocks to a tuple; reject shapes the network cannot be built with."""
        object.__setattr__(self, "blocks", tuple(self.blocks))
        for name in ("latent_channels", "width", "out_channels"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not self.blocks or any(isinstance(b, bool) or not isinstance(b, int) or b < 0 for b in self.blocks):
            raise ValueError(f"blocks must be a non-empty sequence of ints >= 0 such as (3, 3, 3, 1), "
                             f"got {self.blocks!r}")  # fmt: skip

    @property
    def upscale(self) -> int:
        """Images are this many times larger than latents: 2 ** (stages - 1)."""
        return 2 ** (len(self.blocks) - 1)


TAESD = TinyDecoderConfig()


class Clamp(nn.Module):
    """Soft clamp of the latents to (-3, 3): tanh(x / 3) * 3."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) -> (B, C, h, w)."""
        return torch.tanh(x / 3) * 3


class Block(nn.Module):
    """Residual block of three 3x3 convolutions: (B, in, H, W) -> (B, out, H, W)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = nn.Sequential(
            _conv(in_channels, out_channels), nn.ReLU(),
            _conv(out_channels, out_channels), nn.ReLU(),
            _conv(out_channels, out_channels),
        )  # fmt: skip
        # TAESD has a (bias-free 1x1) projection only when the width changes; keys must match
        same = in_channels == out_channels
        self.skip = nn.Identity() if same else nn.Conv2d(in_channels, out_channels, 1, bias=False)
        self.fuse = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in, H, W) -> (B, out, H, W)."""
        return self.fuse(self.conv(x) + self.skip(x))


def _conv(in_channels: int, out_channels: int, bias: bool = True) -> nn.Conv2d:
    """3x3 convolution that keeps H and W."""
    return nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=bias)


def _layers(config: TinyDecoderConfig) -> list[nn.Module]:
    """TAESD's decoder as a flat list; its indices are the state dict's (index 0, the clamp, has no weights)."""
    width = config.width
    layers: list[nn.Module] = [Clamp(), _conv(config.latent_channels, width), nn.ReLU()]
    for stage, count in enumerate(config.blocks):
        if stage:
            layers += [nn.Upsample(scale_factor=2, mode="nearest"), _conv(width, width, bias=False)]
        layers += [Block(width, width) for _ in range(count)]
    return [*layers, _conv(width, config.out_channels)]


class TinyDecoder(nn.Sequential):
    """TAESD decoder: scaled latents (B, C, h, w) -> images (B, 3, h * upscale, w * upscale) in [-1, 1]."""

    def __init__(self, config: TinyDecoderConfig = TAESD) -> None:
        super().__init__(*_layers(config))
        self.config = config

    @property
    def upscale(self) -> int:
        """Images are this many times larger than latents (8 for TAESD)."""
        return self.config.upscale

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents as the sampler leaves them (B, C, h, w) -> images (B, 3, H, W) in [-1, 1] (not clamped)."""
        if latents.ndim != 4 or latents.shape[1] != self.config.latent_channels:
            raise ValueError(
                f"the tiny decoder reads latents (B, {self.config.latent_channels}, h, w), got {tuple(latents.shape)}"
            )
        return super().forward(latents) * 2 - 1  # TAESD's [0, 1] -> [-1, 1]


# --------------------------------------------------------------------------- files


def read_tiny_decoder(
    path: str | os.PathLike, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> TinyDecoder:
    """A TAESD decoder file or diffusers AutoencoderTiny folder -> a frozen TinyDecoder in eval mode, its config
    inferred from the tensors; any missing, unexpected, misshapen or non-finite weight is a one-line
    CheckpointError (a ValueError) naming the file."""
    path = Path(path)
    if path.is_dir():
        tensors, name = _read_folder(path)
    elif path.exists():
        tensors, name = _taesd_names(read_state_dict(path)[0], path), path
    else:
        raise CheckpointError(path, "no such file or folder", FIX)
    config = infer_config(tensors, name)
    check_weights_of(lambda: TinyDecoder(config), tensors, name, "TAESD", FIX)
    with torch.device("meta"):
        decoder = TinyDecoder(config)
    weights = {k: v.to(device=device, dtype=dtype) for k, v in tensors.items()}
    decoder.load_state_dict(weights, strict=True, assign=True)
    return decoder.eval().requires_grad_(False)


def write_tiny_decoder(decoder: TinyDecoder, path: str | os.PathLike, dtype: torch.dtype | None = None) -> None:
    """Atomically write the decoder as .safetensors in madebyollin's taesd_decoder names (in `dtype`, if given)."""
    tensors = {
        k: v.detach().to(dtype=dtype or v.dtype).contiguous().cpu() for k, v in decoder.state_dict().items()
    }
    write_safetensors(tensors, path, metadata={"format": "pt"})


def _read_folder(root: Path) -> tuple[Tensors, Path]:
    """A diffusers AutoencoderTiny folder (or a model folder's vae/): its decoder in TAESD names."""
    folder = root if (root / "config.json").is_file() else root / "vae"
    if not (folder / "config.json").is_file():
        raise CheckpointError(root, "a folder without config.json or vae/config.json", FIX)
    settings = _read_json(folder / "config.json")
    for key, expected in DIFFUSERS_SETTINGS.items():
        if settings.get(key, expected) != expected:
            raise CheckpointError(folder / "config.json", f"{key} is {settings[key]!r}; TAESD uses {expected!r}", FIX)
    return _taesd_names(_diffusers_weights(folder, "vae"), folder), folder


def _taesd_names(tensors: Tensors, name: Path) -> Tensors:
    """A file's tensors in madebyollin's names: diffusers' `decoder.layers.N.*` become `(N+1).*` and its
    `encoder.*` are left out; madebyollin's names are kept. Anything else is an error saying what the file is."""
    if not tensors:
        raise CheckpointError(name, "not a TAESD decoder: the file holds no weights", FIX)
    if any(k.startswith(DIFFUSERS_PREFIX) for k in tensors):
        renamed = {}
        for key, value in tensors.items():
            if key.startswith(DIFFUSERS_PREFIX):
                index, _, rest = key.removeprefix(DIFFUSERS_PREFIX).partition(".")
                if not index.isdigit():
                    raise CheckpointError(name, f"unexpected weight {key!r} in a TAESD decoder", FIX)
                renamed[f"{int(index) + 1}.{rest}"] = value
            elif not key.startswith("encoder."):
                raise CheckpointError(name, f"unexpected weight {key!r} beside the decoder.layers.* weights", FIX)
        return renamed
    if "1.weight" not in tensors:
        raise CheckpointError(name, f"not a TAESD decoder: {_looks_like(tensors)}", FIX)
    return dict(tensors)


def _looks_like(tensors: Tensors) -> str:
    """What a file that is no TAESD decoder holds, by its key names."""
    keys = list(tensors)
    if "0.weight" in tensors:
        return "it looks like a TAESD encoder (0.weight, the first convolution), not the decoder"
    if any(k.startswith(("decoder.conv_in.", "decoder.up.", "decoder.up_blocks.", "first_stage_model.")) for k in keys):
        return "it looks like a full Stable Diffusion VAE (KL autoencoder), not a tiny one"
    return f"no 1.weight or decoder.layers.* weights (its first weight is {keys[0]!r})"


def infer_config(tensors: Tensors, name: str | os.PathLike = "weights") -> TinyDecoderConfig:
    """The TinyDecoderConfig of TAESD-named weights: channels from the first and last convolutions, the
    Blocks of each stage counted by walking the layer indices (a Block's weights are `N.conv.*` / `N.skip.*`,
    a convolution's `N.weight`, an upsampling has none)."""
    kinds = _layer_kinds(tensors)
    first = _conv_weight(tensors, "1.weight", name)
    blocks, count, index = [], 0, 3
    while True:
        if kinds.get(index) == "block":
            count, index = count + 1, index + 1
        elif kinds.get(index) == "conv":  # the last convolution
            break
        elif kinds.get(index + 1) == "conv":  # an upsampling, then the stage's convolution
            blocks.append(count)
            count, index = 0, index + 2
        else:
            raise CheckpointError(name, f"TAESD weights stop at layer {index}: no {index}.weight or {index}.conv.*",
                                  FIX)  # fmt: skip
    last = _conv_weight(tensors, f"{index}.weight", name)
    try:
        return TinyDecoderConfig(first.shape[1], first.shape[0], (*blocks, count), last.shape[0])
    except ValueError as e:
        raise CheckpointError(name, str(e), FIX) from None


def _conv_weight(tensors: Tensors, key: str, name: str | os.PathLike) -> torch.Tensor:
    """The 4-d weight of a convolution whose shape the config is read from; missing or not 4-d is an error."""
    weight = tensors.get(key)
    if weight is None or weight.ndim != 4:
        got = "missing" if weight is None else f"shaped {tuple(weight.shape)}"
        raise CheckpointError(name, f"TAESD weight {key!r} (a convolution) is {got}", FIX)
    return weight


def _layer_kinds(tensors: Tensors) -> dict[int, str]:
    """Layer index -> "block" or "conv", from the TAESD names (keys that fit neither are left to the strict check)."""
    kinds = {}
    for key in tensors:
        index, _, rest = key.partition(".")
        if index.isdigit() and rest.startswith(("conv.", "skip.")):
            kinds[int(index)] = "block"
        elif index.isdigit() and rest in ("weight", "bias"):
            kinds.setdefault(int(index), "conv")
    return kinds


