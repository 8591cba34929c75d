"""CLIP text transformer used by Stable Diffusion to turn token ids into conditioning.

The module layout mirrors Hugging Face's ``CLIPTextModel`` so that checkpoints load
without key remapping: ``TextEncoder().state_dict()`` keys equal the ``CLIPTextModel``
keys with the leading ``"text_model."`` removed (and without the ``position_ids`` buffer).
With ``projection_dim`` set (SDXL's second tower) it is a ``CLIPTextModelWithProjection``,
whose ``text_projection.weight`` has no prefix.
"""

from __future__ import annotations

from dataclasses import dataclass
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "SD1_TEXT_ENCODER",
    "SD2_TEXT_ENCODER",
    "SDXL_TEXT_ENCODER_2",
    "TextEncoder",
    "TextEncoderConfig",
]


def quick_gelu(x: Tensor) -> Tensor:
    """Sigmoid approximation of GELU used by OpenAI CLIP: (...) -> (...)."""
    # The constant 1.702 is what OpenAI trained with; exact GELU would change outputs.
    return x * torch.sigmoid(1.702 * x)


def exact_gelu(x: Tensor) -> Tensor:
    """Erf-based GELU used by OpenCLIP ViT-H: (...) -> (...)."""
    return F.gelu(x)


_ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "quick_gelu": quick_gelu,
    "gelu": exact_gelu,
}


@dataclass(frozen=True)
class TextEncoderConfig:
    """Hyper-parameters of a CLIP text tower."""

    vocab_size: int = 49408
    max_length: int = 77  # positions
    width: int = 768  # hidden size
    layers: int = 12
    heads: int = 12
    mlp_width: int = 3072  # intermediate size
    activation: str = "quick_gelu"  # "quick_gelu" (OpenAI CLIP, SD 1.x) or "gelu" (OpenCLIP ViT-H, SD 2.x)
    eps: float = 1e-5  # layer-norm epsilon
    projection_dim: int | None = None  # pooled-output projection (SDXL's OpenCLIP bigG: 1280); None: none

    def __post_init__(self) -> None:
        """Reject configurations that cannot describe a working transformer."""
        for name in ("vocab_size", "max_length", "width", "layers", "heads", "mlp_width"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"TextEncoderConfig.{name} must be a positive int, got {value!r}")
        if self.width % self.heads != 0:
            raise ValueError(
                f"TextEncoderConfig.width ({self.width}) must be divisible by heads ({self.heads}); "
                f"pick heads among the divisors of {self.width}"
            )
        if not isinstance(self.activation, str) or self.activation not in _ACTIVATIONS:
            raise ValueError(
                f"TextEncoderConfig.activation {self.activation!r} is unknown; "
                f"use one of {sorted(_ACTIVATIONS)}"
            )
        if isinstance(self.eps, bool) or not isinstance(self.eps, (int, float)) or not 0 < self.eps < 1:
            raise ValueError(f"TextEncoderConfig.eps must be a number between 0 and 1 (CLIP: 1e-5), got {self.eps!r}")
        dim = self.projection_dim
        if dim is not None and (not isinstance(dim, int) or isinstance(dim, bool) or dim < 1):
            raise ValueError(f"TextEncoderConfig.projection_dim must be a positive int or None, got {dim!r}")

    @property
    def head_dim(self) -> int:
        """Channels per attention head."""
        return self.width // self.heads


# OpenAI CLIP ViT-L/14 text tower (Stable Diffusion 1.x).
SD1_TEXT_ENCODER = TextEncoderConfig()

# OpenCLIP ViT-H/14 text tower as diffusers stores it for Stable Diffusion 2.x: the 24th
# layer is dropped because SD 2.x conditions on the penultimate layer (then final layer norm).
SD2_TEXT_ENCODER = TextEncoderConfig(width=1024, layers=23, heads=16, mlp_width=4096, activation="gelu")

# OpenCLIP ViT-bigG/14 text tower, SDXL's second text encoder: all 32 layers (SDXL reads the
# penultimate one without the final norm, and pools the last one), with its projection.
SDXL_TEXT_ENCODER_2 = TextEncoderConfig(
    width=1280, layers=32, heads=20, mlp_width=5120, activation="gelu", projection_dim=1280
)


def embedding(count: int, dim: int) -> nn.Embedding:
    """nn.Embedding with torch's N(0, 1) init, skipped on the meta device: there init does nothing,
    yet Embedding's normal_ on meta tensors imports torch._dynamo (about 1 s per process)."""
    weight = torch.empty(count, dim)
    if weight.device.type != "meta":
        nn.init.normal_(weight)
    return nn.Embedding(count, dim, _weight=weight)


