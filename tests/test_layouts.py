"""Full-size SD 1.5 and SD 2.1 layouts, on the meta device (no memory).

The judge is diffusers' own single-file converter: the original-layout keys latentforge writes must
convert, through diffusers' code, into exactly the keys and shapes of diffusers' full-size models,
and latentforge must infer the SD 1.5 / SD 2.1 configs from those tensors alone."""

import pytest
import torch

from latentforge import layouts
from latentforge.checkpoints import _infer_config, _split_single_file, openclip_layers_used, single_file_tensors
from latentforge.config import ModelConfig
from latentforge.text_encoder import SD1_TEXT_ENCODER, SD2_TEXT_ENCODER, TextEncoder
from latentforge.unet import SD1_UNET, SD2_UNET, UNet
from latentforge.vae import SD_VAE, AutoencoderKL

import diffusers
import transformers
from diffusers.loaders import single_file_utils as sfu  # noqa: E402

FULL = {
    "sd15": (SD1_UNET, SD1_TEXT_ENCODER, dict(cross_attention_dim=768, attention_head_dim=8, use_linear_projection=False)),
    "sd21": (SD2_UNET, SD2_TEXT_ENCODER, dict(cross_attention_dim=1024, attention_head_dim=[5, 10, 20, 20], use_linear_projection=True)),
}  # fmt: skip


def shapes(sd):
    return {k: tuple(v.shape) for k, v in sd.items()}


def full_parts(unet_config, text_config):
    with torch.device("meta"):
        models = {"unet": UNet(unet_config), "vae": AutoencoderKL(SD_VAE), "text_encoder": TextEncoder(text_config)}
    return {name: model.state_dict() for name, model in models.items()}


@pytest.mark.parametrize("name", sorted(FULL))
def test_full_size_single_file_layout_is_the_original(name):
    unet_config, text_config, unet_kwargs = FULL[name]
    config = ModelConfig(unet=unet_config, vae=SD_VAE, text_encoder=text_config)
    tensors = single_file_tensors(config, full_parts(unet_config, text_config))

    with torch.device("meta"):
        ref_unet = diffusers.UNet2DConditionModel(sample_size=64, **unet_kwargs)
        ref_vae = diffusers.AutoencoderKL(
            block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        )  # fmt: skip
        ref_text = transformers.CLIPTextModel(
            transformers.CLIPTextConfig(
                hidden_size=text_config.width, num_hidden_layers=text_config.layers,
                num_attention_heads=text_config.heads, intermediate_size=text_config.mlp_width,
                hidden_act=text_config.activation,
            )  # fmt: skip
        )
    unet_keys = [k for k in tensors if k.startswith("model.diffusion_model.")]
    converted = sfu.convert_ldm_unet_checkpoint(tensors, dict(ref_unet.config))
    assert shapes(converted) == shapes(ref_unet.state_dict())
    assert len(unet_keys) == len(converted)  # nothing of ours left unconverted

    vae_keys = [k for k in tensors if k.startswith("first_stage_model.")]
    converted = sfu.convert_ldm_vae_checkpoint(tensors, dict(ref_vae.config))
    assert shapes(converted) == shapes(ref_vae.state_dict())
    assert len(vae_keys) == len(converted)

    want = {k.removeprefix("text_model."): v for k, v in shapes(ref_text.state_dict()).items()}
    want.pop("embeddings.position_ids", None)
    if name == "sd15":
        converted = sfu.convert_ldm_clip_checkpoint(tensors)
    else:
        converted = sfu.convert_open_clip_checkpoint(ref_text, tensors)
    got = {k.removeprefix("text_model."): v for k, v in shapes(converted).items()}
    got.pop("embeddings.position_ids", None)
    assert got == want


@pytest.mark.parametrize("name", sorted(FULL))
def test_config_inferred_from_full_size_tensors(name):
    """The version is told from the tensors of a real-layout file that carries no latentforge config."""
    unet_config, text_config, _ = FULL[name]
    config = ModelConfig(unet=unet_config, vae=SD_VAE, text_encoder=text_config)
    tensors = single_file_tensors(config, full_parts(unet_config, text_config))
    if name == "sd21":
        # a released SD 2.1 file holds all 24 ViT-H blocks and the contrastive head besides
        width = text_config.width
        block = {k.replace("resblocks.0.", "resblocks.23."): v for k, v in tensors.items() if ".resblocks.0." in k}
        tensors.update(block)
        tensors["cond_stage_model.model.text_projection"] = torch.empty(width, width, device="meta")
        tensors["cond_stage_model.model.logit_scale"] = torch.empty((), device="meta")
    tensors["model.diffusion_model.betas"] = torch.empty(1000, device="meta")  # schedule buffers are ignored
    tensors["alphas_cumprod"] = torch.empty(1000, device="meta")
    parts, family = _split_single_file(tensors, "model.safetensors")
    assert family == ("sd2" if name == "sd21" else "sd1")
    if family == "sd2":
        parts["text_encoder"] = layouts.text_encoder_from_openclip(
            parts["text_encoder"], openclip_layers_used(parts["text_encoder"])
        )
    inferred = _infer_config(parts, {"global_step": 875000}, family)
    assert inferred.unet == unet_config and inferred.vae == SD_VAE and inferred.text_encoder == text_config
    assert inferred.prediction_type == "epsilon"
    assert inferred.pad_token == ("!" if name == "sd21" else "<|endoftext|>")
    if name == "sd21":  # without the SD 2.x base release's step count, SD 2.x files are 768-v
        assert _infer_config(parts, {}, family).prediction_type == "v_prediction"
