"""The model-family seam: a Conditioner turns prompts into a Cond (context, and an added vector for the
families that have one); a UNet takes the vector exactly when its config says so (its equality with
diffusers' `text_time` embedding is in tests/test_unet_sdxl.py)."""

import dataclasses

import pytest
import torch

import latentforge
from latentforge import layouts
from latentforge.conditioning import ClipConditioner, Cond
from latentforge.prompts import encode_prompts
from latentforge.unet import UNet

import diffusers

POOLED, TIME_DIM = 16, 8  # the tiny stand-ins of SDXL's 1280-wide pooled text and 256-wide size embeddings


def tiny_text_time_unet():
    """A diffusers UNet with SDXL's added conditioning ("text_time": pooled text + six size numbers)."""
    torch.manual_seed(0)
    model = diffusers.UNet2DConditionModel(
        sample_size=16,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=24,
        attention_head_dim=4,
        addition_embed_type="text_time",
        addition_time_embed_dim=TIME_DIM,
        projection_class_embeddings_input_dim=POOLED + 6 * TIME_DIM,
    ).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def test_unet_refuses_a_missing_or_unexpected_vector():
    reference = tiny_text_time_unet()
    base = layouts.unet_config_from_diffusers({**reference.config, "addition_embed_type": None})
    x, t, context = torch.zeros(1, 4, 8, 8), torch.tensor([1]), torch.zeros(1, 77, 24)
    with pytest.raises(ValueError, match="takes a 64-wide added vector"):
        UNet(dataclasses.replace(base, adm_in_channels=64))(x, t, context)
    with pytest.raises(ValueError, match="takes no added vector"):
        UNet(base)(x, t, context, torch.zeros(1, 64))


def test_cond_cat_joins_batches_and_refuses_a_mix():
    a = Cond(torch.ones(1, 77, 8), torch.ones(1, 4))
    b = Cond(torch.zeros(1, 77, 8), torch.zeros(1, 4))
    both = Cond.cat([a, b])
    assert both.context.shape == (2, 77, 8) and both.vector.tolist() == [[1] * 4, [0] * 4]
    assert Cond.cat([Cond(torch.ones(1, 77, 8)), Cond(torch.ones(1, 77, 8))]).vector is None
    with pytest.raises(ValueError, match="with and without"):
        Cond.cat([a, Cond(torch.zeros(1, 77, 8))])


@pytest.fixture(scope="module")
def shipped():
    return latentforge.load(dtype="float32", device="cpu")


def test_clip_conditioner_is_the_prompt_encoder_with_both_prompts_in_one_batch(shipped):
    conditioner = shipped.conditioner
    assert isinstance(conditioner, ClipConditioner)
    long_prompt = ", ".join(["a red circle"] * 40)  # two chunks: the negative is padded to two as well
    cond, uncond = conditioner(long_prompt, "blurry", clip_skip=1, size=(64, 64))
    want = encode_prompts(conditioner.text_encoder, conditioner.tokenizer, [long_prompt, "blurry"])
    assert cond.vector is None and uncond.vector is None
    assert torch.equal(cond.context, want[:1]) and torch.equal(uncond.context, want[1:])
    alone, none = conditioner(long_prompt, None, clip_skip=1, size=(64, 64))
    assert none is None and torch.equal(alone.context, want[:1])
    assert set(shipped.models()) == {"text_encoder", "unet", "vae"}


def test_generate_asks_the_conditioner_with_the_image_size_and_no_negative_at_scale_1(shipped, monkeypatch):
    calls = []
    real = shipped.conditioner

    class Recording:
        embeddings = {}  # the Conditioner protocol's: none given

        def __call__(self, prompt, negative, *, clip_skip, size):
            calls.append((prompt, negative, clip_skip, size))
            return real(prompt, negative, clip_skip=clip_skip, size=size)

        def models(self):
            return real.models()

    monkeypatch.setattr(shipped, "conditioner", Recording())
    shipped.generate("a red circle", "blue", steps=2, cfg_scale=1, seed=1, width=64, height=32)
    shipped.generate("a red circle", "blue", steps=2, cfg_scale=5, seed=1, width=32, height=64)
    assert calls == [("a red circle", None, 1, (32, 64)), ("a red circle", "blue", 1, (64, 32))]