class Embeddings(nn.Module):
    """Token plus learned absolute position embeddings."""

    def __init__(self, config: TextEncoderConfig) -> None:
        super().__init__()
        self.token_embedding = embedding(config.vocab_size, config.width)
        self.position_embedding = embedding(config.max_length, config.width)

    def forward(self, input_ids: Tensor, extra: Tensor | None = None) -> Tensor:
        """(B, T) int ids -> (B, T, width); ids from vocab_size on take the rows of ``extra`` (m, width)
        (textual-inversion vectors) in place of a token's, the position embedding still added."""
        # Positions are built per call instead of stored as a buffer so the state dict
        # stays checkpoint-shaped and meta-device construction leaves nothing unmaterialised.
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        return self._tokens(input_ids, extra) + self.position_embedding(positions)

    def _tokens(self, input_ids: Tensor, extra: Tensor | None) -> Tensor:
        """(B, T) ids -> (B, T, width) token vectors, rows of ``extra`` for ids >= vocab_size."""
        if extra is None:
            return self.token_embedding(input_ids)
        vocab = self.token_embedding.num_embeddings
        added = input_ids >= vocab
        # Two lookups and a select rather than one lookup in cat([weight, extra]): no copy of the whole table.
        tokens = self.token_embedding(input_ids.masked_fill(added, 0))
        rows = F.embedding((input_ids - vocab).clamp(min=0), extra.to(tokens))
        return torch.where(added.unsqueeze(-1), rows, tokens)


