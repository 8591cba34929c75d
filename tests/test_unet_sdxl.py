"""SDXL's UNet and the distilled ones (SSD-1B, Vega): transformer depths per block, a middle block without a
transformer, and the added vector, against diffusers' UNet2DConditionModel on the same random weights; the
diffusers config written back builds the same model; the config is inferred from LDM-named tensors; and the
full-size SDXL base and refiner layouts (meta device) are diffusers' keys and shapes, by our table and by
diffusers' own single-file converter."""

import dataclasses
import json

import pytest
import torch

from latentforge import layouts
from latentforge.config import ModelConfig
from latentforge.text_encoder import SD1_TEXT_ENCODER, SDXL_TEXT_ENCODER_2
from latentforge.unet import SD1_UNET, UNet, UNetConfig, timestep_embedding
from latentforge.vae import SD_VAE

import diffusers
from diffusers.loaders import single_file_utils as sfu

POOLED, TIME_DIM = 16, 8  # tiny stand-ins of SDXL's 1280-wide pooled text and 256-wide size embeddings
DOWN = ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D")
UP = ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D")

# diffusers options of each tiny UNet, and the per-block depths our config must read from them
TINY = {
    # SDXL's shape: no attention at the first level, deeper transformers further down, the middle as the last level
    "sdxl": (
        dict(transformer_layers_per_block=[1, 2, 3]),
        ((0, 0, 2, 2, 3, 3), 3, (3, 3, 3, 2, 2, 2, 0, 0, 0)),
    ),
    # SSD-1B's kind: depths per block, an up path that is not the mirror, a middle block of one ResNet block
    "ssd1b": (
        dict(
            transformer_layers_per_block=[1, [1, 2], [2, 1]],
            reverse_transformer_layers_per_block=[[3, 1, 2], [2, 1, 1], [0, 0, 0]],
            mid_block_type="UNetMidBlock2D",
        ),
        ((0, 0, 1, 2, 2, 1), 0, (3, 1, 2, 2, 1, 1, 0, 0, 0)),
    ),
    # depths per block under a middle transformer (diffusers gives it the last level's first depth)
    "per_block": (
        dict(
            transformer_layers_per_block=[0, [2, 1], [3, 1]],
            reverse_transformer_layers_per_block=[[1, 1, 3], [1, 2, 2], [0, 0, 0]],
        ),
        ((0, 0, 2, 1, 3, 1), 3, (1, 1, 3, 1, 2, 2, 0, 0, 0)),
    ),
}  # fmt: skip


def tiny_diffusers_unet(kind: str):
    torch.manual_seed(0)
    model = diffusers.UNet2DConditionModel(
        sample_size=16,
        block_out_channels=(32, 64, 64),
        layers_per_block=2,
        down_block_types=DOWN,
        up_block_types=UP,
        attention_head_dim=[2, 4, 4],  # 16-wide heads: SDXL's 64 scaled down
        use_linear_projection=True,
        cross_attention_dim=48,
        addition_embed_type="text_time",
        addition_time_embed_dim=TIME_DIM,
        projection_class_embeddings_input_dim=POOLED + 6 * TIME_DIM,
        **TINY[kind][0],
    ).eval()
    with torch.no_grad():  # move every weight off its init so that no layer can hide behind zeros
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def shapes(sd):
    return {k: tuple(v.shape) for k, v in sd.items()}


@pytest.mark.parametrize("kind", sorted(TINY))
def test_tiny_unet_matches_diffusers(kind):
    reference = tiny_diffusers_unet(kind)
    config = layouts.unet_config_from_diffusers(dict(reference.config))
    assert (config.input_depths, config.middle_depth, config.output_depths) == TINY[kind][1]
    assert (config.attention_levels, config.head_dim, config.num_heads) == ((1, 2), 16, None)
    assert (config.adm_in_channels, config.size_embed_dim) == (POOLED + 6 * TIME_DIM, TIME_DIM)
    unet = UNet(config).eval()
    unet.load_state_dict(layouts.unet_from_diffusers(reference.state_dict(), config), strict=True)

    g = torch.Generator().manual_seed(1)
    x, context = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 77, 48, generator=g)
    pooled = torch.randn(2, POOLED, generator=g)
    time_ids = torch.tensor([[1024.0, 1024, 0, 0, 1024, 1024], [768, 1344, 64, 0, 1024, 1024]])
    t = torch.tensor([5, 870])
    vector = torch.cat([pooled, timestep_embedding(time_ids.flatten(), TIME_DIM).reshape(2, -1)], dim=1)
    with torch.no_grad():
        added = {"text_embeds": pooled, "time_ids": time_ids}
        want = reference(x, t, encoder_hidden_states=context, added_cond_kwargs=added).sample
        got = unet(x, t, context, vector)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind", sorted(TINY))
