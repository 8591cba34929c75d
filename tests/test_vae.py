"""Tests for latentforge.vae against diffusers' AutoencoderKL built (tiny, random) in the test."""

from __future__ import annotations

import dataclasses
import weakref

import pytest
import torch
import torch.nn.functional as F

from latentforge.inference import set_inference
from latentforge.layouts import vae_config_from_diffusers, vae_from_diffusers
from latentforge.vae import SD_VAE, AutoencoderKL, VAEConfig, sample_latents

from diffusers import AutoencoderKL as DiffusersVAE  # noqa: E402

# float32 parity; both sides do the same math, so differences are rounding only.
TOL = dict(atol=1e-4, rtol=1e-4)

# Tiny diffusers VAEs: (block_out_channels, layers_per_block, latent_channels, norm_num_groups).
# Widths differ between levels so that a level-index mix-up changes shapes or results.
TINY_SHAPES = {
    "4_levels_f8": ((32, 64, 64, 64), 1, 4, 32),
    "2_levels_f2": ((32, 64), 2, 4, 32),
    "3_levels_f4_z8_g16": ((32, 64, 96), 1, 8, 16),
}

# Stable Diffusion's VAE as diffusers describes it (its class defaults are a one-level toy).
SD_DIFFUSERS_KWARGS = dict(
    block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    layers_per_block=2,
    latent_channels=4,
    norm_num_groups=32,
    sample_size=512,
    scaling_factor=0.18215,
)


def diffusers_vae(widths: tuple[int, ...], layers: int, latents: int, groups: int) -> DiffusersVAE:
    """A diffusers AutoencoderKL of the given shape (parameters left at their init)."""
    return DiffusersVAE(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(widths),
        up_block_types=("UpDecoderBlock2D",) * len(widths),
        block_out_channels=widths,
        layers_per_block=layers,
        latent_channels=latents,
        norm_num_groups=groups,
        sample_size=64,
    )


def perturb_(model: torch.nn.Module, seed: int) -> None:
    """Move every parameter well away from its init so that swapped or unused weights show."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            noise = torch.randn(param.shape, generator=generator)
            if param.ndim == 1:
                # Norm scales (init 1) and biases (init 0): a 1 or a 0 would hide a mix-up.
                param.add_(0.3 * noise)
            else:
                param.add_(0.5 * param.std() * noise)


@pytest.fixture(scope="module", params=sorted(TINY_SHAPES))
def pair(request: pytest.FixtureRequest) -> tuple[DiffusersVAE, AutoencoderKL]:
    """A perturbed tiny diffusers VAE and our AutoencoderKL loaded (strictly) from it."""
    torch.manual_seed(0)
    reference = diffusers_vae(*TINY_SHAPES[request.param]).eval()
    perturb_(reference, seed=1)
    config = vae_config_from_diffusers(dict(reference.config))
    ours = AutoencoderKL(config).eval()
    ours.load_state_dict(vae_from_diffusers(reference.state_dict(), config), strict=True)
    return reference, ours


def random_images(batch: int, height: int, width: int, seed: int) -> torch.Tensor:
    """Images in [-1, 1], (batch, 3, height, width)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, height, width, generator=generator) * 2 - 1


