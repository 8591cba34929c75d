"""Faster 3 x 3 convolutions for CPU inference: Winograd and upsampling folded into the kernel for large images,
one matrix product for tiny ones.

All three compute what `nn.Conv2d` computes (the first two with fewer multiplies) and are used only where
they were measured to win (`python -m benchmarks.convolution`, docs/benchmarks.md): in a model switched to
inference (`inference.set_inference`; training keeps PyTorch's convolution, whose backward it has), on the
CPU, in float32 or bfloat16, with 256 channels or more. Winograd and the folding on images with many
pixels per weight (the VAE at 512 x 512; the UNet's first level in float32 and its 32 -> 64 upsampling),
the matrix product on few (the UNet's 8 x 8 level). Small models (the shipped one) keep the plain path.
The models' 3 x 3 stride-1 convolutions are this module's `Conv2d`, which decides per call.

Winograd's minimal filtering F(m x m, 3 x 3) (Lavin & Gray, "Fast Algorithms for Convolutional Neural
Networks", 2015) computes an m x m block of outputs from an a x a input tile (a = m + 2) as

    Y = A^T [ (G g G^T) * (B^T d B) ] A

where * is elementwise per channel pair and the sum over input channels turns it into a^2 matrix
products of (tiles x C_in) by (C_in x C_out). A direct 3 x 3 convolution does 9 multiply-adds per output
and channel pair; F(4 x 4) does 36 / 16 = 2.25 and F(2 x 2) 16 / 4 = 4. The transforms around the
products are cheap in FLOPs but move memory, so the image is done a few tile rows at a time (the
transformed tiles stay in cache). It loses for few channels (the transforms dominate) and for small
images with many channels (the transformed weights, 4x or 1.8x the weights, are then the traffic; keeping
them would cost the memory this project keeps low). Accuracy (relative L2 error of one convolution
against float64 on the unrounded inputs, random data, benchmarks/convolution.py): float32 uses F(4 x 4),
2.6e-6 against the direct convolution's 1.0e-6; bfloat16 uses F(2 x 2), 5.8e-3 against 2.9e-3 (F(4 x 4)
would be about 3e-2 in bfloat16, too coarse). On the SD 1.5-sized random VAE, a bfloat16 512 x 512 decode
differs from float32 by 0.85/255 on average with it, 0.73/255 without.

Nearest-neighbour 2x upsampling followed by a 3 x 3 convolution (the decoder's and UNet's Upsample) is
four 2 x 2 convolutions of the small image: output pixel (2i + a, 2j + b) sees input rows i - 1, i
(a = 0) or i, i + 1 (a = 1) and the same for columns, with the 3 x 3 kernel's taps that land on the same
input pixel summed. That is 16 multiply-adds per 4 outputs instead of 36, and the 4x upsampled tensor is
never made. Each output row parity is one convolution with 2 C_out output channels; its outputs are
interleaved into the large image. Exact but for the rounding of the summed taps (bfloat16: 3.3e-3 against 2.9e-3).

The third way is for the opposite case, wide convolutions on tiny images (the UNet's deepest level, 8 x 8
latents at 512 x 512): oneDNN's direct convolution runs 1280 -> 1280 channels on 2 x 8 x 8 pixels at
under half its usual float32 speed (~80 against ~190 GFLOP/s). The same sums as one matrix product, the
nine shifted copies of the image side by side ((N H W) x (3 3 C_in), "im2col": a few MB there) times the
weights read in place as (C_out, 3 3 C_in), take 0.43-0.61x its time in float32 and 0.48-0.94x in
bfloat16 at 8 x 8, with the same number of multiplies and the same float32 accumulation.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

MIN_CHANNELS = 256  # fewer input or output channels and the transforms outweigh the saved multiplies
MIN_UPSAMPLE_PIXELS = 32 * 32  # folded upsampling: below this, summing the taps each call costs what it saves
UNFOLD_MIN_CHANNELS = 1280  # one matrix product: with 640 channels oneDNN is as fast (1.09x / 0.92x at 8 x 8)
UNFOLD_MAX_ROWS = 288  # ... on at most this many output pixels, batch x height x width (2 x 12 x 12: 0.8x / ~1x)


@dataclass(frozen=True)
class Algorithm:
    """F(m x m, 3 x 3): input transform B^T (a x a), filter transform G (a x 3), output transform A^T (m x a)."""

    m: int
    min_pixels: int  # height x width below which the direct convolution is as fast (the weights dominate)
    tiles_per_chunk: int  # tiles transformed and multiplied at once: a few MB, in cache (measured best)
    BT: tuple[tuple[float, ...], ...]
    G: tuple[tuple[float, ...], ...]
    AT: tuple[tuple[float, ...], ...]

    @property
    def a(self) -> int:
        return self.m + 2

    def matrices(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The 2-D transforms as Kronecker products acting on a flattened tile: B (a^2 x a^2), G (a^2 x 9),
        A (m^2 x a^2)."""
        bt, g, at = (torch.tensor(t, dtype=torch.float64) for t in (self.BT, self.G, self.AT))
        return torch.kron(bt, bt).to(dtype), torch.kron(g, g).to(dtype), torch.kron(at, at).to(dtype)


