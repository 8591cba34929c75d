"""The noise predictor: Stable Diffusion's UNet with cross-attention.

Module attribute names follow the original CompVis/LDM layout (`input_blocks`, `middle_block`,
`output_blocks`, ...), so a single-file checkpoint loads by stripping `model.diffusion_model.`;
`layouts.py` maps the diffusers names onto these.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .attention import attention
from .convolution import Conv2d
from .tome import bipartite_soft_matching_2d

# SDXL's width of each size number's sinusoidal embedding (diffusers' addition_time_embed_dim); its
# tensors cannot tell it
SDXL_SIZE_EMBED_DIM = 256
FEED_FORWARD_ROWS = 2048  # tokens per feed-forward chunk in inference (FeedForward; 512-2048 measured alike)


@dataclass(frozen=True)
class UNetConfig:
    in_channels: int = 4  # 9 for the inpainting UNet: latents + mask + masked-image latents
    out_channels: int = 4
    model_channels: int = 320  # width of the first level
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)  # width of each level, in model_channels
    num_res_blocks: int = 2  # ResNet blocks per level on the way down (one more on the way up)
    attention_levels: tuple[int, ...] = (0, 1, 2)  # levels that have spatial transformers
    num_heads: int | None = 8  # SD 1.x: fixed head count ...
    head_dim: int | None = None  # ... SD 2.x: fixed head width (64)
    transformer_depth: int = 1  # transformer blocks in each spatial transformer, unless given per block below
    # Per-block depths, for UNets whose transformers differ (SDXL: 2 at level 1 and 10 at level 2; the distilled
    # SSD-1B and Vega: block by block); None: transformer_depth. 0 marks a block without a transformer, which
    # is exactly a block at a level outside attention_levels. Per block rather than per level because that is
    # what the tensors hold (each block's count of transformer_blocks) and what the distilled UNets vary.
    transformer_depth_input: tuple[int, ...] | None = None  # per input ResNet block, top level first
    transformer_depth_middle: int | None = None  # 0: the middle block is one ResNet block (SSD-1B, Vega)
    transformer_depth_output: tuple[int, ...] | None = None  # per output block, as output_blocks: bottom level first
    context_dim: int = 768  # width of the text vectors that cross-attention reads
    use_linear_projection: bool = False  # SD 2.x: Linear instead of 1x1 conv around transformers
    norm_groups: int = 32
    sample_size: int = 64  # native latent size (64 -> 512 px images, 96 -> 768 px)
    # width of the vector added to the timestep embedding through `label_emb` (LDM's name; SDXL: pooled
    # text + size embeddings, 2816); None: no such input (SD 1.x / 2.x)
    adm_in_channels: int | None = None
    # SDXL: width of the sinusoidal embedding of each size number in the added vector (diffusers'
    # addition_time_embed_dim, 256); made by the conditioner, which reads it here; the UNet does not use it
    size_embed_dim: int | None = None

    def __post_init__(self) -> None:
        """Reject a configuration the network cannot be built from, naming the field (every value that
        reaches a module constructor is checked here first)."""
        for name in ("channel_mult", "attention_levels"):  # JSON gives lists: keep the config hashable
            value = getattr(self, name)
            if not isinstance(value, (tuple, list)) or not all(_is_int(v) for v in value):
                raise ValueError(f"UNetConfig.{name} must be a list of whole numbers, got {value!r}")
            object.__setattr__(self, name, tuple(value))
        if not self.channel_mult or min(self.channel_mult) < 1:
            raise ValueError(f"UNetConfig.channel_mult must be one or more positive numbers, got {self.channel_mult}")
        names = ["in_channels", "out_channels", "model_channels", "num_res_blocks", "transformer_depth",
                 "context_dim", "norm_groups", "sample_size"]  # fmt: skip
        optional = ("num_heads", "head_dim", "adm_in_channels", "size_embed_dim")
        names += [name for name in optional if getattr(self, name) is not None]
        for name in names:
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise ValueError(f"UNetConfig.{name} must be a positive whole number, got {value!r}")
        if not isinstance(self.use_linear_projection, bool):
            raise ValueError(f"UNetConfig.use_linear_projection must be true or false, got {self.use_linear_projection!r}")
        if (self.num_heads is None) == (self.head_dim is None):
            raise ValueError("UNetConfig: set exactly one of num_heads and head_dim")
        levels = len(self.channel_mult)
        if any(not 0 <= i < levels for i in self.attention_levels):
            raise ValueError(f"UNetConfig: attention_levels {self.attention_levels} outside 0..{levels - 1}")
        for ch in self.level_channels:
            if ch % self.norm_groups:
                raise ValueError(f"UNetConfig: level width {ch} is not divisible by norm_groups={self.norm_groups}")
            heads = self.heads_at(ch)
            if ch % heads:
                raise ValueError(f"UNetConfig: level width {ch} is not divisible by {heads} attention heads")
        if self.size_embed_dim is not None and self.adm_in_channels is None:
            raise ValueError("UNetConfig: size_embed_dim is set but there is no added vector (adm_in_channels)")
        self._check_depths()

    def _check_depths(self) -> None:
        """The per-block depths: whole numbers >= 0, one per block, 0 exactly outside attention_levels."""
        middle = self.transformer_depth_middle
        if middle is not None and (not _is_int(middle) or middle < 0):
            raise ValueError(f"UNetConfig.transformer_depth_middle must be a whole number >= 0, got {middle!r}")
        levels = len(self.channel_mult)
        blocks = {"transformer_depth_input": self.num_res_blocks, "transformer_depth_output": self.num_res_blocks + 1}
        for name, per_level in blocks.items():
            value = getattr(self, name)
            if value is None:
                continue
            if not isinstance(value, (tuple, list)) or not all(_is_int(v) and v >= 0 for v in value):
                raise ValueError(f"UNetConfig.{name} must be a list of whole numbers >= 0, got {value!r}")
            object.__setattr__(self, name, tuple(value))
            if len(value) != levels * per_level:
                raise ValueError(f"UNetConfig.{name} has {len(value)} depths, not {per_level} per level x {levels} levels")
        for name, depths, block_levels in (
            ("transformer_depth_input", self.input_depths, self._input_levels()),
            ("transformer_depth_output", self.output_depths, self._output_levels()),
        ):
            for i, (depth, level) in enumerate(zip(depths, block_levels)):
                if (depth > 0) != (level in self.attention_levels):
                    has = "has" if level in self.attention_levels else "has no"
                    raise ValueError(f"UNetConfig.{name}[{i}] is {depth} at level {level}, which {has} attention")

    def _input_levels(self) -> list[int]:
        return [level for level in range(len(self.channel_mult)) for _ in range(self.num_res_blocks)]

    def _output_levels(self) -> list[int]:
        return [level for level in reversed(range(len(self.channel_mult))) for _ in range(self.num_res_blocks + 1)]

    @property
    def input_depths(self) -> tuple[int, ...]:
        """Transformer depth of each input ResNet block, top level first (0: no transformer)."""
        if self.transformer_depth_input is not None:
            return self.transformer_depth_input
        return tuple(self.transformer_depth if lv in self.attention_levels else 0 for lv in self._input_levels())

    @property
    def middle_depth(self) -> int:
        """Transformer depth of the middle block (0: the middle block is one ResNet block)."""
        return self.transformer_depth if self.transformer_depth_middle is None else self.transformer_depth_middle

    @property
    def output_depths(self) -> tuple[int, ...]:
        """Transformer depth of each output block, in output_blocks order (bottom level first; 0: none)."""
        if self.transformer_depth_output is not None:
            return self.transformer_depth_output
        return tuple(self.transformer_depth if lv in self.attention_levels else 0 for lv in self._output_levels())

    @property
    def level_channels(self) -> list[int]:
        """Width of each level, top (full resolution) first."""
        return [self.model_channels * m for m in self.channel_mult]

    def heads_at(self, channels: int) -> int:
        """Number of attention heads in a transformer of this width."""
        return self.num_heads if self.num_heads is not None else max(1, channels // self.head_dim)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


SD1_UNET = UNetConfig()
SD2_UNET = UNetConfig(num_heads=None, head_dim=64, context_dim=1024, use_linear_projection=True)


def depth_fields(input_depths: Sequence[int], middle: int, output_depths: Sequence[int]) -> dict[str, object]:
    """UNetConfig's depth fields for these per-block depths (0: no transformer), in one form so that equal
    UNets have equal configs: where every transformer has one depth (SD 1.x/2.x, the SDXL refiner) that is
    transformer_depth alone, as those configs have always been written; else transformer_depth is the middle
    block's (without one, the deepest) and the per-block fields that differ from it are given."""
    depth = middle or max(*input_depths, *output_depths, 1)
    same = all(d in (0, depth) for d in input_depths), all(d in (0, depth) for d in output_depths)
    return dict(
        transformer_depth=depth,
        transformer_depth_input=None if same[0] else tuple(input_depths),
        transformer_depth_middle=None if middle == depth else middle,
        transformer_depth_output=None if same[1] else tuple(output_depths),
    )