def test_tiny_config_written_back_builds_the_same_model(kind):
    reference = tiny_diffusers_unet(kind)
    config = layouts.unet_config_from_diffusers(dict(reference.config))
    written = layouts.unet_config_to_diffusers(config)
    json.dumps(written)  # a config.json
    with torch.device("meta"):
        rebuilt = diffusers.UNet2DConditionModel(**{k: v for k, v in written.items() if not k.startswith("_")})
    assert shapes(rebuilt.state_dict()) == shapes(reference.state_dict())
    assert layouts.unet_config_from_diffusers(written) == config


@pytest.mark.parametrize("kind", sorted(TINY))
def test_tiny_config_inferred_from_ldm_tensors(kind):
    reference = tiny_diffusers_unet(kind)
    config = layouts.unet_config_from_diffusers(dict(reference.config))
    with torch.device("meta"):
        sd = UNet(config).state_dict()
    # our LDM names are what diffusers' own single-file converter reads into this model
    converted = sfu.convert_ldm_unet_checkpoint({"model.diffusion_model." + k: v for k, v in sd.items()}, reference.config)
    assert shapes(converted) == shapes(reference.state_dict())
    inferred = layouts.infer_unet_config(sd, head_dim=16, size_embed_dim=TIME_DIM)
    assert dataclasses.replace(inferred, sample_size=16) == config  # the native size is the family's
    # the heads' width is the caller's: without it, a UNet with an added vector has SDXL's 64-wide heads
    assert layouts.infer_unet_config(sd).head_dim == 64
    assert layouts.infer_unet_config(sd).size_embed_dim == layouts.SDXL_SIZE_EMBED_DIM


# the published diffusers configs (stabilityai/stable-diffusion-xl-base-1.0, -refiner-1.0: unet/config.json)
SDXL_BASE = dict(
    sample_size=128, block_out_channels=[320, 640, 1280], layers_per_block=2, down_block_types=list(DOWN),
    up_block_types=list(UP), transformer_layers_per_block=[1, 2, 10], attention_head_dim=[5, 10, 20],
    use_linear_projection=True, cross_attention_dim=2048, addition_embed_type="text_time",
    addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816, addition_embed_type_num_heads=64,
)  # fmt: skip
SDXL_REFINER = dict(
    sample_size=128, block_out_channels=[384, 768, 1536, 1536], layers_per_block=2,
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    transformer_layers_per_block=4, attention_head_dim=[6, 12, 24, 24], use_linear_projection=True,
    cross_attention_dim=1280, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2560, addition_embed_type_num_heads=64,
)  # fmt: skip
# the same UNets as their published facts: 64-wide heads, depths 2 and 10 (base), 4 (refiner)
SDXL_FACTS = dict(
    num_heads=None, head_dim=64, use_linear_projection=True, num_res_blocks=2, sample_size=128, size_embed_dim=256
)
FULL = {
    "base": (SDXL_BASE, UNetConfig(
        model_channels=320, channel_mult=(1, 2, 4), attention_levels=(1, 2), transformer_depth=10,
        transformer_depth_input=(0, 0, 2, 2, 10, 10), transformer_depth_output=(10, 10, 10, 2, 2, 2, 0, 0, 0),
        context_dim=2048, adm_in_channels=2816, **SDXL_FACTS,
    )),
    "refiner": (SDXL_REFINER, UNetConfig(
        model_channels=384, channel_mult=(1, 2, 4, 4), attention_levels=(1, 2), transformer_depth=4,
        context_dim=1280, adm_in_channels=2560, **SDXL_FACTS,
    )),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(FULL))
def test_full_size_sdxl_layouts_are_diffusers(name):
    published, facts = FULL[name]
    with torch.device("meta"):
        reference = diffusers.UNet2DConditionModel(**published)
        config = layouts.unet_config_from_diffusers(dict(reference.config))
        assert config == facts
        ours = UNet(config).state_dict()
    theirs = shapes(reference.state_dict())
    assert shapes(layouts.unet_to_diffusers(ours, config)) == theirs
    assert shapes(layouts.unet_from_diffusers(reference.state_dict(), config)) == shapes(ours)
    # diffusers' own single-file converter reads our LDM names into its model, nothing missing or left over
    single_file = {"model.diffusion_model." + k: v for k, v in ours.items()}
    converted = sfu.convert_ldm_unet_checkpoint(single_file, dict(reference.config))
    assert shapes(converted) == theirs and len(converted) == len(ours)
    # and the config comes back from the tensors alone (but the native size, which is the family's)
    assert dataclasses.replace(layouts.infer_unet_config(ours), sample_size=128) == config
    # written back: the published fields (0 for the first level, which has no transformer, where SDXL's says 1)
    written = layouts.unet_config_to_diffusers(config)
    added = ("addition_embed_type", "addition_time_embed_dim", "projection_class_embeddings_input_dim")
    assert {k: written[k] for k in added} == {k: published[k] for k in added}
    assert written["transformer_layers_per_block"] == {"base": [0, 2, 10], "refiner": 4}[name]
    assert "reverse_transformer_layers_per_block" not in written
    with torch.device("meta"):
        rebuilt = diffusers.UNet2DConditionModel(**{k: v for k, v in written.items() if not k.startswith("_")})
    assert shapes(rebuilt.state_dict()) == theirs


