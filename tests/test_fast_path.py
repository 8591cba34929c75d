"""The fast path keeps the outputs: automatic dtype, channels-last weights, the float16 VAE's float32 retry.

Speed itself is measured in benchmarks/vs_diffusers.py (docs/benchmarks.md, `speed`), never here. These
tests hold the quality guard of each speed-up: the same weights and seed give final latents within a
stated relative error of the float32 path, and the shipped model follows its prompts as well as in float32.
"""

import copy
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import latentforge
from latentforge import pipeline, vae
from latentforge.images import tensor_to_images

# Relative L2 error of the final latents, automatic (bfloat16) path against float32, 20 Euler steps.
# Measured when this was written: 1.4-1.9% on the tiny random SD 1.x model, 0.25-0.46% on the shipped one.
BF16_LATENT_TOLERANCE = 0.03
PROMPTS = [
    "a small red circle on the left, white background",
    "a green triangle to the left of a yellow circle, gray background",
]


def final_latents(pipe, prompt: str, seed: int, **settings) -> torch.Tensor:
    """The clean latents of a whole Euler run (Euler's last step lands on its last prediction)."""
    box = {}
    pipe.generate(prompt, seed=seed, sampler="Euler", callback=lambda s: box.update(x0=s.denoised.float()), **settings)
    return box["x0"]


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).norm() / want.norm())


# --------------------------------------------------------------------------- dtype="auto"


@pytest.mark.parametrize(
    "flags, native",
    [("fpu avx512f avx512_bf16 avx512_vnni", True), ("fpu amx_tile amx_bf16", True), ("fpu avx2 avx512f", False)],
)
def test_native_bfloat16_reads_the_cpu_flags(monkeypatch, tmp_path, flags, native):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nflags\t\t: {flags}\n\nprocessor\t: 1\nflags\t\t: {flags}\n")
    monkeypatch.setattr(pipeline, "CPUINFO", str(cpuinfo))
    assert pipeline.native_bfloat16() is native


def test_native_bfloat16_is_false_without_cpuinfo(monkeypatch, tmp_path):
    monkeypatch.setattr(pipeline, "CPUINFO", str(tmp_path / "missing"))
    assert pipeline.native_bfloat16() is False


@pytest.mark.parametrize("native, want", [(True, torch.bfloat16), (False, torch.float32)])
def test_auto_dtype_follows_the_hardware(monkeypatch, native, want):
    monkeypatch.setattr(pipeline, "native_bfloat16", lambda: native)
    assert pipeline.resolve_dtype("auto", torch.device("cpu")) == want
    assert pipeline.resolve_dtype("auto", torch.device("cuda")) == torch.float16
    assert pipeline.resolve_dtype("float32", torch.device("cpu")) == torch.float32  # a named dtype always wins
    assert pipeline.resolve_dtype("bf16", torch.device("cuda")) == torch.bfloat16


def test_load_uses_the_automatic_dtype(monkeypatch, sd1_folder):
    monkeypatch.setattr(pipeline, "native_bfloat16", lambda: True)
    pipe = latentforge.load(sd1_folder, device="cpu")
    assert pipe.dtype == torch.bfloat16 and pipe.unet.out[2].weight.dtype == torch.bfloat16


# --------------------------------------------------------------------------- the quality guard


def test_bfloat16_final_latents_stay_close_to_float32(sd1_folder):
    f32 = latentforge.load(sd1_folder, dtype="float32", device="cpu")
    b16 = latentforge.load(sd1_folder, dtype="bfloat16", device="cpu")
    settings = dict(steps=20, width=64, height=64)
    errors = [
        relative_error(final_latents(b16, p, seed, **settings), final_latents(f32, p, seed, **settings))
        for p in PROMPTS
        for seed in (0, 1)
    ]
    assert max(errors) <= BF16_LATENT_TOLERANCE, errors
    assert min(errors) > 0  # the two paths really computed in different precisions


@pytest.fixture(scope="module")
def shipped_pair():
    return latentforge.load(dtype="float32", device="cpu"), latentforge.load(dtype="bfloat16", device="cpu")


def test_shipped_model_bfloat16_latents_stay_close_to_float32(shipped_pair):
    f32, b16 = shipped_pair
    errors = [relative_error(final_latents(b16, p, 3), final_latents(f32, p, 3)) for p in PROMPTS]
    assert max(errors) <= BF16_LATENT_TOLERANCE, errors


def test_shipped_model_follows_its_prompts_as_well_in_bfloat16(shipped_pair):
    """The default model's prompt adherence (`latentforge eval`'s judge) does not drop on the fast path:
    at most one prompt of 24 may flip (rounding can tip a borderline image either way)."""
    from latentforge.training.evaluate import evaluate

    f32, b16 = shipped_pair
    scores = [
        evaluate(pipe, n=24, seed=4, cfg_scales=(None,), two_objects_fraction=0.0)["scales"][0]["single_object"]
        for pipe in (f32, b16)
    ]
    assert scores[1] >= scores[0] - 1 / 24, scores