@dataclass
class DeepFeatures:
    """DeepCache's state in one sampler run (speed.StepCache): the deep features the UNet's last whole call
    left at the input of its `depth`-th output block from the end, and whether this call reuses them."""

    depth: int
    features: torch.Tensor | None = None
    reuse: bool = False


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of timesteps (B,) -> (B, dim), cosines first as in the original."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def group_norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, channels, eps=1e-5)


class ResBlock(nn.Module):
    """ResNet block that also receives the timestep embedding (never the text)."""

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, groups: int):
        super().__init__()
        self.in_layers = nn.Sequential(group_norm(in_ch, groups), nn.SiLU(), Conv2d(in_ch, out_ch, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, out_ch))
        self.out_layers = nn.Sequential(
            group_norm(out_ch, groups), nn.SiLU(), nn.Dropout(0.0), Conv2d(out_ch, out_ch, 3, padding=1)
        )
        self.skip_connection = nn.Identity() if in_ch == out_ch else nn.Conv2d(in_ch, out_ch, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """(B, in, H, W), (B, emb_dim) -> (B, out, H, W)."""
        h = self.in_layers(x)
        h = h + self.emb_layers(emb)[:, :, None, None].to(h.dtype)
        return self.skip_connection(x) + self.out_layers(h)


class Attention(nn.Module):
    """Multi-head attention; keys and values come from `context` (text vectors) or from x itself."""

    # a callable given the attention probabilities (B, heads, N, M) at each call; None (off): nothing extra runs
    probe: Callable[[torch.Tensor], None] | None = None

    def __init__(self, dim: int, heads: int, context_dim: int | None = None):
        super().__init__()
        self.heads = heads
        context_dim = context_dim or dim
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(context_dim, dim, bias=False)
        self.to_v = nn.Linear(context_dim, dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(dim, dim))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """(B, N, dim), context (B, M, context_dim) -> (B, N, dim)."""
        context = x if context is None else context
        b, n, dim = x.shape
        # (B, L, dim) -> (B, heads, L, dim / heads)
        q, k, v = (
            proj(src).view(b, -1, self.heads, dim // self.heads).transpose(1, 2)
            for proj, src in ((self.to_q, x), (self.to_k, context), (self.to_v, context))
        )
        out = attention(q, k, v)
        if self.probe is not None:  # the probabilities, computed only for a probe (latentforge explain)
            self.probe((q.float() @ k.float().transpose(-1, -2) * (dim // self.heads) ** -0.5).softmax(-1))
        return self.to_out(out.transpose(1, 2).reshape(b, n, dim))


class GEGLU(nn.Module):
    """Linear projection to twice the width, one half gating the other through GELU."""

    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.proj = nn.Linear(dim, inner * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden, gate = self.proj(x).chunk(2, dim=-1)
        return hidden * F.gelu(gate)


class FeedForward(nn.Module):
    """GEGLU then a linear layer back to `dim`. In inference (`inference.set_inference`), FEED_FORWARD_ROWS
    tokens at a time: the 8x-wide intermediate is ~10-20 MB from chunk to chunk instead of a fresh ~40-80 MB
    per call (SD 1.5's 64 x 64 level: 0.75-0.97x the time in float32, 0.73-0.86x in bfloat16 over four runs of
    `python -m benchmarks.transformer`). Each token's result is the same."""

    inference = False  # chunks only when True

    def __init__(self, dim: int):
        super().__init__()
        # net.1 is the original's dropout slot; kept so that `net.2` matches the checkpoint names
        self.net = nn.Sequential(GEGLU(dim, dim * 4), nn.Dropout(0.0), nn.Linear(dim * 4, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., dim) -> (..., dim)."""
        tokens = x.reshape(-1, x.shape[-1])
        if not self.inference or len(tokens) <= FEED_FORWARD_ROWS:
            return self.net(x)
        out = torch.empty_like(tokens)
        for start in range(0, len(tokens), FEED_FORWARD_ROWS):
            out[start : start + FEED_FORWARD_ROWS] = self.net(tokens[start : start + FEED_FORWARD_ROWS])
        return out.view(x.shape)


class TransformerBlock(nn.Module):
    """Self-attention, cross-attention on the text, GEGLU feed-forward; pre-norm, residual."""

    # ToMe: the share of tokens merged for the self-attention (`tome.set_token_merging`); 0 (off): nothing extra runs
    token_merge_ratio: float = 0.0

    def __init__(self, dim: int, heads: int, context_dim: int):
        super().__init__()
        self.attn1 = Attention(dim, heads)
        self.attn2 = Attention(dim, heads, context_dim)
        self.ff = FeedForward(dim)
        self.norm1, self.norm2, self.norm3 = (nn.LayerNorm(dim) for _ in range(3))

    def forward(self, x: torch.Tensor, context: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        """(B, N, dim), (B, M, context_dim), size (h, w) of the N = h * w token grid (read only when merging
        tokens) -> (B, N, dim)."""
        if self.token_merge_ratio:
            x = x + self.merged_self_attention(x, size)
        else:
            x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))

    def merged_self_attention(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """attn1 on int(N * token_merge_ratio) fewer tokens (ToMe, matched on x itself as tomesd does), each
        merged token's output copied back to the tokens it holds: (B, N, dim), (h, w) -> (B, N, dim)."""
        merge, unmerge = bipartite_soft_matching_2d(x, *size, int(x.shape[1] * self.token_merge_ratio))
        return unmerge(self.attn1(merge(self.norm1(x))))


class SpatialTransformer(nn.Module):
    """Transformer over the H*W positions of a feature map; the only place the text enters."""

    def __init__(self, channels: int, heads: int, depth: int, context_dim: int, linear: bool, groups: int):
        super().__init__()
        self.linear = linear
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)
        make_proj = (lambda: nn.Linear(channels, channels)) if linear else (lambda: nn.Conv2d(channels, channels, 1))
        self.proj_in = make_proj()
        self.transformer_blocks = nn.ModuleList(TransformerBlock(channels, heads, context_dim) for _ in range(depth))
        self.proj_out = make_proj()

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W), (B, M, context_dim) -> (B, C, H, W)."""
        b, c, h, w = x.shape
        tokens = self.norm(x)
        if not self.linear:
            tokens = self.proj_in(tokens)
        tokens = tokens.flatten(2).transpose(1, 2)  # (B, C, H, W) -> (B, H*W, C)
        if self.linear:
            tokens = self.proj_in(tokens)
        for block in self.transformer_blocks:
            tokens = block(tokens, context, (h, w))
        if self.linear:
            tokens = self.proj_out(tokens)
        tokens = tokens.transpose(1, 2).reshape(b, c, h, w)
        if not self.linear:
            tokens = self.proj_out(tokens)
        return x + tokens


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """Nearest-neighbour up to `size` (2x, or the skip's size when the input was odd), then conv."""
        return self.conv.upsampled(x, size)


class Block(nn.ModuleList):
    """One entry of input_blocks / output_blocks: layers that take what each needs."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor, size=None) -> torch.Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            elif isinstance(layer, Upsample):
                x = layer(x, size)
            else:
                x = layer(x)
        return x


class UNet(nn.Module):
    """Predicts the noise (or v) in latents x at timestep t, conditioned on text vectors."""

    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = config
        c = config
        emb_dim = c.model_channels * 4
        self.time_embed = nn.Sequential(nn.Linear(c.model_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        if c.adm_in_channels is not None:  # nested as in LDM: label_emb.0.0 / label_emb.0.2
            self.label_emb = nn.Sequential(
                nn.Sequential(nn.Linear(c.adm_in_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
            )

        def res(i: int, o: int) -> ResBlock:
            return ResBlock(i, o, emb_dim, c.norm_groups)

        def attn(ch: int, depth: int) -> list[SpatialTransformer]:
            """The block's transformer: none where its depth is 0."""
            if not depth:
                return []
            heads, linear = c.heads_at(ch), c.use_linear_projection
            return [SpatialTransformer(ch, heads, depth, c.context_dim, linear, c.norm_groups)]

        self.input_blocks = nn.ModuleList([Block([Conv2d(c.in_channels, c.model_channels, 3, padding=1)])])
        skip_channels = [c.model_channels]  # widths of the skip connections, in the order they are made
        ch = c.model_channels
        last = len(c.channel_mult) - 1
        input_depths, output_depths = iter(c.input_depths), iter(c.output_depths)
        for level, width in enumerate(c.level_channels):
            for _ in range(c.num_res_blocks):
                layers = [res(ch, width), *attn(width, next(input_depths))]
                self.input_blocks.append(Block(layers))
                ch = width
                skip_channels.append(ch)
            if level != last:
                self.input_blocks.append(Block([Downsample(ch)]))
                skip_channels.append(ch)

        middle = [res(ch, ch)]  # ResNet, transformer, ResNet; without a transformer one ResNet block (SSD-1B)
        if c.middle_depth:
            middle += [*attn(ch, c.middle_depth), res(ch, ch)]
        self.middle_block = Block(middle)

        self.output_blocks = nn.ModuleList()
        for level, width in reversed(list(enumerate(c.level_channels))):
            for i in range(c.num_res_blocks + 1):
                layers = [res(ch + skip_channels.pop(), width)]
                ch = width
                layers += attn(width, next(output_depths))
                if level != 0 and i == c.num_res_blocks:
                    layers.append(Upsample(width))
                self.output_blocks.append(Block(layers))

        self.out = nn.Sequential(
            group_norm(ch, c.norm_groups), nn.SiLU(), Conv2d(ch, c.out_channels, 3, padding=1)
        )

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor | float,
        context: torch.Tensor,
        vector: torch.Tensor | None = None,
        deep: DeepFeatures | None = None,
    ) -> torch.Tensor:
        """Latents (B, in, h, w), timesteps (B,) or scalar, text (B, 77, context_dim), and the added vector
        (B, adm_in_channels) when the config has one -> (B, out, h, w). With `deep` (DeepCache), a call that
        reuses runs only the top deep.depth blocks of each side around deep.features; any other call stores
        them there."""
        if (vector is None) != (self.config.adm_in_channels is None):
            wanted = self.config.adm_in_channels
            raise ValueError(f"this UNet takes {f'a {wanted}-wide added vector' if wanted else 'no added vector'}")
        t = torch.as_tensor(t, device=x.device)
        t = t.expand(x.shape[0]) if t.ndim == 0 else t
        emb = self.time_embed(timestep_embedding(t, self.config.model_channels).to(x.dtype))
        if vector is not None:
            emb = emb + self.label_emb(vector.to(x.dtype))
        context = context.to(x.dtype)

        reuse = deep is not None and deep.reuse
        skips = []
        h = x
        for block in self.input_blocks[: deep.depth] if reuse else self.input_blocks:
            h = block(h, emb, context)
            skips.append(h)
        if reuse:
            h, outputs = deep.features, self.output_blocks[len(self.output_blocks) - deep.depth :]
        else:
            h, outputs = self.middle_block(h, emb, context), self.output_blocks
        for i, block in enumerate(outputs):
            if deep is not None and not reuse and i == len(outputs) - deep.depth:
                deep.features = h
            h = torch.cat([h, skips.pop()], dim=1)
            # an upsampling block must land on the size of the skip it will be joined with next
            size = skips[-1].shape[-2:] if skips else None
            h = block(h, emb, context, size)
        return self.out(h)
