"""Faster 3 x 3 convolutions (latentforge.convolution): Winograd, nearest 2x upsampling folded into the
kernel, and one matrix product for tiny images. The same functions as F.conv2d (after F.interpolate), used
only where they win.

Their speed is measured in benchmarks (`python -m benchmarks.convolution`, docs/benchmarks.md); these tests
hold their correctness and quality guard.
"""

import dataclasses
import functools

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import latentforge
from latentforge import convolution as convolution
from latentforge.inference import set_inference
from latentforge.unet import UNet
from latentforge.vae import AutoencoderKL


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want.double()).norm() / want.double().norm())


def random_conv(c_in: int, c_out: int, seed: int, dtype=torch.float64) -> convolution.Conv2d:
    """A frozen convolution switched to inference, as `latentforge.load` leaves the models' convolutions."""
    torch.manual_seed(seed)
    conv = convolution.Conv2d(c_in, c_out, 3, padding=1).to(dtype).to(memory_format=torch.channels_last)
    return set_inference(conv.eval().requires_grad_(False))


def trained(conv: convolution.Conv2d) -> convolution.Conv2d:
    """The convolution as training has it: not switched to inference, its weights trained."""
    return set_inference(conv, False).requires_grad_(True)


def image(n: int, c: int, h: int, w: int, seed: int, dtype=torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, h, w, generator=g, dtype=torch.float64).to(dtype)
    return x.contiguous(memory_format=torch.channels_last)


def spy(monkeypatch, name: str) -> list:
    """convolution.<name>, still called, with each call's input shape recorded in the returned list."""
    calls = []
    real = getattr(convolution, name)
    monkeypatch.setattr(convolution, name, lambda *a: calls.append(a[0].shape) or real(*a))
    return calls


def errors_against_float64(fast, n: int, channels: int, size: int, dtype, before=lambda x: x) -> tuple[float, float]:
    """Relative L2 errors against float64 on the unrounded inputs of `fast(x, weight, bias)` and of the
    direct convolution of `before(x)`, both in `dtype`, for a random channels -> channels 3 x 3 convolution."""
    conv64 = random_conv(channels, channels, seed=0)
    x64 = image(n, channels, size, size, seed=1)
    want = F.conv2d(before(x64), conv64.weight, conv64.bias, padding=1)
    conv = random_conv(channels, channels, seed=0, dtype=dtype)
    x = x64.to(dtype)
    got = fast(x, conv.weight, conv.bias)
    assert got.dtype == dtype
    return relative_error(got, want), relative_error(F.conv2d(before(x), conv.weight, conv.bias, padding=1), want)


@pytest.mark.parametrize("algorithm", [convolution.F2, convolution.F4], ids=["F2", "F4"])
@pytest.mark.parametrize(
    "n, c_in, c_out, h, w, chunk",
    [(2, 5, 7, 8, 8, 256), (1, 3, 4, 7, 10, 256), (2, 4, 3, 13, 9, 3), (1, 2, 2, 1, 1, 256), (1, 3, 3, 9, 9, 1)],
)
@pytest.mark.parametrize("bias", [True, False])
def test_winograd_is_the_convolution(algorithm, n, c_in, c_out, h, w, chunk, bias):
    """In float64 both algorithms agree with F.conv2d to rounding: whole and partial tiles (sizes that are
    not multiples of m), images done in several chunks with a short last one, with and without bias."""
    algorithm = dataclasses.replace(algorithm, tiles_per_chunk=chunk)
    conv = random_conv(c_in, c_out, seed=0)
    x = image(n, c_in, h, w, seed=1)
    b = conv.bias if bias else None
    got = convolution.conv3x3(x, conv.weight, b, algorithm)
    torch.testing.assert_close(got, F.conv2d(x, conv.weight, b, padding=1), rtol=1e-12, atol=1e-12)
    assert got.shape == (n, c_out, h, w) and got.is_contiguous(memory_format=torch.channels_last)


def test_winograd_reads_a_contiguous_input_too():
    conv = random_conv(4, 4, seed=0)
    x = image(1, 4, 9, 9, seed=1).contiguous()
    got = convolution.conv3x3(x, conv.weight, conv.bias, convolution.F4)
    torch.testing.assert_close(got, F.conv2d(x, conv.weight, conv.bias, padding=1))


