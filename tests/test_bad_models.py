"""A model whose configs or weights cannot be used fails to load with one line naming the file and the problem
(a CheckpointError), and `latentforge inspect` / `generate` exit with status 2 and that line, never a traceback.

Each case takes the tiny SD 1.x model (a diffusers folder written by diffusers, and the single file latentforge
writes from it, with and without its config metadata) and damages one thing."""

import json
import shutil

import pytest
import torch

import latentforge
from latentforge.checkpoints import CONFIG_METADATA_KEY
from latentforge.cli import main
from latentforge.weightfiles import CheckpointError, read_state_dict, write_safetensors


def assert_refused(path, named, message, capsys):
    """Loading `path` is a one-line CheckpointError naming `named` and saying `message`; so is the CLI's."""
    with pytest.raises(CheckpointError) as caught:
        latentforge.load(path, device="cpu")
    text = str(caught.value)
    assert "\n" not in text and text.startswith(f"{named}: ") and message in text, text
    assert main(["inspect", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [f"latentforge inspect: error: {text}"] and "Traceback" not in err


# ------------------------------------------------------------------------------------------------ diffusers folder

def drop(key):
    return lambda d: d.pop(key)


def put(key, value):
    return lambda d: d.__setitem__(key, value)


CONFIG_CASES = {  # component, change to its config.json, what the error says
    "unet no down_block_types": ("unet", drop("down_block_types"), "the field 'down_block_types' is missing"),
    "unet no levels": ("unet", put("block_out_channels", []), "block_out_channels must be a list of one or more"),
    "unet zero groups": ("unet", put("norm_num_groups", 0), "norm_num_groups must be a positive whole number, got 0"),
    "unet text int": ("unet", put("layers_per_block", "2"), "layers_per_block must be a positive whole number, got '2'"),
    "unet float int": ("unet", put("cross_attention_dim", 128.5), "cross_attention_dim must be a positive whole"),
    "unet negative": ("unet", put("in_channels", -4), "in_channels must be a positive whole number, got -4"),
    "unet float widths": ("unet", put("block_out_channels", [64.0, 128]), "block_out_channels must be a list of"),
    "unet zero heads": ("unet", put("attention_head_dim", [0, 8]), "attention_head_dim must be a list of one or more"),
    "unet heads per level": ("unet", put("attention_head_dim", [1, 2, 3]), "must give each level"),
    "unet level count": ("unet", put("block_out_channels", [64, 128, 256]), "block_out_channels has 3 levels"),
    "unet unknown block": ("unet", put("down_block_types", ["SimpleDownBlock2D", "DownBlock2D"]), "is not supported"),
    "unet upcast text": ("unet", put("upcast_attention", "yes"), "upcast_attention must be true or false"),
    "unet bad flag": ("unet", put("use_linear_projection", 1), "use_linear_projection must be true or false, got 1"),
    "unet UNet2DModel": ("unet", put("_class_name", "UNet2DModel"), "_class_name is 'UNet2DModel', not"),
    "unet ControlNet": ("unet", put("_class_name", "ControlNetModel"), "not the config of a Stable Diffusion UNet"),
    "unet indivisible groups": ("unet", put("norm_num_groups", 48), "not divisible by norm_groups=48"),
    "vae no levels": ("vae", put("block_out_channels", []), "block_out_channels must be a list of one or more"),
    "vae zero latents": ("vae", put("latent_channels", 0), "latent_channels must be a positive whole number, got 0"),
    "vae text scale": ("vae", put("scaling_factor", "0.18"), "scaling_factor must be a number, got '0.18'"),
    "vae zero scale": ("vae", put("scaling_factor", 0), "scaling_factor must be a finite positive number"),
    "vae class": ("vae", put("_class_name", "AutoencoderTiny"), "not the config of a Stable Diffusion VAE"),
    "vae blocks": ("vae", put("down_block_types", ["DownBlock2D"] * 4), "'DownBlock2D' is not supported"),
    "vae no quant conv": ("vae", put("use_quant_conv", False), "use_quant_conv=False is not supported"),
    "text no width": ("text_encoder", drop("hidden_size"), "the field 'hidden_size' is missing"),
    "text zero heads": ("text_encoder", put("num_attention_heads", 0), "num_attention_heads must be a positive"),
    "text activation": ("text_encoder", put("hidden_act", ["gelu"]), "hidden_act must be an activation name"),
    "text unknown activation": ("text_encoder", put("hidden_act", "relu"), "activation 'relu' is unknown"),
    "text eps": ("text_encoder", put("layer_norm_eps", "small"), "layer_norm_eps must be a number, got 'small'"),
    "text vision tower": (
        "text_encoder", put("architectures", ["CLIPVisionModel"]), "architectures is 'CLIPVisionModel', not"
    ),
}


@pytest.fixture
def folder(sd1_folder, tmp_path):
    """A copy of the tiny SD 1.x diffusers folder, to damage."""
    return shutil.copytree(sd1_folder, tmp_path / "model")


def edit_json(path, change):
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize("case", sorted(CONFIG_CASES))
def test_malformed_config_json_names_the_file_and_field(folder, capsys, case):
    component, change, message = CONFIG_CASES[case]
    path = folder / component / "config.json"
    edit_json(path, change)
    assert_refused(folder, path, message, capsys)


@pytest.mark.parametrize(
    "file, change, message",
    [
        ("scheduler/scheduler_config.json", put("prediction_type", "sample"), "prediction_type must be one of"),
        ("scheduler/scheduler_config.json", put("beta_schedule", "cosine"), "beta_schedule must be one of"),
        ("scheduler/scheduler_config.json", put("num_train_timesteps", "1000"), "num_train_timesteps must be an int"),
        ("scheduler/scheduler_config.json", put("beta_end", "0.012"), "beta_end must be a number"),
        ("model_index.json", put("_latentforge_defaults", {"cfg_scale": 1e308}), "cfg_scale must be between 0 and"),
        ("model_index.json", put("_latentforge_defaults", {"sampler": "nope"}), "unknown sampler 'nope'"),
        ("tokenizer/tokenizer_config.json", put("pad_token", 5), "pad_token must be a token such as '!', got 5"),
    ],
)
def test_malformed_pipeline_files_name_the_file(folder, capsys, file, change, message):
    edit_json(folder / file, change)
    assert_refused(folder, folder / file, message, capsys)


def test_tokenizer_longer_than_the_text_encoder_names_its_file(folder, tmp_path, capsys):
    """Windows of 100 tokens for a 77-position text encoder: refused at load (was an error at generation
    that told the user to shorten the prompt)."""
    path = folder / "tokenizer" / "tokenizer_config.json"
    edit_json(path, put("model_max_length", 100))
    with pytest.raises(CheckpointError, match="model_max_length 100 is more than the text encoder's 77 positions"):
        latentforge.load(folder, device="cpu")
    code = main(["generate", "x", "--model", str(folder), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and f"{path}: model_max_length 100" in err[0]


def test_integer_weights_are_refused_at_load(folder, capsys):
    """An integer weight would load and fail at the first step: refused by name instead."""
    path = folder / "unet" / "diffusion_pytorch_model.safetensors"
    tensors, metadata = read_state_dict(path)
    tensors["conv_in.weight"] = tensors["conv_in.weight"].to(torch.int32)
    write_safetensors(tensors, path, metadata=metadata)
    assert_refused(folder, folder, "unet weight 'input_blocks.0.0.weight' is int32, not a floating-point type", capsys)


@pytest.mark.parametrize("upcast", [True, False, None, "absent"])
def test_the_intact_folder_loads_whatever_upcast_attention_says(folder, upcast):
    """The cases above fail for the change they make, not for the copy. upcast_attention (true in SD 2.1's
    UNet config) loads either way: attention here accumulates q k^T in float32, as diffusers' SDPA does."""
    change = drop("upcast_attention") if upcast == "absent" else put("upcast_attention", upcast)
    edit_json(folder / "unet" / "config.json", change)
    assert latentforge.load(folder, device="cpu").config.unet.model_channels == 64


# ------------------------------------------------------------------------------------------------ single files

@pytest.fixture(scope="module")
def single(sd1_folder, tmp_path_factory):
    """(tensors, metadata) of the single file latentforge writes for the tiny model."""
    path = tmp_path_factory.mktemp("single") / "model.safetensors"
    assert main(["convert", str(sd1_folder), str(path)]) == 0
    return read_state_dict(path)


def stored_config(single) -> dict:
    return json.loads(single[1][CONFIG_METADATA_KEY])


def with_config(change):
    def edit(single):
        config = stored_config(single)
        change(config)
        return json.dumps(config)

    return edit


METADATA_CASES = {  # the latentforge_config metadata -> what the error says
    "not JSON": (lambda s: "{unet: 1", "malformed latentforge config: not JSON"),
    "not an object": (lambda s: "[1, 2]", "expected a JSON object, got list"),
    "missing part": (with_config(drop("vae")), "the vae part is missing"),
    "part not an object": (with_config(put("unet", 320)), "unet must be an object of UNetConfig fields, got int"),
    "unknown part": (with_config(put("controlnet", {})), "unknown part 'controlnet'"),
    "unknown field": (with_config(lambda c: c["unet"].update(dropout=0.1)), "unet has no field 'dropout'"),
    "text for int": (
        with_config(lambda c: c["unet"].update(model_channels="64")),
        "UNetConfig.model_channels must be a positive whole number, got '64'",
    ),
    "zero size": (
        with_config(lambda c: c["unet"].update(model_channels=0)),
        "UNetConfig.model_channels must be a positive whole number, got 0",
    ),
    "no levels": (with_config(lambda c: c["vae"].update(channel_mult=[])), "channel_mult must have at least one level"),
    "zero heads": (
        with_config(lambda c: c["text_encoder"].update(heads=0)), "TextEncoderConfig.heads must be a positive int"
    ),
    "float levels": (
        with_config(lambda c: c["unet"].update(channel_mult=[1, 2.5])), "UNetConfig.channel_mult must be a list of whole"
    ),
    "prediction": (with_config(put("prediction_type", "x0")), "prediction_type must be one of"),
    "default guidance": (
        with_config(put("defaults", {"cfg_scale": float("inf")})), "the default cfg_scale must be between 0 and 100"
    ),
}


@pytest.mark.parametrize("case", sorted(METADATA_CASES))
def test_malformed_config_metadata_names_the_file(single, tmp_path, capsys, case):
    edit, message = METADATA_CASES[case]
    tensors, metadata = single
    path = tmp_path / "model.safetensors"
    write_safetensors(tensors, path, metadata={**metadata, CONFIG_METADATA_KEY: edit(single)})
    assert_refused(path, path, message, capsys)


@pytest.mark.parametrize("metadata", [True, False], ids=["latentforge file", "anyone's file"])
@pytest.mark.parametrize(
    "key, make, message",
    [
        ("model.diffusion_model.input_blocks.0.0.weight", lambda t: t[:0], "has shape (0, 4, 3, 3)"),
        ("first_stage_model.encoder.conv_in.weight", lambda t: t[:, :0], "has shape (32, 0, 3, 3)"),
        ("cond_stage_model.transformer.text_model.embeddings.token_embedding.weight", lambda t: t[0], "has shape (128,)"),
        ("first_stage_model.decoder.conv_in.weight", lambda t: t.to(torch.int16), "is int16, not a floating-point"),
        ("model.diffusion_model.out.2.bias", lambda t: t.to(torch.bool), "'out.2.bias' is bool, not a floating-point"),
    ],
    ids=["zero-width unet", "zero-width vae input", "1-d embedding", "int16 weight", "bool weight"],
)
def test_unusable_tensors_name_the_file_and_weight(single, tmp_path, capsys, metadata, key, make, message):
    tensors, stored = single
    path = tmp_path / "model.safetensors"
    write_safetensors({**tensors, key: make(tensors[key])}, path, metadata=stored if metadata else None)
    assert_refused(path, path, message, capsys)


def test_generate_with_a_bad_model_is_one_line(folder, tmp_path, capsys):
    edit_json(folder / "unet" / "config.json", put("block_out_channels", []))
    code = main(["generate", "x", "--model", str(folder), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "unet/config.json: block_out_channels must be a list" in err[0]