def test_uniform_depths_keep_their_one_field_and_old_json_loads():
    """SD 1.x/2.x configs read and write transformer_depth alone, as before the per-block fields; a stored
    config without the new fields loads as it did, and one with them goes through JSON unchanged."""
    assert layouts.unet_config_to_diffusers(SD1_UNET)["transformer_layers_per_block"] == 1
    assert (SD1_UNET.input_depths, SD1_UNET.middle_depth) == ((1,) * 6 + (0,) * 2, 1)
    assert SD1_UNET.output_depths == (0,) * 3 + (1,) * 9
    model = ModelConfig(unet=SD1_UNET, vae=SD_VAE, text_encoder=SD1_TEXT_ENCODER)
    stored = json.loads(model.to_json())
    for field in ("transformer_depth_input", "transformer_depth_middle", "transformer_depth_output", "size_embed_dim"):
        del stored["unet"][field]
    assert ModelConfig.from_json(json.dumps(stored)) == model
    sdxl = dataclasses.replace(model, unet=FULL["base"][1], text_encoder_2=SDXL_TEXT_ENCODER_2)
    assert ModelConfig.from_json(sdxl.to_json()).unet == FULL["base"][1]


BASE = FULL["base"][1]
BAD_CONFIGS = {
    "input length": (dict(transformer_depth_input=(0, 2, 2, 10, 10)), "transformer_depth_input has 5 depths"),
    "output length": (dict(transformer_depth_output=(1,) * 6), "transformer_depth_output has 6 depths"),
    "negative": (dict(transformer_depth_input=(0, 0, 2, -2, 10, 10)), "must be a list of whole numbers >= 0"),
    "depth without attention": (
        dict(transformer_depth_input=(1, 0, 2, 2, 10, 10)), "transformer_depth_input[0] is 1 at level 0, which has no"
    ),
    "no depth at attention": (
        dict(transformer_depth_output=(10, 10, 0, 2, 2, 2, 0, 0, 0)), "transformer_depth_output[2] is 0 at level 2"
    ),
    "middle": (dict(transformer_depth_middle=-1), "transformer_depth_middle must be a whole number >= 0, got -1"),
    "size without vector": (dict(adm_in_channels=None), "size_embed_dim is set but there is no added vector"),
    "size zero": (dict(size_embed_dim=0), "size_embed_dim must be a positive whole number, got 0"),
}


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_bad_depths_are_one_line_errors(case):
    change, message = BAD_CONFIGS[case]
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        dataclasses.replace(BASE, **change)


BAD_DIFFUSERS = {
    "addition type": (dict(addition_embed_type="text"), "addition_embed_type='text' is not supported"),
    "per block without reverse": (
        dict(transformer_layers_per_block=[1, [1, 2], 3]), "reverse_transformer_layers_per_block is missing"
    ),
    "zero at attention": (dict(transformer_layers_per_block=[1, 0, 10]), "a transformer of depth 0 at level 1"),
    "reverse length": (
        dict(transformer_layers_per_block=[1, 2, 10], reverse_transformer_layers_per_block=[[10] * 3, [2] * 2, [0]]),
        "each level's depth must be a whole number >= 0 or 3 of them",
    ),
    "no middle block": (dict(mid_block_type=None), "mid_block_type=None is not supported"),
    "text_time without size": (dict(addition_time_embed_dim=None), "the field 'addition_time_embed_dim' is missing"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(BAD_DIFFUSERS))
def test_bad_diffusers_depths_and_added_embeddings_are_refused(case):
    change, message = BAD_DIFFUSERS[case]
    with pytest.raises(ValueError, match=message):
        layouts.unet_config_from_diffusers({**SDXL_BASE, "_class_name": "UNet2DConditionModel", **change})


def test_configs_diffusers_cannot_express_are_refused_when_written():
    with pytest.raises(ValueError, match="needs size_embed_dim"):
        layouts.unet_config_to_diffusers(dataclasses.replace(BASE, size_embed_dim=None))
    with pytest.raises(ValueError, match="a middle transformer of depth 4 under a last level of depth 10"):
        layouts.unet_config_to_diffusers(dataclasses.replace(BASE, transformer_depth_middle=4))