@pytest.mark.parametrize(
    "dtype, bound, factor",
    [(torch.float32, 4e-6, 10), (torch.bfloat16, 2 * 2**-8, 4)],
    ids=["float32-F4", "bfloat16-F2"],
)
def test_winograd_error_in_its_dtype(dtype, bound, factor):
    """Against float64 on random data: float32 F(4x4) measured 1.8e-6 here (direct 4e-7), a thousandth of
    the bfloat16 path's error; bfloat16 F(2x2) 5.8e-3 (direct 2.9e-3), under two bfloat16 roundings (unit
    roundoff 2^-8)."""
    winograd = functools.partial(convolution.conv3x3, algorithm=convolution.ALGORITHMS[dtype])
    error, direct = errors_against_float64(winograd, 1, 64, 32, dtype)
    assert error <= bound, (error, direct)
    assert error < factor * direct  # within a small factor of what the dtype itself costs


def test_winograd_is_used_only_where_it_wins():
    big = random_conv(256, 256, seed=0, dtype=torch.float32)
    x = image(1, 256, 64, 64, seed=1, dtype=torch.float32)
    assert convolution.winograd_wins(big, x)  # float32, 64 x 64 and 256 channels
    assert not convolution.winograd_wins(big, x[:, :, :32, :32])  # small image: the weights dominate
    assert not convolution.winograd_wins(big.bfloat16(), x.bfloat16())  # bfloat16 needs 128 x 128
    assert convolution.winograd_wins(big.bfloat16(), image(1, 256, 128, 128, seed=1, dtype=torch.bfloat16))
    assert not convolution.winograd_wins(big.half(), x.half())  # float16: not on this path
    narrow = random_conv(256, 128, seed=0, dtype=torch.float32)
    assert not convolution.winograd_wins(narrow, x)  # few output channels: the transforms dominate
    strided = torch.nn.Conv2d(256, 256, 3, stride=2, padding=1)
    assert not convolution.winograd_wins(strided, x)
    assert not convolution.winograd_wins(torch.nn.Conv2d(256, 256, 1), x)


def test_conv2d_module_dispatches_and_keeps_gradients(monkeypatch):
    """Only a convolution switched to inference takes the fast way; one that was not (training, or a model
    built by hand) takes PyTorch's, under torch.no_grad() too, and its gradients flow."""
    calls = spy(monkeypatch, "conv3x3")
    conv = random_conv(256, 256, seed=0, dtype=torch.float32)
    x = image(1, 256, 64, 64, seed=1, dtype=torch.float32)
    fast = conv(x)  # switched: the fast way, with or without autograd recording
    assert calls == [x.shape]
    with torch.no_grad():
        plain = set_inference(conv, False)(x)
    assert calls == [x.shape]
    slow = trained(conv)(x)
    slow.sum().backward()
    assert calls == [x.shape] and conv.weight.grad is not None
    assert relative_error(fast, slow.detach()) < 1e-5 and torch.equal(plain, slow.detach())
    with pytest.raises(ValueError, match="requires_grad_"):
        set_inference(conv)  # trainable weights: the fast paths are for frozen models


@pytest.mark.parametrize("n, c_in, c_out, h, w", [(2, 5, 7, 8, 8), (1, 3, 4, 5, 7), (1, 2, 3, 1, 3), (3, 4, 2, 2, 1)])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("layout", ["channels_last", "contiguous"])
def test_unfolded_is_the_convolution(n, c_in, c_out, h, w, bias, layout):
    """In float64 the one matrix product is F.conv2d to rounding: borders, non-square and 1-pixel-wide
    images, batches, with and without bias; an NCHW input or weight is read correctly (only slower)."""
    conv = random_conv(c_in, c_out, seed=0)
    x = image(n, c_in, h, w, seed=1)
    weight = conv.weight if layout == "channels_last" else conv.weight.contiguous()
    x = x if layout == "channels_last" else x.contiguous()
    b = conv.bias if bias else None
    got = convolution.unfolded_conv3x3(x, weight, b)
    torch.testing.assert_close(got, F.conv2d(x, weight, b, padding=1), rtol=1e-12, atol=1e-12)
    assert got.shape == (n, c_out, h, w) and got.is_contiguous(memory_format=torch.channels_last)


