"""Image upscalers: ESRGAN / Real-ESRGAN model files (RRDBNet), the plain resizes A1111 offers, and its latent modes.

The RRDBNet is the one ESRGAN (Wang et al. 2018) published and Real-ESRGAN reuses: a 3x3 conv, `blocks`
residual-in-residual dense blocks (three 5-conv dense blocks each, `growth` channels per conv, residuals
scaled by 0.2), a 3x3 conv added back to the first conv's features, then per x2 a nearest-neighbour
doubling and a 3x3 conv, a 3x3 conv and the last 3x3 conv; LeakyReLU(0.2) after every conv but the last
of a dense block and the last two. Real-ESRGAN's x2 and x1 models pixel-unshuffle the input first (by 2 or
4: `conv_first` takes 12 or 48 channels) and keep the x4 body.

Files come in two key layouts, both read here and renamed to one (BasicSR's, our module names) by one table:

- BasicSR / Real-ESRGAN: `conv_first`, `body.N.rdb1.conv1`, `conv_body`, `conv_up1`, `conv_up2`, `conv_hr`,
  `conv_last` (RealESRGAN_x4plus.pth, whose weights sit under `params_ema`);
- the original ESRGAN's `nn.Sequential`: `model.0`, `model.1.sub.N.RDB1.conv1.0`, `model.1.sub.<blocks>`,
  then per x2 `model.3`, `model.6`, ..., and the last two convs 2 and 4 after the last upsampling one
  (4x-UltraSharp: `model.8`, `model.10`).

Everything about the network (blocks, channels, growth, scale) is read from the tensors. Images are run
in overlapping tiles whose seams are blended, so memory is bounded by the tile, not the image.
"""

from __future__ import annotations

import math
import os
import re
import threading
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from .adapters.library import Folder
from .weightfiles import CheckpointError, detect_format, read_pickle, read_state_dict

PathLike = str | os.PathLike[str]

UPSCALER_SUFFIXES = (".pth", ".pt", ".safetensors")  # those A1111's ESRGAN folder lists
# A1111's upscalers that need no file: the image is resized (None: left as the model step makes it, i.e.
# only the final Lanczos resize to the asked size, as A1111's UpscalerNone).
BUILT_IN = {"None": None, "Lanczos": Image.Resampling.LANCZOS, "Nearest": Image.Resampling.NEAREST}
# A1111's latent upscale modes (the hires fix's "Latent ..." upscalers): name -> (F.interpolate mode, antialias)
LATENT_UPSCALE_MODES: dict[str, tuple[str, bool]] = {
    "Latent": ("bilinear", False),
    "Latent (antialiased)": ("bilinear", True),
    "Latent (bicubic)": ("bicubic", False),
    "Latent (bicubic antialiased)": ("bicubic", True),
    "Latent (nearest)": ("nearest", False),
    "Latent (nearest-exact)": ("nearest-exact", False),
}
TILE = 192  # input pixels per tile side (A1111's ESRGAN_tile default)
TILE_OVERLAP = 16  # pixels two neighbouring tiles share (at the network's resolution); blended across the middle
MAX_UPSAMPLES = 4  # x2 stages an RRDBNet may have (x16 without unshuffle): more is no upscaler file
MAX_PASSES = 3  # a model is applied at most this often to reach a scale above its own (as A1111)
WRAPPERS = ("params_ema", "params", "state_dict")  # where BasicSR / Lightning files keep the weights
RDB_CONVS = 5
SLOPE = 0.2  # LeakyReLU's negative slope everywhere in the network
RESIDUAL = 0.2  # the scale of every dense block's and RRDB's residual


# --------------------------------------------------------------------------- the network


@dataclass(frozen=True)
class RRDBConfig:
    """An RRDBNet's shape, as read from its tensors."""

    channels: int = 64  # features of the trunk (ESRGAN's nf)
    blocks: int = 23  # RRDBs in the trunk (nb)
    growth: int = 32  # channels each dense-block conv adds (gc)
    upsamples: int = 2  # x2 nearest + conv stages
    unshuffle: int = 1  # pixel-unshuffle factor of the input (Real-ESRGAN x2: 2, x1: 4)
    image_channels: int = 3

    @property
    def scale(self) -> int:
        """Output size / input size."""
        return 2**self.upsamples // self.unshuffle

    def describe(self) -> str:
        return f"x{self.scale} RRDBNet ({self.blocks} blocks, {self.channels} channels, growth {self.growth})"