# --------------------------------------------------------------------------- channels-last weights


def test_convolution_weights_are_channels_last_and_change_nothing(sd1_folder):
    pipe = latentforge.load(sd1_folder, dtype="float32", device="cpu")
    convs = [m for model in (pipe.unet, pipe.vae) for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(c.weight.is_contiguous(memory_format=torch.channels_last) for c in convs)

    plain_unet = copy.deepcopy(pipe.unet).to(memory_format=torch.contiguous_format)
    plain_vae = copy.deepcopy(pipe.vae).to(memory_format=torch.contiguous_format)
    g = torch.Generator().manual_seed(0)
    x, context = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, 128, generator=g)
    with torch.no_grad():
        out, want = pipe.unet(x, 500, context), plain_unet(x, 500, context)
        image, want_image = pipe.vae.decode(x[:1]), plain_vae.decode(x[:1])
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert relative_error(out, want) < 1e-5 and relative_error(image, want_image) < 1e-5


# --------------------------------------------------------------------------- float16 VAE overflow


def test_float16_vae_that_overflows_is_retried_in_float32(sd1_folder):
    pipe = latentforge.load(sd1_folder, dtype="float16", device="cpu")
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pipe.decode(latents)  # an ordinary decode stays in float16, without a warning
    assert pipe.vae.quant_conv.weight.dtype == torch.float16

    with torch.no_grad():  # push the decoder's first activations past float16's 65504
        pipe.vae.decoder.conv_in.weight.mul_(3e4)
    reference = copy.deepcopy(pipe.vae).float()  # the same (float16-rounded) weights, in float32
    with pytest.warns(RuntimeWarning, match="overflowed in float16"):
        image = pipe.decode(latents)[0]
    assert pipe.vae.quant_conv.weight.dtype == torch.float32  # for good: the next call does not retry
    with torch.no_grad():
        z = latents / pipe.config.vae.scaling_factor
        want = tensor_to_images(reference.decode(z).float())[0]
    assert image.tobytes() == want.tobytes()
    assert pipe.generate("a cat", steps=2, seed=0, width=64, height=64)[0].getextrema() != ((0, 0),) * 3


# --------------------------------------------------------------------------- tiled VAE decode


@pytest.mark.parametrize("length, tile, overlap", [(8, 8, 2), (9, 8, 2), (16, 8, 2), (128, 64, 16), (100, 64, 16)])
def test_tiles_cover_the_latent_with_the_overlap(length, tile, overlap):
    starts = vae.tile_starts(length, tile, overlap)
    assert starts[0] == 0 and starts[-1] + min(tile, length) == length
    assert all(b - a <= tile - overlap for a, b in zip(starts, starts[1:], strict=False))


def test_tiled_decode_blends_a_local_decoder_exactly(shipped_pair, monkeypatch):
    """With a decoder that is purely local (each latent paints its own 8 x 8 pixels), tiles must add up to
    the whole decode exactly: the tile placement and the blend weights are right."""
    model = shipped_pair[0].vae
    monkeypatch.setattr(model, "decode", lambda z: F.interpolate(z[:, :3], scale_factor=model.downscale))
    z = torch.randn(2, 4, 21, 30, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(model.decode_tiled(z, 8, 2), model.decode(z), rtol=1e-6, atol=1e-6)


def test_tiled_decode_of_a_small_latent_is_the_whole_decode(shipped_pair):
    model = shipped_pair[0].vae
    z = torch.randn(1, 4, 8, 6, generator=torch.Generator().manual_seed(1))
    assert torch.equal(model.decode_tiled(z, 8, 2), model.decode(z))
    with pytest.raises(ValueError, match="overlap must be in"):
        model.decode_tiled(z, 8, 8)


def test_pipeline_vae_tiling_decodes_large_images_in_tiles(shipped_pair, monkeypatch):
    """vae_tiling changes nothing at the native size; above it, the image is decoded in tiles, close to
    the whole decode (each tile normalises alone, so not equal; measured mean 2.8/255 at 128 x 128)."""
    pipe = shipped_pair[0]
    settings = dict(prompt=PROMPTS[0], seed=3)
    native = pipe.generate(**settings)[0]
    whole = pipe.generate(**settings, width=128, height=128)[0]
    calls = []
    monkeypatch.setattr(pipe, "vae_tiling", True)
    monkeypatch.setattr(pipe.vae, "decode_tiled", lambda *a, f=pipe.vae.decode_tiled: calls.append(a[1:]) or f(*a))
    assert np.array_equal(np.asarray(pipe.generate(**settings)[0]), np.asarray(native)) and not calls
    tiled = pipe.generate(**settings, width=128, height=128)[0]
    assert calls == [(8, 2)]
    difference = np.abs(np.asarray(tiled, dtype=float) - np.asarray(whole, dtype=float))
    assert 0 < difference.mean() < 8
