"""Stable Diffusion's KL autoencoder (VAE), with the original CompVis/LDM parameter names.

The state dict of :class:`AutoencoderKL` matches, key for key, what single-file Stable Diffusion
checkpoints store under ``first_stage_model.``, so those weights load without renaming.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .philox import normal

from .attention import attention
from .convolution import Conv2d

# The original model uses eps=1e-6 in every GroupNorm of the VAE (not PyTorch's default 1e-5).
GROUPNORM_EPS = 1e-6
# The original clamps logvar to this range so that exp(logvar) can neither overflow nor vanish.
LOGVAR_MIN = -30.0
LOGVAR_MAX = 20.0


def _check_positive_int(name: str, value: object) -> None:
    """Raise ValueError unless value is a positive int (bools rejected)."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


@dataclass(frozen=True)
class VAEConfig:
    """Hyper-parameters of the KL autoencoder; defaults are Stable Diffusion 1.x/2.x's."""

    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 4  # z channels (= embed_dim in ldm)
    base_channels: int = 128  # ldm "ch"
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    norm_groups: int = 32
    scaling_factor: float = 0.18215  # applied by the pipeline after encoding, not by this module

    def __post_init__(self) -> None:
        """Normalise channel_mult to a tuple and reject configurations the network cannot build."""
        if isinstance(self.channel_mult, Sequence) and not isinstance(self.channel_mult, str):
            # Frozen dataclass: a list from a JSON config would otherwise make the config unhashable.
            object.__setattr__(self, "channel_mult", tuple(self.channel_mult))
        else:
            raise ValueError(
                f"channel_mult must be a sequence of positive ints such as (1, 2, 4, 4), "
                f"got {self.channel_mult!r}"
            )
        for name in (
            "in_channels",
            "out_channels",
            "latent_channels",
            "base_channels",
            "num_res_blocks",
            "norm_groups",
        ):
            _check_positive_int(name, getattr(self, name))
        if not self.channel_mult:
            raise ValueError("channel_mult must have at least one level, e.g. (1, 2, 4, 4)")
        for index, mult in enumerate(self.channel_mult):
            _check_positive_int(f"channel_mult[{index}]", mult)
        bad = [c for c in (self.base_channels, *self.level_channels) if c % self.norm_groups]
        if bad:
            raise ValueError(
                f"every feature width must be divisible by norm_groups={self.norm_groups} "
                f"(GroupNorm splits channels into equal groups), but base_channels * channel_mult "
                f"gives {bad}; change base_channels, channel_mult or norm_groups"
            )
        if isinstance(self.scaling_factor, bool) or not isinstance(self.scaling_factor, int | float):
            raise ValueError(f"scaling_factor must be a number, got {self.scaling_factor!r}")
        if not (math.isfinite(self.scaling_factor) and self.scaling_factor > 0):
            raise ValueError(
                f"scaling_factor must be a finite positive number (SD uses 0.18215), "
                f"got {self.scaling_factor!r}"
            )

    @property
    def downscale(self) -> int:
        """Spatial reduction factor between images and latents: 2 ** (levels - 1)."""
        return 2 ** (len(self.channel_mult) - 1)

    @property
    def level_channels(self) -> tuple[int, ...]:
        """Feature width of each resolution level, highest resolution first."""
        return tuple(self.base_channels * mult for mult in self.channel_mult)


SD_VAE = VAEConfig()


def _group_norm(channels: int, groups: int) -> nn.GroupNorm:
    """GroupNorm with the VAE's eps over `channels` features."""
    return nn.GroupNorm(groups, channels, eps=GROUPNORM_EPS)


def _silu(x: torch.Tensor, inference: bool) -> torch.Tensor:
    """SiLU of a temporary (a GroupNorm's output), in place in inference (autograd would need the input): at
    512 x 512 each activation the decoder holds is 67-134 MB in bfloat16, and this is one fewer at a time."""
    return F.silu(x, inplace=inference)