class DenseBlock(nn.Module):
    """Five 3x3 convs, each seeing the input and all earlier outputs; the last one's output is the residual."""

    def __init__(self, channels: int, growth: int) -> None:
        super().__init__()
        for i in range(RDB_CONVS):
            out = channels if i == RDB_CONVS - 1 else growth
            setattr(self, f"conv{i + 1}", nn.Conv2d(channels + i * growth, out, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = [x]
        for i in range(1, RDB_CONVS):
            features.append(F.leaky_relu(getattr(self, f"conv{i}")(torch.cat(features, 1)), SLOPE))
        return getattr(self, f"conv{RDB_CONVS}")(torch.cat(features, 1)) * RESIDUAL + x


class RRDB(nn.Module):
    """Three dense blocks in a row, with a scaled residual around them."""

    def __init__(self, channels: int, growth: int) -> None:
        super().__init__()
        self.rdb1 = DenseBlock(channels, growth)
        self.rdb2 = DenseBlock(channels, growth)
        self.rdb3 = DenseBlock(channels, growth)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.rdb3(self.rdb2(self.rdb1(x))) * RESIDUAL + x


class RRDBNet(nn.Module):
    """ESRGAN's generator in BasicSR's module names; (B, 3, H, W) in [0, 1] -> (B, 3, H*s, W*s)."""

    def __init__(self, config: RRDBConfig) -> None:
        super().__init__()
        self.config = config
        c, inputs = config.channels, config.image_channels * config.unshuffle**2
        self.conv_first = nn.Conv2d(inputs, c, 3, padding=1)
        self.body = nn.Sequential(*(RRDB(c, config.growth) for _ in range(config.blocks)))
        self.conv_body = nn.Conv2d(c, c, 3, padding=1)
        for i in range(config.upsamples):
            setattr(self, f"conv_up{i + 1}", nn.Conv2d(c, c, 3, padding=1))
        self.conv_hr = nn.Conv2d(c, c, 3, padding=1)
        self.conv_last = nn.Conv2d(c, config.image_channels, 3, padding=1)

    @property
    def scale(self) -> int:
        return self.config.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, 3, H, W), H and W multiples of `config.unshuffle`."""
        if self.config.unshuffle > 1:
            x = F.pixel_unshuffle(x, self.config.unshuffle)  # (B, 3 * u^2, H / u, W / u)
        feat = self.conv_first(x)
        feat = feat + self.conv_body(self.body(feat))
        for i in range(self.config.upsamples):
            up = getattr(self, f"conv_up{i + 1}")
            feat = F.leaky_relu(up(F.interpolate(feat, scale_factor=2, mode="nearest")), SLOPE)
        return self.conv_last(F.leaky_relu(self.conv_hr(feat), SLOPE))


# --------------------------------------------------------------------------- key layouts

_OLD_RDB = re.compile(r"model\.1\.sub\.(\d+)\.RDB(\d)\.conv(\d)\.0\.(weight|bias)")
_NEW_RDB = re.compile(r"body\.(\d+)\.rdb(\d)\.conv(\d)\.(weight|bias)")
_OLD_CONV = re.compile(r"model\.(\d+)\.(weight|bias)")
_UP = re.compile(r"conv_up(\d+)\.weight")


def old_names(config: RRDBConfig) -> dict[str, str]:
    """Our module name -> its name in the original ESRGAN's nn.Sequential (weights and biases alike)."""
    table = {"conv_first": "model.0", "conv_body": f"model.1.sub.{config.blocks}"}
    for b in range(config.blocks):
        for r in range(1, 4):
            for c in range(1, RDB_CONVS + 1):
                table[f"body.{b}.rdb{r}.conv{c}"] = f"model.1.sub.{b}.RDB{r}.conv{c}.0"
    # model.2 is the first upsampling (no weights); each x2 stage is (upsample, conv, LeakyReLU)
    for i in range(config.upsamples):
        table[f"conv_up{i + 1}"] = f"model.{3 + 3 * i}"
    last_up = 3 * config.upsamples  # index of the last LeakyReLU of the upsampling stages (1 when there are none)
    table["conv_hr"] = f"model.{last_up + 2}"
    table["conv_last"] = f"model.{last_up + 4}"
    return table


def _renamed(state: Mapping[str, torch.Tensor], table: dict[str, str]) -> dict[str, torch.Tensor]:
    """Keys renamed module by module through `table` (module -> module); keys it has no entry for kept as they are."""
    out = {}
    for key, tensor in state.items():
        module, _, leaf = key.rpartition(".")
        out[f"{table.get(module, module)}.{leaf}"] = tensor
    return out


def to_old_layout(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A BasicSR-layout state dict in the original ESRGAN's keys."""
    return _renamed(state, old_names(infer_config(state)))


def to_new_layout(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An original-ESRGAN-layout state dict in BasicSR's keys (ours); a BasicSR one as it is."""
    if "conv_first.weight" in state:
        return dict(state)
    inverse = {old: new for new, old in old_names(_old_config(state)).items()}
    return _renamed(state, inverse)


def is_rrdbnet(state: Mapping[str, torch.Tensor]) -> bool:
    """Whether the keys are an RRDBNet's, in either layout."""
    return ("conv_first.weight" in state and "body.0.rdb1.conv1.weight" in state) or (
        "model.0.weight" in state and "model.1.sub.0.RDB1.conv1.0.weight" in state
    )


def _old_config(state: Mapping[str, torch.Tensor]) -> RRDBConfig:
    """The config of an original-layout state dict: its highest `model.N` is the last conv, 4 after the last
    upsampling stage's LeakyReLU at 3 * upsamples."""
    blocks = _count_blocks(state, _OLD_RDB, "model.1.sub.{}.RDB1.conv1.0.weight")
    top = max(int(m.group(1)) for key in state if (m := _OLD_CONV.fullmatch(key)))
    upsamples, rest = divmod(top - 4, 3)
    if rest or not 0 <= upsamples <= MAX_UPSAMPLES:
        raise ValueError(f"the last conv is model.{top}, which no x1 to x16 ESRGAN layout has")
    return _shape(state["model.0.weight"], state[f"model.{top}.weight"], state["model.1.sub.0.RDB1.conv1.0.weight"],
                  blocks, upsamples)  # fmt: skip


def infer_config(state: Mapping[str, torch.Tensor]) -> RRDBConfig:
    """The RRDBNet config of a state dict in either layout, from its tensors' names and shapes."""
    if "conv_first.weight" not in state:
        return _old_config(state)
    blocks = _count_blocks(state, _NEW_RDB, "body.{}.rdb1.conv1.weight")
    upsamples = sum(1 for key in state if _UP.fullmatch(key))
    if upsamples > MAX_UPSAMPLES:
        raise ValueError(f"{upsamples} upsampling convs (conv_upN): no ESRGAN upscaler has more than {MAX_UPSAMPLES}")
    return _shape(state["conv_first.weight"], state["conv_last.weight"], state["body.0.rdb1.conv1.weight"],
                  blocks, upsamples)  # fmt: skip


def _count_blocks(state: Mapping[str, torch.Tensor], pattern: re.Pattern[str], key: str) -> int:
    """The number of RRDBs, whose indices must be 0, 1, ... without a gap (checked from the keys there are, so
    that a file cannot make us list the keys of a billion blocks)."""
    found = {int(m.group(1)) for name in state if (m := pattern.fullmatch(name))}
    gap = next(i for i in range(len(found) + 1) if i not in found)
    if gap != len(found):
        raise ValueError(f"it lacks key {key.format(gap)} (blocks go up to {max(found)}); the file is damaged")
    return len(found)


def _shape(first: torch.Tensor, last: torch.Tensor, dense: torch.Tensor, blocks: int, upsamples: int) -> RRDBConfig:
    """Channels from the first and last convs; the unshuffle factor from how many more inputs than outputs."""
    inputs, outputs = first.shape[1], last.shape[0]
    unshuffle = {1: 1, 4: 2, 16: 4}.get(inputs // outputs if inputs % outputs == 0 else 0)
    if unshuffle is None or outputs != 3:
        raise ValueError(f"an RRDBNet with {inputs} input and {outputs} output channels; latentforge runs RGB "
                         "upscalers (3 outputs; 3, 12 or 48 inputs)")  # fmt: skip
    if 2**upsamples < unshuffle:
        raise ValueError(f"{upsamples} upsampling convs after a pixel-unshuffle by {unshuffle} would shrink the image")
    return RRDBConfig(first.shape[0], blocks, dense.shape[0], upsamples, unshuffle)


# --------------------------------------------------------------------------- files


def read_upscaler_state(path: PathLike) -> dict[str, torch.Tensor]:
    """A file's tensors, through the safe readers (no pickle code runs); BasicSR's `params_ema` / `params`
    wrappers (and Lightning's `state_dict`) unwrapped."""
    if detect_format(path) == "safetensors":
        return read_state_dict(path)[0]
    loaded = read_pickle(path)
    while isinstance(loaded, Mapping) and (wrapper := next((w for w in WRAPPERS if isinstance(loaded.get(w), Mapping)), None)):
        loaded = loaded[wrapper]  # params_ema wins over params, as in Real-ESRGAN's own loader
    if not isinstance(loaded, Mapping):
        raise CheckpointError(path, f"holds a {type(loaded).__name__}, not a dict of tensors")
    bad = next((key for key, value in loaded.items() if not isinstance(key, str) or not isinstance(value, torch.Tensor)), None)
    if bad is not None:
        raise CheckpointError(path, f"entry {bad!r} is not a named tensor", "give an ESRGAN/RRDBNet .pth or .safetensors file")
    return {key: value.detach() for key, value in loaded.items()}


def expected_shapes(config: RRDBConfig) -> dict[str, tuple[int, ...]]:
    """Every key of an RRDBNet of this config (our names) and its tensor's shape."""
    c, g = config.channels, config.growth
    convs = {"conv_first": (c, config.image_channels * config.unshuffle**2)}
    for b in range(config.blocks):
        for r in range(1, 4):
            for k in range(1, RDB_CONVS + 1):
                convs[f"body.{b}.rdb{r}.conv{k}"] = (c if k == RDB_CONVS else g, c + (k - 1) * g)
    convs |= {name: (c, c) for name in ("conv_body", *(f"conv_up{i + 1}" for i in range(config.upsamples)), "conv_hr")}
    convs["conv_last"] = (config.image_channels, c)
    shapes: dict[str, tuple[int, ...]] = {}
    for name, (out, inputs) in convs.items():
        shapes |= {f"{name}.weight": (out, inputs, 3, 3), f"{name}.bias": (out,)}
    return shapes


def load_rrdbnet(state: Mapping[str, torch.Tensor], name: str = "the weights") -> RRDBNet:
    """An RRDBNet built from a state dict in either layout; strict: a missing, unexpected or misshapen key is
    a one-line ValueError naming it. Keys and shapes are checked before the network is made, so what it
    allocates is what the file holds."""
    if not is_rrdbnet(state):
        sample = ", ".join(list(state)[:4]) or "none"
        raise ValueError(f"{name} is not an ESRGAN/RRDBNet upscaler (keys such as {sample})")
    layout = "BasicSR" if "conv_first.weight" in state else "ESRGAN"
    fix = "the file is damaged or another architecture"
    try:
        config = infer_config(state)
    except ValueError as e:
        raise ValueError(f"{name}: {e}") from None
    except (KeyError, IndexError) as e:  # a key the layout always has, or a tensor of too few dimensions
        raise ValueError(f"{name}: not a complete {layout}-layout RRDBNet ({type(e).__name__}: {e}); {fix}") from None
    ours = to_new_layout(state)
    expected = expected_shapes(config)
    missing = [key for key in expected if key not in ours]
    unexpected = [key for key in ours if key not in expected]
    for problem, keys in (("lacks", missing), ("has unexpected", unexpected)):
        if keys:
            theirs = keys if layout == "BasicSR" else [_old_key(key, config) for key in keys]
            more = f" and {len(keys) - 1} more" if len(keys) > 1 else ""
            raise ValueError(f"{name}: as a {config.describe()} ({layout} layout) it {problem} key {theirs[0]}{more}; {fix}")
    for key, shape in expected.items():
        if tuple(ours[key].shape) != shape:
            raise ValueError(f"{name}: {key} is {tuple(ours[key].shape)}, a {config.describe()} needs {shape}; {fix}")
    model = RRDBNet(config)
    model.load_state_dict({key: value.float() for key, value in ours.items()})
    return model.eval().requires_grad_(False)


def _old_key(key: str, config: RRDBConfig) -> str:
    """Our key in the original ESRGAN layout, for messages (a key the table lacks: as it is)."""
    module, _, leaf = key.rpartition(".")
    return f"{old_names(config).get(module, module)}.{leaf}"


def read_upscaler(path: PathLike) -> RRDBNet:
    """An ESRGAN / Real-ESRGAN upscaler file (.pth, .pt, .safetensors; either key layout) as a float32 RRDBNet on the CPU."""
    return load_rrdbnet(read_upscaler_state(path), Path(path).name)


# --------------------------------------------------------------------------- running


def _starts(length: int, tile: int, overlap: int) -> list[int]:
    """Where the tiles along one side begin: `tile` apart minus `overlap`, the last one flush with the end."""
    if length <= tile:
        return [0]
    return [*range(0, length - tile, tile - overlap), length - tile]


def _ramps(starts: list[int], size: int, overlap: int, scale: int) -> list[torch.Tensor]:
    """Each tile's blending weights along one side, in output pixels. Where two tiles meet, the outer quarter
    of what they share (at least `overlap`) is dropped from each (its pixels saw the tile's edge) and the
    middle half is a linear ramp from one to the other; the weights of every pixel add up to 1."""
    blend = overlap // 2 * scale
    ramp = (torch.arange(blend, dtype=torch.float32) + 0.5) / max(blend, 1)
    weights = []
    for i, start in enumerate(starts):
        left, right = torch.ones(size * scale), torch.ones(size * scale)
        if i > 0:  # shared with the tile before: [start, end of the previous one)
            skip = ((starts[i - 1] + size - start) * scale - blend) // 2
            left[:skip] = 0
            left[skip : skip + blend] = ramp
        if i < len(starts) - 1:  # shared with the tile after
            shared = (start + size - starts[i + 1]) * scale - blend
            keep = size * scale - (shared - shared // 2)
            right[keep - blend : keep] = 1 - ramp
            right[keep:] = 0
        weights.append(left * right)
    # where three tiles meet (an overlap above half the tile, or the last tile flush with the end) the ramps
    # cross: dividing by the sum keeps the total at 1 everywhere
    total = torch.zeros((starts[-1] + size) * scale)
    for start, w in zip(starts, weights):
        total[start * scale : (start + size) * scale] += w
    return [w / total[start * scale : (start + size) * scale] for start, w in zip(starts, weights)]


@torch.inference_mode()
def run_tiled(model: RRDBNet, x: torch.Tensor, tile: int = TILE, overlap: int = TILE_OVERLAP) -> torch.Tensor:
    """(1, 3, H, W) in [0, 1] -> (1, 3, H*s, W*s) float32 on the CPU, the model run on tiles of at most
    tile x tile input pixels that overlap by `overlap` pixels of the network's own resolution (input pixels
    times the unshuffle factor: the x2 models see half as many) and are blended; one run when the image fits.

    H and W must be multiples of the model's unshuffle factor; the tile is rounded up to one.
    """
    s, u = model.scale, model.config.unshuffle
    tile, overlap = -(-tile // u) * u, overlap * u
    if not 0 <= overlap < tile:
        raise ValueError(f"the tile overlap ({overlap} input pixels for this x{s} model) must be at least 0 and less "
                         f"than the tile ({tile}); use a smaller overlap or a larger tile")  # fmt: skip
    param = next(model.parameters())
    _, channels, height, width = x.shape
    tile_h, tile_w = min(tile, height), min(tile, width)
    ys, xs = _starts(height, tile, overlap), _starts(width, tile, overlap)
    wys, wxs = _ramps(ys, tile_h, overlap, s), _ramps(xs, tile_w, overlap, s)
    out = torch.zeros(1, channels, height * s, width * s)
    for y, wy in zip(ys, wys):
        for x0, wx in zip(xs, wxs):
            piece = x[:, :, y : y + tile_h, x0 : x0 + tile_w].to(param.device, param.dtype)
            result = model(piece).float().cpu()  # (1, 3, tile_h * s, tile_w * s)
            out[:, :, y * s : (y + tile_h) * s, x0 * s : (x0 + tile_w) * s] += result * (wy[:, None] * wx[None, :])
    return out


def image_to_unit(image: Image.Image) -> torch.Tensor:
    """RGB image -> (1, 3, H, W) float32 in [0, 1] (ESRGAN's input: RGB / 255)."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1).unsqueeze(0).contiguous()


def unit_to_image(x: torch.Tensor) -> Image.Image:
    """(1, 3, H, W) -> RGB image: clamped to [0, 1], * 255, rounded."""
    array = (x[0].clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return Image.fromarray(array)


def model_upscale(model: RRDBNet, image: Image.Image, tile: int = TILE, overlap: int = TILE_OVERLAP) -> Image.Image:
    """The image at the model's own scale (run in tiles); sides that are not a multiple of its unshuffle
    factor are padded by repeating the edge, and the padding cropped off again."""
    x = image_to_unit(image)
    u, s = model.config.unshuffle, model.scale
    pad_h, pad_w = -image.height % u, -image.width % u
    if pad_h or pad_w:
        x = F.pad(x, (0, pad_w, 0, pad_h), mode="replicate")
    out = run_tiled(model, x, tile, overlap)
    return unit_to_image(out[:, :, : image.height * s, : image.width * s])


Upscaler = RRDBNet | str  # a model, or the name of a built-in upscaler ("None", "Lanczos", "Nearest")


def target_size(size: tuple[int, int], scale: float) -> tuple[int, int]:
    """(width, height) * scale, rounded; an error for a scale that is not a positive, finite number."""
    if not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
        raise ValueError(f"the upscale factor must be a positive number, got {scale!r}")
    return max(1, round(size[0] * scale)), max(1, round(size[1] * scale))


def passes(upscaler: Upscaler, size: tuple[int, int], target: tuple[int, int]) -> list[tuple[int, int]]:
    """The sizes a model's runs give on the way to `target`, as A1111 does it: the model is run again while
    the image is smaller than the target, at most 3 times; a built-in makes no model run."""
    sizes: list[tuple[int, int]] = []
    if isinstance(upscaler, str):
        return sizes
    while len(sizes) < MAX_PASSES and (size[0] < target[0] or size[1] < target[1]):
        size = (size[0] * upscaler.scale, size[1] * upscaler.scale)
        sizes.append(size)
    return sizes


def upscale(
    image: Image.Image,
    upscaler: Upscaler,
    scale: float | None = None,
    *,
    size: tuple[int, int] | None = None,
    tile: int = TILE,
    overlap: int = TILE_OVERLAP,
) -> Image.Image:
    """The image upscaled by `scale` (or to `size` = (width, height)); default: the model's own scale.

    A model runs (in tiles) until the image is at least the asked size (at most 3 times, as A1111), and a
    result of another size is resized to it with Lanczos; "Lanczos" and "Nearest" resize with that filter,
    "None" with Lanczos. The result is RGB; the image's infotext (info["parameters"]) is kept.
    """
    if isinstance(upscaler, str) and upscaler not in BUILT_IN:
        raise ValueError(f"unknown built-in upscaler {upscaler!r}; known: {', '.join(BUILT_IN)}")
    if size is None:
        if scale is None:
            if isinstance(upscaler, str):
                raise ValueError(f"the {upscaler} upscaler needs a scale (e.g. 2) or a size")
            scale = upscaler.scale
        size = target_size(image.size, scale)
    result = image.convert("RGB")
    for _ in passes(upscaler, image.size, size):
        result = model_upscale(upscaler, result, tile, overlap)  # type: ignore[arg-type]
    if result.size != tuple(size):
        resample = BUILT_IN[upscaler] if isinstance(upscaler, str) and BUILT_IN[upscaler] is not None else Image.Resampling.LANCZOS
        result = result.resize(tuple(size), resample=resample)
    if "parameters" in image.info:
        result.info["parameters"] = image.info["parameters"]
    return result


# --------------------------------------------------------------------------- the registry


@dataclass
class Upscalers:
    """The built-in upscalers and the model files in some folders, by name (a file's stem, never a path).
    The most recently used model stays loaded; one upscale runs at a time (`lock`)."""

    folder: Folder = field(default_factory=lambda: Folder(suffixes=UPSCALER_SUFFIXES, what="upscaler"))
    device: str | torch.device = "cpu"
    dtype: torch.dtype = torch.float32
    keep: int = 2  # models kept loaded (A1111's extras may blend two)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _loaded: OrderedDict[tuple[Path, int, int], RRDBNet] = field(default_factory=OrderedDict, repr=False)
    _scales: dict[Path, int] = field(default_factory=dict, repr=False)

    @classmethod
    def from_dirs(cls, dirs: list[PathLike] = (), **kwargs) -> Upscalers:
        return cls(Folder(tuple(Path(d) for d in dirs), UPSCALER_SUFFIXES, "upscaler"), **kwargs)

    def models(self) -> dict[str, Path]:
        """The model files by name, in case-blind order of name (a file named like a built-in is hidden by it)."""
        files = self.folder.files()
        return {name: files[name] for name in sorted(files, key=str.lower) if name not in BUILT_IN}

    def names(self) -> list[str]:
        """The built-ins, then the model files' names."""
        return [*BUILT_IN, *self.models()]

    def get(self, name: str) -> Upscaler:
        """A built-in's name as it is, or the model file of that name, loaded (the last one is reused while
        its file is unchanged); one-line ValueError for an unknown name or a file that is not an RRDBNet."""
        if name in BUILT_IN:
            return name
        return self.load(self.folder.find(name))

    def load(self, path: Path) -> RRDBNet:
        """A model file (by path: for local callers such as the CLI); the `keep` last used stay loaded while
        their files are unchanged."""
        try:
            stat = path.stat()
        except OSError as e:
            raise ValueError(f"{path}: cannot open the upscaler file ({e.strerror or e})") from None
        key = (path.resolve(), stat.st_mtime_ns, stat.st_size)
        if key in self._loaded:
            self._loaded.move_to_end(key)
            return self._loaded[key]
        while len(self._loaded) >= max(1, self.keep):
            self._loaded.popitem(last=False)  # freed before the next one is read
        model = read_upscaler(path).to(self.device, self.dtype)
        self._loaded[key] = model
        self._scales[path] = model.scale
        return model

    def upscale(self, image: Image.Image, name: str, scale: float | None = None, **kwargs) -> Image.Image:
        """`upscale` with the upscaler of that name, one call at a time."""
        with self.lock:
            return upscale(image, self.get(name), scale, **kwargs)

    def listing(self) -> list[dict[str, object]]:
        """A1111's /sdapi/v1/upscalers entries; a model's scale is known once it has been loaded (else None)."""
        entries: list[dict[str, object]] = [
            {"name": name, "model_name": None, "model_path": None, "model_url": None, "scale": 4} for name in BUILT_IN
        ]  # A1111 gives its built-ins the default scale 4
        for name, path in self.models().items():
            entries.append({"name": name, "model_name": "ESRGAN", "model_path": str(path), "model_url": None,
                            "scale": self._scales.get(path)})  # fmt: skip
        return entries