class SelfAttention(nn.Module):
    """Multi-head causal self-attention with separate q/k/v projections."""

    def __init__(self, config: TextEncoderConfig) -> None:
        super().__init__()
        self.heads = config.heads
        self.q_proj = nn.Linear(config.width, config.width)
        self.k_proj = nn.Linear(config.width, config.width)
        self.v_proj = nn.Linear(config.width, config.width)
        self.out_proj = nn.Linear(config.width, config.width)

    def _split_heads(self, x: Tensor) -> Tensor:
        """(B, T, width) -> (B, heads, T, head_dim)."""
        batch, length, width = x.shape
        return x.view(batch, length, self.heads, width // self.heads).transpose(1, 2)

    def forward(self, x: Tensor) -> Tensor:
        """(B, T, width) -> (B, T, width)."""
        batch, length, width = x.shape
        q = self._split_heads(self.q_proj(x))
        k = self._split_heads(self.k_proj(x))
        v = self._split_heads(self.v_proj(x))
        # CLIP's text tower is autoregressive-style: token t only sees tokens <= t, so
        # padding after EOS never influences earlier positions.
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        out = out.transpose(1, 2).reshape(batch, length, width)
        return self.out_proj(out)


class MLP(nn.Module):
    """Position-wise feed-forward block: width -> mlp_width -> width."""

    def __init__(self, config: TextEncoderConfig) -> None:
        super().__init__()
        self.activation = _ACTIVATIONS[config.activation]
        self.fc1 = nn.Linear(config.width, config.mlp_width)
        self.fc2 = nn.Linear(config.mlp_width, config.width)

    def forward(self, x: Tensor) -> Tensor:
        """(B, T, width) -> (B, T, width)."""
        return self.fc2(self.activation(self.fc1(x)))


class EncoderLayer(nn.Module):
    """Pre-norm transformer block: x + attn(ln1(x)), then x + mlp(ln2(x))."""

    def __init__(self, config: TextEncoderConfig) -> None:
        super().__init__()
        self.self_attn = SelfAttention(config)
        self.layer_norm1 = nn.LayerNorm(config.width, eps=config.eps)
        self.mlp = MLP(config)
        self.layer_norm2 = nn.LayerNorm(config.width, eps=config.eps)

    def forward(self, x: Tensor) -> Tensor:
        """(B, T, width) -> (B, T, width)."""
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class Encoder(nn.Module):
    """Stack of encoder layers; exists so state-dict keys read ``encoder.layers.{i}``."""

    def __init__(self, config: TextEncoderConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(config) for _ in range(config.layers))

    def forward(self, x: Tensor, stop: int, start: int = 0) -> Tensor:
        """Run layers ``start`` to ``stop - 1``: (B, T, width) -> (B, T, width)."""
        for layer in self.layers[start:stop]:
            x = layer(x)
        return x


class TextEncoder(nn.Module):
    """CLIP text transformer: token ids (B, T) -> per-token hidden states (B, T, width), and with
    ``config.projection_dim`` a pooled, projected vector (B, projection_dim)."""

    def __init__(self, config: TextEncoderConfig) -> None:
        super().__init__()
        if not isinstance(config, TextEncoderConfig):
            raise ValueError(f"config must be a TextEncoderConfig, got {type(config).__name__}")
        self.config = config
        self.embeddings = Embeddings(config)
        self.encoder = Encoder(config)
        self.final_layer_norm = nn.LayerNorm(config.width, eps=config.eps)
        self.text_projection = (
            None if config.projection_dim is None else nn.Linear(config.width, config.projection_dim, bias=False)
        )

    def _check_input_ids(self, input_ids: Tensor, extra: Tensor | None) -> None:
        """Validate that input_ids is a (B, T) integer tensor with 1 <= T <= max_length, its ids within the
        vocabulary and the rows of ``extra`` (m, width)."""
        if input_ids.dim() != 2:
            raise ValueError(
                f"input_ids must have shape (batch, length), got {tuple(input_ids.shape)}; "
                "add a batch dimension with input_ids.unsqueeze(0)"
            )
        if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
            raise ValueError(f"input_ids must be an integer tensor, got dtype {input_ids.dtype}")
        length = input_ids.shape[1]
        if not 1 <= length <= self.config.max_length:
            raise ValueError(
                f"input_ids length {length} is outside [1, {self.config.max_length}]; "
                f"split or truncate prompts to at most {self.config.max_length} tokens"
            )
        if extra is not None and (extra.dim() != 2 or extra.shape[1] != self.config.width):
            raise ValueError(
                f"extra token vectors must have shape (m, {self.config.width}), got {tuple(extra.shape)}"
            )
        top = self.config.vocab_size + (0 if extra is None else extra.shape[0])
        if input_ids.numel() and not 0 <= input_ids.min() <= input_ids.max() < top:
            raise ValueError(
                f"input_ids must lie in [0, {top}) ({self.config.vocab_size} tokens"
                f"{'' if extra is None else f' and {extra.shape[0]} extra vectors'}), got "
                f"[{int(input_ids.min())}, {int(input_ids.max())}]; use the model's own tokenizer"
            )

    def _check_clip_skip(self, clip_skip: int) -> None:
        """Validate clip_skip against the number of layers."""
        if isinstance(clip_skip, bool) or not isinstance(clip_skip, int):
            raise ValueError(f"clip_skip must be an int, got {clip_skip!r}")
        if not 1 <= clip_skip <= self.config.layers:
            raise ValueError(
                f"clip_skip must be in [1, {self.config.layers}] "
                f"(1 = last layer, 2 = penultimate, ...), got {clip_skip}"
            )

    def forward(self, input_ids: Tensor, clip_skip: int = 1, *, extra: Tensor | None = None) -> Tensor:
        """(B, T<=max_length) int ids -> (B, T, width) final-layer-normed hidden states.

        ``clip_skip`` follows AUTOMATIC1111: 1 takes the last layer's output, 2 the
        penultimate one, and so on; the final layer norm is applied to the layer taken.
        ``extra`` as in `encode`.
        """
        return self.encode(input_ids, clip_skip, extra=extra)[0]

    def encode(
        self,
        input_ids: Tensor,
        clip_skip: int = 1,
        *,
        final_norm: bool = True,
        pooled: bool = False,
        extra: Tensor | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """(B, T<=max_length) int ids -> ((B, T, width) hidden states, (B, projection_dim) pooled or None).

        The hidden states are layer ``layers - clip_skip + 1``'s output (1 = last layer), through the
        final layer norm only if ``final_norm`` (SDXL reads the penultimate layer without it). With
        ``pooled`` (needs ``projection_dim``), also the last layer's output at the end token, through
        the final layer norm and ``text_projection``: transformers' ``CLIPTextModelWithProjection.text_embeds``.
        Only the layers needed are run, each once. ``extra`` (m, width): vectors for ids vocab_size to
        vocab_size + m - 1 (textual-inversion embeddings), which never count as the end token.
        """
        self._check_input_ids(input_ids, extra)
        self._check_clip_skip(clip_skip)
        if pooled and self.text_projection is None:
            raise ValueError("pooled=True needs a text encoder with a projection (projection_dim); this one has none")
        # Layers after the one taken would be discarded anyway, so they are run only for the pooled vector.
        taken = self.config.layers - clip_skip + 1
        hidden = self.encoder(self.embeddings(input_ids, extra), taken)
        states = self.final_layer_norm(hidden) if final_norm else hidden
        if not pooled:
            return states, None
        last = self.encoder(hidden, self.config.layers, start=taken)
        return states, self._pool(last, input_ids)

    def _pool(self, last: Tensor, input_ids: Tensor) -> Tensor:
        """Last layer (B, T, width), ids (B, T) -> (B, projection_dim) at each row's end token.

        The end token is taken as the first largest id, as OpenCLIP (and transformers for SDXL's
        published config) do: in CLIP's vocabulary the end token, 49407, is the largest id, so this
        is its first position; pad ids (49407 or 0) cannot move it, nor can the ids past the vocabulary
        that stand for textual-inversion vectors (they count as -1 here).
        """
        rows = torch.arange(last.shape[0], device=last.device)
        input_ids = input_ids.to(last.device)
        end = input_ids.masked_fill(input_ids >= self.config.vocab_size, -1).argmax(dim=-1)
        # The layer norm works per position, so normalising the taken rows only gives the same values.
        return self.text_projection(self.final_layer_norm(last[rows, end]))
