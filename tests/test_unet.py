"""The UNet computes what diffusers' UNet2DConditionModel computes, on the same random weights."""

import pytest
import torch

from latentforge import layouts
from latentforge.unet import SD1_UNET, SD2_UNET, UNet

import diffusers

# tiny versions of the three shapes: SD 1.x (8 heads, conv projections), SD 2.x (64-wide heads
# scaled down to 16, linear projections), and the 9-channel inpainting UNet
TINY = {
    "sd1": dict(attention_head_dim=4, use_linear_projection=False, in_channels=4),
    "sd2": dict(attention_head_dim=[2, 4, 4], use_linear_projection=True, in_channels=4),
    "inpaint": dict(attention_head_dim=4, use_linear_projection=False, in_channels=9),
}


def tiny_diffusers_unet(kind: str, seed: int = 0):
    torch.manual_seed(seed)
    model = diffusers.UNet2DConditionModel(
        sample_size=16,
        out_channels=4,
        block_out_channels=(32, 64, 64),
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=48,
        norm_num_groups=32,
        **TINY[kind],
    ).eval()
    with torch.no_grad():  # move every weight off its init so that no layer can hide behind zeros
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def ours_from(reference) -> UNet:
    config = layouts.unet_config_from_diffusers(dict(reference.config))
    unet = UNet(config).eval()
    unet.load_state_dict(layouts.unet_from_diffusers(reference.state_dict(), config), strict=True)
    return unet


@pytest.mark.parametrize("kind", sorted(TINY))
@pytest.mark.parametrize("size", [(16, 16), (18, 14)])
def test_unet_matches_diffusers(kind, size):
    reference = tiny_diffusers_unet(kind)
    unet = ours_from(reference)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, unet.config.in_channels, *size, generator=g)
    t = torch.tensor([17, 901])
    context = torch.randn(2, 77, 48, generator=g)
    with torch.no_grad():
        want = reference(x, t, encoder_hidden_states=context).sample
        got = unet(x, t, context)
    assert got.shape == want.shape == (2, 4, *size)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_scalar_timestep_is_broadcast():
    reference = tiny_diffusers_unet("sd1")
    unet = ours_from(reference)
    x = torch.randn(2, 4, 16, 16)
    context = torch.randn(2, 77, 48)
    with torch.no_grad():
        torch.testing.assert_close(unet(x, 500, context), unet(x, torch.tensor([500, 500]), context))


@pytest.mark.parametrize("ours, hub_config", [(SD1_UNET, "sd15"), (SD2_UNET, "sd21")])
def test_full_size_keys_and_shapes_match_diffusers(ours, hub_config):
    """Full SD 1.5 / 2.1 UNets on the meta device: the key tables cover every weight, none extra."""
    full = {
        "sd15": dict(sample_size=64, cross_attention_dim=768, attention_head_dim=8, use_linear_projection=False),
        "sd21": dict(sample_size=64, cross_attention_dim=1024, attention_head_dim=[5, 10, 20, 20], use_linear_projection=True),
    }[hub_config]
    with torch.device("meta"):
        reference = diffusers.UNet2DConditionModel(**full)
        unet = UNet(ours)
    assert layouts.unet_config_from_diffusers(dict(reference.config)) == ours
    theirs = {k: v.shape for k, v in reference.state_dict().items()}
    mine = {k: v.shape for k, v in unet.state_dict().items()}
    converted = {k: v.shape for k, v in layouts.unet_to_diffusers(unet.state_dict(), ours).items()}
    assert converted == theirs
    assert {k: v.shape for k, v in layouts.unet_from_diffusers(reference.state_dict(), ours).items()} == mine


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_feed_forward_in_chunks_is_the_whole_feed_forward(monkeypatch, dtype):
    """Switched to inference, the feed-forward goes FEED_FORWARD_ROWS tokens at a time (partial last chunk
    here); each token's result is what the one-call path gives. Not switched (training, or a model built by
    hand), it is one call, under torch.no_grad() too, and its gradients flow."""
    from latentforge import unet
    from latentforge.inference import set_inference

    torch.manual_seed(0)
    ff = unet.FeedForward(16).to(dtype)
    x = torch.randn(2, 37, 16, dtype=dtype)
    monkeypatch.setattr(unet, "FEED_FORWARD_ROWS", 10)
    calls = []
    ff.net.register_forward_hook(lambda module, inputs, output: calls.append(tuple(inputs[0].shape)))
    with torch.no_grad():
        ff(x)
    assert calls == [(2, 37, 16)]  # not switched: one call although no graph is recorded
    chunked = set_inference(ff.requires_grad_(False))(x)
    assert calls[1:] == [(10, 16)] * 7 + [(4, 16)]
    whole = set_inference(ff, False).requires_grad_(True)(x)  # training: one call
    whole.sum().backward()
    assert calls[-1] == (2, 37, 16) and ff.net[0].proj.weight.grad is not None
    # float64: equal but for the GEMM's summation order; bfloat16: a rounding of the outputs (~1e-2 here)
    tolerance = {} if dtype == torch.float64 else {"rtol": 0, "atol": 1e-2}
    torch.testing.assert_close(chunked, whole.detach(), **tolerance)