def test_unfolded_error_in_bfloat16():
    """Same multiplies and float32 accumulation as the direct convolution: within a rounding of it."""
    error, direct = errors_against_float64(convolution.unfolded_conv3x3, 2, 256, 8, torch.bfloat16)
    assert error <= 2**-8 and error < 1.5 * direct, (error, direct)


def test_unfold_is_used_only_where_it_wins(monkeypatch):
    calls = spy(monkeypatch, "unfolded_conv3x3")
    channels = convolution.UNFOLD_MIN_CHANNELS
    conv = random_conv(channels, channels, seed=0, dtype=torch.float32)
    x = image(2, channels, 8, 8, seed=1, dtype=torch.float32)  # SD 1.5's deepest level, guidance batch
    torch.testing.assert_close(conv(x), F.conv2d(x, conv.weight, conv.bias, padding=1), rtol=1e-5, atol=1e-5)
    assert calls == [x.shape]
    half = random_conv(channels, channels, seed=0, dtype=torch.bfloat16)
    assert convolution.unfold_wins(half, x.bfloat16())
    assert x.shape[0] * 12 * 12 <= convolution.UNFOLD_MAX_ROWS  # SD 2.x at 768 px: 12 x 12
    assert not convolution.unfold_wins(conv, image(2, channels, 16, 16, seed=1, dtype=torch.float32))
    narrow = random_conv(channels // 2, channels // 2, seed=0, dtype=torch.float32)
    assert not convolution.unfold_wins(narrow, x[:, : channels // 2])  # weights in cache: oneDNN is as fast
    half.weight.data = half.weight.contiguous()
    assert not convolution.unfold_wins(half, x.bfloat16())  # NCHW weights would be copied each call
    with torch.no_grad():
        set_inference(conv, False)(x)  # not switched: the plain path, also outside autograd
    trained(conv)(x).sum().backward()  # training: the plain path, differentiable
    assert calls == [x.shape] and conv.weight.grad is not None


@pytest.mark.parametrize("n, c_in, c_out, h, w", [(2, 5, 7, 8, 8), (1, 3, 4, 5, 7), (1, 2, 3, 1, 3)])
@pytest.mark.parametrize("bias", [True, False])
def test_folded_upsampling_is_upsample_then_convolution(n, c_in, c_out, h, w, bias):
    """In float64, the four 2 x 2 convolutions of x are the 3 x 3 convolution of x upsampled 2x (nearest)."""
    conv = random_conv(c_in, c_out, seed=0)
    x = image(n, c_in, h, w, seed=1)
    b = conv.bias if bias else None
    got = convolution.upsampled_conv3x3(x, conv.weight, b)
    want = F.conv2d(F.interpolate(x, scale_factor=2.0, mode="nearest"), conv.weight, b, padding=1)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert got.is_contiguous(memory_format=torch.channels_last)


def test_folded_upsampling_error_in_bfloat16():
    """Summing taps rounds once more than the direct path: measured 3.4e-3 against 2.9e-3."""
    def up(x):
        return F.interpolate(x, scale_factor=2.0, mode="nearest")

    error, direct = errors_against_float64(convolution.upsampled_conv3x3, 1, 64, 16, torch.bfloat16, before=up)
    assert error <= 2**-8 and error < 2 * direct, (error, direct)


def test_upsampled_folds_only_an_exact_doubling_where_it_wins(monkeypatch):
    calls = spy(monkeypatch, "upsampled_conv3x3")
    channels = convolution.MIN_CHANNELS
    conv = random_conv(channels, channels, seed=0, dtype=torch.float32)
    side = int(convolution.MIN_UPSAMPLE_PIXELS**0.5)
    x = image(1, channels, side, side, seed=1, dtype=torch.float32)
    def want(size):
        return F.conv2d(F.interpolate(x, size=size, mode="nearest"), conv.weight, conv.bias, padding=1)

    torch.testing.assert_close(conv.upsampled(x), want((2 * side, 2 * side)))
    assert calls == [x.shape]
    odd = (2 * side - 1, 2 * side)  # the UNet's Upsample to an odd skip's size: interpolate, then convolve
    torch.testing.assert_close(conv.upsampled(x, odd), want(odd))
    small = x[:, :, : side // 2]
    conv.upsampled(small)
    narrow = random_conv(8, 8, seed=0, dtype=torch.float32)
    narrow.upsampled(image(1, 8, side, side, seed=1, dtype=torch.float32))  # few channels: plain
    with torch.no_grad():
        set_inference(conv, False).upsampled(x)  # not switched: the plain path, also outside autograd
    assert calls == [x.shape]
    trained(conv).upsampled(x).sum().backward()  # training: the plain path, differentiable
    assert calls == [x.shape] and conv.weight.grad is not None


def test_models_use_it_for_every_3x3_stride_1_convolution(sd1_folder):
    pipe = latentforge.load(sd1_folder, dtype="float32", device="cpu")
    for model in (pipe.unet, pipe.vae):
        assert isinstance(model, (UNet, AutoencoderKL))
        convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
        same_size = [m for m in convs if m.kernel_size == (3, 3) and m.stride == (1, 1)]
        assert same_size and all(isinstance(m, convolution.Conv2d) for m in same_size)
        assert all(m.inference for m in same_size)  # `load` switches the models to inference
        assert all(type(m) is torch.nn.Conv2d for m in convs if m not in same_size)


def fast_everywhere(way: str) -> tuple[dict, tuple[str, ...]]:
    """The module settings that put one fast way on every 3 x 3 convolution of the tiny test model (normally
    too small to qualify), and the functions that way calls."""
    if way == "winograd":  # and the folded upsampling
        fast = {dtype: dataclasses.replace(a, min_pixels=1) for dtype, a in convolution.ALGORITHMS.items()}
        return {"MIN_CHANNELS": 1, "MIN_UPSAMPLE_PIXELS": 1, "ALGORITHMS": fast}, ("conv3x3", "upsampled_conv3x3")
    return {"MIN_CHANNELS": 1, "UNFOLD_MIN_CHANNELS": 1, "UNFOLD_MAX_ROWS": 10**9}, ("unfolded_conv3x3",)


def final_latents(pipe, seed: int) -> torch.Tensor:
    box = {}
    pipe.generate("a red circle", seed=seed, steps=20, width=64, height=64, sampler="Euler",
                  callback=lambda s: box.update(x0=s.denoised.float()))  # fmt: skip
    return box["x0"]


@pytest.mark.parametrize("way", ["winograd", "unfold"])
def test_generation_through_the_fast_convolutions_keeps_the_outputs(sd1_folder, monkeypatch, way):
    """Quality guard: with every UNet and VAE 3 x 3 convolution on the Winograd path and every Upsample
    folded (or every 3 x 3 convolution one matrix product), float32 final latents and images are those of
    the plain path, and bfloat16 stays within the fast path's stated tolerance of float32
    (tests/test_fast_path.py, BF16_LATENT_TOLERANCE)."""
    from test_fast_path import BF16_LATENT_TOLERANCE

    f32 = latentforge.load(sd1_folder, dtype="float32", device="cpu")
    b16 = latentforge.load(sd1_folder, dtype="bfloat16", device="cpu")
    settings, names = fast_everywhere(way)
    for name, value in settings.items():
        monkeypatch.setattr(convolution, name, value)
    calls = []
    for name in names:
        real = getattr(convolution, name)
        monkeypatch.setattr(convolution, name, lambda *a, f=real, name=name: calls.append((name, a[0].dtype)) or f(*a))
    fast = {seed: final_latents(f32, seed) for seed in (0, 1)}
    fast_b16 = {seed: final_latents(b16, seed) for seed in (0, 1)}
    fast_image = np.asarray(f32.generate("a red circle", seed=0, steps=4, width=64, height=64)[0], dtype=int)
    assert {(name, dtype) for name in names for dtype in (torch.float32, torch.bfloat16)} <= set(calls)
    monkeypatch.setattr(convolution, "MIN_CHANNELS", 10**9)  # the plain path, for every way
    calls.clear()
    for seed in (0, 1):
        plain = final_latents(f32, seed)
        assert relative_error(fast[seed], plain) < 1e-5
        assert relative_error(fast_b16[seed], plain) <= BF16_LATENT_TOLERANCE
    plain_image = np.asarray(f32.generate("a red circle", seed=0, steps=4, width=64, height=64)[0], dtype=int)
    assert not calls
    assert abs(fast_image - plain_image).max() <= 1