class ResnetBlock(nn.Module):
    """Pre-activation residual block: (B, in, H, W) -> (B, out, H, W)."""

    inference = False  # activations and the residual sum in place when True (`inference.set_inference`)

    def __init__(self, in_channels: int, out_channels: int, groups: int) -> None:
        super().__init__()
        self.norm1 = _group_norm(in_channels, groups)
        self.conv1 = Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _group_norm(out_channels, groups)
        self.conv2 = Conv2d(out_channels, out_channels, 3, padding=1)
        # The original only has a (1x1) projection when the width changes; keys must match.
        self.nin_shortcut: nn.Conv2d | None = (
            nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in, H, W) -> (B, out, H, W)."""
        h = self.conv1(_silu(self.norm1(x), self.inference))
        h = self.conv2(_silu(self.norm2(h), self.inference))
        shortcut = x if self.nin_shortcut is None else self.nin_shortcut(x)
        return h.add_(shortcut) if self.inference else shortcut + h  # in place: as _silu


class AttnBlock(nn.Module):
    """Single-head self-attention over all H*W positions: (B, C, H, W) -> (B, C, H, W)."""

    def __init__(self, channels: int, groups: int) -> None:
        super().__init__()
        self.norm = _group_norm(channels, groups)
        # 1x1 convolutions (not Linear) because that is how the original stores these weights.
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, C, H, W)."""
        batch, channels, height, width = x.shape
        h = self.norm(x)
        # (B, C, H, W) -> (B, 1, H*W, C): one head whose dimension is all C channels,
        # so the default 1/sqrt(d) scale is the original's C ** -0.5.
        q, k, v = (
            proj(h).flatten(2).transpose(1, 2).unsqueeze(1) for proj in (self.q, self.k, self.v)
        )
        out = attention(q, k, v)
        out = out.squeeze(1).transpose(1, 2).reshape(batch, channels, height, width)
        return x + self.proj_out(out)


class MidBlock(nn.Module):
    """Resnet, attention, resnet at the lowest resolution: (B, C, h, w) -> (B, C, h, w)."""

    def __init__(self, channels: int, groups: int) -> None:
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, groups)
        self.attn_1 = AttnBlock(channels, groups)
        self.block_2 = ResnetBlock(channels, channels, groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) -> (B, C, h, w)."""
        return self.block_2(self.attn_1(self.block_1(x)))


class Downsample(nn.Module):
    """Strided 3x3 convolution halving the resolution: (B, C, H, W) -> (B, C, ceil(H/2), ceil(W/2))."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, C, H/2, W/2) for even H, W."""
        # The original pads only right and bottom (asymmetric); symmetric padding shifts the grid.
        return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0.0))


class Upsample(nn.Module):
    """Nearest-neighbour 2x then 3x3 convolution: (B, C, H, W) -> (B, C, 2H, 2W)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, C, 2H, 2W)."""
        return self.conv.upsampled(x)


def _resnet_stack(in_channels: int, out_channels: int, count: int, groups: int) -> nn.ModuleList:
    """`count` ResnetBlocks, the first changing width in -> out, the rest out -> out."""
    widths = [in_channels] + [out_channels] * count
    return nn.ModuleList(ResnetBlock(widths[j], out_channels, groups) for j in range(count))


def _run_layers(layers: list[nn.Module], x: torch.Tensor) -> torch.Tensor:
    """Apply layers in order, holding only the activation of the moment: each layer's input is freed as soon
    as that layer returns. (A level's own forward would keep the level's input, the largest tensor there,
    alive to the level's end: 1 GB in float32 at 1024 x 1024.) Pass x as a temporary, not a name the
    caller keeps."""
    for layer in layers:
        x = layer(x)
    return x


class EncoderLevel(nn.Module):
    """One encoder resolution: resnets, then optional downsampling; (B, in, H, W) -> (B, out, H', W').
    The Encoder runs its `layers()` itself (see _run_layers)."""

    def __init__(
        self, in_channels: int, out_channels: int, num_blocks: int, groups: int, downsample: bool
    ) -> None:
        super().__init__()
        self.block = _resnet_stack(in_channels, out_channels, num_blocks, groups)
        self.downsample: Downsample | None = Downsample(out_channels) if downsample else None

    def layers(self) -> list[nn.Module]:
        """Its resnets, then the downsampling (none at the lowest level)."""
        return [*self.block, *([self.downsample] if self.downsample is not None else [])]