def random_latents(model: AutoencoderKL, batch: int, height: int, width: int, seed: int) -> torch.Tensor:
    """Unscaled latents (batch, z, height, width)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, model.config.latent_channels, height, width, generator=generator)


# ---------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(TINY_SHAPES))
def test_config_from_diffusers_matches_tiny_shapes(name: str) -> None:
    widths, layers, latents, groups = TINY_SHAPES[name]
    config = vae_config_from_diffusers(dict(diffusers_vae(widths, layers, latents, groups).config))
    assert config == VAEConfig(
        base_channels=widths[0],
        channel_mult=tuple(w // widths[0] for w in widths),
        num_res_blocks=layers,
        latent_channels=latents,
        norm_groups=groups,
    )
    assert config.downscale == 2 ** (len(widths) - 1)


def test_sd_preset_is_the_diffusers_sd_vae() -> None:
    with torch.device("meta"):
        reference = DiffusersVAE(**SD_DIFFUSERS_KWARGS)
    assert vae_config_from_diffusers(dict(reference.config)) == SD_VAE
    assert SD_VAE.downscale == 8


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (dict(norm_groups=24), "divisible by norm_groups"),
        (dict(base_channels=48), "divisible by norm_groups"),
        (dict(base_channels=32, channel_mult=(1, 1.5)), r"channel_mult\[1\] must be a positive int"),
        (dict(channel_mult=()), "at least one level"),
        (dict(channel_mult=5), "channel_mult must be a sequence"),
        (dict(channel_mult=(1, 0)), r"channel_mult\[1\] must be a positive int"),
        (dict(latent_channels=0), "latent_channels must be a positive int"),
        (dict(num_res_blocks=-1), "num_res_blocks must be a positive int"),
        (dict(in_channels=True), "in_channels must be a positive int"),
        (dict(out_channels=3.0), "out_channels must be a positive int"),
        (dict(scaling_factor=0.0), "scaling_factor must be a finite positive"),
        (dict(scaling_factor=float("nan")), "scaling_factor must be a finite positive"),
        (dict(scaling_factor="0.18215"), "scaling_factor must be a number"),
    ],
)
def test_config_rejects_invalid_values(changes: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        VAEConfig(**changes)


def test_config_accepts_list_channel_mult_and_stays_hashable() -> None:
    config = VAEConfig(channel_mult=[1, 2, 4, 4])
    assert config == SD_VAE
    assert hash(config) == hash(SD_VAE)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.latent_channels = 8  # type: ignore[misc]


def test_model_rejects_non_config() -> None:
    with pytest.raises(ValueError, match="must be a VAEConfig"):
        AutoencoderKL({"latent_channels": 4})  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# State-dict layout
# ---------------------------------------------------------------------------------------------


def ldm_resnet_keys(prefix: str, in_channels: int, out_channels: int) -> set[str]:
    """The original's parameter names of one ResnetBlock under prefix."""
    layers = ["norm1", "conv1", "norm2", "conv2"] + (["nin_shortcut"] if in_channels != out_channels else [])
    return {f"{prefix}.{layer}.{kind}" for layer in layers for kind in ("weight", "bias")}


def ldm_expected_keys(config: VAEConfig) -> set[str]:
    """The CompVis/LDM first_stage_model key set, written out from the original's layout."""
    widths, levels = config.level_channels, len(config.channel_mult)
    leaf = lambda *names: {f"{n}.{kind}" for n in names for kind in ("weight", "bias")}  # noqa: E731
    keys = leaf("quant_conv", "post_quant_conv")
    for side in ("encoder", "decoder"):
        keys |= leaf(f"{side}.conv_in", f"{side}.norm_out", f"{side}.conv_out")
        keys |= ldm_resnet_keys(f"{side}.mid.block_1", widths[-1], widths[-1])
        keys |= ldm_resnet_keys(f"{side}.mid.block_2", widths[-1], widths[-1])
        keys |= leaf(*(f"{side}.mid.attn_1.{n}" for n in ("norm", "q", "k", "v", "proj_out")))
    width = config.base_channels
    for i in range(levels):
        for j in range(config.num_res_blocks):
            keys |= ldm_resnet_keys(f"encoder.down.{i}.block.{j}", width, widths[i])
            width = widths[i]
        if i < levels - 1:
            keys |= leaf(f"encoder.down.{i}.downsample.conv")
    for i in reversed(range(levels)):
        for j in range(config.num_res_blocks + 1):
            keys |= ldm_resnet_keys(f"decoder.up.{i}.block.{j}", width, widths[i])
            width = widths[i]
        if i > 0:
            keys |= leaf(f"decoder.up.{i}.upsample.conv")
    return keys