# Interpolation points 0, 1, -1 and infinity.
F2 = Algorithm(
    m=2,
    min_pixels=128 * 128,
    tiles_per_chunk=512,
    BT=((1, 0, -1, 0), (0, 1, 1, 0), (0, -1, 1, 0), (0, 1, 0, -1)),
    G=((1, 0, 0), (0.5, 0.5, 0.5), (0.5, -0.5, 0.5), (0, 0, 1)),
    AT=((1, 1, 1, 0), (0, 1, -1, -1)),
)
# Interpolation points 0, 1, -1, 2, -2 and infinity.
F4 = Algorithm(
    m=4,
    min_pixels=64 * 64,
    tiles_per_chunk=256,
    BT=(
        (4, 0, -5, 0, 1, 0),
        (0, -4, -4, 1, 1, 0),
        (0, 4, -4, -1, 1, 0),
        (0, -2, -1, 2, 1, 0),
        (0, 2, -1, -2, 1, 0),
        (0, 4, 0, -5, 0, 1),
    ),
    G=(
        (1 / 4, 0, 0),
        (-1 / 6, -1 / 6, -1 / 6),
        (-1 / 6, 1 / 6, -1 / 6),
        (1 / 24, 1 / 12, 1 / 6),
        (1 / 24, -1 / 12, 1 / 6),
        (0, 0, 1),
    ),
    AT=((1, 1, 1, 1, 1, 0), (0, 1, -1, 2, -2, 0), (0, 1, 1, 4, 4, 0), (0, 1, -1, 8, -8, 1)),
)
ALGORITHMS = {torch.float32: F4, torch.bfloat16: F2}


def wide_inference_3x3(conv: nn.Conv2d, x: torch.Tensor) -> bool:
    """Whether `conv(x)` is a plain 3 x 3, stride 1, padding 1 convolution with at least MIN_CHANNELS input
    and output channels, on the CPU in float32 or bfloat16. Every fast way needs this; each adds its own
    image-size bound. (Whether the model runs for inference at all is the caller's: `Conv2d.inference`.)"""
    return (
        x.device.type == "cpu"
        and x.dtype in ALGORITHMS
        and conv.weight.dtype == x.dtype
        and x.ndim == 4
        and conv.kernel_size == (3, 3)
        and conv.stride == (1, 1)
        and conv.padding == (1, 1)
        and conv.dilation == (1, 1)
        and conv.groups == 1
        and conv.padding_mode == "zeros"
        and min(conv.in_channels, conv.out_channels) >= MIN_CHANNELS
    )


def winograd_wins(conv: nn.Conv2d, x: torch.Tensor) -> bool:
    """Whether `conv(x)` goes the Winograd way: on an image of at least the algorithm's `min_pixels`."""
    return wide_inference_3x3(conv, x) and x.shape[2] * x.shape[3] >= ALGORITHMS[x.dtype].min_pixels


def upsample_wins(conv: nn.Conv2d, x: torch.Tensor) -> bool:
    """Whether conv(2x nearest upsampling of x) is done as four 2 x 2 convolutions of x: for inputs of at
    least MIN_UPSAMPLE_PIXELS (measured there; small models keep the plain path)."""
    return wide_inference_3x3(conv, x) and x.shape[2] * x.shape[3] >= MIN_UPSAMPLE_PIXELS