class DecoderLevel(nn.Module):
    """One decoder resolution: resnets, then optional upsampling; (B, in, H, W) -> (B, out, H', W').
    The Decoder runs its `layers()` itself (see _run_layers)."""

    def __init__(
        self, in_channels: int, out_channels: int, num_blocks: int, groups: int, upsample: bool
    ) -> None:
        super().__init__()
        self.block = _resnet_stack(in_channels, out_channels, num_blocks, groups)
        self.upsample: Upsample | None = Upsample(out_channels) if upsample else None

    def layers(self) -> list[nn.Module]:
        """Its resnets, then the upsampling (none at full resolution)."""
        return [*self.block, *([self.upsample] if self.upsample is not None else [])]


class Encoder(nn.Module):
    """Image to latent moments: (B, in_channels, H, W) -> (B, 2 * latent_channels, H/f, W/f)."""

    inference = False  # the last activation in place when True (`inference.set_inference`)

    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        groups, widths = config.norm_groups, config.level_channels
        last = len(widths) - 1
        self.conv_in = Conv2d(config.in_channels, config.base_channels, 3, padding=1)
        # Level i widens from the previous level's width (base_channels before level 0).
        inputs = (config.base_channels, *widths[:-1])
        self.down = nn.ModuleList(
            EncoderLevel(inputs[i], widths[i], config.num_res_blocks, groups, downsample=i < last)
            for i in range(len(widths))
        )
        self.mid = MidBlock(widths[-1], groups)
        self.norm_out = _group_norm(widths[-1], groups)
        # Twice the latent channels: mean and log-variance of the diagonal Gaussian.
        self.conv_out = Conv2d(widths[-1], 2 * config.latent_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_channels, H, W) -> (B, 2 * latent_channels, H/f, W/f)."""
        layers = [layer for level in self.down for layer in level.layers()]
        h = _run_layers([*layers, self.mid], self.conv_in(x))
        return self.conv_out(_silu(self.norm_out(h), self.inference))


class Decoder(nn.Module):
    """Latents to image: (B, latent_channels, h, w) -> (B, out_channels, h*f, w*f)."""

    inference = False  # the last activation in place when True (`inference.set_inference`)

    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        groups, widths = config.norm_groups, config.level_channels
        self.conv_in = Conv2d(config.latent_channels, widths[-1], 3, padding=1)
        self.mid = MidBlock(widths[-1], groups)
        # up[i] is resolution level i (up[0] = full resolution), matching the original's keys;
        # it receives the width of level i + 1 because the decoder runs from the lowest level up.
        inputs = (*widths[1:], widths[-1])
        self.up = nn.ModuleList(
            DecoderLevel(inputs[i], widths[i], config.num_res_blocks + 1, groups, upsample=i > 0)
            for i in range(len(widths))
        )
        self.norm_out = _group_norm(widths[0], groups)
        self.conv_out = Conv2d(widths[0], config.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """(B, latent_channels, h, w) -> (B, out_channels, h*f, w*f)."""
        layers = [layer for level in reversed(self.up) for layer in level.layers()]
        h = _run_layers([self.mid, *layers], self.conv_in(z))
        return self.conv_out(_silu(self.norm_out(h), self.inference))


class AutoencoderKL(nn.Module):
    """Stable Diffusion's KL-regularised autoencoder with CompVis/LDM state-dict names."""

    def __init__(self, config: VAEConfig = SD_VAE) -> None:
        super().__init__()
        if not isinstance(config, VAEConfig):
            raise ValueError(f"config must be a VAEConfig (e.g. SD_VAE), got {type(config).__name__}")
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quant_conv = nn.Conv2d(2 * config.latent_channels, 2 * config.latent_channels, 1)
        self.post_quant_conv = nn.Conv2d(config.latent_channels, config.latent_channels, 1)

    @property
    def downscale(self) -> int:
        """Spatial reduction factor between images and latents (config.downscale)."""
        return self.config.downscale

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, in_channels, H, W) in [-1, 1] -> (mean, logvar), each (B, latent_channels, H/f, W/f)."""
        self._check_input(x, self.config.in_channels, self.downscale, "encode", "images")
        moments = self.quant_conv(self.encoder(x))
        mean, logvar = moments.chunk(2, dim=1)
        return mean, logvar.clamp(LOGVAR_MIN, LOGVAR_MAX)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Unscaled latents (B, latent_channels, h, w) -> images (B, out_channels, h*f, w*f)."""
        self._check_input(z, self.config.latent_channels, 1, "decode", "latents")
        return self.decoder(self.post_quant_conv(z))

    def decode_tiled(self, z: torch.Tensor, tile: int, overlap: int) -> torch.Tensor:
        """decode() in overlapping tiles of tile x tile latents, blended linearly across each overlap.

        Peak memory is that of one tile's decode plus the output image, whatever the image size. The
        result differs slightly from decode() (each tile's GroupNorm sees only its own pixels; the seams
        are blended over overlap latents, i.e. overlap * downscale pixels). A latent no larger than
        `tile` on a side is decoded whole along that side."""
        self._check_input(z, self.config.latent_channels, 1, "decode_tiled", "latents")
        if not 0 <= overlap < tile:
            raise ValueError(f"overlap must be in [0, tile), got overlap={overlap}, tile={tile}")
        f, (b, _, h, w) = self.downscale, z.shape
        th, tw = min(tile, h), min(tile, w)
        out = weight = None
        for top in tile_starts(h, tile, overlap):
            for left in tile_starts(w, tile, overlap):
                image = self.decode(z[:, :, top : top + th, left : left + tw]).float()
                ramp = _blend_ramp(top, th, h, overlap, f)[:, None] * _blend_ramp(left, tw, w, overlap, f)[None, :]
                ramp = ramp.to(image.device)
                if out is None:
                    out = image.new_zeros(b, image.shape[1], h * f, w * f)
                    weight = image.new_zeros(h * f, w * f)
                region = (slice(top * f, (top + th) * f), slice(left * f, (left + tw) * f))
                out[(..., *region)] += image * ramp
                weight[region] += ramp
        return (out / weight).to(z.dtype)

    @staticmethod
    def _check_input(x: torch.Tensor, channels: int, multiple: int, method: str, what: str) -> None:
        """Raise ValueError unless x is (B, channels, H, W) with H and W multiples of `multiple`."""
        if x.ndim != 4 or x.shape[1] != channels:
            raise ValueError(
                f"AutoencoderKL.{method} expects {what} shaped (batch, {channels}, height, width), "
                f"got {tuple(x.shape)}"
            )
        height, width = x.shape[-2:]
        if height % multiple or width % multiple:
            raise ValueError(
                f"AutoencoderKL.{method} needs height and width divisible by {multiple} "
                f"(the VAE's downscale factor), got {height}x{width}; resize or crop the {what}"
            )


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Where tiles of `tile` latents start so that they cover `length` with at least `overlap` shared."""
    if length <= tile:
        return [0]
    count = math.ceil((length - overlap) / (tile - overlap))
    return [round(i * (length - tile) / (count - 1)) for i in range(count)]


def _blend_ramp(start: int, size: int, length: int, overlap: int, f: int) -> torch.Tensor:
    """Per-pixel blend weights of one tile along one axis: rising over `overlap` latents from each side
    that another tile shares, 1 elsewhere (a side at the image border keeps full weight)."""
    ramp = torch.ones(size * f)
    width = overlap * f
    if width:
        rise = (torch.arange(width) + 0.5) / width
        if start > 0:
            ramp[:width] = rise
        if start + size < length:
            ramp[-width:] = torch.minimum(ramp[-width:], rise.flip(0))
    return ramp


def sample_latents(
    mean: torch.Tensor, logvar: torch.Tensor, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Draw from N(mean, exp(logvar)); mean, logvar and the result are (B, z, h, w)."""
    if mean.shape != logvar.shape:
        raise ValueError(
            f"mean and logvar must have the same shape, got {tuple(mean.shape)} and "
            f"{tuple(logvar.shape)}; pass both halves returned by AutoencoderKL.encode"
        )
    # Draw on the generator's own device (torch requires it), then move: a CPU generator thus
    # gives the same latents whatever device the model runs on, as diffusers does.
    noise_device = mean.device if generator is None else generator.device
    noise = normal(mean.shape, generator, dtype=mean.dtype, device=noise_device)
    return mean + torch.exp(0.5 * logvar) * noise.to(mean.device)