def test_full_size_state_dict_is_the_ldm_layout() -> None:
    with torch.device("meta"):
        ours = AutoencoderKL(SD_VAE)
        reference = DiffusersVAE(**SD_DIFFUSERS_KWARGS)
    state = ours.state_dict()
    assert all(t.device.type == "meta" for t in state.values())
    assert set(state) == ldm_expected_keys(SD_VAE)

    converted = vae_from_diffusers(reference.state_dict(), SD_VAE)
    assert set(converted) == set(state)
    mismatched = {
        key: (tuple(converted[key].shape), tuple(ours_tensor.shape))
        for key, ours_tensor in state.items()
        if converted[key].shape != ours_tensor.shape
    }
    assert not mismatched
    # Spot checks of the original's shapes that the key names alone do not pin down.
    assert state["encoder.mid.attn_1.q.weight"].shape == (512, 512, 1, 1)
    assert state["decoder.up.0.block.0.nin_shortcut.weight"].shape == (128, 256, 1, 1)
    assert state["encoder.conv_out.weight"].shape == (8, 512, 3, 3)
    assert state["quant_conv.weight"].shape == (8, 8, 1, 1)
    assert state["post_quant_conv.weight"].shape == (4, 4, 1, 1)
    assert sum(t.numel() for t in state.values()) == sum(t.numel() for t in reference.state_dict().values())


@pytest.mark.parametrize("name", sorted(TINY_SHAPES))
def test_tiny_state_dict_is_the_ldm_layout(name: str) -> None:
    config = vae_config_from_diffusers(dict(diffusers_vae(*TINY_SHAPES[name]).config))
    with torch.device("meta"):
        ours = AutoencoderKL(config)
    assert set(ours.state_dict()) == ldm_expected_keys(config)