def unfold_wins(conv: nn.Conv2d, x: torch.Tensor) -> bool:
    """Whether `conv(x)` is done as one matrix product: at least UNFOLD_MIN_CHANNELS in and out, on at most
    UNFOLD_MAX_ROWS output pixels, with channels-last weights (read in place; other layouts would be copied)."""
    return (
        wide_inference_3x3(conv, x)
        and min(conv.in_channels, conv.out_channels) >= UNFOLD_MIN_CHANNELS
        and x.shape[0] * x.shape[2] * x.shape[3] <= UNFOLD_MAX_ROWS
        and conv.weight.is_contiguous(memory_format=torch.channels_last)
    )


def conv3x3(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, algorithm: Algorithm) -> torch.Tensor:
    """F.conv2d(x, weight, bias, padding=1) for a (C_out, C_in, 3, 3) weight, computed by `algorithm`.
    The result is channels-last (as oneDNN's is for channels-last weights)."""
    m, a = algorithm.m, algorithm.a
    n, channels, height, width = x.shape
    out_channels = weight.shape[0]
    B, G, A = algorithm.matrices(x.dtype)
    tiles_h, tiles_w = -(-height // m), -(-width // m)
    image = x.permute(0, 2, 3, 1)  # (N, H, W, C): a view for channels-last x
    out = x.new_empty(n, tiles_h * m, tiles_w * m, out_channels)
    rows = min(tiles_h, max(1, algorithm.tiles_per_chunk // (n * tiles_w)))
    most = n * rows * tiles_w  # tiles in a chunk
    # (a^2, C_in, C_out) transformed weights. G's entries are exact in the dtype used (F(2x2)'s are halves)
    # and the GEMM accumulates in float32, so U is rounded once.
    U = (G @ weight.permute(2, 3, 1, 0).reshape(9, -1)).view(a * a, channels, out_channels)
    # One set of chunk buffers, reused from chunk to chunk (a few MB: they stay in cache). `halo`: a chunk's
    # input rows with a one-pixel zero border (the convolution's padding) and zeros for whatever rounds the
    # image up to whole tiles; its border columns are never written.
    halo = x.new_zeros(n, m * rows + 2, m * tiles_w + 2, channels)
    tiles, V = x.new_empty(a * a, most * channels), x.new_empty(a * a, most, channels)
    M, Y = x.new_empty(a * a, most, out_channels), x.new_empty(m * m, most * out_channels)
    s_n, s_h, s_w, s_c = halo.stride()
    for top in range(0, tiles_h, rows):
        count = min(rows, tiles_h - top)
        t = n * count * tiles_w
        first, last = m * top - 1, m * (top + count) + 1  # image rows this chunk reads (with its halo)
        low, high = max(first, 0), min(last, height)
        halo[:, low - first : high - first, 1 : 1 + width] = image[:, low:high]
        halo[:, : low - first].zero_()  # above the image (first chunk)
        halo[:, high - first : last - first].zero_()  # below it (last chunk)
        windows = halo.as_strided((a, a, n, count, tiles_w, channels), (s_h, s_w, s_n, m * s_h, m * s_w, s_c))
        tiles[:, : t * channels].view(a, a, n, count, tiles_w, channels).copy_(windows)
        torch.mm(B, tiles[:, : t * channels], out=V[:, :t].view(a * a, -1))
        torch.bmm(V[:, :t], U, out=M[:, :t])
        torch.mm(A, M[:, :t].view(a * a, -1), out=Y[:, : t * out_channels])
        blocks = Y[:, : t * out_channels].view(m, m, n, count, tiles_w, out_channels).permute(2, 3, 0, 4, 1, 5)
        target = out[:, m * top : m * (top + count)].view(n, count, m, tiles_w, m, out_channels)
        if bias is None:
            target.copy_(blocks)
        else:
            torch.add(blocks, bias, out=target)
    if out.shape[1:3] != (height, width):
        out = out[:, :height, :width].contiguous()
    return out.permute(0, 3, 1, 2)


def unfolded_conv3x3(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """F.conv2d(x, weight, bias, padding=1) for a (C_out, C_in, 3, 3) weight as one matrix product: the
    (N H W) x (3 3 C_in) matrix of each output pixel's 3 x 3 neighbourhood times the weights as
    (C_out, 3 3 C_in), a view of channels-last weights. The result is channels-last."""
    n, channels, height, width = x.shape
    out_channels = weight.shape[0]
    padded = F.pad(x.permute(0, 2, 3, 1), (0, 0, 1, 1, 1, 1))  # (N, H + 2, W + 2, C), zero border
    s_n, s_h, s_w, s_c = padded.stride()
    windows = padded.as_strided((n, height, width, 3, 3, channels), (s_n, s_h, s_w, s_h, s_w, s_c))
    columns = windows.reshape(n * height * width, 9 * channels)  # the one copy
    kernel = weight.permute(0, 2, 3, 1).reshape(out_channels, 9 * channels).t()
    out = torch.mm(columns, kernel) if bias is None else torch.addmm(bias, columns, kernel)
    return out.view(n, height, width, out_channels).permute(0, 3, 1, 2)


def upsampled_conv3x3(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """F.conv2d(F.interpolate(x, scale_factor=2, mode="nearest"), weight, bias, padding=1), computed from x
    as four 2 x 2 convolutions; channels-last result."""
    n, _, height, width = x.shape
    out_channels = weight.shape[0]
    kernels = folded_kernels(weight)
    bias = None if bias is None else bias.repeat(2)
    out = x.new_empty(n, height, 2, width, 2, out_channels)
    for a in range(2):  # one output row parity at a time: half the intermediate memory of all four at once
        # Padding 1 gives (H + 1) x (W + 1) outputs per phase; phase (a, b) wants those from row a, column b.
        phases = F.conv2d(x, kernels[a], bias, padding=1)
        phases = phases.permute(0, 2, 3, 1).view(n, height + 1, width + 1, 2, out_channels)
        for b in range(2):
            out[:, :, a, :, b] = phases[:, a : a + height, b : b + width, b]
        del phases
    return out.view(n, 2 * height, 2 * width, out_channels).permute(0, 3, 1, 2)


def folded_kernels(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For output row parity a = 0, 1 the (2 C_out, C_in, 2, 2) kernels of folded upsampling: column parity
    b = 0's C_out kernels, then b = 1's; channels-last. Parity 0 sees input pixels (i - 1, i) with taps
    (k0, k1 + k2), parity 1 sees (i, i + 1) with (k0 + k1, k2): rows first, then columns. The taps are summed
    in float32 (or better) and rounded once."""

    def fold(taps: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
        k0, k1, k2 = taps.unbind(dim)
        return torch.stack((k0, k1 + k2), dim), torch.stack((k0 + k1, k2), dim)

    exact = weight.to(torch.promote_types(weight.dtype, torch.float32))
    return tuple(
        torch.cat(fold(rows, -1)).to(weight.dtype).contiguous(memory_format=torch.channels_last)
        for rows in fold(exact, -2)
    )


@contextlib.contextmanager
def circular_padding(models: Iterable[nn.Module | None], on: bool = True):
    """Within it (when `on`), every convolution of these models pads by wrapping around the image instead of
    with zeros, so that what they make tiles seamlessly (A1111's "Tiling"); the padding modes are put back
    after. The faster ways above need zero padding, so those layers take nn.Conv2d's way meanwhile."""
    convs = [m for model in models if model is not None and on for m in model.modules() if isinstance(m, nn.Conv2d)]
    modes = [conv.padding_mode for conv in convs]
    for conv in convs:
        conv.padding_mode = "circular"
    try:
        yield
    finally:
        for conv, mode in zip(convs, modes):
            conv.padding_mode = mode


class Conv2d(nn.Conv2d):
    """nn.Conv2d (same parameters, same state-dict keys) that takes a faster way where one wins, in a model
    switched to inference (`inference.set_inference`)."""

    inference = False  # the fast ways are taken only when True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.inference and winograd_wins(self, x):
            return conv3x3(x, self.weight, self.bias, ALGORITHMS[x.dtype])
        if self.inference and unfold_wins(self, x):
            return unfolded_conv3x3(x, self.weight, self.bias)
        return super().forward(x)

    def upsampled(self, x: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        """self(F.interpolate(x, size, mode="nearest")); size defaults to twice x's, the case made faster."""
        doubled = (2 * x.shape[2], 2 * x.shape[3])
        if self.inference and tuple(size or doubled) == doubled and upsample_wins(self, x):
            return upsampled_conv3x3(x, self.weight, self.bias)
        return self(F.interpolate(x, size=size or doubled, mode="nearest"))
