"""Full-size SDXL base and refiner single files, on the meta device (no memory): every key latentforge writes
converts, through diffusers' own single-file converters, into exactly the keys and shapes of diffusers'
full-size models (UNet, VAE, both text towers), nothing left over; and the whole model config comes back
from those tensors alone."""

import dataclasses

import pytest
import torch

from latentforge.checkpoints import _infer_config, _split_single_file, _text_from_openclip, single_file_tensors
from latentforge.config import ModelConfig
from latentforge.text_encoder import SD1_TEXT_ENCODER, SDXL_TEXT_ENCODER_2, TextEncoder
from latentforge.unet import UNet
from latentforge.vae import SD_VAE, AutoencoderKL
from test_unet_sdxl import FULL

import diffusers
import transformers
from diffusers.loaders import single_file_utils as sfu

SDXL_VAE = dataclasses.replace(SD_VAE, scaling_factor=0.13025)


def shapes(sd):
    return {k: tuple(v.shape) for k, v in sd.items()}


def full_model(name: str) -> tuple[ModelConfig, dict, dict]:
    """Our full-size config and meta-device parts, and diffusers' published UNet options."""
    published, unet_config = FULL[name]
    if name == "base":
        config = ModelConfig(unet=unet_config, vae=SDXL_VAE, text_encoder=SD1_TEXT_ENCODER,
                             text_encoder_2=SDXL_TEXT_ENCODER_2, pad_token_2="!")  # fmt: skip
    else:
        config = ModelConfig(unet=unet_config, vae=SDXL_VAE, text_encoder=SDXL_TEXT_ENCODER_2, pad_token="!")
    with torch.device("meta"):
        models = {"unet": UNet(config.unet), "vae": AutoencoderKL(config.vae), "text_encoder": TextEncoder(config.text_encoder)}
        if config.text_encoder_2 is not None:
            models["text_encoder_2"] = TextEncoder(config.text_encoder_2)
    return config, {name: model.state_dict() for name, model in models.items()}, published


def clip_model(config, projection: bool):
    cls = transformers.CLIPTextModelWithProjection if projection else transformers.CLIPTextModel
    extra = dict(projection_dim=config.projection_dim) if projection else {}
    with torch.device("meta"):
        return cls(transformers.CLIPTextConfig(
            hidden_size=config.width, num_hidden_layers=config.layers, num_attention_heads=config.heads,
            intermediate_size=config.mlp_width, hidden_act=config.activation, **extra,
        ))  # fmt: skip


def text_shapes(sd):
    got = {k.removeprefix("text_model."): v for k, v in shapes(sd).items()}
    got.pop("embeddings.position_ids", None)
    return got


@pytest.mark.parametrize("name", sorted(FULL))
def test_full_size_sdxl_single_file_is_the_original_layout(name):
    config, parts, published = full_model(name)
    tensors = single_file_tensors(config, parts)
    prefixes = ("model.diffusion_model.", "first_stage_model.", "conditioner.embedders.")
    assert all(k.startswith(prefixes) for k in tensors)

    with torch.device("meta"):
        ref_unet = diffusers.UNet2DConditionModel(**published)
        ref_vae = diffusers.AutoencoderKL(
            block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        )  # fmt: skip
    unet = sfu.convert_ldm_unet_checkpoint(tensors, dict(ref_unet.config))
    assert shapes(unet) == shapes(ref_unet.state_dict())
    assert len(unet) == sum(k.startswith("model.diffusion_model.") for k in tensors)
    vae = sfu.convert_ldm_vae_checkpoint(tensors, dict(ref_vae.config))
    assert shapes(vae) == shapes(ref_vae.state_dict())
    assert len(vae) == sum(k.startswith("first_stage_model.") for k in tensors)

    big_g = config.text_encoder_2 or config.text_encoder
    prefix = "conditioner.embedders.1.model." if name == "base" else "conditioner.embedders.0.model."
    ref_big_g = clip_model(big_g, projection=True)
    converted = [text_shapes(sfu.convert_open_clip_checkpoint(ref_big_g, tensors, prefix=prefix))]
    assert converted[0] == text_shapes(ref_big_g.state_dict())
    if name == "base":
        ref_vit_l = clip_model(config.text_encoder, projection=False)
        converted.append(text_shapes(sfu.convert_ldm_clip_checkpoint(tensors)))
        assert converted[1] == text_shapes(ref_vit_l.state_dict())
    # every weight of our text towers reached diffusers' (OpenCLIP's stacked q/k/v split again)
    assert sum(map(len, converted)) == sum(len(t) for part, t in parts.items() if part.startswith("text_encoder"))


@pytest.mark.parametrize("name", sorted(FULL))
def test_full_size_sdxl_config_comes_back_from_the_tensors(name):
    config, parts, _ = full_model(name)
    split, family = _split_single_file(single_file_tensors(config, parts), "sdxl.safetensors")
    assert family == {"base": "sdxl", "refiner": "sdxl-refiner"}[name]
    _text_from_openclip(split, family, None)
    inferred = _infer_config(split, {}, family)
    assert inferred == config
    assert inferred.version == {"base": "sdxl", "refiner": "sdxl-refiner"}[name] and inferred.native_size == 1024
    assert {k: shapes(v) for k, v in split.items()} == {k: shapes(v) for k, v in parts.items()}