# ---------------------------------------------------------------------------------------------
# Numerical parity with diffusers
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("batch", "height", "width"), [(1, 64, 64), (2, 48, 64)])
@torch.no_grad()
def test_encode_matches_diffusers(
    pair: tuple[DiffusersVAE, AutoencoderKL], batch: int, height: int, width: int
) -> None:
    reference, ours = pair
    images = random_images(batch, height, width, seed=2)
    expected = reference.encode(images).latent_dist
    mean, logvar = ours.encode(images)
    factor = ours.downscale
    assert mean.shape == (batch, ours.config.latent_channels, height // factor, width // factor)
    torch.testing.assert_close(mean, expected.mean, **TOL)
    torch.testing.assert_close(logvar, expected.logvar, **TOL)


@pytest.mark.parametrize(("batch", "height", "width"), [(1, 8, 8), (2, 6, 8)])
@torch.no_grad()
def test_decode_matches_diffusers(
    pair: tuple[DiffusersVAE, AutoencoderKL], batch: int, height: int, width: int
) -> None:
    reference, ours = pair
    latents = random_latents(ours, batch, height, width, seed=3)
    expected = reference.decode(latents).sample
    images = ours.decode(latents)
    factor = ours.downscale
    assert images.shape == (batch, 3, height * factor, width * factor)
    torch.testing.assert_close(images, expected, **TOL)


@torch.no_grad()
def test_logvar_is_clamped_like_diffusers(pair: tuple[DiffusersVAE, AutoencoderKL]) -> None:
    reference, ours = pair
    z = ours.config.latent_channels
    # Push half the logvar channels far above the clamp range and half far below it.
    shift = torch.tensor([1000.0, -1000.0]).repeat_interleave(z // 2)
    original = ours.quant_conv.bias.clone()
    try:
        for model in (reference, ours):
            model.quant_conv.bias[z:] += shift
        images = random_images(1, 32, 32, seed=4)
        _, logvar = ours.encode(images)
        assert logvar[:, : z // 2].eq(20.0).all() and logvar[:, z // 2 :].eq(-30.0).all()
        torch.testing.assert_close(logvar, reference.encode(images).latent_dist.logvar, **TOL)
    finally:
        for model in (reference, ours):
            model.quant_conv.bias.copy_(original)


@torch.no_grad()
def test_sample_latents_matches_diffusers(pair: tuple[DiffusersVAE, AutoencoderKL]) -> None:
    reference, ours = pair
    images = random_images(2, 32, 32, seed=5)
    mean, logvar = ours.encode(images)
    expected = reference.encode(images).latent_dist.sample(generator=torch.Generator().manual_seed(6))
    sample = sample_latents(mean, logvar, generator=torch.Generator().manual_seed(6))
    torch.testing.assert_close(sample, expected, **TOL)
    assert not torch.allclose(sample, mean)


# ---------------------------------------------------------------------------------------------
# Sampling and input checks
# ---------------------------------------------------------------------------------------------


def test_sample_latents_follows_the_distribution() -> None:
    mean = torch.full((4, 4, 64, 64), 1.5)
    logvar = torch.full_like(mean, 2 * torch.log(torch.tensor(0.25)).item())
    first = sample_latents(mean, logvar, generator=torch.Generator().manual_seed(0))
    again = sample_latents(mean, logvar, generator=torch.Generator().manual_seed(0))
    other = sample_latents(mean, logvar, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(first, again, atol=0, rtol=0)
    assert not torch.equal(first, other)
    assert abs(first.mean().item() - 1.5) < 0.01
    assert abs(first.std().item() - 0.25) < 0.01


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_sample_latents_keeps_dtype_and_device(dtype: torch.dtype) -> None:
    mean = torch.zeros(1, 4, 8, 8, dtype=dtype)
    sample = sample_latents(mean, torch.zeros_like(mean))
    assert sample.dtype == dtype and sample.device == mean.device


def test_sample_latents_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="same shape"):
        sample_latents(torch.zeros(1, 4, 8, 8), torch.zeros(1, 4, 8, 4))


def test_encode_and_decode_reject_bad_shapes() -> None:
    model = AutoencoderKL(VAEConfig(base_channels=32, channel_mult=(1, 2), num_res_blocks=1))
    with pytest.raises(ValueError, match=r"images shaped \(batch, 3, height, width\)"):
        model.encode(torch.zeros(1, 4, 16, 16))
    with pytest.raises(ValueError, match="divisible by 2"):
        model.encode(torch.zeros(1, 3, 16, 15))
    with pytest.raises(ValueError, match=r"latents shaped \(batch, 4, height, width\)"):
        model.decode(torch.zeros(1, 3, 8, 8))
    with pytest.raises(ValueError, match=r"latents shaped"):
        model.decode(torch.zeros(4, 8, 8))


def test_encoder_and_decoder_hold_one_activation_at_a_time() -> None:
    """Inference memory: a level's input (the largest tensor at that level: 1 GB in float32 for a
    1024 x 1024 decode) is freed once the level's first block has its output, not kept to the level's end.
    Checked with weak references to the activation that enters the second level (encoder) and the full
    resolution level (decoder); that the outputs stay diffusers' is the parity tests above."""
    torch.manual_seed(0)
    model = AutoencoderKL(VAEConfig(base_channels=32, channel_mult=(1, 2), num_res_blocks=2)).eval()
    set_inference(model.requires_grad_(False))
    entering = {"encoder": model.encoder.down[0].downsample, "decoder": model.decoder.up[1].upsample}
    second = {"encoder": model.encoder.down[1].block[1], "decoder": model.decoder.up[0].block[1]}
    alive = {}
    for part, layer in entering.items():
        layer.register_forward_hook(lambda m, a, out, part=part: alive.update({part: weakref.ref(out)}))
        second[part].register_forward_pre_hook(lambda m, a, part=part: alive.update({part: alive[part]() is not None}))
    image = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        model.decode(model.encode(image)[0])
    assert alive == {"encoder": False, "decoder": False}


def test_in_place_activations_only_in_a_model_switched_to_inference(monkeypatch) -> None:
    """The VAE's activations and residual sums are in place only in a model switched to inference, with the
    same output; not switched (training, or a model built by hand) the plain path runs, under torch.no_grad()
    too, and its gradients flow."""
    from latentforge import vae

    calls = []
    silu = F.silu
    monkeypatch.setattr(vae.F, "silu", lambda x, inplace=False: calls.append(inplace) or silu(x, inplace=inplace))
    torch.manual_seed(0)
    model = AutoencoderKL(VAEConfig(base_channels=32, channel_mult=(1, 2), num_res_blocks=1)).eval()
    image = torch.rand(1, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        plain = model.decode(model.encode(image)[0])
    assert calls and not any(calls)
    calls.clear()
    fast = set_inference(model.requires_grad_(False)).decode(model.encode(image)[0])
    assert calls and all(calls)
    torch.testing.assert_close(fast, plain, rtol=0, atol=0)
    calls.clear()
    trained = set_inference(model, False).requires_grad_(True)
    trained.decode(trained.encode(image)[0]).square().mean().backward()
    assert calls and not any(calls)
    assert all(p.grad is not None for p in trained.decoder.parameters())
